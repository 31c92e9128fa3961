//! End-to-end tests of the `rotator` binary against a real `issuer serve` child process:
//! one-shot rotation and the `..data` layout, the daemon's SIGHUP/hooks/self-renewal,
//! sd_notify READY ordering, the verify step's exit status, `status`, secrets hygiene and
//! `linkerd-bootstrap` accepted by the issuer.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proxy_lib::bundle::CertBundle;
use proxy_lib::certdir::{CA_FILE, CERT_FILE, DATA_LINK, KEY_FILE};
use proxy_lib::clock::{Clock, SystemClock};
use proxy_lib::identity::Identity;
use proxy_lib::test_util::{FakeConsumer, Serve};
use proxy_lib::verify::{TrustAnchors, Usage};
use rustix::process::Signal;
use testkit::{ChildGuard, bin, free_port, wait_for};

const ID: &str = "legacy-database.external-services.serviceaccount.identity.linkerd.cluster.local";

/// A temp dir with an initialised issuer, a token for [`ID`] and (once started) a running
/// `issuer serve`.
struct Rig {
    tmp: tempfile::TempDir,
    port: u16,
    issuer: Option<ChildGuard>,
}

impl Rig {
    fn new() -> Self {
        proxy_lib::install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        let iss = tmp.path().join("iss");
        run_ok(
            Command::new(bin("issuer"))
                .args(["init", "--dir"])
                .arg(&iss),
        );
        run_ok(
            Command::new(bin("issuer"))
                .args(["token", "create", "--dir"])
                .arg(&iss)
                .args(["--identity", ID, "--out"])
                .arg(tmp.path().join("token")),
        );
        Self {
            tmp,
            port: free_port(),
            issuer: None,
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.tmp.path().join(p)
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.path("token"))
            .unwrap()
            .trim()
            .to_string()
    }

    fn anchors(&self) -> TrustAnchors {
        TrustAnchors::read(&self.path("iss/ca.crt")).unwrap()
    }

    /// Starts `issuer serve` with leaves of `lifetime`, and waits until it listens.
    fn serve(&mut self, lifetime: &str) {
        self.serve_with(lifetime, &[]);
    }

    fn serve_with(&mut self, lifetime: &str, extra: &[&str]) {
        let child = Command::new(bin("issuer"))
            .args(["serve", "--dir"])
            .arg(self.path("iss"))
            .args(["--listen", &format!("127.0.0.1:{}", self.port)])
            .args(["--admin", &format!("127.0.0.1:{}", free_port())])
            .args(["--lifetime", lifetime])
            .args(extra)
            .stdout(std::fs::File::create(self.path("issuer.out")).unwrap())
            .stderr(std::fs::File::create(self.path("issuer.err")).unwrap())
            .spawn()
            .expect("spawn issuer serve");
        self.issuer = Some(ChildGuard(child));
        let port = self.port;
        wait_for("issuer to listen", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }

    /// Writes a rotator.toml for cert dir `certs` with `extra` lines; returns its path.
    fn config(&self, certs: &str, extra: &str) -> PathBuf {
        let path = self.path(&format!("{certs}.toml"));
        std::fs::write(
            &path,
            format!(
                "identity = \"{ID}\"\ndir = \"{}\"\ntrust_anchors = \"{}\"\ntoken_file = \"{}\"\n\
                 issuer_addr = \"127.0.0.1:{}\"\n{extra}",
                self.path(certs).display(),
                self.path("iss/ca.crt").display(),
                self.path("token").display(),
                self.port
            ),
        )
        .unwrap();
        path
    }
}

fn rotator() -> Command {
    let mut c = Command::new(bin("rotator"));
    c.env_remove("NOTIFY_SOCKET").env("ROTATOR_LOG", "debug");
    c
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Every file under `dir` (names, link targets and contents), for "nothing changed" checks.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.file_type().is_symlink() {
            out.push((
                name,
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes(),
            ));
        } else if m.is_dir() {
            for (n, b) in snapshot(&p) {
                out.push((format!("{name}/{n}"), b));
            }
        } else {
            out.push((name, std::fs::read(&p).unwrap()));
        }
    }
    out.sort();
    out
}

