//! What an operator sees when setting the product up by hand: the example configs spell out
//! every key, `--help` names the defaults, and the logs are plain text that name addresses
//! and backoff deadlines without Rust `Option` noise or terminal colour codes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use proxy_lib::clock::{Clock, SystemClock};
use proxy_lib::identity::Identity;
use proxy_lib::test_util::{TestPki, write_data_dir};
use testkit::{ChildGuard, bin, free_port, wait_for};

const ID: &str = "legacy-database.external-services.serviceaccount.identity.linkerd.cluster.local";

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

/// `(section, key)` of every `key = value` line in a TOML example, commented out or not
/// (`# key = value` documents an optional key); `section` is "" before the first table.
fn documented_keys(toml: &str) -> Vec<(String, String)> {
    let mut section = String::new();
    let mut keys = Vec::new();
    for line in toml.lines() {
        let line = line.trim_start();
        let line = line.strip_prefix('#').unwrap_or(line).trim_start();
        if let Some(rest) = line.strip_prefix('[') {
            if let Some(name) = rest.split(']').next() {
                section = name.trim().to_string();
            }
            continue;
        }
        if let Some((key, _)) = line.split_once('=') {
            let key = key.trim();
            if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                keys.push((section.clone(), key.to_string()));
            }
        }
    }
    keys
}

#[test]
fn rotator_example_spells_out_every_config_key() {
    let text = std::fs::read_to_string(example("rotator.toml")).unwrap();
    let have = documented_keys(&text);
    let missing: Vec<&str> = rotator::config::KEYS
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| {
            let (section, key) = k.split_once('.').unwrap_or(("", k));
            !have.iter().any(|(s, n)| s == section && n == key)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "examples/rotator.toml does not mention {missing:?} (README says it lists every key)"
    );
}

#[test]
fn mtls_proxy_example_spells_out_every_flag_as_a_key() {
    let out = Command::new(bin("mtls-proxy"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    // Every long option except the ones that are not config keys.
    let flags: Vec<String> = help
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l.split_once(", ").map_or(l, |(_, rest)| rest);
            let name = l.strip_prefix("--")?.split([' ', '<']).next()?;
            (!["config", "help", "version", "log-format"].contains(&name))
                .then(|| name.replace('-', "_"))
        })
        .collect();
    assert!(flags.len() >= 10, "parsed too few flags from:\n{help}");
    let text = std::fs::read_to_string(example("mtls-proxy.toml")).unwrap();
    let have = documented_keys(&text);
    let missing: Vec<&String> = flags
        .iter()
        .filter(|f| !have.iter().any(|(s, n)| s.is_empty() && n == *f))
        .collect();
    assert!(
        missing.is_empty(),
        "examples/mtls-proxy.toml does not mention {missing:?}"
    );
}

