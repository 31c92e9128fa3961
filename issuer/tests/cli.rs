//! Child-process tests of the `issuer` binary: init, tokens, serve exit paths, CA rotation by
//! SIGHUP and by file replacement, and what ends up in its output.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use proxy_lib::cert::CertInfo;
use proxy_lib::clock::{Clock, SystemClock};
use proxy_lib::verify::{TrustAnchors, Usage};
use tonic::Code;

const EXAMPLE_ID: &str =
    "legacy-database.external-services.serviceaccount.identity.linkerd.example.org";

fn issuer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_issuer"))
}

fn run(args: &[&str]) -> (i32, String, String) {
    let out = issuer().args(args).output().expect("run issuer");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn init(dir: &Path, extra: &[&str]) {
    let mut args = vec!["init", "--dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (code, _, err) = run(&args);
    assert_eq!(code, 0, "init failed: {err}");
}

fn token(dir: &Path, identity: &str) -> String {
    let (code, out, err) = run(&[
        "token",
        "create",
        "--dir",
        dir.to_str().unwrap(),
        "--identity",
        identity,
    ]);
    assert_eq!(code, 0, "token create failed: {err}");
    out.trim().to_string()
}

/// A running `issuer serve`, killed on drop, with its stdout and stderr captured.
struct Served {
    child: Child,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn capture(mut r: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

impl Served {
    fn start(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = issuer();
        cmd.args(["serve", "--dir", dir.to_str().unwrap()])
            .args(["--listen", &addr.to_string(), "--admin", &admin.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn issuer serve");
        let out = capture(child.stdout.take().unwrap());
        let err = capture(child.stderr.take().unwrap());
        Self {
            child,
            out,
            err,
            addr,
            admin,
        }
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("issuer exited early ({status}): {}", self.stderr());
            }
            if tokio::net::TcpStream::connect(self.admin).await.is_ok()
                && http_get(self.admin, "/ready").await.0 == 200
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "issuer never became ready: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, sig).unwrap();
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    /// SIGTERM and wait for a clean exit (all output flushed).
    fn stop(&mut self) {
        self.signal(rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "issuer exit status {status}: {}",
                    self.stderr()
                );
                break;
            }
            assert!(Instant::now() < deadline, "issuer did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100)); // let the reader threads drain
    }
}

// Acceptance 1: init writes the documented files with keys 0600; openssl verifies the issuer
// against ca.crt; a second init refuses and changes nothing.
#[test]
fn init_writes_the_ca_and_refuses_a_second_run() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ca");
    init(&dir, &[]);
    let names = [
        "ca.crt",
        "anchor.key",
        "issuer.crt",
        "issuer.key",
        "issuer.toml",
    ];
    let snapshot = |dir: &Path| {
        names
            .iter()
            .map(|n| {
                let m = std::fs::metadata(dir.join(n)).unwrap();
                (std::fs::read(dir.join(n)).unwrap(), m.ino(), m.mtime_nsec())
            })
            .collect::<Vec<_>>()
    };
    let before = snapshot(&dir);
    for key in ["anchor.key", "issuer.key"] {
        assert_eq!(
            std::fs::metadata(dir.join(key)).unwrap().mode() & 0o777,
            0o600,
            "{key}"
        );
    }
    if openssl_available() {
        let (ok, out) = openssl(&dir, &["verify", "-CAfile", "ca.crt", "issuer.crt"]);
        assert!(ok, "openssl verify: {out}");
        let (ok, text) = openssl(&dir, &["x509", "-noout", "-text", "-in", "issuer.crt"]);
        assert!(ok);
        assert!(text.contains("CA:TRUE, pathlen:0"), "{text}");
        assert!(text.contains("Certificate Sign"), "{text}");
    }
    let (code, _, err) = run(&["init", "--dir", dir.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(snapshot(&dir), before);
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), names.len());
}

// `ca sign-bundle --configmap` also prints the trust-roots ConfigMap, both keys holding the
// exact bytes written to the files, as YAML kubectl applies.
#[test]
fn sign_bundle_prints_the_trust_roots_configmap() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ca");
    init(&dir, &[]);
    let out = d.path().join("signed");
    let (code, stdout, err) = run(&[
        "ca",
        "sign-bundle",
        "--anchor-key",
        dir.join("anchor.key").to_str().unwrap(),
        "--bundle",
        dir.join("ca.crt").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--configmap",
        "roots",
        "--namespace",
        "mesh",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("wrote"), "{err}");
    let cm: serde_json::Value = serde_saphyr::from_str(&stdout).unwrap();
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["name"], "roots");
    assert_eq!(cm["metadata"]["namespace"], "mesh");
    let file = |n: &str| std::fs::read_to_string(out.join(n)).unwrap();
    assert_eq!(cm["data"]["ca-bundle.crt"], file("ca.crt").as_str());
    assert_eq!(cm["data"]["ca-bundle.crt.sig"], file("ca.crt.sig").as_str());
    // --namespace alone is a usage error
    let (code, _, _) = run(&[
        "ca",
        "sign-bundle",
        "--anchor-key",
        "k",
        "--bundle",
        "b",
        "--namespace",
        "mesh",
    ]);
    assert_eq!(code, 64);
}

// `init --owner` with an unknown user or group is a usage error naming it, and writes nothing.
#[test]
fn init_owner_names_an_unknown_user_or_group_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ca");
    for (owner, needle) in [
        ("no-such-user-here", "no user named \"no-such-user-here\""),
        ("root:no-such-group", "no group named \"no-such-group\""),
    ] {
        let (code, _, err) = run(&["init", "--dir", dir.to_str().unwrap(), "--owner", owner]);
        assert_eq!(code, 64, "{err}");
        assert!(err.contains(needle) && err.contains("--owner"), "{err}");
        assert!(!dir.exists());
    }
}

// Usage errors exit 64; help exits 0; a bad config value is reported with its name.
#[test]
fn usage_errors_exit_64() {
    assert_eq!(run(&["--help"]).0, 0);
    assert_eq!(run(&["--version"]).0, 0);
    assert_eq!(run(&["serve"]).0, 64);
    assert_eq!(run(&["frobnicate"]).0, 64);
    assert_eq!(run(&["serve", "--dir", "/x", "--lifetime", "soon"]).0, 64);
    assert_eq!(run(&["token", "create", "--dir", "/x"]).0, 64);
    let d = tempfile::tempdir().unwrap();
    init(d.path(), &[]);
    let (code, _, err) = run(&[
        "serve",
        "--dir",
        d.path().to_str().unwrap(),
        "--plaintext",
        "--listen",
        "0.0.0.0:1",
    ]);
    assert_eq!(code, 78);
    assert!(err.contains("loopback"), "{err}");
}

// Acceptance 7 (last part): serve with a missing CA file exits non-zero naming the file.
#[test]
fn serve_with_missing_ca_files_names_the_file() {
    for missing in ["ca.crt", "issuer.crt", "issuer.key"] {
        let d = tempfile::tempdir().unwrap();
        init(d.path(), &[]);
        std::fs::remove_file(d.path().join(missing)).unwrap();
        let port = free_port().to_string();
        let admin = free_port().to_string();
        let (code, _, err) = run(&[
            "serve",
            "--dir",
            d.path().to_str().unwrap(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ]);
        assert_ne!(code, 0, "{missing}");
        assert!(err.contains(missing), "{missing}: {err}");
    }
}

// Acceptance 1 (trust domain) + token create output: the trust domain given at init is what
// token create and serve use; the token is alone on stdout, or 0600 in --out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_domain_from_init_drives_token_create_and_serve() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ca");
    init(&dir, &["--trust-domain", "example.org"]);
    let dirs = dir.to_str().unwrap();

    let (code, out, err) = run(&["token", "create", "--dir", dirs, "--identity", ID]);
    assert_ne!(code, 0);
    assert!(out.is_empty());
    assert!(err.contains("outside the trust domain"), "{err}");

    let (code, out, err) = run(&["token", "create", "--dir", dirs, "--identity", EXAMPLE_ID]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.len(), 70, "stdout must hold only the token: {out:?}");
    let hex = out
        .trim()
        .strip_prefix("l5dh_")
        .expect("new tokens carry the l5dh_ prefix");
    assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    assert!(err.contains("valid until revoked"), "{err}");
    let tok = out.trim().to_string();

    let out_file = d.path().join("tok");
    let (code, out, err) = run(&[
        "token",
        "create",
        "--dir",
        dirs,
        "--identity",
        EXAMPLE_ID,
        "--out",
        out_file.to_str().unwrap(),
        "--ttl",
        "1h",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.is_empty());
    assert_eq!(std::fs::metadata(&out_file).unwrap().mode() & 0o777, 0o600);
    let tok2 = std::fs::read_to_string(&out_file).unwrap();
    assert_eq!(tok2.trim().len(), 69);
    // --out onto an existing file: refused (naming --force), the file and the store unchanged;
    // with --force it is replaced atomically, still 0600.
    let out_args = |force: bool| {
        let mut a = vec![
            "token",
            "create",
            "--dir",
            dirs,
            "--identity",
            EXAMPLE_ID,
            "--out",
            out_file.to_str().unwrap(),
        ];
        if force {
            a.push("--force");
        }
        run(&a)
    };
    let (_, before, _) = run(&["token", "list", "--dir", dirs, "--json"]);
    let (code, _, err) = out_args(false);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("refusing to overwrite") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), tok2);
    let (_, after, _) = run(&["token", "list", "--dir", dirs, "--json"]);
    assert_eq!(before, after, "a refused --out must not add a token");
    let (code, _, err) = out_args(true);
    assert_eq!(code, 0, "{err}");
    let tok3 = std::fs::read_to_string(&out_file).unwrap();
    assert!(tok3.trim().len() == 69 && tok3 != tok2, "{tok3:?}");
    assert_eq!(std::fs::metadata(&out_file).unwrap().mode() & 0o777, 0o600);
    assert_eq!(
        run(&[
            "token",
            "create",
            "--dir",
            dirs,
            "--identity",
            EXAMPLE_ID,
            "--force"
        ])
        .0,
        64
    );
    let (code, list, _) = run(&["token", "list", "--dir", dirs]);
    assert_eq!(code, 0);
    assert!(
        list.contains(EXAMPLE_ID) && !list.contains(&tok) && !list.contains(tok2.trim()),
        "{list}"
    );

    let mut s = Served::start(&dir, &[], &[]);
    s.wait_ready().await;
    let anchors = std::fs::read(dir.join("ca.crt")).unwrap();
    let mut client = tls_client(
        s.addr,
        &anchors,
        "linkerd-identity.linkerd.serviceaccount.identity.linkerd.example.org",
    )
    .await;
    let (_, csr) = p256_csr(EXAMPLE_ID);
    // the token file's bytes as read from disk, trailing newline included
    let r = certify(&mut client, request(EXAMPLE_ID, tok2.as_bytes(), csr))
        .await
        .unwrap();
    let leaf = CertInfo::from_der(&r.leaf_certificate).unwrap();
    assert_eq!(
        leaf.uri_sans,
        vec!["spiffe://example.org/ns/external-services/sa/legacy-database"]
    );
    let (_, csr) = p256_csr(ID);
    let st = certify(&mut client, request(ID, tok.as_bytes(), csr))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);

    // revoke through the CLI: the running server sees it within its poll
    let (code, json, _) = run(&["token", "list", "--dir", dirs, "--json"]);
    assert_eq!(code, 0);
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    let ttl_row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| !r["expires"].is_null())
        .expect("the --ttl token is listed with its expiry");
    let (code, _, err) = run(&[
        "token",
        "revoke",
        "--dir",
        dirs,
        ttl_row["id"].as_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    // The server re-reads a changed token file on its one-second maintenance tick (requests
    // only read its in-memory copy): the revoke applies within a few ticks.
    let deadline = Instant::now() + Duration::from_secs(10);
    let st = loop {
        let (_, csr) = p256_csr(EXAMPLE_ID);
        match certify(&mut client, request(EXAMPLE_ID, tok2.as_bytes(), csr)).await {
            Err(st) => break st,
            Ok(_) => {
                assert!(Instant::now() < deadline, "revoke not applied");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(st.code(), Code::Unauthenticated);
    assert!(st.message().contains("revoked"), "{st:?}");
    let (_, list, _) = run(&["token", "list", "--dir", dirs]);
    assert!(list.contains("revoked"), "{list}");
    assert_ne!(run(&["token", "revoke", "--dir", dirs, "nosuchid"]).0, 0);
    s.stop();
}

fn write_pair(dir: &Path, cert: &str, key: &str) {
    proxy_lib::fs::write_atomic(&dir.join("issuer.key"), key.as_bytes(), 0o600, None).unwrap();
    proxy_lib::fs::write_atomic(&dir.join("issuer.crt"), cert.as_bytes(), 0o644, None).unwrap();
}

/// Requests leaves in a loop until `stop`; every one must validate against the anchors with
/// the intermediate it came with. Returns the issuer subjects seen, in order.
async fn hammer(
    addr: SocketAddr,
    anchors: Vec<u8>,
    token: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<String> {
    let ta = TrustAnchors::from_bytes(&anchors, "ca.crt").unwrap();
    let mut client = tls_client(
        addr,
        &anchors,
        "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local",
    )
    .await;
    let (_, csr) = p256_csr(ID);
    let mut seen: Vec<String> = Vec::new();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let r = certify(&mut client, request(ID, token.as_bytes(), csr.clone()))
            .await
            .expect("issued");
        ta.verify_leaf(
            &r.leaf_certificate.clone().into(),
            &[r.intermediate_certificates[0].clone().into()],
            SystemClock.now(),
            Usage::Client,
        )
        .expect("every leaf chains through a complete issuer pair");
        let leaf = CertInfo::from_der(&r.leaf_certificate).unwrap();
        let issuer = CertInfo::from_der(&r.intermediate_certificates[0]).unwrap();
        assert_eq!(leaf.aki, issuer.ski);
        if seen.last() != Some(&issuer.subject) {
            seen.push(issuer.subject);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

async fn current_issuer(client: &mut Client, token: &str) -> String {
    let (_, csr) = p256_csr(ID);
    let r = certify(client, request(ID, token.as_bytes(), csr))
        .await
        .unwrap();
    CertInfo::from_der(&r.intermediate_certificates[0])
        .unwrap()
        .subject
}

async fn wait_issuer(client: &mut Client, token: &str, cn: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !current_issuer(client, token).await.contains(cn) {
        assert!(Instant::now() < deadline, "issuer {cn} never used");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// Acceptance 5: a new pair under the same anchor is taken on SIGHUP, and when its files are
// replaced one after the other (the half-replaced pair is never used); no restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotation_by_sighup_and_by_file_replacement() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ca");
    init(&dir, &[]);
    let tok = token(&dir, ID);
    let anchors = std::fs::read(dir.join("ca.crt")).unwrap();
    let anchor_pem = String::from_utf8(anchors.clone()).unwrap();
    let anchor_key = std::fs::read_to_string(dir.join("anchor.key")).unwrap();
    let mut s = Served::start(&dir, &[], &[]);
    s.wait_ready().await;
    let pid = s.child.id();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let bg = tokio::spawn(hammer(s.addr, anchors.clone(), tok.clone(), stop.clone()));
    let mut client = tls_client(
        s.addr,
        &anchors,
        "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local",
    )
    .await;
    assert!(
        current_issuer(&mut client, &tok)
            .await
            .contains("identity.linkerd.cluster.local")
    );

    let now = SystemClock.now();
    let (b_cert, b_key) = issuer_pair(
        &anchor_pem,
        &anchor_key,
        "issuer-b",
        now - Duration::from_secs(60),
        now + Duration::from_secs(86_400),
        true,
    );
    write_pair(&dir, &b_cert, &b_key);
    s.signal(rustix::process::Signal::HUP);
    wait_issuer(&mut client, &tok, "issuer-b").await;

    // file by file, with a pause longer than the poll + debounce in between
    let (c_cert, c_key) = issuer_pair(
        &anchor_pem,
        &anchor_key,
        "issuer-c",
        now - Duration::from_secs(60),
        now + Duration::from_secs(86_400),
        true,
    );
    proxy_lib::fs::write_atomic(&dir.join("issuer.crt"), c_cert.as_bytes(), 0o644, None).unwrap();
    // the watcher tries the half-replaced pair (new cert, old key) and refuses it
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, m) = http_get(s.admin, "/metrics").await;
        if metric(&m, "issuer_ca_reloads_total{result=\"refused\"}") >= Some(1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "half pair never tried: {m}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        current_issuer(&mut client, &tok).await.contains("issuer-b"),
        "half-replaced pair used"
    );
    proxy_lib::fs::write_atomic(&dir.join("issuer.key"), c_key.as_bytes(), 0o600, None).unwrap();
    wait_issuer(&mut client, &tok, "issuer-c").await;

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = bg.await.unwrap();
    assert!(seen.len() >= 2, "{seen:?}");
    // every leaf of the background stream came from one complete pair: A, B or C, in order
    let order = ["identity.linkerd.cluster.local", "issuer-b", "issuer-c"];
    let ranks: Vec<usize> = seen
        .iter()
        .map(|s| {
            order
                .iter()
                .position(|o| s.contains(o))
                .expect("known issuer")
        })
        .collect();
    assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(s.alive());
    assert_eq!(s.child.id(), pid);
    let err = s.stderr();
    assert!(
        err.contains("issuer ca refused"),
        "the half pair was not refused: {err}"
    );
    s.stop();
}

// Acceptance 5 (refusals): a pair from another anchor, an expired pair, a pair without
// CA:TRUE are refused, logged and counted; leaves keep coming from the old issuer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_issuer_pairs_are_refused_and_the_old_one_kept() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("ca");
    init(&dir, &[]);
    let other = d.path().join("other");
    init(&other, &[]);
    let tok = token(&dir, ID);
    let anchors = std::fs::read(dir.join("ca.crt")).unwrap();
    let anchor_pem = String::from_utf8(anchors.clone()).unwrap();
    let anchor_key = std::fs::read_to_string(dir.join("anchor.key")).unwrap();
    let mut s = Served::start(&dir, &[], &[]);
    s.wait_ready().await;
    let mut client = tls_client(
        s.addr,
        &anchors,
        "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local",
    )
    .await;
    let original = current_issuer(&mut client, &tok).await;
    let now = SystemClock.now();
    let bad: Vec<(&str, String, String)> = vec![
        (
            "another anchor",
            std::fs::read_to_string(other.join("issuer.crt")).unwrap(),
            std::fs::read_to_string(other.join("issuer.key")).unwrap(),
        ),
        {
            let (c, k) = issuer_pair(
                &anchor_pem,
                &anchor_key,
                "expired",
                now - Duration::from_secs(7200),
                now - Duration::from_secs(3600),
                true,
            );
            ("expired", c, k)
        },
        {
            let (c, k) = issuer_pair(
                &anchor_pem,
                &anchor_key,
                "no-ca",
                now - Duration::from_secs(60),
                now + Duration::from_secs(86_400),
                false,
            );
            ("not a CA", c, k)
        },
    ];
    for (i, (name, cert, key)) in bad.iter().enumerate() {
        write_pair(&dir, cert, key);
        s.signal(rustix::process::Signal::HUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, m) = http_get(s.admin, "/metrics").await;
            if metric(&m, "issuer_ca_reloads_total{result=\"refused\"}") >= Some((i + 1) as f64) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: refusal not counted: {m}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(current_issuer(&mut client, &tok).await, original, "{name}");
        assert!(s.alive());
    }
    assert_eq!(http_get(s.admin, "/ready").await.0, 200);
    let err = s.stderr();
    assert!(err.contains("does not chain"), "{err}");
    assert!(err.contains("not valid now"), "{err}");
    assert!(err.contains("not a CA"), "{err}");
    s.stop();
}

fn needles(dir: &Path, token: &str, csrs: &[Vec<u8>]) -> Vec<(String, String)> {
    use base64_like::b64;
    let mut v = vec![("token".to_string(), token.to_string())];
    for key in ["issuer.key", "anchor.key"] {
        let pem = std::fs::read_to_string(dir.join(key)).unwrap();
        for (i, line) in pem.lines().filter(|l| !l.starts_with("-----")).enumerate() {
            v.push((format!("{key} pem line {i}"), line.to_string()));
        }
        let der = proxy_lib::pem::PrivateKey::from_bytes(pem.as_bytes(), key).unwrap();
        v.push((format!("{key} der hex"), hex_of(der.pkcs8_der())));
    }
    for (i, csr) in csrs.iter().enumerate() {
        v.push((format!("csr {i} hex"), hex_of(csr)));
        v.push((format!("csr {i} base64"), b64(csr)[..40].to_string()));
        v.push((format!("csr {i} bytes"), format!("{:?}", &csr[..24])));
    }
    v
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

mod base64_like {
    pub fn b64(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in data.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

// Acceptance 4: a full issue + refuse run at trace log level (JSON and text) leaves no
// token, private key or CSR body in any output, audit included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_never_contain_tokens_keys_or_csrs() {
    for json in [false, true] {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("ca");
        init(&dir, &[]);
        let tok = token(&dir, ID);
        let anchors = std::fs::read(dir.join("ca.crt")).unwrap();
        let extra: &[&str] = if json { &["--log-json"] } else { &[] };
        let mut s = Served::start(&dir, extra, &[("RUST_LOG", "trace")]);
        s.wait_ready().await;
        let mut client = tls_client(
            s.addr,
            &anchors,
            "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local",
        )
        .await;
        let (_, good) = p256_csr(ID);
        let (_, other) = p256_csr("x.y.serviceaccount.identity.linkerd.cluster.local");
        certify(&mut client, request(ID, tok.as_bytes(), good.clone()))
            .await
            .unwrap();
        certify(&mut client, request(ID, tok.as_bytes(), other.clone()))
            .await
            .unwrap_err();
        let mut wrong = tok.clone().into_bytes();
        wrong[0] ^= 1;
        certify(&mut client, request(ID, &wrong, good.clone()))
            .await
            .unwrap_err();
        certify(
            &mut client,
            request(ID, tok.as_bytes(), b"\x30\x82garbage-csr-body".to_vec()),
        )
        .await
        .unwrap_err();
        s.signal(rustix::process::Signal::HUP);
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.stop();
        let all = format!("{}\n{}", s.stdout(), s.stderr());
        assert!(
            all.contains("\"decision\":\"issued\""),
            "audit on stdout: {all}"
        );
        assert!(all.contains("\"decision\":\"refused\""));
        assert!(
            all.to_lowercase().contains("debug"),
            "debug logging was not on: {all}"
        );
        let mut checks = needles(&dir, &tok, &[good, other]);
        checks.push(("mutated token".into(), String::from_utf8(wrong).unwrap()));
        checks.push(("garbage csr".into(), "garbage-csr-body".into()));
        for (what, needle) in checks {
            assert!(
                !all.contains(&needle),
                "{what} appears in the output (json={json})"
            );
        }
    }
}
