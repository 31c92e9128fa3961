//! [`Layers`]: one configuration assembled from a TOML file, the environment and command-line
//! flags, in that order of precedence, then deserialized into a binary's typed raw struct with
//! every bad key reported at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{ConfigFileError, name_the_key};

/// A source of environment variables: [`ProcessEnv`] reads the process environment, tests
/// use a [`MapEnv`] so they never mutate it.
pub trait Env {
    /// The value of `name`, if set (and valid UTF-8).
    fn get(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// A map-backed environment for tests.
#[derive(Debug, Clone, Default)]
pub struct MapEnv(pub HashMap<String, String>);

impl MapEnv {
    /// An environment holding the given pairs.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self(
            pairs
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }
}

impl Env for MapEnv {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// The environment variable of a config key: the prefix, then the key upper-cased with dots
/// as underscores (`env_name("ROTATOR_", "backoff.max")` is `ROTATOR_BACKOFF_MAX`).
pub fn env_name(prefix: &str, key: &str) -> String {
    format!("{prefix}{}", key.to_ascii_uppercase().replace('.', "_"))
}

/// One bad key: unknown, of the wrong type, missing or out of range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// The dotted key (`backoff.max`).
    pub key: String,
    /// What was wrong, ending with where the value came from when it came from a layer
    /// (`(from /etc/rotator.toml)`, `(from ROTATOR_BACKOFF_MAX)`, `(from --lifetime)`).
    pub message: String,
}

impl FieldError {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}`: {}", self.key, self.message)
    }
}

/// The layered configuration of one binary, before it is typed.
///
/// Layers are added from the lowest precedence up, and each replaces the keys it sets (a
/// list replaces a list, it does not append):
///
/// 1. the TOML file ([`Layers::file`]);
/// 2. environment variables ([`Layers::env`]): one per key, named by [`env_name`], plus
///    any aliases a binary accepts; a blank value counts as unset;
/// 3. command-line flags ([`Layers::flags`]): a serde struct whose unset fields serialize
///    to nothing.
///
/// [`Layers::extract`] then deserializes the binary's raw struct (every key optional, with
/// `#[serde(deny_unknown_fields)]` and `#[serde(default)]` on sub-tables) key by key, so
/// every unknown key and every value of the wrong type is reported, each with where it came
/// from, and the struct is built from the good keys. Environment values are text: fields
/// that are not text take them through [`super::de`].
#[derive(Debug, Clone, Default)]
pub struct Layers {
    table: toml::Table,
    origins: BTreeMap<String, String>,
    /// Keys whose value is environment text.
    text: BTreeSet<String>,
}

impl Layers {
    /// No layer yet (no config file).
    pub fn new() -> Self {
        Self::default()
    }

    /// The file layer: reads and parses `path`. Unreadable means exit 66; not TOML, 78 (the
    /// error names the file and the line). Blocks.
    pub fn file(path: &Path) -> Result<Self, ConfigFileError> {
        Self::from_toml(&super::read(path)?, path)
    }

    /// The file layer from TOML text read from `path` (which only names it in errors).
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigFileError> {
        let table: toml::Table = super::parse(text, path)?;
        let mut layers = Self::new();
        layers.set_all(table, &|_| path.display().to_string());
        Ok(layers)
    }

