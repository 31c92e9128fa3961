//! The trust-anchor rotation of the README ("Rotating the trust anchor"), step by step, as
//! processes: one issuer, two hosts each running a rotator daemon and mtls-proxy, and a client
//! sending requests host A → A's outbound → B's inbound → B's app the whole time. Short leaf
//! lifetimes and a 1 s bundle poll keep it under a minute or so; every wait is on a readiness
//! signal (metrics, files), never a fixed sleep. No request may fail, and every host must end
//! holding only the new anchor and a leaf that chains to it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use proxy_lib::cert::CertInfo;
use proxy_lib::pem::read_certs;
use proxy_lib::trust_bundle::{fingerprint, short};
use proxy_lib::verify::{TrustAnchors, Usage};
use rustls_pki_types::CertificateDer;
use testkit::{ChildGuard, TestDir, bin, free_port, http_get, run_ok, wait_for};

const LIFETIME: Duration = Duration::from_secs(6);
const STEP_TIMEOUT: Duration = Duration::from_secs(40);

struct Host {
    name: &'static str,
    identity: String,
    certs: PathBuf,
    rotator_admin: u16,
    proxy_admin: u16,
    inbound: u16,
    outbound: u16,
    _proxy: ChildGuard,
    _rotator: ChildGuard,
}

fn spawn(cmd: &mut Command, log: &Path) -> ChildGuard {
    testkit::demo::spawn(cmd, log).unwrap_or_else(|e| panic!("{e:#}"))
}

fn ready(port: u16, path: &str) -> bool {
    matches!(http_get(port, path), Ok((200, _)))
}

fn metrics(port: u16) -> String {
    http_get(port, "/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default()
}

/// An echo server on loopback (a thread per connection).
fn echo_app() -> u16 {
    testkit::demo::echo_app().unwrap().port()
}

fn start_host(
    root: &Path,
    name: &'static str,
    issuer_dir: &Path,
    issuer_port: u16,
    peer: Option<(u16, &str)>,
) -> Host {
    let dir = root.join(name);
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let identity = format!("{name}.hosts.serviceaccount.identity.linkerd.cluster.local");
    let token = dir.join("token");
    run_ok(
        Command::new(bin("issuer"))
            .args(["token", "create", "--dir"])
            .arg(issuer_dir)
            .args(["--identity", &identity, "--out"])
            .arg(&token),
    );
    // Installed on the host at setup: the bootstrap anchors.
    let anchors = dir.join("bootstrap-ca.crt");
    std::fs::copy(issuer_dir.join("ca.crt"), &anchors).unwrap();
    let (inbound, outbound, proxy_admin, rotator_admin) =
        (free_port(), free_port(), free_port(), free_port());
    let app = echo_app();
    let pidfile = dir.join("mtls-proxy.pid");
    let mut proxy = Command::new(bin("mtls-proxy"));
    proxy
        .arg("--certs")
        .arg(&certs)
        .args(["--inbound", &format!("127.0.0.1:{inbound}=127.0.0.1:{app}")])
        .args(["--admin", &format!("127.0.0.1:{proxy_admin}")])
        .arg("--pidfile")
        .arg(&pidfile);
    if let Some((peer_inbound, peer_id)) = peer {
        proxy.args([
            "--outbound",
            &format!("127.0.0.1:{outbound}=127.0.0.1:{peer_inbound}@{peer_id}"),
        ]);
    }
    let mut proxy = spawn(&mut proxy, &dir.join("mtls-proxy"));
    wait_for("mtls-proxy /live", STEP_TIMEOUT, || {
        assert!(
            proxy.0.try_wait().unwrap().is_none(),
            "{name}: mtls-proxy exited"
        );
        ready(proxy_admin, "/live").then_some(())
    });
    let config = dir.join("rotator.toml");
    std::fs::write(
        &config,
        format!(
            "identity = \"{identity}\"\ndir = \"{}\"\ntrust_anchors = \"{}\"\n\
             token_file = \"{}\"\nissuer_addr = \"127.0.0.1:{issuer_port}\"\n\
             bundle_poll_interval = \"1s\"\n\
             [reload]\nsignal = \"HUP\"\npidfile = \"{}\"\nprocess_name = \"mtls-proxy\"\n\
             [verify]\naddr = \"127.0.0.1:{inbound}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{rotator_admin}\"\n",
            certs.display(),
            anchors.display(),
            token.display(),
            pidfile.display(),
        ),
    )
    .unwrap();
    let mut rotator = spawn(
        Command::new(bin("rotator"))
            .args(["run", "--config"])
            .arg(&config),
        &dir.join("rotator"),
    );
    wait_for("the first cert served", STEP_TIMEOUT, || {
        assert!(
            rotator.0.try_wait().unwrap().is_none(),
            "{name}: rotator exited"
        );
        (ready(rotator_admin, "/ready") && ready(proxy_admin, "/ready")).then_some(())
    });
    Host {
        name,
        identity,
        certs,
        rotator_admin,
        proxy_admin,
        inbound,
        outbound,
        _proxy: proxy,
        _rotator: rotator,
    }
}

impl Host {
    fn chain(&self) -> Vec<CertificateDer<'static>> {
        read_certs(&self.certs.join("tls.crt")).unwrap_or_default()
    }

    fn anchors(&self) -> Vec<CertificateDer<'static>> {
        read_certs(&self.certs.join("ca.crt")).unwrap_or_default()
    }

    /// Whether the host's rotator reports `certs` as the anchors it trusts.
    fn trusts(&self, certs: &[CertificateDer<'static>]) -> bool {
        let want = format!("fingerprint=\"{}\"", short(&fingerprint(certs)));
        metrics(self.rotator_admin)
            .lines()
            .any(|l| l.starts_with("rotator_trust_bundle_info{") && l.contains(&want))
    }

    /// notAfter (Unix seconds) of the cert the proxy serves.
    fn served_not_after(&self) -> Option<u64> {
        proxy_lib::test_util::metric(
            &metrics(self.proxy_admin),
            "proxy_cert_expiration_timestamp_seconds",
        )
        .map(|v| v as u64)
    }

    /// Whether the proxy serves a leaf issued after `t`: it reloaded (anchors included) since.
    fn reloaded_after(&self, t: SystemTime) -> bool {
        let issued_after = proxy_lib::clock::unix_secs(t + LIFETIME);
        self.served_not_after().is_some_and(|n| n > issued_after)
    }

    /// Whether the leaf on disk chains to `root` alone, and the proxy serves it.
    fn serves_leaf_under(&self, root: &CertificateDer<'static>) -> bool {
        let chain = self.chain();
        let Some((leaf, rest)) = chain.split_first() else {
            return false;
        };
        let anchors = TrustAnchors::from_certs(vec![root.clone()]).unwrap();
        let now = proxy_lib::clock::Clock::now(&proxy_lib::clock::SystemClock);
        let chains = anchors.verify_leaf(leaf, rest, now, Usage::Server).is_ok();
        let not_after = proxy_lib::clock::unix_secs(CertInfo::from_der(leaf).unwrap().not_after);
        chains && self.served_not_after() == Some(not_after)
    }
}

