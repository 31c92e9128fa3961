//! The example systemd units in `examples/systemd/` and the README's "Installing on a host":
//! each unit is hardened (`systemd-analyze security` rates it at most 2.5), names no path a
//! fresh host lacks, and its `ExecStart=` command line starts its binary with the example
//! configs in the layout the README installs (every host path moved into a temp dir, the
//! README's own `issuer init` and `sed` lines run on it), so neither can rot. The README's
//! `cargo install --path` lines must name the packages that hold the binaries the units run.
//! (`systemd-analyze verify` of each unit runs in `operator.rs`.)

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use testkit::{ChildGuard, bin, free_port, http_get, run_ok, wait_for};

const UNITS: [&str; 3] = ["issuer.service", "mtls-proxy.service", "rotator.service"];
/// The highest `systemd-analyze security` exposure level a unit may have.
const MAX_EXPOSURE: f64 = 2.5;
/// Where the README installs the binaries and the units run them from.
const BIN_DIR: &str = "/usr/local/bin/";
/// Host paths a unit, the example configs or the README's commands may name; the tests move
/// them into a temp dir.
const HOST_ROOTS: [&str; 3] = ["/etc/", "/var/lib/", "/run/"];
/// Settings that make systemd create a directory, and where.
const UNIT_DIRS: [(&str, &str); 5] = [
    ("StateDirectory", "/var/lib/"),
    ("RuntimeDirectory", "/run/"),
    ("ConfigurationDirectory", "/etc/"),
    ("CacheDirectory", "/var/cache/"),
    ("LogsDirectory", "/var/log/"),
];

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// Whether `systemd-analyze` can run; a failure, not a skip, under `REQUIRE_INTEROP=1`.
fn have_systemd_analyze() -> bool {
    if testkit::have_tool("systemd-analyze") {
        return true;
    }
    assert!(
        !testkit::require_interop(),
        "systemd-analyze is missing and REQUIRE_INTEROP=1 (install the systemd package)"
    );
    eprintln!("skipping: systemd-analyze not installed");
    false
}

/// The `[Service]` settings of an example unit, in file order (a repeated key keeps each).
struct Unit {
    name: &'static str,
    settings: Vec<(String, String)>,
}