    /// Sets the dotted `key` (creating its tables), replacing a lower layer's value.
    pub fn set(&mut self, key: &str, value: impl Into<toml::Value>, origin: impl Into<String>) {
        let mut table = &mut self.table;
        let mut parts = key.split('.').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                table.insert(part.to_string(), value.into());
                break;
            }
            let slot = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !slot.is_table() {
                *slot = toml::Value::Table(toml::Table::new());
            }
            table = slot.as_table_mut().expect("made a table above");
        }
        self.origins.insert(key.to_string(), origin.into());
        self.text.remove(key);
    }

    /// The environment layer: for each `(variable, key)` set to a non-blank value, sets `key`
    /// to the (trimmed) text. Later pairs win over earlier ones. When the key's type refuses
    /// text, the text is read as a TOML value (`600`, `true`, `["a", "b"]`) instead.
    pub fn env<V: AsRef<str>, K: AsRef<str>>(
        &mut self,
        env: &dyn Env,
        vars: impl IntoIterator<Item = (V, K)>,
    ) {
        for (var, key) in vars {
            let var = var.as_ref();
            if let Some(value) = env.get(var).filter(|v| !v.trim().is_empty()) {
                self.set(key.as_ref(), value.trim().to_string(), var);
                self.text.insert(key.as_ref().to_string());
            }
        }
    }

    /// The flags layer: every key `flags` serializes (leave unset flags out with `Option`,
    /// `skip_serializing_if`), each reported as coming from `--the-key`.
    pub fn flags<T: Serialize>(&mut self, flags: &T) -> Result<(), FieldError> {
        let table =
            toml::Table::try_from(flags).map_err(|e| FieldError::new("<flags>", e.to_string()))?;
        self.set_all(table, &|key| format!("--{}", key.replace('_', "-")));
        Ok(())
    }

    fn set_all(&mut self, table: toml::Table, origin: &dyn Fn(&str) -> String) {
        let mut leaves = Vec::new();
        flatten("", table, &mut leaves);
        for (key, value) in leaves {
            let from = origin(&key);
            self.set(&key, value, from);
        }
    }

    /// The value of the dotted `key`, if a layer set it.
    pub fn get(&self, key: &str) -> Option<&toml::Value> {
        let (tables, last) = match key.rsplit_once('.') {
            Some((tables, last)) => (Some(tables), last),
            None => (None, key),
        };
        let mut table = &self.table;
        for part in tables.into_iter().flat_map(|t| t.split('.')) {
            table = table.get(part)?.as_table()?;
        }
        table.get(last)
    }

    /// Where the dotted `key`'s value came from: the file, an environment variable or a flag.
    pub fn origin(&self, key: &str) -> Option<&str> {
        self.origins.get(key).map(String::as_str)
    }

    /// Environment text read as a TOML value, for a key whose type is not text.
    fn as_toml(&self, key: &str, value: &toml::Value) -> Option<toml::Value> {
        let text = value.as_str().filter(|_| self.text.contains(key))?;
        let mut table: toml::Table = toml::from_str(&format!("value = {text}")).ok()?;
        table.remove("value")
    }

    /// Deserializes `T` key by key: every unknown key and every value `T` refuses is
    /// reported (with where it came from), and `T` is built from the other keys.
    pub fn extract<T: DeserializeOwned + Default>(&self) -> (T, Vec<FieldError>) {
        let mut leaves = Vec::new();
        flatten("", self.table.clone(), &mut leaves);
        let mut good = Self::new();
        let mut errors = Vec::new();
        for (key, value) in leaves {
            let origin = self.origin(&key).unwrap_or("<default>").to_string();
            let check = |value: &toml::Value| {
                let mut alone = Self::new();
                alone.set(&key, value.clone(), "");
                typed::<T>(alone.table).map(|_| ())
            };
            let Some((path, message)) = check(&value).err() else {
                good.set(&key, value, origin);
                continue;
            };
            if let Some(typed) = self.as_toml(&key, &value).filter(|v| check(v).is_ok()) {
                good.set(&key, typed, origin);
                continue;
            }
            let (named, message) = name_the_key(Some(path), &message);
            // An unknown key is named by serde; any other error is about this leaf.
            let key = match named {
                Some(named) if message.starts_with("unknown key") => named,
                _ => key,
            };
            errors.push(FieldError::new(key, format!("{message} (from {origin})")));
        }
        match typed::<T>(good.table) {
            Ok(t) => (t, errors),
            Err((path, message)) => {
                errors.push(FieldError::new(path, message));
                (T::default(), errors)
            }
        }
    }
}

fn typed<T: DeserializeOwned>(table: toml::Table) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        (path, e.into_inner().message().to_string())
    })
}