/// Sends one short request after another through `port` until `stop`, each on a fresh
/// connection (a fresh mTLS handshake between the proxies), counting the failures.
fn client(port: u16, stop: Arc<AtomicBool>, ok: Arc<AtomicU64>, failed: Arc<AtomicU64>) {
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let msg = format!("request {n}\n");
        let result = (|| -> std::io::Result<bool> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(msg.as_bytes())?;
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back)?;
            Ok(back == msg.as_bytes())
        })();
        match result {
            Ok(true) => ok.fetch_add(1, Ordering::SeqCst),
            other => {
                eprintln!("request {n} failed: {other:?}");
                failed.fetch_add(1, Ordering::SeqCst)
            }
        };
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sign_bundle(key: &Path, bundle: &Path, out: &Path) {
    run_ok(
        Command::new(bin("issuer"))
            .args(["ca", "sign-bundle", "--anchor-key"])
            .arg(key)
            .arg("--bundle")
            .arg(bundle)
            .arg("--out")
            .arg(out),
    );
}

/// Waits until every host trusts `certs` and its proxy has reloaded since.
fn wait_hosts_trust(hosts: &[&Host], certs: &[CertificateDer<'static>], what: &str) {
    for h in hosts {
        wait_for(&format!("{}: {what}", h.name), STEP_TIMEOUT, || {
            h.trusts(certs).then_some(())
        });
    }
    let seen = proxy_lib::clock::Clock::now(&proxy_lib::clock::SystemClock);
    for h in hosts {
        wait_for(
            &format!("{}: mtls-proxy reloaded after {what}", h.name),
            STEP_TIMEOUT,
            || h.reloaded_after(seen).then_some(()),
        );
    }
}

#[test]
fn the_readme_anchor_rotation_keeps_every_request_flowing_and_ends_on_the_new_root_alone() {
    proxy_lib::install_crypto_provider();
    let tmp = TestDir::new();
    let root = tmp.path();
    let iss = root.join("issuer");
    let offline = root.join("offline");
    std::fs::create_dir_all(&offline).unwrap();
    run_ok(
        Command::new(bin("issuer"))
            .args(["init", "--dir"])
            .arg(&iss),
    );
    let old_root = read_certs(&iss.join("ca.crt")).unwrap().remove(0);
    let old_key = offline.join("anchor.key");
    std::fs::rename(iss.join("anchor.key"), &old_key).unwrap();

    let (issuer_port, issuer_admin) = (free_port(), free_port());
    let mut issuer = spawn(
        Command::new(bin("issuer"))
            .args(["serve", "--dir"])
            .arg(&iss)
            .args(["--listen", &format!("127.0.0.1:{issuer_port}")])
            .args(["--admin", &format!("127.0.0.1:{issuer_admin}")])
            .args([
                "--lifetime",
                &humantime::format_duration(LIFETIME).to_string(),
            ]),
        &root.join("issuer"),
    );
    wait_for("the issuer /ready", STEP_TIMEOUT, || {
        assert!(issuer.0.try_wait().unwrap().is_none(), "the issuer exited");
        ready(issuer_admin, "/ready").then_some(())
    });

    let b = start_host(root, "b", &iss, issuer_port, None);
    let a = start_host(root, "a", &iss, issuer_port, Some((b.inbound, &b.identity)));
    let hosts = [&a, &b];

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let traffic = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let port = a.outbound;
        std::thread::spawn(move || client(port, stop, ok, failed))
    };
    wait_for("the first request through A → B", STEP_TIMEOUT, || {
        (ok.load(Ordering::SeqCst) > 0).then_some(())
    });

    // 0. Offline: a new root.
    let new_dir = offline.join("new-root");
    run_ok(
        Command::new(bin("issuer"))
            .args(["init", "--dir"])
            .arg(&new_dir),
    );
    let new_root = read_certs(&new_dir.join("ca.crt")).unwrap().remove(0);
    let new_key = new_dir.join("anchor.key");

    // 1. Sign and publish a bundle with both roots, signed by the old root's key.
    let both = root.join("both.pem");
    std::fs::write(&both, proxy_lib::pem::certs_to_pem([&old_root, &new_root])).unwrap();
    sign_bundle(&old_key, &both, &iss);
    // 2. Wait until every host holds both.
    let both_certs = vec![old_root.clone(), new_root.clone()];
    wait_hosts_trust(&hosts, &both_certs, "trusts both roots");

    // 3. Switch the issuer to an issuer certificate under the new root.
    run_ok(
        Command::new(bin("issuer"))
            .args(["ca", "new-issuer", "--dir"])
            .arg(&iss)
            .arg("--anchor-key")
            .arg(&new_key),
    );
    // 4. Wait until every host has renewed under the new root (and its proxy serves that
    //    leaf); the issuer counts renewals under the new anchor.
    for h in hosts {
        wait_for(
            &format!("{}: a leaf under the new root served", h.name),
            STEP_TIMEOUT,
            || h.serves_leaf_under(&new_root).then_some(()),
        );
    }
    let new_label = format!(
        "issuer_certify_by_anchor_total{{anchor=\"{}\"}}",
        short(&proxy_lib::cert::sha256_hex(&new_root))
    );
    let issued_under_new =
        proxy_lib::test_util::metric(&metrics(issuer_admin), &new_label).unwrap_or(0.0);
    assert!(issued_under_new >= 2.0, "{new_label} = {issued_under_new}");

    // 5. Sign and publish the bundle without the old root, signed by the new root's key.
    sign_bundle(&new_key, &new_dir.join("ca.crt"), &iss);
    let new_only = vec![new_root.clone()];
    wait_hosts_trust(&hosts, &new_only, "trusts the new root alone");

    stop.store(true, Ordering::SeqCst);
    traffic.join().unwrap();
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok > 50, "only {ok} requests went through");

    for h in hosts {
        assert_eq!(
            h.anchors(),
            new_only,
            "{}: ca.crt holds the new root alone",
            h.name
        );
        assert!(
            h.serves_leaf_under(&new_root),
            "{}: leaf under the new root",
            h.name
        );
        let status = run_ok(
            Command::new(bin("rotator"))
                .args(["status", "--config"])
                .arg(root.join(h.name).join("rotator.toml")),
        );
        let text = String::from_utf8_lossy(&status.stdout);
        assert!(text.starts_with("OK"), "{}: {text}", h.name);
    }
}
