//! Field deserializers for values that may arrive as text. An environment variable is always
//! text, so a number, a switch or an argv set from the environment is parsed from it, while
//! the file may give the same key natively. Use them as
//! `#[serde(default, deserialize_with = "proxy_lib::config_file::de::number")]` on an
//! `Option` field; durations take `#[serde(default, with = "humantime_serde")]`.

use std::fmt::Display;
use std::str::FromStr;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};

/// A number given natively or as text (`renew_at = 0.7`, `ROTATOR_RENEW_AT=0.7`).
pub fn number<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr + DeserializeOwned,
{
    match toml::Value::deserialize(d)? {
        toml::Value::String(s) => s
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| D::Error::custom(format!("expected a number, got {s:?}"))),
        v @ (toml::Value::Integer(_) | toml::Value::Float(_)) => T::deserialize(v)
            .map(Some)
            .map_err(|e| D::Error::custom(e.message())),
        other => Err(D::Error::custom(format!(
            "expected a number, got {}",
            describe(&other)
        ))),
    }
}

/// A value written as text and parsed with its `FromStr` (an identity, a trust domain, a
/// `host:port`, a signal name); the error is `FromStr`'s.
pub fn parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: Display,
{
    match toml::Value::deserialize(d)? {
        toml::Value::String(s) => s.trim().parse().map(Some).map_err(D::Error::custom),
        other => Err(D::Error::custom(format!(
            "expected text, got {}",
            describe(&other)
        ))),
    }
}

/// A switch: `true`/`false`, or as text `true`, `1`, `yes` / `false`, `0`, `no` (any case).
pub fn switch<'de, D>(d: D) -> Result<Option<bool>, D::Error>
where
    D: Deserializer<'de>,
{
    match toml::Value::deserialize(d)? {
        toml::Value::Boolean(b) => Ok(Some(b)),
        toml::Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(Some(true)),
            "false" | "0" | "no" => Ok(Some(false)),
            _ => Err(D::Error::custom(format!(
                "expected true or false, got {s:?}"
            ))),
        },
        other => Err(D::Error::custom(format!(
            "expected true or false, got {}",
            describe(&other)
        ))),
    }
}

/// A command to run: an array of strings, or as text an array (`["a", "b"]`, TOML or
/// JSON) or whitespace-separated words. The program must be named.
pub fn argv<'de, D>(d: D) -> Result<Option<Vec<String>>, D::Error>
where
    D: Deserializer<'de>,
{
    let value = match toml::Value::deserialize(d)? {
        toml::Value::String(s) if s.trim_start().starts_with('[') => {
            let mut table: toml::Table =
                toml::from_str(&format!("argv = {}", s.trim())).map_err(|e| {
                    D::Error::custom(format!("not an array of strings: {}", e.message()))
                })?;
            table
                .remove("argv")
                .unwrap_or(toml::Value::Array(Vec::new()))
        }
        toml::Value::String(s) => toml::Value::Array(
            s.split_whitespace()
                .map(|w| toml::Value::from(w.to_string()))
                .collect(),
        ),
        other => other,
    };
    let argv = match &value {
        toml::Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>(),
        _ => None,
    }
    .ok_or_else(|| {
        D::Error::custom(format!(
            "expected an array of strings, got {}",
            describe(&value)
        ))
    })?;
    match argv.first() {
        Some(program) if !program.is_empty() => Ok(Some(argv)),
        _ => Err(D::Error::custom("must name a program to run")),
    }
}

/// A value as the operator wrote it: text quoted, anything else as TOML.
fn describe(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => format!("{s:?}"),
        toml::Value::Table(_) => "a table".into(),
        toml::Value::Datetime(d) => format!("the date-time {d}"),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Raw {
        #[serde(default, deserialize_with = "number")]
        n: Option<f64>,
        #[serde(default, deserialize_with = "parsed")]
        addr: Option<std::net::SocketAddr>,
        #[serde(default, deserialize_with = "switch")]
        on: Option<bool>,
        #[serde(default, deserialize_with = "argv")]
        exec: Option<Vec<String>>,
    }

    fn raw(text: &str) -> Result<Raw, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| e.message().to_string())
    }

    #[test]
    fn values_are_taken_natively_or_from_text() {
        let r = raw("n = 1\naddr = \"127.0.0.1:80\"\non = \"YES\"\nexec = \"a  b\"\n").unwrap();
        assert_eq!(r.n, Some(1.0));
        assert_eq!(r.addr.unwrap().port(), 80);
        assert_eq!(r.on, Some(true));
        assert_eq!(r.exec.unwrap(), ["a", "b"]);
        let r = raw("n = \" 0.5 \"\non = false\nexec = '[\"x\", \"y z\"]'\n").unwrap();
        assert_eq!(r.n, Some(0.5));
        assert_eq!(r.on, Some(false));
        assert_eq!(r.exec.unwrap(), ["x", "y z"]);
        assert_eq!(raw("exec = [\"p\"]\n").unwrap().exec.unwrap(), ["p"]);
    }

    #[test]
    fn refusals_say_what_was_expected_and_what_was_found() {
        for (text, want) in [
            ("n = \"x\"", "expected a number, got \"x\""),
            ("n = true", "expected a number, got true"),
            ("addr = 5", "expected text, got 5"),
            ("addr = \"nope\"", "invalid socket address"),
            ("on = \"maybe\"", "expected true or false, got \"maybe\""),
            ("exec = [\"a\", 1]", "expected an array of strings"),
            ("exec = []", "must name a program"),
            ("exec = '[\"a\",'", "not an array of strings"),
        ] {
            let e = raw(text).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