impl Unit {
    fn load(name: &'static str) -> Self {
        let text = std::fs::read_to_string(example("systemd").join(name)).unwrap();
        let mut section = String::new();
        let mut settings = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            assert!(!line.ends_with('\\'), "{name}: continuation lines: {line}");
            if let Some(s) = line.strip_prefix('[') {
                section = s.trim_end_matches(']').to_string();
            } else if section == "Service" {
                let (k, v) = line
                    .split_once('=')
                    .unwrap_or_else(|| panic!("{name}: not Key=value: {line}"));
                settings.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        Self { name, settings }
    }

    /// Every value of `key`.
    fn all(&self, key: &str) -> Vec<&str> {
        self.settings
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value in force for `key` (the last one).
    fn get(&self, key: &str) -> Option<&str> {
        self.all(key).pop()
    }

    /// `ExecStart=` as argv. Our units quote nothing and use no specifiers, which keeps the
    /// split trivial; say so if that changes.
    fn exec_start(&self) -> Vec<String> {
        let line = self
            .get("ExecStart")
            .unwrap_or_else(|| panic!("{}: no ExecStart=", self.name));
        assert!(
            !line.contains(['"', '\'', '%', '$']),
            "{}: ExecStart= with quotes, specifiers or variables: {line}",
            self.name
        );
        line.split_whitespace().map(str::to_string).collect()
    }

    /// The argument after `flag` in `ExecStart=`.
    fn exec_arg(&self, flag: &str) -> String {
        let argv = self.exec_start();
        let i = argv
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{}: ExecStart= has no {flag}", self.name));
        argv[i + 1].clone()
    }

    /// The directories systemd creates for this unit when it starts it, with their modes.
    fn made_dirs(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        for (key, root) in UNIT_DIRS {
            let mode = self
                .get(&format!("{key}Mode"))
                .map_or(0o755, |m| u32::from_str_radix(m, 8).unwrap());
            for names in self.all(key) {
                for name in names.split_whitespace() {
                    out.push((format!("{root}{name}"), mode));
                }
            }
        }
        out
    }
}

fn units() -> Vec<Unit> {
    UNITS.iter().map(|u| Unit::load(u)).collect()
}

#[test]
fn each_unit_is_rated_at_most_2_5_by_systemd_analyze_security() {
    if !have_systemd_analyze() {
        return;
    }
    for unit in UNITS {
        // --threshold counts tenths: the command fails above it, and the test says why.
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(format!("--threshold={}", (MAX_EXPOSURE * 10.0) as u32))
            .arg(example("systemd").join(unit))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let marker = format!("Overall exposure level for {unit}: ");
        let exposure: f64 = stdout
            .lines()
            .find_map(|l| l.split_once(&marker))
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: no exposure level in:\n{stdout}{stderr}"));
        assert!(
            exposure <= MAX_EXPOSURE,
            "{unit}: exposure {exposure} > {MAX_EXPOSURE}:\n{stdout}"
        );
        assert!(
            out.status.success(),
            "systemd-analyze security {unit}: {}\n{stdout}{stderr}",
            out.status
        );
    }
}

#[test]
fn units_start_on_a_fresh_host_and_keep_out_of_each_others_dirs() {
    let units = units();
    for u in &units {
        // A path that must exist when the unit starts would fail it on a host where nothing
        // has run yet: only dirs systemd creates itself (StateDirectory= ...) or '-' paths.
        for key in [
            "ReadWritePaths",
            "ReadOnlyPaths",
            "InaccessiblePaths",
            "ExecPaths",
            "NoExecPaths",
            "BindPaths",
            "BindReadOnlyPaths",
            "WorkingDirectory",
        ] {
            for paths in u.all(key) {
                for p in paths.split_whitespace() {
                    assert!(
                        p.starts_with('-') || p == "~",
                        "{}: {key}={p} must exist before the unit starts; use StateDirectory= \
                         and friends, or a '-' prefix",
                        u.name
                    );
                }
            }
        }
        assert!(
            u.exec_start()[0].starts_with(BIN_DIR),
            "{}: ExecStart= runs a binary from {BIN_DIR}, where the README installs them",
            u.name
        );
        assert_eq!(u.get("CapabilityBoundingSet"), Some(""), "{}", u.name);
    }
    // systemd chowns a unit's StateDirectory= (and the others) to that unit's user: two units
    // naming one would take it from each other at every start.
    let mut owners = std::collections::BTreeMap::new();
    for u in &units {
        for (dir, _) in u.made_dirs() {
            if let Some(other) = owners.insert(dir.clone(), u.name) {
                panic!("{dir} is created by both {other} and {}", u.name);
            }
        }
    }
    // ProtectProc=invisible hides /proc/<pid>/comm of other users' processes, which the
    // pidfile signal hook reads before it signals: the example config must reload another way.
    let rotator = units.iter().find(|u| u.name == "rotator.service").unwrap();
    let env = rotator::config::MapEnv::from_pairs([]);
    let config = rotator::config::load(Some(&example("rotator.toml")), &env).unwrap();
    if rotator.get("ProtectProc") == Some("invisible") {
        assert!(
            config.reload.signal.is_none(),
            "rotator.service hides /proc of other users, but examples/rotator.toml signals by pidfile"
        );
    }
}

/// The README's "Installing on a host" section.
fn readme_install_section() -> String {
    let readme = testkit::readme();
    let start = readme
        .find("## Installing on a host")
        .expect("README: no \"## Installing on a host\"");
    let rest = &readme[start + 3..];
    rest[..rest.find("\n## ").unwrap_or(rest.len())].to_string()
}

/// The shell commands of a README section's code blocks, continuation lines joined.
fn commands(section: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in section.lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        match line.trim().strip_suffix('\\') {
            Some(head) => pending.push_str(head),
            None => {
                pending.push_str(line.trim());
                out.push(std::mem::take(&mut pending));
            }
        }
    }
    out
}

#[test]
fn readme_cargo_install_lines_name_the_packages_that_hold_the_units_binaries() {
    let section = readme_install_section();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    // A cargo run from a test inherits cargo's variables; metadata needs none of them.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CARGO_") {
            cmd.env_remove(k);
        }
    }
    let out = run_ok(
        cmd.args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
            "--offline",
        ])
        .current_dir(&root),
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let root = std::fs::canonicalize(&root).unwrap();
    let mut installed = Vec::new();
    for line in commands(&section)
        .iter()
        .filter(|c| c.starts_with("cargo install"))
    {
        let words: Vec<&str> = line.split('#').next().unwrap().split_whitespace().collect();
        let after = |flag: &str| {
            words
                .iter()
                .position(|w| *w == flag)
                .map(|i| words[i + 1].to_string())
        };
        let path = after("--path").unwrap_or_else(|| panic!("no --path: {line}"));
        assert_eq!(
            after("--root").as_deref().map(|r| format!("{r}/bin/")),
            Some(BIN_DIR.to_string()),
            "{line}: the units run the binaries from {BIN_DIR}"
        );
        let manifest = std::fs::canonicalize(root.join(&path).join("Cargo.toml"))
            .unwrap_or_else(|e| panic!("{line}: {path}/Cargo.toml: {e}"));
        let package = meta["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| Path::new(p["manifest_path"].as_str().unwrap()) == manifest)
            .unwrap_or_else(|| panic!("{line}: {path} is not a workspace package"));
        let bins: Vec<&serde_json::Value> = package["targets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
            .collect();
        let chosen: Vec<&serde_json::Value> = match after("--bin") {
            Some(name) => bins.into_iter().filter(|t| t["name"] == *name).collect(),
            None => bins,
        };
        assert!(!chosen.is_empty(), "{line}: no such binary in {path}");
        let defaults = &package["features"]["default"];
        for target in chosen {
            // `cargo install` builds with default features: a binary needing others fails.
            for f in target["required-features"].as_array().into_iter().flatten() {
                assert!(
                    defaults.as_array().unwrap().contains(f),
                    "{line}: {} needs feature {f}, not a default of {path}",
                    target["name"]
                );
            }
            installed.push(target["name"].as_str().unwrap().to_string());
        }
    }
    installed.sort();
    let mut run: Vec<String> = units()
        .iter()
        .map(|u| u.exec_start()[0].trim_start_matches(BIN_DIR).to_string())
        .collect();
    run.sort();
    assert_eq!(
        installed, run,
        "README installs other binaries than the units run"
    );
}

/// A host's file system moved into a temp dir.
struct Host {
    root: tempfile::TempDir,
}

impl Host {
    /// Where host path `p` lands.
    fn path(&self, p: &str) -> PathBuf {
        assert!(p.starts_with('/'), "not an absolute path: {p}");
        self.root.path().join(&p[1..])
    }

    /// `text` with every host path (one of [`HOST_ROOTS`] where a path may begin) moved here.
    fn rewrite(&self, text: &str) -> String {
        let mut out = String::new();
        let mut rest = text;
        while !rest.is_empty() {
            let at_start = out
                .chars()
                .last()
                .is_none_or(|c| matches!(c, ' ' | '"' | '\'' | '=' | '|'));
            match HOST_ROOTS.iter().find(|r| at_start && rest.starts_with(*r)) {
                Some(r) => {
                    out.push_str(&self.path(r).display().to_string());
                    out.push('/');
                    rest = &rest[r.len()..];
                }
                None => {
                    let c = rest.chars().next().unwrap();
                    out.push(c);
                    rest = &rest[c.len_utf8()..];
                }
            }
        }
        out
    }

    /// Creates what systemd creates when it starts `unit`.
    fn make_unit_dirs(&self, unit: &Unit) {
        for (dir, mode) in unit.made_dirs() {
            let p = self.path(&dir);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
    }

    /// The unit's `ExecStart=` as a command: the binary built here, host paths moved here,
    /// and the small environment systemd gives a service.
    fn command(&self, unit: &Unit) -> Command {
        let argv = unit.exec_start();
        let mut cmd = Command::new(bin(argv[0].trim_start_matches(BIN_DIR)));
        for a in &argv[1..] {
            if a.starts_with('/') {
                cmd.arg(self.path(a));
            } else {
                cmd.arg(a);
            }
        }
        cmd.env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .current_dir(self.root.path())
            .stdin(Stdio::null());
        cmd
    }

    /// Starts `unit` with its output in `<name>.log` here.
    fn start(&self, unit: &Unit, env: &[(&str, &Path)]) -> ChildGuard {
        let log = std::fs::File::create(self.log(unit)).unwrap();
        let mut cmd = self.command(unit);
        cmd.stdout(log.try_clone().unwrap()).stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        ChildGuard(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("{}: {cmd:?}: {e}", unit.name)),
        )
    }

    fn log(&self, unit: &Unit) -> PathBuf {
        self.root.path().join(format!("{}.log", unit.name))
    }

    fn read_log(&self, unit: &Unit) -> String {
        std::fs::read_to_string(self.log(unit)).unwrap_or_default()
    }

    /// [`wait_for`], failing with the logs of every unit started here.
    fn wait_for<T>(&self, what: &str, timeout: Duration, f: impl FnMut() -> Option<T>) -> T {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| wait_for(what, timeout, f)))
            .unwrap_or_else(|_| {
                let logs: Vec<String> = UNITS
                    .map(Unit::load)
                    .iter()
                    .map(|u| format!("--- {}:\n{}", u.name, self.read_log(u)))
                    .collect();
                panic!("timed out waiting for {what}\n{}", logs.join("\n"))
            })
    }

    /// Runs the README's command `line` here: host paths moved, the installed binaries found
    /// on PATH, and `--owner issuer` as the user running the test (chown to anyone else needs
    /// root).
    fn run_readme_line(&self, line: &str) {
        let me = rustix::process::geteuid().as_raw();
        let script = self
            .rewrite(line)
            .replace("--owner issuer", &format!("--owner {me}"));
        let bins = bin("issuer").parent().unwrap().to_path_buf();
        let out = Command::new("sh")
            .args(["-ec", &script])
            .env("PATH", format!("{}:/usr/bin:/bin", bins.display()))
            .current_dir(self.root.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "README: {line}\nran as: {script}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Reads a TOML file.
fn read_toml(p: &Path) -> toml::Table {
    toml::from_str(&std::fs::read_to_string(p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn write_toml(p: &Path, t: &toml::Table) {
    std::fs::write(p, toml::to_string(t).unwrap()).unwrap();
}

/// The table at `key` (created if missing).
fn table<'a>(t: &'a mut toml::Table, key: &str) -> &'a mut toml::Table {
    t.entry(key)
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .unwrap()
}

fn string<'a>(t: &'a toml::Table, key: &str) -> &'a str {
    t.get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("no string {key}"))
}