fn serial(dir: &Path) -> String {
    CertBundle::load_dir(dir).unwrap().0.leaf.serial
}

/// Checks the full `..data` layout of a freshly rotated dir; returns the bundle.
fn check_layout(rig: &Rig, dir: &Path) -> CertBundle {
    let data = std::fs::read_link(dir.join(DATA_LINK)).expect("..data is a symlink");
    let name = data.to_string_lossy().into_owned();
    assert!(rotator::store::is_version_name(&name), "..data -> {name}");
    for f in [CERT_FILE, KEY_FILE, CA_FILE] {
        assert_eq!(
            std::fs::read_link(dir.join(f)).unwrap(),
            Path::new(DATA_LINK).join(f),
            "{f} is a symlink into ..data"
        );
    }
    let version = dir.join(&name);
    assert_eq!(
        std::fs::metadata(version.join(KEY_FILE)).unwrap().mode() & 0o777,
        0o600
    );
    let (b, from) = CertBundle::load_dir(dir).unwrap();
    assert_eq!(from, version);
    b.check(SystemClock.now())
        .expect("key matches, valid, chains");
    // tls.crt = leaf + the issuer's intermediate; ca.crt = the anchors.
    assert_eq!(b.chain.len(), 2);
    let issuer_crt = proxy_lib::pem::read_certs(&rig.path("iss/issuer.crt")).unwrap();
    assert_eq!(b.chain[1], issuer_crt[0]);
    assert_eq!(b.anchors.certs(), rig.anchors().certs());
    for usage in [Usage::Server, Usage::Client] {
        rig.anchors()
            .verify_leaf(&b.chain[0], &b.chain[1..], SystemClock.now(), usage)
            .expect("chains to ca.crt");
    }
    let id = Identity::parse(ID).unwrap();
    assert_eq!(b.leaf.dns_sans, vec![ID.to_string()]);
    assert_eq!(b.leaf.uri_sans, vec![id.spiffe_id()]);
    b
}

#[test]
fn rotate_installs_the_layout_is_idempotent_forces_and_takes_over_plain_files() {
    let mut rig = Rig::new();
    rig.serve("1h");
    let cfg = rig.config("certs", "");
    let dir = rig.path("certs");

    let out = run_ok(rotator().arg("rotate").arg("--config").arg(&cfg));
    assert!(
        text(&out.stdout).starts_with("rotated: serial "),
        "{}",
        text(&out.stdout)
    );
    let first = check_layout(&rig, &dir);
    let log = text(&out.stderr);
    assert!(log.contains("rotated"), "debug logs were captured");
    assert!(!log.contains(&rig.token()), "the token was logged:\n{log}");
    let key_pem = first.key.to_pem();
    let key_b64: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    assert!(
        !log.replace('\n', "").contains(&key_b64[48..]),
        "the key was logged"
    );
    assert!(!text(&out.stdout).contains(&key_b64[48..]));

    // Not due: says so, exits 0, changes nothing.
    let before = snapshot(&dir);
    let out = run_ok(rotator().arg("rotate").arg("--config").arg(&cfg));
    assert!(
        text(&out.stdout).starts_with("not due until 20"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(snapshot(&dir), before, "a not-due rotate changed the dir");

    // --force: a new cert with a new key and a new serial.
    run_ok(rotator().args(["rotate", "--force", "--config"]).arg(&cfg));
    let second = check_layout(&rig, &dir);
    assert_ne!(second.leaf.serial, first.leaf.serial);
    assert_ne!(second.leaf.spki_der, first.leaf.spki_der);
    assert_ne!(second.key.pkcs8_der(), first.key.pkcs8_der());
    assert!(rotator::store::version_dirs(&dir).len() <= 2);

    // status agrees.
    let out = run_ok(rotator().args(["status", "--json", "--config"]).arg(&cfg));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["status"], "OK");
    assert_eq!(j["serial"], second.leaf.serial.as_str());

    // A dir with plain files from an old cron script (a cert from another CA): taken over.
    let legacy = rig.path("legacy");
    std::fs::create_dir(&legacy).unwrap();
    let now = SystemClock.now();
    let old_pki = proxy_lib::test_util::TestPki::new(now);
    let old = old_pki.leaf(
        &Identity::parse(ID).unwrap(),
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    let old_crt = proxy_lib::pem::certs_to_pem(&old.chain);
    std::fs::write(legacy.join(CERT_FILE), &old_crt).unwrap();
    std::fs::write(legacy.join(KEY_FILE), old.key.to_pem().as_bytes()).unwrap();
    std::fs::write(
        legacy.join(CA_FILE),
        proxy_lib::pem::certs_to_pem(old.anchors.certs()),
    )
    .unwrap();
    let cfg2 = rig.config("legacy", "");
    run_ok(rotator().arg("rotate").arg("--config").arg(&cfg2));
    check_layout(&rig, &legacy);
    let aside: Vec<PathBuf> = std::fs::read_dir(&legacy)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(rotator::store::LEGACY_PREFIX)
        })
        .collect();
    assert_eq!(aside.len(), 1, "old files kept aside once");
    assert_eq!(
        std::fs::read_to_string(aside[0].join(CERT_FILE)).unwrap(),
        old_crt
    );
}