/// Every leaf of `table` (a value that is not a table) with its dotted key.
fn flatten(prefix: &str, table: toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in table {
        let key = if prefix.is_empty() {
            k
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) if !t.is_empty() => flatten(&key, t, out),
            v => out.push((key, v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[derive(Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        name: Option<String>,
        #[serde(default, deserialize_with = "crate::config_file::de::number")]
        count: Option<u32>,
        #[serde(
            default,
            with = "humantime_serde",
            skip_serializing_if = "Option::is_none"
        )]
        wait: Option<Duration>,
        #[serde(default, skip_serializing_if = "Sub::is_empty")]
        sub: Sub,
    }

    #[derive(Debug, Default, PartialEq, serde::Deserialize, serde::Serialize)]
    #[serde(deny_unknown_fields)]
    struct Sub {
        #[serde(default, deserialize_with = "crate::config_file::de::switch")]
        on: Option<bool>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        list: Vec<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    }

    impl Sub {
        fn is_empty(&self) -> bool {
            self == &Sub::default()
        }
    }

    #[test]
    fn file_then_environment_then_flags_each_replacing_what_it_sets() {
        let mut layers = Layers::from_toml(
            "name = \"file\"\ncount = 1\nwait = \"1s\"\n[sub]\nlist = [\"a\", \"b\"]\non = false\n",
            Path::new("x.toml"),
        )
        .unwrap();
        let env = MapEnv::from_pairs([
            ("X_COUNT", " 2 "),
            ("X_SUB_ON", "yes"),
            ("X_NAME", " "),
            ("X_SUB_LIMIT", "7"),
        ]);
        layers.env(
            &env,
            ["name", "count", "sub.on", "sub.limit"].map(|k| (env_name("X_", k), k)),
        );
        let flags = Raw {
            wait: Some(Duration::from_secs(3)),
            sub: Sub {
                list: vec!["c".into()],
                ..Sub::default()
            },
            ..Raw::default()
        };
        layers.flags(&flags).unwrap();
        let (raw, errors) = layers.extract::<Raw>();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            raw,
            Raw {
                name: Some("file".into()),
                count: Some(2),
                wait: Some(Duration::from_secs(3)),
                sub: Sub {
                    on: Some(true),
                    list: vec!["c".into()],
                    limit: Some(7),
                },
            }
        );
        assert_eq!(layers.origin("name"), Some("x.toml"));
        assert_eq!(layers.origin("count"), Some("X_COUNT"));
        assert_eq!(layers.origin("sub.list"), Some("--sub.list"));
        assert_eq!(layers.origin("wait"), Some("--wait"));
        assert_eq!(layers.get("sub.on"), Some(&toml::Value::from("yes")));

        // Environment text is read as TOML when the key's type is not text; the file's
        // values are taken as written.
        let mut layers = Layers::from_toml("[sub]\nlimit = \"7\"\n", Path::new("x.toml")).unwrap();
        let env = MapEnv::from_pairs([("X_NAME", "5"), ("X_SUB_LIST", "[\"a\", \"b\"]")]);
        layers.env(&env, [("X_NAME", "name"), ("X_SUB_LIST", "sub.list")]);
        let (raw, errors) = layers.extract::<Raw>();
        assert_eq!(raw.name.as_deref(), Some("5"));
        assert_eq!(raw.sub.list, ["a", "b"]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].key, "sub.limit");
    }

    #[test]
    fn every_bad_key_is_reported_with_its_origin_and_the_rest_is_kept() {
        let mut layers = Layers::from_toml(
            "name = 5\nwait = \"soon\"\nbogus = 1\n[sub]\nlist = \"a\"\nextra = true\n[nope]\nx = 1\n",
            Path::new("/etc/x.toml"),
        )
        .unwrap();
        layers.env(
            &MapEnv::from_pairs([("X_COUNT", "many")]),
            [("X_COUNT", "count")],
        );
        layers.set("sub.on", true, "test");
        let (raw, errors) = layers.extract::<Raw>();
        assert_eq!(raw.sub.on, Some(true));
        let keys: Vec<&str> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "bogus",
                "count",
                "name",
                "nope",
                "sub.extra",
                "sub.list",
                "wait"
            ]
        );
        for e in &errors {
            let from = if e.key == "count" {
                "(from X_COUNT)"
            } else {
                "(from /etc/x.toml)"
            };
            assert!(e.message.ends_with(from), "{e}");
            assert!(e.to_string().starts_with(&format!("key `{}`: ", e.key)));
        }
        assert!(
            errors[0].message.starts_with("unknown key (expected"),
            "{}",
            errors[0]
        );
        assert!(errors[1].message.contains("\"many\""), "{}", errors[1]);
    }
}