/// Every string in `t` that is a host path, moved to `host`.
fn move_paths(host: &Host, t: &mut toml::Table) {
    for (_, v) in t.iter_mut() {
        match v {
            toml::Value::String(s) if s.starts_with('/') => {
                *s = host.path(s.as_str()).display().to_string();
            }
            toml::Value::Table(inner) => move_paths(host, inner),
            _ => {}
        }
    }
}

/// `LISTEN=REST` with the listen address replaced.
fn relisten(entry: &toml::Value, listen: &str) -> toml::Value {
    let (_, rest) = entry.as_str().unwrap().split_once('=').unwrap();
    toml::Value::String(format!("{listen}={rest}"))
}

#[test]
fn each_units_command_line_starts_its_binary_in_the_readme_layout() {
    let host = Host {
        root: tempfile::tempdir().unwrap(),
    };
    let [issuer_unit, proxy_unit, rotator_unit] = UNITS.map(Unit::load);
    let section = readme_install_section();
    let readme_lines = commands(&section);
    let readme_line = |prefix: &str| -> Vec<&String> {
        readme_lines
            .iter()
            .filter(|c| c.starts_with(prefix))
            .collect()
    };

    // The issuer's machine: what systemd makes, then the README's init and config edit.
    host.make_unit_dirs(&issuer_unit);
    for line in readme_line("issuer init").into_iter().chain(
        readme_line("sed -i")
            .into_iter()
            .filter(|l| l.contains("/etc/issuer/")),
    ) {
        host.run_readme_line(line);
    }
    let issuer_config = issuer_unit.exec_arg("--config");
    let issuer_toml_path = host.path(&issuer_config);
    let mut issuer_toml = read_toml(&issuer_toml_path);
    assert_eq!(string(&issuer_toml, "listen"), "0.0.0.0:8080");
    // The token store lives in the unit's state dir: the only place it may write.
    let tokens = PathBuf::from(string(table(&mut issuer_toml, "auth"), "tokens"));
    let state_dir = host.path(&format!(
        "/var/lib/{}",
        issuer_unit.get("StateDirectory").unwrap()
    ));
    assert_eq!(tokens.parent(), Some(state_dir.as_path()), "{tokens:?}");
    assert_eq!(
        Path::new(string(table(&mut issuer_toml, "ca"), "dir")),
        issuer_toml_path.parent().unwrap()
    );
    let me = rustix::process::geteuid().as_raw();
    let key = issuer_toml_path.parent().unwrap().join("issuer.key");
    assert_eq!(std::fs::metadata(&key).unwrap().uid(), me);
    // Tests bind loopback only.
    let (issuer_port, issuer_admin) = (free_port(), free_port());
    issuer_toml.insert("listen".into(), format!("127.0.0.1:{issuer_port}").into());
    issuer_toml.insert("admin".into(), format!("127.0.0.1:{issuer_admin}").into());
    write_toml(&issuer_toml_path, &issuer_toml);
    let _issuer = host.start(&issuer_unit, &[]);
    host.wait_for("issuer /ready", Duration::from_secs(30), || {
        http_get(issuer_admin, "/ready")
            .ok()
            .filter(|(c, _)| *c == 200)
    });

    // A token for the example identity, as the README makes it (minus runuser).
    let rotator_config = rotator_unit.exec_arg("--config");
    let mesh = host.path(&rotator_config).parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&mesh).unwrap();
    let example_rotator = read_toml(&example("rotator.toml"));
    let token_file = host.path(string(&example_rotator, "token_file"));
    run_ok(
        Command::new(bin("issuer"))
            .args(["token", "create", "--config"])
            .arg(&issuer_toml_path)
            .args(["--identity", string(&example_rotator, "identity"), "--out"])
            .arg(&token_file),
    );
    assert!(
        tokens.exists(),
        "token store not in {}",
        state_dir.display()
    );
    std::fs::copy(
        issuer_toml_path.parent().unwrap().join("ca.crt"),
        host.path(string(&example_rotator, "trust_anchors")),
    )
    .unwrap();

    // The host: both configs from examples/ where the units read them, the README's edits.
    let proxy_config = proxy_unit.exec_arg("--config");
    std::fs::copy(example("rotator.toml"), host.path(&rotator_config)).unwrap();
    std::fs::copy(example("mtls-proxy.toml"), host.path(&proxy_config)).unwrap();
    for line in readme_line("sed -i")
        .into_iter()
        .filter(|l| l.contains("/etc/mesh/"))
    {
        host.run_readme_line(line);
    }
    let mut proxy_toml = read_toml(&host.path(&proxy_config));
    let mut rotator_toml = read_toml(&host.path(&rotator_config));
    assert_eq!(string(&rotator_toml, "key_group"), "mesh-identity");
    // The examples agree with the units and with each other.
    let cert_dir = format!("/var/lib/{}", rotator_unit.get("StateDirectory").unwrap());
    assert_eq!(string(&rotator_toml, "dir"), cert_dir);
    assert_eq!(string(&proxy_toml, "certs"), cert_dir);
    let pidfile = string(&proxy_toml, "pidfile").to_string();
    assert!(
        pidfile.starts_with(&format!(
            "/run/{}/",
            proxy_unit.get("RuntimeDirectory").unwrap()
        )),
        "{pidfile}"
    );
    assert_eq!(
        string(table(&mut rotator_toml, "reload"), "http"),
        format!("http://{}/reload", string(&proxy_toml, "admin"))
    );
    // Test-only changes: loopback ports, and a group this test is in (mesh-identity is not
    // there): the test's own.
    let (inbound, outbound, proxy_admin, metrics) =
        (free_port(), free_port(), free_port(), free_port());
    move_paths(&host, &mut proxy_toml);
    move_paths(&host, &mut rotator_toml);
    let app = format!("127.0.0.1:{}", free_port());
    proxy_toml.insert(
        "inbound".into(),
        toml::Value::Array(vec![toml::Value::String(format!(
            "127.0.0.1:{inbound}={app}"
        ))]),
    );
    let outbound_entry = relisten(
        &proxy_toml["outbound"].as_array().unwrap()[0],
        &format!("127.0.0.1:{outbound}"),
    );
    proxy_toml.insert("outbound".into(), toml::Value::Array(vec![outbound_entry]));
    proxy_toml.insert("admin".into(), format!("127.0.0.1:{proxy_admin}").into());
    write_toml(&host.path(&proxy_config), &proxy_toml);
    let egid = rustix::process::getegid().as_raw();
    rotator_toml.insert("key_group".into(), egid.to_string().into());
    rotator_toml.insert(
        "issuer_addr".into(),
        format!("127.0.0.1:{issuer_port}").into(),
    );
    table(&mut rotator_toml, "reload").insert(
        "http".into(),
        format!("http://127.0.0.1:{proxy_admin}/reload").into(),
    );
    table(&mut rotator_toml, "verify").insert("addr".into(), format!("127.0.0.1:{inbound}").into());
    table(&mut rotator_toml, "metrics")
        .insert("listen".into(), format!("127.0.0.1:{metrics}").into());
    write_toml(&host.path(&rotator_config), &rotator_toml);

    // Start order as systemd's: the proxy (no cert dir yet), then the rotator.
    host.make_unit_dirs(&proxy_unit);
    let proxy = host.start(&proxy_unit, &[]);
    host.wait_for("mtls-proxy /live", Duration::from_secs(30), || {
        http_get(proxy_admin, "/live")
            .ok()
            .filter(|(c, _)| *c == 200)
    });
    assert_eq!(http_get(proxy_admin, "/ready").ok().map(|r| r.0), Some(503));
    assert_eq!(
        std::fs::read_to_string(host.path(&pidfile)).unwrap().trim(),
        proxy.pid().to_string()
    );
    assert!(!host.path(&cert_dir).exists());

    host.make_unit_dirs(&rotator_unit);
    let notify = host.root.path().join("notify.sock");
    let sock = UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut rotator = host.start(&rotator_unit, &[("NOTIFY_SOCKET", &notify)]);
    let mut buf = [0u8; 4096];
    // Type=notify: READY=1 once the cert is installed, the proxy reloaded and serving it.
    host.wait_for("rotator READY=1", Duration::from_secs(90), || {
        if let Ok(Some(status)) = rotator.0.try_wait() {
            panic!("rotator exited: {status}");
        }
        let n = sock.recv(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n])
            .contains("READY=1")
            .then_some(())
    });
    assert_eq!(
        http_get(proxy_admin, "/ready").ok().map(|r| r.0),
        Some(200),
        "{}",
        host.read_log(&proxy_unit)
    );
    let key = std::fs::metadata(host.path(&cert_dir).join("tls.key")).unwrap();
    assert_eq!((key.mode() & 0o777, key.gid()), (0o640, egid));
    assert!(
        host.read_log(&rotator_unit).contains("reload hook ran"),
        "{}",
        host.read_log(&rotator_unit)
    );
}
