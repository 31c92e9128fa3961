//! One command-line convention for all three binaries, as one table run against the real
//! binaries: a missing config file exits 66 naming it, an unknown key or a value of the wrong
//! type exits 78 naming the key and the file, a bad flag exits 64, and with
//! `--log-format json` (or the binary's `*_LOG_FORMAT=json`) every line on stderr is JSON,
//! usage and fatal errors included.

use std::path::Path;
use std::process::Command;

use testkit::bin;

/// One binary and how to point it at a config file.
struct Binary {
    name: &'static str,
    /// The variable that sets the log format.
    format_env: &'static str,
    /// The arguments before `--config FILE`.
    command: &'static [&'static str],
    /// A config file with a value of the wrong type, and the key at fault.
    type_error: (&'static str, &'static str),
}

const BINARIES: &[Binary] = &[
    Binary {
        name: "issuer",
        format_env: "ISSUER_LOG_FORMAT",
        command: &["serve"],
        type_error: ("listen = \"127.0.0.1:1\"\nlifetime = 5\n", "lifetime"),
    },
    Binary {
        name: "rotator",
        format_env: "ROTATOR_LOG_FORMAT",
        command: &["rotate"],
        type_error: ("[backoff]\nmin = \"1s\"\nmax = true\n", "backoff.max"),
    },
    Binary {
        name: "mtls-proxy",
        format_env: "MTLS_PROXY_LOG_FORMAT",
        command: &[],
        type_error: (
            "certs = \"/x\"\nmax_connections = \"many\"\n",
            "max_connections",
        ),
    },
];

/// How the log format is asked for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    /// Nothing: plain text.
    Default,
    /// `--log-format json` before everything else.
    Flag,
    /// The binary's `*_LOG_FORMAT=json`.
    Env,
}

/// One row: what to run and what must come out.
struct Row {
    what: String,
    bin: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, &'static str)>,
    json: bool,
    code: i32,
    /// Each must appear on stderr (in plain text, or in the JSON lines' messages).
    stderr_names: Vec<String>,
    /// Must appear on stdout.
    stdout_has: Option<&'static str>,
}

/// One case of the per-binary part of the table, run in each [`Format`].
struct Case {
    name: &'static str,
    /// The `--config` argument.
    config: String,
    /// Arguments after `--config FILE`.
    extra: &'static [&'static str],
    code: i32,
    /// Each must appear on stderr.
    names: Vec<String>,
}

struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn run(row: &Row) -> Outcome {
    let out = Command::new(bin(row.bin))
        .args(&row.args)
        // Nothing from the test's own environment (RUST_LOG, ROTATOR_*, ...) leaks in.
        .env_clear()
        .envs(row.env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", row.bin));
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The messages of JSON log lines, or why a line is not one.
fn json_messages(stderr: &str) -> Result<String, String> {
    let mut messages = String::new();
    for line in stderr.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("not JSON ({e}): {line:?}"))?;
        let message = v["fields"]["message"]
            .as_str()
            .ok_or_else(|| format!("no fields.message: {line:?}"))?;
        if v["level"].as_str().is_none() {
            return Err(format!("no level: {line:?}"));
        }
        messages.push_str(message);
        messages.push('\n');
    }
    Ok(messages)
}

/// What is wrong with `out` for `row`, if anything.
fn check(row: &Row, out: &Outcome) -> Option<String> {
    if out.code != Some(row.code) {
        return Some(format!("exit {:?}, want {}", out.code, row.code));
    }
    let text = if row.json {
        if out.stderr.is_empty() && !row.stderr_names.is_empty() {
            return Some("nothing on stderr".into());
        }
        match json_messages(&out.stderr) {
            Ok(m) => m,
            Err(e) => return Some(e),
        }
    } else {
        out.stderr.clone()
    };
    if let Some(name) = row.stderr_names.iter().find(|n| !text.contains(n.as_str())) {
        return Some(format!("stderr does not name {name:?}"));
    }
    if let Some(want) = row.stdout_has
        && !out.stdout.contains(want)
    {
        return Some(format!("stdout lacks {want:?}"));
    }
    None
}