/// Counts POST requests on a loopback port (one request per connection).
fn post_counter() -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let count = n.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut r = BufReader::new(s);
            let mut first = String::new();
            if r.read_line(&mut first).is_err() {
                continue;
            }
            let mut line = String::new();
            while r.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            if first.starts_with("POST /reload ") {
                count.fetch_add(1, Ordering::SeqCst);
            }
            let _ = r
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    (addr, n)
}

fn count_lines(p: &Path) -> usize {
    std::fs::read_to_string(p).map_or(0, |s| s.lines().count())
}

fn rotations(log: &Path) -> usize {
    std::fs::read_to_string(log).map_or(0, |s| {
        s.lines()
            .filter(|l| l.contains("rotator::renew: rotated"))
            .count()
    })
}

#[test]
fn daemon_sighup_rotates_once_and_runs_every_hook_once() {
    let mut rig = Rig::new();
    rig.serve("1h");
    // The process to signal: a shell counting SIGHUPs, found through its pidfile. The trap is
    // set before the pidfile is written: a SIGHUP that came before it would kill the shell.
    let count_file = rig.path("hups");
    let pidfile = rig.path("app.pid");
    let script = format!(
        "n=0; trap 'n=$((n+1)); echo $n > {count}' HUP; echo $$ > {pid}; while :; do sleep 0.02; done",
        pid = pidfile.display(),
        count = count_file.display()
    );
    // `env --default-signal=HUP`: a shell that starts with SIGHUP ignored (under nohup, as CI
    // runners may be) cannot trap it, so it is reset to the default before sh starts.
    let _app = ChildGuard(
        Command::new("env")
            .args(["--default-signal=HUP", "sh", "-c", &script])
            .spawn()
            .unwrap(),
    );
    wait_for("app pidfile", Duration::from_secs(5), || {
        std::fs::read_to_string(&pidfile)
            .ok()
            .filter(|s| s.ends_with('\n'))
    });
    let (http, posts) = post_counter();
    let marker = rig.path("exec-marker");
    let cfg = rig.config(
        "certs",
        &format!(
            "[reload]\npidfile = \"{}\"\nprocess_name = \"sh\"\nsignal = \"HUP\"\n\
             http = \"http://{http}/reload\"\nexec = [\"sh\", \"-c\", \"echo x >> {}\"]\n",
            pidfile.display(),
            marker.display()
        ),
    );
    let metrics_port = free_port();
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).unwrap()
            + &format!("[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"),
    )
    .unwrap();
    let log = rig.path("rotator.log");
    let daemon = ChildGuard(
        rotator()
            .args(["run", "--config"])
            .arg(&cfg)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let hups = || {
        std::fs::read_to_string(&count_file)
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(0)
    };
    let counts = || {
        (
            rotations(&log),
            hups(),
            posts.load(Ordering::SeqCst),
            count_lines(&marker),
        )
    };
    for n in 1..=4 {
        if n > 1 {
            daemon.signal(Signal::HUP);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while counts() != (n, n, n, n) {
            assert!(
                std::time::Instant::now() < deadline,
                "rotation {n}: (rotations, SIGHUPs, POSTs, execs) = {:?}; rotator log:\n{}",
                counts(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // And nothing more.
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(counts(), (n, n, n, n), "after rotation {n}");
    }
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(!log_text.contains(&rig.token()), "token logged");
    // The metrics endpoint counts the four rotations and their reloads.
    let (code, body) = testkit::http_get(metrics_port, "/metrics").unwrap();
    assert_eq!(code, 200);
    for want in [
        "rotator_rotations_total{result=\"success\"} 4",
        "rotator_reloads_total{result=\"success\"} 12",
        "rotator_cert_expiration_timestamp_seconds ",
        "rotator_last_success_timestamp_seconds ",
    ] {
        assert!(body.contains(want), "{want} missing from\n{body}");
    }
    let expiry = CertBundle::load_dir(&rig.path("certs"))
        .unwrap()
        .0
        .leaf
        .not_after;
    assert!(body.contains(&format!(
        "rotator_cert_expiration_timestamp_seconds {}",
        proxy_lib::clock::unix_secs(expiry)
    )));
    assert_eq!(testkit::http_get(metrics_port, "/ready").unwrap().0, 200);
    daemon.signal(Signal::TERM);
}

#[test]
fn daemon_renews_ten_second_certs_by_itself() {
    let mut rig = Rig::new();
    rig.serve("10s");
    let marker = rig.path("exec-marker");
    let cfg = rig.config(
        "certs",
        &format!(
            "[reload]\nexec = [\"sh\", \"-c\", \"echo x >> {}\"]\n",
            marker.display()
        ),
    );
    let log = rig.path("rotator.log");
    let _daemon = ChildGuard(
        rotator()
            .args(["run", "--config"])
            .arg(&cfg)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("first rotation", Duration::from_secs(20), || {
        (rotations(&log) >= 1).then_some(())
    });
    let first = serial(&rig.path("certs"));
    wait_for("two renewals within 30 s", Duration::from_secs(30), || {
        (rotations(&log) >= 3).then_some(())
    });
    assert!(count_lines(&marker) >= 3);
    assert_ne!(serial(&rig.path("certs")), first);
    check_layout(&rig, &rig.path("certs"));
}

#[test]
fn ready_is_notified_only_after_the_first_cert_is_installed() {
    let mut rig = Rig::new();
    let sock_path = rig.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let cfg = rig.config("certs", "[backoff]\nmin = \"200ms\"\nmax = \"1s\"\n");
    let daemon = ChildGuard(
        rotator()
            .args(["run", "--config"])
            .arg(&cfg)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "400000")
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut buf = [0u8; 4096];
    let mut recv = || sock.recv(&mut buf).ok().map(|n| text(&buf[..n]));
    // The issuer is not up yet: status messages maybe, READY never.
    for _ in 0..20 {
        if let Some(m) = recv() {
            assert!(!m.contains("READY=1"), "READY before any cert: {m}");
        }
    }
    assert!(CertBundle::load_dir(&rig.path("certs")).is_err());
    rig.serve("1h");
    wait_for("READY=1", Duration::from_secs(20), || {
        recv().filter(|m| m.contains("READY=1"))
    });
    // At the moment READY arrived the cert was already installed.
    check_layout(&rig, &rig.path("certs"));
    let status = wait_for("STATUS=", Duration::from_secs(5), || {
        recv().filter(|m| m.contains("STATUS=next renewal at"))
    });
    assert!(status.contains("STATUS="), "{status}");
    // WATCHDOG_USEC is set: pings at half the interval, also while idle.
    for _ in 0..3 {
        wait_for("WATCHDOG=1", Duration::from_secs(2), || {
            recv().filter(|m| m.contains("WATCHDOG=1"))
        });
    }
    daemon.signal(Signal::TERM);
    wait_for("STOPPING=1", Duration::from_secs(5), || {
        recv().filter(|m| m.contains("STOPPING=1"))
    });
}

/// The fake consumer (nginx-like) of `proxy_lib::test_util` on a runtime of its own, for
/// tests that drive the rotator binary synchronously.
struct TlsListener {
    consumer: FakeConsumer,
    _rt: tokio::runtime::Runtime,
}

impl TlsListener {
    fn start(fixed: Option<CertBundle>, dir: PathBuf, anchors: &TrustAnchors) -> Self {
        Self::start_on("127.0.0.1:0", fixed, dir, anchors)
    }

    /// [`TlsListener::start`] on a given address: serves `fixed`, or the cert dir `dir`.
    fn start_on(
        listen: &str,
        fixed: Option<CertBundle>,
        dir: PathBuf,
        anchors: &TrustAnchors,
    ) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let serve = match fixed {
            Some(b) => Serve::Fixed(Box::new(b)),
            None => Serve::FromDir(dir),
        };
        let consumer = rt.block_on(FakeConsumer::start_on(listen, serve, anchors));
        Self { consumer, _rt: rt }
    }

    fn addr(&self) -> SocketAddr {
        self.consumer.addr
    }

    /// The client certs seen, once there are at least `n`.
    fn seen(&self, n: usize) -> Vec<String> {
        self._rt.block_on(self.consumer.seen(n))
    }
}

#[test]
fn verify_failure_is_reported_in_the_exit_status_and_success_with_the_new_cert() {
    let mut rig = Rig::new();
    rig.serve("1h");
    let dir = rig.path("certs");
    run_ok(
        rotator()
            .arg("rotate")
            .arg("--config")
            .arg(rig.config("certs", "")),
    );
    let old = CertBundle::load_dir(&dir).unwrap().0;
    let marker = rig.path("exec-marker");
    let hooks = format!(
        "[reload]\nexec = [\"sh\", \"-c\", \"echo x >> {}\"]\n",
        marker.display()
    );

    // The listener keeps serving the old cert: the reload is retried, then rotate fails.
    let stuck = TlsListener::start(Some(old.clone()), dir.clone(), &rig.anchors());
    let cfg = rig.config(
        "certs",
        &format!(
            "{hooks}[verify]\naddr = \"{}\"\nattempts = 3\ndelay = \"20ms\"\n",
            stuck.addr()
        ),
    );
    let out = rotator()
        .args(["rotate", "--force", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("verify failed after 3 attempts"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(count_lines(&marker), 3, "the reload ran once per attempt");
    let new = CertBundle::load_dir(&dir).unwrap().0;
    assert_ne!(new.leaf.serial, old.leaf.serial);
    let seen = stuck.seen(3);
    assert!(seen.len() >= 3, "3 handshakes: {seen:?}");
    assert!(
        seen.iter().all(|s| *s == new.leaf.sha256),
        "the new cert is the client cert"
    );
    let out = rotator()
        .args(["status", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "status warns: {}",
        text(&out.stdout)
    );

    // A listener that reloads: verify passes, presenting the new cert.
    let live = TlsListener::start(None, dir.clone(), &rig.anchors());
    let cfg = rig.config(
        "certs",
        &format!(
            "{hooks}[verify]\naddr = \"{}\"\ndelay = \"20ms\"\n",
            live.addr()
        ),
    );
    run_ok(rotator().args(["rotate", "--force", "--config"]).arg(&cfg));
    let newest = CertBundle::load_dir(&dir).unwrap().0;
    let seen = live.seen(1);
    assert_eq!(seen, vec![newest.leaf.sha256.clone()]);
    let out = rotator()
        .args(["status", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
}

#[test]
fn a_rotate_whose_verify_failed_runs_the_hooks_and_verify_again_next_time() {
    let mut rig = Rig::new();
    rig.serve("1h");
    let dir = rig.path("certs");
    let marker = rig.path("exec-marker");
    // Nothing listens at the verify address yet (the proxy is not up).
    let port = free_port();
    let cfg = rig.config(
        "certs",
        &format!(
            "[reload]\nexec = [\"sh\", \"-c\", \"echo x >> {}\"]\n\
             [verify]\naddr = \"127.0.0.1:{port}\"\nattempts = 2\ndelay = \"20ms\"\n",
            marker.display()
        ),
    );
    let rotate = || rotator_with(&["rotate"], &cfg);

    let out = rotate();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("verify failed after 2 attempts"), "{err}");
    assert!(!err.contains("cannot write the state file"), "{err}");
    assert_eq!(count_lines(&marker), 2, "the reload ran once per attempt");
    let installed = check_layout(&rig, &dir);
    let (code, summary) = status_of(&cfg);
    assert_eq!(code, Some(1), "{summary}");
    assert!(
        summary.starts_with("WARNING: renewal failing (1 attempt): new cert"),
        "{summary}"
    );

    // The listener is up now: the next run reloads and verifies the installed cert (it does
    // not print "not due"), fetching no new one.
    let live = TlsListener::start_on(
        &format!("127.0.0.1:{port}"),
        None,
        dir.clone(),
        &rig.anchors(),
    );
    let out = rotate();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(&format!(
            "reloaded and verified: serial {}, installed by an earlier run; next renewal at 20",
            installed.leaf.serial
        )),
        "{stdout}"
    );
    assert_eq!(count_lines(&marker), 3, "the hooks ran again");
    assert_eq!(serial(&dir), installed.leaf.serial, "no new cert");
    let seen = live.seen(1);
    assert_eq!(seen, vec![installed.leaf.sha256.clone()]);
    let (code, summary) = status_of(&cfg);
    assert_eq!(code, Some(0), "{summary}");
    assert!(summary.starts_with("OK: valid until"), "{summary}");

    // Done: from now on the run is "not due" and runs nothing.
    let out = rotate();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with("not due until 20"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(count_lines(&marker), 3);
}

#[test]
fn status_exit_codes_from_the_binary() {
    let rig = Rig::new();
    let cfg = rig.config("certs", "");
    let code = |args: &[&str]| {
        rotator()
            .args(args)
            .output()
            .unwrap()
            .status
            .code()
            .unwrap()
    };
    let c = cfg.to_str().unwrap();
    assert_eq!(
        code(&["status", "--config", c]),
        2,
        "missing cert: CRITICAL"
    );
    let out = rotator()
        .args(["status", "--json", "--config", c])
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["status"], "CRITICAL");
    let bad = rig.path("bad.toml");
    std::fs::write(&bad, "identity = 5\n").unwrap();
    assert_eq!(
        code(&["status", "--config", bad.to_str().unwrap()]),
        3,
        "UNKNOWN"
    );
    assert_eq!(code(&["status", "--nope"]), 64);
    assert_eq!(code(&["frobnicate"]), 64);
    // A missing config file is a missing input (EX_NOINPUT), not a usage error.
    assert_eq!(
        code(&["rotate", "--config", "/nonexistent/rotator.toml"]),
        66
    );
    assert_eq!(code(&["--help"]), 0);
    assert_eq!(code(&["run", "--help"]), 0);
}

#[test]
fn linkerd_bootstrap_output_is_a_p256_key_and_a_csr_the_issuer_accepts() {
    let mut rig = Rig::new();
    rig.serve("1h");
    let dir = rig.path("linkerd-identity");
    run_ok(
        rotator()
            .args(["linkerd-bootstrap", "--identity", ID, "--dir"])
            .arg(&dir),
    );
    let key_path = dir.join("key.p8");
    assert_eq!(std::fs::metadata(&key_path).unwrap().mode() & 0o777, 0o600);
    let key_der = std::fs::read(&key_path).unwrap();
    let pair = rcgen::KeyPair::try_from(key_der.as_slice()).expect("PKCS#8 DER");
    assert!(pair.is_compatible(&rcgen::PKCS_ECDSA_P256_SHA256), "P-256");
    let spki = rcgen::PublicKeyData::subject_public_key_info(&pair);

    let csr = std::fs::read(dir.join("csr.der")).unwrap();
    {
        use x509_parser::prelude::*;
        let (rest, req) = X509CertificationRequest::from_der(&csr).expect("DER CSR");
        assert!(rest.is_empty());
        req.verify_signature().expect("signed by key.p8");
        assert_eq!(
            req.certification_request_info.subject_pki.raw,
            spki.as_slice()
        );
        let cn: Vec<&str> = req
            .certification_request_info
            .subject
            .iter_common_name()
            .map(|c| c.as_str().unwrap())
            .collect();
        assert_eq!(cn, vec![ID]);
        let mut dns = Vec::new();
        for ext in req.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(s) = ext {
                for n in &s.general_names {
                    match n {
                        GeneralName::DNSName(d) => dns.push(d.to_string()),
                        other => panic!("unexpected SAN {other:?}"),
                    }
                }
            }
        }
        assert_eq!(dns, vec![ID.to_string()]);
    }
    // Refuses to overwrite.
    let out = rotator()
        .args(["linkerd-bootstrap", "--identity", ID, "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(&key_path).unwrap(), key_der);

    // The issuer signs it, and the answer validates for that key.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rotator::client::GrpcIssuer::tls(
        rotator::config::parse_host_port(&format!("127.0.0.1:{}", rig.port)).unwrap(),
        proxy_lib::identity::TrustDomain::default()
            .identity_service_name()
            .to_string(),
        rig.anchors(),
        Duration::from_secs(10),
    );
    let token = rotator::client::read_token(&rig.path("token")).unwrap();
    let resp = rt
        .block_on(rotator::client::Issue::certify(
            &client,
            rotator::client::CertifyRequest {
                identity: ID.into(),
                token,
                csr_der: csr.clone(),
            },
        ))
        .expect("the issuer accepts the bootstrap CSR");
    let valid = rotator::validate::validate(
        &resp.leaf,
        &resp.intermediates,
        &Identity::parse(ID).unwrap(),
        &spki,
        &rig.anchors(),
        SystemClock.now(),
        Duration::from_secs(20),
    )
    .expect("a leaf for key.p8");
    assert_eq!(valid.leaf.dns_sans, vec![ID.to_string()]);
    let mut s = String::new();
    let _ = std::fs::File::open(rig.path("issuer.err")).and_then(|mut f| f.read_to_string(&mut s));
    assert!(!s.contains(&rig.token()), "the issuer logged the token");
}

#[test]
fn rotate_over_plaintext_to_a_loopback_issuer() {
    let mut rig = Rig::new();
    rig.serve_with("1h", &["--plaintext"]);
    let cfg = rig.config("certs", "plaintext = true\n");
    run_ok(rotator().arg("rotate").arg("--config").arg(&cfg));
    check_layout(&rig, &rig.path("certs"));
    // Without `plaintext` the TLS client cannot talk to it, and says so.
    let cfg = rig.config("other", "timeout = \"2s\"\n");
    let out = rotator()
        .arg("rotate")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("rotation failed"),
        "{}",
        text(&out.stderr)
    );
    assert!(CertBundle::load_dir(&rig.path("other")).is_err());
}

/// Runs `rotator ARGS --config CFG` to the end.
fn rotator_with(args: &[&str], cfg: &Path) -> Output {
    rotator()
        .args(args)
        .arg("--config")
        .arg(cfg)
        .output()
        .unwrap()
}

/// Runs `rotator status`: its exit code and its first line.
fn status_of(cfg: &Path) -> (Option<i32>, String) {
    let out = rotator_with(&["status"], cfg);
    let first = text(&out.stdout).lines().next().unwrap_or("").to_string();
    (out.status.code(), first)
}

#[test]
fn rotate_fails_clearly_with_a_bad_token_or_no_issuer() {
    let mut rig = Rig::new();
    // Nobody listening yet.
    let cfg = rig.config("certs", "timeout = \"3s\"\n");
    let out = rotator_with(&["rotate"], &cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("cannot reach the issuer"), "{err}");
    assert!(!err.contains("cannot write the state file"), "{err}");
    // `status` on a host that never got a cert says why.
    let (code, summary) = status_of(&cfg);
    assert_eq!(code, Some(2));
    assert!(
        summary.starts_with(
            "CRITICAL: renewal failing (1 attempt): cannot reach the issuer at 127.0.0.1:"
        ),
        "{summary}"
    );
    rig.serve("1h");
    // An issuer_name of another trust domain: named as such, not as unreachable.
    let other = "linkerd-identity.linkerd.serviceaccount.identity.linkerd.other.example";
    let wrong = rig.config("wrong", &format!("issuer_name = \"{other}\"\n"));
    let out = rotator_with(&["rotate"], &wrong);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("does not carry issuer_name {other}"))
            && err.contains("likely a wrong trust domain or issuer_name")
            && !err.contains("cannot reach"),
        "{err}"
    );
    // A token the issuer never issued.
    let bad = "not-a-real-token-0123456789abcdef";
    std::fs::write(rig.path("token"), format!("{bad}\n")).unwrap();
    let out = rotator_with(&["rotate"], &cfg);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("Unauthenticated"), "{err}");
    assert!(!err.contains(bad), "the token was echoed: {err}");
    assert!(
        CertBundle::load_dir(&rig.path("certs")).is_err(),
        "nothing installed"
    );
    let (code, summary) = status_of(&cfg);
    assert_eq!(code, Some(2));
    assert!(
        summary.starts_with(
            "CRITICAL: renewal failing (2 attempts): the issuer refused: Unauthenticated"
        ),
        "{summary}"
    );
}

#[test]
fn sigterm_right_after_sighup_stops_cleanly_with_a_complete_set() {
    let mut rig = Rig::new();
    rig.serve("1h");
    let cfg = rig.config("certs", "");
    let dir = rig.path("certs");
    for i in 0..5 {
        let log = rig.path(&format!("run{i}.log"));
        let mut daemon = ChildGuard(
            rotator()
                .args(["run", "--config"])
                .arg(&cfg)
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        );
        wait_for("daemon ready", Duration::from_secs(20), || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|l| l.contains("rotator::daemon: next renewal at"))
        });
        // Force a rotation and ask it to stop a few ms later (while it may be under way).
        daemon.signal(Signal::HUP);
        std::thread::sleep(Duration::from_millis(3 * i as u64));
        daemon.signal(Signal::TERM);
        let status = wait_for("daemon exit", Duration::from_secs(20), || {
            daemon.0.try_wait().unwrap()
        });
        assert_eq!(status.code(), Some(0), "run {i}");
        check_layout(&rig, &dir);
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            !names.iter().any(|n| n.contains("_tmp.")),
            "leftovers after SIGTERM: {names:?}"
        );
        assert!(rotator::store::version_dirs(&dir).len() <= 2);
    }
}
