//! Reading a TOML config file into a serde type, with errors that name the file, the line
//! and the key at fault (`issuer.toml:3: key `limits.max_request_bytes`: invalid type: ...`),
//! and say which exit code they mean: 66 for a file that cannot be read, 78 for one that is
//! not valid.
//!
//! The three binaries configure themselves the same way (see [`Layers`]): a typed serde
//! struct per binary, every key optional, filled from a TOML file, then the environment,
//! then command-line flags (each layer replacing the keys it sets), every bad key reported
//! together with where its value came from, then validated into the binary's `Config`.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::cli::exit;

pub mod de;
mod layers;

pub use layers::{Env, FieldError, Layers, MapEnv, ProcessEnv, env_name};

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigFileError {
    /// The file is missing or unreadable.
    #[error("cannot read config file {}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not TOML, or a key is unknown or of the wrong type.
    #[error("invalid config file {}{}: {}{message}",
        path.display(),
        line.map(|l| format!(":{l}")).unwrap_or_default(),
        key.as_ref().map(|k| format!("key `{k}`: ")).unwrap_or_default())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key at fault (`limits.max_request_bytes`), when the problem is in one.
        key: Option<String>,
        /// The 1-based line, when known.
        line: Option<usize>,
        /// What was wrong.
        message: String,
    },
}

impl ConfigFileError {
    /// The exit code this error means: 66 (`EX_NOINPUT`) for an unreadable file, 78
    /// (`EX_CONFIG`) for an invalid one.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Unreadable { .. } => exit::NO_INPUT,
            Self::Invalid { .. } => exit::CONFIG,
        }
    }

    /// The key at fault, if the problem is in one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Invalid { key, .. } => key.as_deref(),
            Self::Unreadable { .. } => None,
        }
    }
}

/// Reads a config file as text. Blocks.
pub fn read(path: &Path) -> Result<String, ConfigFileError> {
    std::fs::read_to_string(path).map_err(|source| ConfigFileError::Unreadable {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses TOML `text` read from `path` (which only names the source in errors) into `T`.
/// Unknown keys (with `#[serde(deny_unknown_fields)]`) and values of the wrong type are
/// reported with their full dotted key.
pub fn parse<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigFileError> {
    let de = toml::Deserializer::parse(text).map_err(|e| invalid(text, path, None, &e))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = (key != ".").then_some(key);
        invalid(text, path, key, e.inner())
    })
}

/// Reads and parses a config file. Blocks.
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigFileError> {
    parse(&read(path)?, path)
}

fn invalid(
    text: &str,
    path: &Path,
    key: Option<String>,
    error: &toml::de::Error,
) -> ConfigFileError {
    let line = error.span().map(|span| {
        let end = span.start.min(text.len());
        text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    });
    let (key, message) = name_the_key(key, error.message());
    ConfigFileError::Invalid {
        path: path.to_path_buf(),
        key,
        line,
        message,
    }
}

/// Turns serde's wording for `deny_unknown_fields` ("unknown field `x`, expected ...") into
/// the full dotted key and "unknown key (expected ...)"; `key` is the path serde reported,
/// which usually ends with the unknown key already but may stop at its table.
fn name_the_key(key: Option<String>, message: &str) -> (Option<String>, String) {
    let message = message.trim();
    let unknown = message.strip_prefix("unknown field `").and_then(|rest| {
        let (name, rest) = rest.split_once('`')?;
        Some((name, rest.trim_start_matches(',').trim()))
    });
    match unknown {
        Some((name, rest)) => {
            let full = match key {
                Some(k) if k == name || k.ends_with(&format!(".{name}")) => k,
                Some(table) => format!("{table}.{name}"),
                None => name.to_string(),
            };
            let message = if rest.is_empty() {
                "unknown key".to_string()
            } else {
                format!("unknown key ({rest})")
            };
            (Some(full), message)
        }
        None => (key, message.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Raw {
        name: Option<String>,
        #[serde(default)]
        limits: Limits,
    }

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Limits {
        max: Option<u32>,
        list: Option<Vec<String>>,
    }

    fn err(text: &str) -> ConfigFileError {
        parse::<Raw>(text, Path::new("/etc/x.toml")).unwrap_err()
    }

    #[test]
    fn errors_name_the_file_the_line_and_the_key() {
        let cases = [
            ("name = 5\n", Some("name"), "invalid type"),
            (
                "\n[limits]\nmax = \"lots\"\n",
                Some("limits.max"),
                "expected u32",
            ),
            (
                "[limits]\nlist = [\"a\", 2]\n",
                Some("limits.list[1]"),
                "invalid type",
            ),
            (
                "nmae = \"x\"\n",
                Some("nmae"),
                "unknown key (expected `name` or `limits`)",
            ),
            ("[limits]\nbogus = 1\n", Some("limits.bogus"), "unknown key"),
            ("name = \n", None, ""),
        ];
        for (text, key, needle) in cases {
            let e = err(text);
            assert_eq!(e.key(), key, "{text:?}: {e}");
            assert_eq!(e.exit_code(), exit::CONFIG);
            let shown = e.to_string();
            assert!(
                shown.starts_with("invalid config file /etc/x.toml"),
                "{shown}"
            );
            assert!(shown.contains(needle), "{text:?}: {shown}");
            if let Some(key) = key {
                assert!(shown.contains(&format!("key `{key}`: ")), "{shown}");
            }
            assert!(!shown.contains('\n'), "one line: {shown:?}");
        }
        let ConfigFileError::Invalid { line, .. } = err("\n[limits]\nmax = \"lots\"\n") else {
            unreachable!()
        };
        assert_eq!(line, Some(3));
        assert!(
            err("\n[limits]\nmax = \"lots\"\n")
                .to_string()
                .contains("x.toml:3: ")
        );
    }

    #[test]
    fn a_missing_file_is_unreadable_and_means_66() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("missing.toml");
        let e = load::<Raw>(&path).unwrap_err();
        assert!(matches!(e, ConfigFileError::Unreadable { .. }), "{e}");
        assert_eq!(e.exit_code(), exit::NO_INPUT);
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    }
}