fn rows(tmp: &Path) -> Vec<Row> {
    let mut rows = Vec::new();
    for b in BINARIES {
        let missing = tmp.join(format!("{}-missing.toml", b.name));
        let unknown = tmp.join(format!("{}-unknown.toml", b.name));
        std::fs::write(&unknown, "no_such_key = 1\n").unwrap();
        let typed = tmp.join(format!("{}-type.toml", b.name));
        std::fs::write(&typed, b.type_error.0).unwrap();
        let path = |p: &Path| p.display().to_string();
        let case = |name, config: &Path, extra: &'static [&'static str], code, names| Case {
            name,
            config: path(config),
            extra,
            code,
            names,
        };
        let cases = [
            case(
                "missing config file",
                &missing,
                &[],
                66,
                vec![path(&missing)],
            ),
            case(
                "unknown key",
                &unknown,
                &[],
                78,
                vec!["no_such_key".into(), path(&unknown)],
            ),
            case(
                "value of the wrong type",
                &typed,
                &[],
                78,
                vec![b.type_error.1.into(), path(&typed)],
            ),
            case(
                "bad flag",
                &unknown,
                &["--no-such-flag"],
                64,
                vec!["--no-such-flag".into()],
            ),
        ];
        for Case {
            name,
            config,
            extra,
            code,
            names,
        } in cases
        {
            for format in [Format::Default, Format::Flag, Format::Env] {
                let mut args: Vec<String> = Vec::new();
                if format == Format::Flag {
                    args.extend(["--log-format".into(), "json".into()]);
                }
                args.extend(b.command.iter().map(|s| s.to_string()));
                args.extend(["--config".into(), config.clone()]);
                args.extend(extra.iter().map(|s| s.to_string()));
                rows.push(Row {
                    what: format!("{} {name} ({format:?})", b.name),
                    bin: b.name,
                    args,
                    env: if format == Format::Env {
                        vec![(b.format_env, "json")]
                    } else {
                        vec![]
                    },
                    json: format != Format::Default,
                    code,
                    stderr_names: names.clone(),
                    stdout_has: None,
                });
            }
        }
    }

    // `rotator status` keeps its monitoring codes: an unreadable config is 3 UNKNOWN, on stdout.
    let missing = tmp.join("rotator-missing.toml").display().to_string();
    rows.push(Row {
        what: "rotator status with a missing config (json)".into(),
        bin: "rotator",
        args: vec![
            "status".into(),
            "--log-format".into(),
            "json".into(),
            "--config".into(),
            missing.clone(),
        ],
        env: vec![],
        json: true,
        code: 3,
        stderr_names: vec![],
        stdout_has: Some("UNKNOWN"),
    });
    // `issuer serve` needs its CA files at start: a missing one is a missing input too.
    let no_ca = tmp.join("no-ca");
    let issuer_toml = tmp.join("issuer-no-ca.toml");
    std::fs::write(
        &issuer_toml,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[ca]\ndir = \"{}\"\n",
            no_ca.display()
        ),
    )
    .unwrap();
    rows.push(Row {
        what: "issuer serve with a missing CA file (json)".into(),
        bin: "issuer",
        args: vec![
            "serve".into(),
            "--config".into(),
            issuer_toml.display().to_string(),
        ],
        env: vec![("ISSUER_LOG_FORMAT", "json")],
        json: true,
        code: 66,
        stderr_names: vec![no_ca.join("ca.crt").display().to_string()],
        stdout_has: None,
    });
    // Runs that succeed and tell the operator something on stderr: JSON too.
    let ca = tmp.join("ca").display().to_string();
    rows.push(Row {
        what: "issuer init (json)".into(),
        bin: "issuer",
        args: vec![
            "--log-format".into(),
            "json".into(),
            "init".into(),
            "--dir".into(),
            ca.clone(),
        ],
        env: vec![],
        json: true,
        code: 0,
        stderr_names: vec![format!("wrote {ca}")],
        stdout_has: None,
    });
    let boot = tmp.join("bootstrap").display().to_string();
    rows.push(Row {
        what: "rotator linkerd-bootstrap (json)".into(),
        bin: "rotator",
        args: vec![
            "linkerd-bootstrap".into(),
            "--dir".into(),
            boot.clone(),
            "--identity".into(),
            "web.apps.serviceaccount.identity.linkerd.cluster.local".into(),
        ],
        env: vec![("ROTATOR_LOG_FORMAT", "json")],
        json: true,
        code: 0,
        stderr_names: vec![format!("wrote {boot}")],
        stdout_has: None,
    });
    // The issuer's old `--log-json` still works, as a deprecated spelling.
    rows.push(Row {
        what: "issuer --log-json (deprecated) with a missing config".into(),
        bin: "issuer",
        args: vec![
            "serve".into(),
            "--log-json".into(),
            "--config".into(),
            missing.clone(),
        ],
        env: vec![],
        json: true,
        code: 66,
        stderr_names: vec![missing, "--log-json is deprecated".into()],
        stdout_has: None,
    });
    rows
}

#[test]
fn every_binary_follows_one_exit_code_and_log_format_convention() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = rows(tmp.path());
    let mut failures = Vec::new();
    for row in &rows {
        let out = run(row);
        if let Some(problem) = check(row, &out) {
            failures.push(format!(
                "{}: {problem}\n  args: {:?}\n  stderr: {}\n  stdout: {}",
                row.what, row.args, out.stderr, out.stdout
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}