#[test]
fn issuer_serve_help_names_the_defaults() {
    let out = Command::new(bin("issuer"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    // clap wraps to the terminal width: compare with single spaces.
    let help = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for default in ["127.0.0.1:8080", "127.0.0.1:9990", "24h", "1h", "20s"] {
        assert!(help.contains(default), "no {default} in:\n{help}");
    }
    // min_lifetime is about the issuer cert's remaining life, not the requested leaf.
    assert!(
        help.contains("issuer cert has less than this left"),
        "{help}"
    );
}

fn assert_plain(what: &str, log: &str) {
    assert!(
        !log.contains('\u{1b}'),
        "{what} wrote terminal colour codes into a non-terminal log:\n{log}"
    );
    assert!(
        !log.contains("Some(") && !log.contains("=None"),
        "{what} logged a Rust Option:\n{log}"
    );
}

#[test]
fn issuer_and_mtls_proxy_logs_are_plain_text_naming_the_addresses() {
    let tmp = tempfile::tempdir().unwrap();
    let iss = tmp.path().join("iss");
    let init = Command::new(bin("issuer"))
        .args(["init", "--dir"])
        .arg(&iss)
        .output()
        .unwrap();
    assert!(init.status.success());

    let (port, admin) = (free_port(), free_port());
    let issuer_err = tmp.path().join("issuer.err");
    let issuer = ChildGuard(
        Command::new(bin("issuer"))
            .args(["serve", "--dir"])
            .arg(&iss)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&issuer_err).unwrap())
            .spawn()
            .unwrap(),
    );
    let want = format!("admin listening addr=127.0.0.1:{admin}");
    let log = wait_for("issuer admin log line", Duration::from_secs(20), || {
        let log = std::fs::read_to_string(&issuer_err).ok()?;
        log.contains(&want).then_some(log)
    });
    drop(issuer);
    assert_plain("issuer", &log);

    proxy_lib::install_crypto_provider();
    let now = SystemClock.now();
    let pki = TestPki::new(now);
    let certs = tmp.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let leaf = pki.leaf(
        &Identity::parse(ID).unwrap(),
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    write_data_dir(&certs, &leaf);
    let (inbound, padmin) = (free_port(), free_port());
    let pidfile = tmp.path().join("mtls-proxy.pid");
    let proxy_err = tmp.path().join("mtls-proxy.err");
    let proxy = ChildGuard(
        Command::new(bin("mtls-proxy"))
            .arg("--certs")
            .arg(&certs)
            .args(["--inbound", &format!("127.0.0.1:{inbound}=127.0.0.1:1")])
            .args(["--admin", &format!("127.0.0.1:{padmin}")])
            .arg("--pidfile")
            .arg(&pidfile)
            .env_remove("RUST_LOG")
            .env_remove("MTLS_PROXY_LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&proxy_err).unwrap())
            .spawn()
            .unwrap(),
    );
    let log = wait_for(
        "mtls-proxy listening log line",
        Duration::from_secs(20),
        || {
            let log = std::fs::read_to_string(&proxy_err).ok()?;
            log.contains("proxy started").then_some(log)
        },
    );
    drop(proxy);
    assert_plain("mtls-proxy", &log);
    assert!(
        log.contains(&format!("pidfile={}", pidfile.display())),
        "pidfile path not logged as such:\n{log}"
    );
    assert!(
        log.contains(&leaf.leaf.serial),
        "loaded serial not logged:\n{log}"
    );
}

#[test]
fn rotator_daemon_logs_when_it_retries_an_unreachable_issuer() {
    proxy_lib::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let pki = TestPki::new(SystemClock.now());
    let ca = tmp.path().join("ca.crt");
    std::fs::write(&ca, proxy_lib::pem::certs_to_pem(pki.anchors().certs())).unwrap();
    let token = tmp.path().join("token");
    std::fs::write(&token, "not-a-real-token-but-secret\n").unwrap();
    // A port nothing listens on: the issuer is down.
    let dead = free_port();
    let metrics = free_port();
    // What an earlier run of the daemon recorded.
    let dir = tmp.path().join("certs");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(
        dir.join("..rotator-state.json"),
        r#"{"last_success": 1700000000}"#,
    )
    .unwrap();
    let config = tmp.path().join("rotator.toml");
    std::fs::write(
        &config,
        format!(
            "identity = \"{ID}\"\ndir = \"{}\"\ntrust_anchors = \"{}\"\ntoken_file = \"{}\"\n\
             issuer_addr = \"127.0.0.1:{dead}\"\n[backoff]\nmin = \"50ms\"\nmax = \"200ms\"\n\
             [metrics]\nlisten = \"127.0.0.1:{metrics}\"\n",
            dir.display(),
            ca.display(),
            token.display(),
        ),
    )
    .unwrap();
    let mut child = ChildGuard(
        Command::new(bin("rotator"))
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .env_remove("ROTATOR_LOG")
            .env_remove("ROTATOR_LOG_FORMAT")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = child.0.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all);
        all
    });
    // Two failed attempts, each logged with its retry deadline at the default log level.
    wait_for("two failed attempts", Duration::from_secs(20), || {
        let state = std::fs::read_to_string(dir.join("..rotator-state.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&state).ok()?;
        (v["failures"].as_u64()? >= 2).then_some(())
    });
    // The restarted daemon still reports the last success it had recorded.
    let scrape = testkit::http_get(metrics, "/metrics").unwrap().1;
    assert!(
        scrape.contains("rotator_last_success_timestamp_seconds 1700000000"),
        "{scrape}"
    );
    let status = Command::new(bin("rotator"))
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    child.signal(rustix::process::Signal::TERM);
    let _ = child.0.wait();
    let log = reader.join().unwrap();
    assert_plain("rotator", &log);
    assert!(
        log.contains(&format!("cannot reach the issuer at 127.0.0.1:{dead}")),
        "{log}"
    );
    // One line per failed attempt, with the error, the count and the retry deadline.
    for n in 1..=2 {
        let line = log
            .lines()
            .find(|l| l.contains(&format!("failures={n} ")))
            .unwrap_or_else(|| panic!("no line for attempt {n}:\n{log}"));
        assert!(
            line.contains("renewal failed error=cannot reach the issuer")
                && line.contains("retry_at="),
            "no backoff deadline at the default log level: {line}"
        );
    }
    assert!(!log.contains("not-a-real-token"), "token leaked:\n{log}");
    // No cert at all: CRITICAL, with the reason.
    assert_eq!(status.status.code(), Some(2), "{status:?}");
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("cannot reach the issuer"), "{text}");
}

/// The shell block of the README's issuer-CA rotation recipe, adapted to a temp dir: the
/// issuer dir instead of /etc/issuer, `offline` instead of /media/offline, the built binary,
/// and a SIGHUP to `pid` instead of `systemctl reload issuer`.
fn readme_ca_rotation_script(issuer_dir: &Path, offline: &Path, pid: u32) -> String {
    let script = testkit::sh_block_after(&testkit::readme(), "Where the anchor key is mounted:");
    assert!(script.contains("systemctl reload issuer"), "{script}");
    assert!(script.contains("issuer ca new-issuer"), "{script}");
    script
        .replace("/etc/issuer", &issuer_dir.display().to_string())
        .replace("/media/offline", &offline.display().to_string())
        .replace("issuer ca ", &format!("{} ca ", bin("issuer").display()))
        .replace("systemctl reload issuer", &format!("kill -HUP {pid}"))
}

#[test]
fn readme_issuer_ca_rotation_recipe_works() {
    proxy_lib::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let iss = tmp.path().join("iss");
    let ok = |cmd: &mut Command| {
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    ok(Command::new(bin("issuer"))
        .args(["init", "--dir"])
        .arg(&iss));
    let token = tmp.path().join("token");
    ok(Command::new(bin("issuer"))
        .args(["token", "create", "--dir"])
        .arg(&iss)
        .args(["--identity", ID, "--out"])
        .arg(&token));
    let (port, admin) = (free_port(), free_port());
    let issuer_err = tmp.path().join("issuer.err");
    let issuer = ChildGuard(
        Command::new(bin("issuer"))
            .args(["serve", "--dir"])
            .arg(&iss)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&issuer_err).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("issuer to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });

    // Where the anchor key lives: a separate dir (removable media), not the issuer's.
    let offline = tmp.path().join("offline");
    std::fs::create_dir(&offline).unwrap();
    std::fs::rename(iss.join("anchor.key"), offline.join("anchor.key")).unwrap();
    let old_issuer = proxy_lib::pem::read_certs(&iss.join("issuer.crt")).unwrap();
    let script = readme_ca_rotation_script(&iss, &offline, issuer.pid());
    let out = ok(Command::new("sh")
        .args(["-ec", &script])
        .current_dir(&offline));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("ok: the pair loads"), "{shown}");
    let new_issuer = proxy_lib::pem::read_certs(&iss.join("issuer.crt")).unwrap();
    assert_ne!(new_issuer, old_issuer);
    assert!(!iss.join("anchor.key").exists());

    wait_for("the new issuer CA in use", Duration::from_secs(20), || {
        let m = testkit::http_get(admin, "/metrics").unwrap().1;
        m.contains("issuer_ca_reloads_total{result=\"loaded\"}")
            .then_some(())
    });
    let log = std::fs::read_to_string(&issuer_err).unwrap();
    assert!(log.contains("changed=true"), "{log}");

    // A host renews and gets a leaf issued by the new issuer CA.
    let config = tmp.path().join("rotator.toml");
    std::fs::write(
        &config,
        format!(
            "identity = \"{ID}\"\ndir = \"{}\"\ntrust_anchors = \"{}\"\ntoken_file = \"{}\"\n\
             issuer_addr = \"127.0.0.1:{port}\"\n",
            tmp.path().join("certs").display(),
            iss.join("ca.crt").display(),
            token.display(),
        ),
    )
    .unwrap();
    ok(Command::new(bin("rotator"))
        .args(["rotate", "--config"])
        .arg(&config));
    let chain = proxy_lib::pem::read_certs(&tmp.path().join("certs/tls.crt")).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(
        chain[1], new_issuer[0],
        "leaf not issued by the new issuer CA"
    );
    drop(issuer);
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if !testkit::have_tool("systemd-analyze") {
        assert!(
            !testkit::require_interop(),
            "systemd-analyze is missing and REQUIRE_INTEROP=1 (install the systemd package)"
        );
        eprintln!("skipping: systemd-analyze not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The units name /usr/local/bin/*; point them at the binaries built here, which exist.
    let bins = bin("issuer").parent().unwrap().to_path_buf();
    for unit in ["issuer.service", "rotator.service", "mtls-proxy.service"] {
        let text = std::fs::read_to_string(example("systemd").join(unit)).unwrap();
        assert!(text.contains("ExecStart=/usr/local/bin/"), "{unit}");
        let path = tmp.path().join(unit);
        std::fs::write(
            &path,
            text.replace("/usr/local/bin/", &format!("{}/", bins.display())),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains(unit),
            "systemd-analyze verify {unit}: {stderr}"
        );
    }
}

/// The shell block under the README's "Checking the proxy by hand", adapted to a temp dir and
/// the test's ports.
fn readme_proxy_check_script(certs: &Path, inbound: u16, admin: u16) -> String {
    let script = testkit::sh_block_after(&testkit::readme(), "### Checking the proxy by hand");
    for expected in ["/var/lib/mesh-identity", "127.0.0.1:4143", "127.0.0.1:4191"] {
        assert!(script.contains(expected), "{expected} not in {script}");
    }
    script
        .replace("/var/lib/mesh-identity", &certs.display().to_string())
        .replace("127.0.0.1:4143", &format!("127.0.0.1:{inbound}"))
        .replace("127.0.0.1:4191", &format!("127.0.0.1:{admin}"))
}

#[test]
fn readme_openssl_check_of_the_proxy_works() {
    for tool in ["openssl", "curl"] {
        if !testkit::have_tool(tool) {
            assert!(
                !testkit::require_interop(),
                "REQUIRE_INTEROP=1 but {tool} is missing"
            );
            eprintln!("skipping: {tool} not installed");
            return;
        }
    }
    proxy_lib::install_crypto_provider();
    let tmp = testkit::TestDir::new();
    let certs = tmp.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let now = SystemClock.now();
    let pki = TestPki::new(now);
    let id: Identity = ID.parse().unwrap();
    write_data_dir(
        &certs,
        &pki.leaf(
            &id,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        ),
    );
    // The app behind the proxy: accepts and holds the connection until the client leaves.
    let app = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let app_addr = app.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in app.incoming() {
            let Ok(mut conn) = conn else { break };
            std::thread::spawn(move || std::io::copy(&mut conn.try_clone()?, &mut conn));
        }
    });
    let (inbound, admin) = (free_port(), free_port());
    let proxy_log = tmp.path().join("mtls-proxy.log");
    let _proxy = ChildGuard(
        Command::new(bin("mtls-proxy"))
            .arg("--certs")
            .arg(&certs)
            .args(["--inbound", &format!("127.0.0.1:{inbound}={app_addr}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&proxy_log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("the proxy's /ready", Duration::from_secs(30), || {
        testkit::http_get(admin, "/ready")
            .ok()
            .filter(|(code, _)| *code == 200)
    });

    let script = readme_proxy_check_script(&certs, inbound, admin);
    let out = Command::new("sh")
        .args(["-ec", &script])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script}\n{text}");
    assert!(text.contains("Verification: OK"), "{text}");
    assert!(text.contains(&format!("Verified peername: {ID}")), "{text}");
    assert!(
        text.contains(r#"proxy_tls_handshakes_total{direction="inbound",result="ok"} 1"#),
        "the proxy did not accept the client cert:\n{text}"
    );
}

/// Under `umask 000` (a mis-set service manager or shell), nothing `issuer init`, `issuer
/// token create` and `rotator linkerd-bootstrap` create, dirs included, is group- or
/// world-writable: every mode is set explicitly.
#[test]
fn under_umask_000_nothing_created_is_group_or_world_writable() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("made");
    let under_umask_000 = |bin_name: &str, args: &[&std::ffi::OsStr]| {
        let out = Command::new("sh")
            .arg("-c")
            .arg("umask 000; exec \"$0\" \"$@\"")
            .arg(bin(bin_name))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{bin_name} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let iss = root.join("etc/issuer");
    under_umask_000(
        "issuer",
        &["init".as_ref(), "--dir".as_ref(), iss.as_os_str()],
    );
    under_umask_000(
        "issuer",
        &[
            "token".as_ref(),
            "create".as_ref(),
            "--dir".as_ref(),
            iss.as_os_str(),
            "--identity".as_ref(),
            ID.as_ref(),
        ],
    );
    let boot = root.join("var/lib/bootstrap");
    under_umask_000(
        "rotator",
        &[
            "linkerd-bootstrap".as_ref(),
            "--dir".as_ref(),
            boot.as_os_str(),
            "--identity".as_ref(),
            ID.as_ref(),
        ],
    );
    let mut seen = 0;
    let mut stack = vec![root.clone()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
        if !meta.file_type().is_symlink() {
            use std::os::unix::fs::MetadataExt;
            assert_eq!(
                meta.mode() & 0o022,
                0,
                "{} is {:o}",
                p.display(),
                meta.mode() & 0o777
            );
            seen += 1;
        }
    }
    // made, etc, issuer, its files; var, lib, bootstrap, key and CSR.
    assert!(seen >= 10, "only {seen} paths checked");
}
