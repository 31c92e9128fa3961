//! The `mtls-proxy` binary as a child process: usage errors exit 64 (a missing config file
//! 66), and acceptance 3 —
//! zero-drop reloads under load driven by SIGHUP and `POST /reload` alternately, with the
//! pidfile written at start and removed on SIGTERM.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use proxy_lib::test_util::{ChildGuard, TestPki, free_port, write_data_dir};
use rustix::process::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const BIN: &str = env!("CARGO_BIN_EXE_mtls-proxy");

fn run_to_end(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run mtls-proxy")
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    let out = run_to_end(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let out = run_to_end(&[]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("certs"), "{stderr}");
    assert!(stderr.contains("no listener"), "{stderr}");
    let out = run_to_end(&["--certs", "/x", "--outbound", "127.0.0.1:1=h:1"]);
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("@IDENTITY"));
    // A missing config file is a missing input (EX_NOINPUT), not a usage error.
    let out = run_to_end(&["--config", "/nonexistent/proxy.toml"]);
    assert_eq!(out.status.code(), Some(66), "{out:?}");
    let out = run_to_end(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--certs",
        "--trust-anchors",
        "--inbound",
        "--outbound",
        "--admin",
        "--pidfile",
        "--allow-client",
        "--idle-timeout",
        "[default: 127.0.0.1:4191]",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
    assert_eq!(run_to_end(&["--version"]).status.code(), Some(0));
}

/// Deterministic payload byte `k` of stream `s`.
fn byte(s: usize, k: u64) -> u8 {
    ((k.wrapping_mul(31) + s as u64 * 17) % 251) as u8
}

const STREAMS: usize = 50;
const RELOADS: usize = 20;
const CHUNK: usize = 4096;

struct Stream {
    progress: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Result<(u64, u64), String>>,
}

/// Opens a TLS stream and keeps writing chunks (and checking the echo) until `stop`.
async fn spawn_stream(
    s: usize,
    addr: SocketAddr,
    cc: Arc<rustls::ClientConfig>,
    me: &proxy_lib::identity::Identity,
    stop: Arc<AtomicBool>,
) -> (Stream, String) {
    let tls = tls_connect(addr, cc, me).await.expect("stream handshake");
    let fp = served_fingerprint(&tls);
    let progress = Arc::new(AtomicU64::new(0));
    let p = progress.clone();
    let task = tokio::spawn(async move {
        let (mut r, mut w) = tokio::io::split(tls);
        let writer = tokio::spawn(async move {
            let mut sent = 0u64;
            let mut buf = vec![0u8; CHUNK];
            while !stop.load(Ordering::Relaxed) {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = byte(s, sent + i as u64);
                }
                w.write_all(&buf).await.map_err(|e| format!("write: {e}"))?;
                sent += CHUNK as u64;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            w.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
            Ok::<u64, String>(sent)
        });
        let mut got = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = r.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                break;
            }
            for (i, b) in buf[..n].iter().enumerate() {
                if *b != byte(s, got + i as u64) {
                    return Err(format!("stream {s}: byte {} differs", got + i as u64));
                }
            }
            got += n as u64;
            p.store(got, Ordering::Relaxed);
        }
        let sent = writer.await.map_err(|e| e.to_string())??;
        Ok((sent, got))
    });
    (Stream { progress, task }, fp)
}

async fn wait_ready(admin: SocketAddr) {
    for _ in 0..1500 {
        if tokio::net::TcpStream::connect(admin).await.is_ok()
            && http(admin, "GET", "/ready").await.0 == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("mtls-proxy never became ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_drop_reloads_under_load_via_sighup_and_post_reload() {
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    let mut versions = vec![write_data_dir(&certs, &leaf(&pki, &me))];
    let app = echo_app().await;
    let (inbound_port, admin_port) = (free_port(), free_port());
    let inbound: SocketAddr = format!("127.0.0.1:{inbound_port}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let pidfile = dir.path().join("mtls-proxy.pid");
    let child = ChildGuard(
        Command::new(BIN)
            .arg("--certs")
            .arg(&certs)
            .args(["--inbound", &format!("{inbound}={app}")])
            .args(["--admin", &admin.to_string()])
            .arg("--pidfile")
            .arg(&pidfile)
            .args(["--watch-interval", "0s"]) // reloads come only from the test
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn mtls-proxy"),
    );
    wait_ready(admin).await;
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("pidfile written at start")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, child.0.id());

    let cc = client_config(&pki.anchors(), Some(&leaf(&pki, &id("web", "apps"))));
    let stop = Arc::new(AtomicBool::new(false));
    let first = proxy_lib::bundle::CertBundle::load_dir(&certs).unwrap().0;
    let mut streams = Vec::new();
    for s in 0..STREAMS {
        let (st, fp) = spawn_stream(s, inbound, cc.clone(), &me, stop.clone()).await;
        assert_eq!(fp, first.leaf.sha256);
        streams.push(st);
    }

    let mut progress_mid = Vec::new();
    for i in 1..=RELOADS {
        let next = leaf(&pki, &me);
        // The writer prunes as the rotator does: only this version and the previous remain.
        versions.push(write_data_dir(&certs, &next));
        let mut kept: Vec<_> = versions[versions.len() - 2..]
            .iter()
            .map(|v| v.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        kept.sort();
        assert_eq!(proxy_lib::certdir::version_dirs(&certs), kept);
        if i % 2 == 1 {
            child.signal(Signal::HUP);
            // The reload is asynchronous: poll new handshakes until they see the new cert.
            let mut seen = String::new();
            for _ in 0..250 {
                let tls = tls_connect(inbound, cc.clone(), &me).await.unwrap();
                seen = served_fingerprint(&tls);
                if seen == next.leaf.sha256 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(seen, next.leaf.sha256, "SIGHUP reload #{i} not served");
        } else {
            let (status, body) = http(admin, "POST", "/reload").await;
            assert_eq!(status, 200, "reload #{i}: {body}");
            assert!(body.contains(&next.leaf.sha256), "reload #{i}: {body}");
            // POST /reload answers after the swap: the very next handshake has the new cert.
            let tls = tls_connect(inbound, cc.clone(), &me).await.unwrap();
            assert_eq!(
                served_fingerprint(&tls),
                next.leaf.sha256,
                "POST reload #{i}"
            );
        }
        if i == RELOADS / 2 {
            progress_mid = streams
                .iter()
                .map(|s| s.progress.load(Ordering::Relaxed))
                .collect();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let text = metrics_text(admin).await;
    assert_eq!(
        metric(&text, r#"proxy_reloads_total{result="ok"}"#),
        (RELOADS + 1) as f64,
        "{text}"
    );
    assert_eq!(metric(&text, r#"proxy_reloads_total{result="error"}"#), 0.0);
    assert!(
        metric(&text, r#"proxy_open_connections{direction="inbound"}"#) >= STREAMS as f64,
        "{text}"
    );

    stop.store(true, Ordering::Relaxed);
    for (s, st) in streams.into_iter().enumerate() {
        let (sent, got) = st
            .task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("stream {s}: {e}"));
        assert_eq!(got, sent, "stream {s} lost bytes");
        assert!(
            got > progress_mid[s],
            "stream {s} did not keep streaming through the second half of the reloads"
        );
    }

    // Clean exit on SIGTERM removes the pidfile.
    let mut child = child;
    child.signal(Signal::TERM);
    let status = wait_exit(&mut child.0, Duration::from_secs(15));
    assert!(status.success(), "mtls-proxy exited with {status}");
    assert!(!pidfile.exists(), "pidfile left behind after a clean exit");
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "mtls-proxy did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Each proxied connection holds two descriptors: started with a low soft open-file limit (as
/// a shell or service manager may hand it), the proxy raises it to the hard limit at start so
/// `--max-connections` is not silently capped by EMFILE.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_binary_raises_its_soft_open_file_limit_to_the_hard_limit() {
    init();
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    let Some(hard) = hard.filter(|h| *h > 256) else {
        eprintln!("skipping: the hard open-file limit is unlimited or too low to test");
        return;
    };
    let pki = TestPki::new(now());
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &id("db", "data")));
    let app = echo_app().await;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = ChildGuard(
        Command::new("sh")
            .args(["-c", r#"ulimit -Sn 256 && exec "$0" "$@""#, BIN])
            .arg("--certs")
            .arg(dir.path())
            .args(["--inbound", &format!("127.0.0.1:{}={app}", free_port())])
            .args(["--admin", &admin.to_string(), "--watch-interval", "0s"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn mtls-proxy under sh"),
    );
    wait_ready(admin).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.0.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("open files line");
    let soft: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert_eq!(soft, hard, "{line}");
}

fn pid_in(pidfile: &Path) -> u32 {
    std::fs::read_to_string(pidfile)
        .expect("pidfile")
        .trim()
        .parse()
        .expect("a pid")
}

/// An `mtls-proxy` on fresh loopback ports with `pidfile`, logging to a pipe.
fn proxy_with_pidfile(certs: &Path, app: SocketAddr, pidfile: &Path) -> (Command, SocketAddr) {
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("--certs")
        .arg(certs)
        .args(["--inbound", &format!("127.0.0.1:{}={app}", free_port())])
        .args(["--admin", &admin.to_string(), "--watch-interval", "0s"])
        .arg("--pidfile")
        .arg(pidfile)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    (cmd, admin)
}

#[tokio::test]
async fn a_pidfile_naming_a_live_mtls_proxy_is_refused_and_a_stale_one_taken_over() {
    init();
    let pki = TestPki::new(now());
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir(&certs).unwrap();
    write_data_dir(&certs, &leaf(&pki, &id("db", "data")));
    let app = echo_app().await;
    let pidfile = dir.path().join("mtls-proxy.pid");

    let (mut cmd, admin) = proxy_with_pidfile(&certs, app, &pidfile);
    let mut first = ChildGuard(cmd.spawn().expect("spawn mtls-proxy"));
    wait_ready(admin).await;
    assert_eq!(pid_in(&pidfile), first.0.id());

    // A second instance with the same pidfile (other ports): refused, clearly, non-zero.
    let (mut cmd, _) = proxy_with_pidfile(&certs, app, &pidfile);
    let mut second = ChildGuard(cmd.spawn().expect("spawn the second mtls-proxy"));
    let status = wait_exit(&mut second.0, Duration::from_secs(15));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "the second instance started: {stderr}");
    let want = format!(
        "another mtls-proxy (pid {}) is running with pidfile {}",
        first.0.id(),
        pidfile.display()
    );
    assert!(stderr.contains(&want), "{want:?} missing from {stderr}");
    // Its exit left the first one's pidfile alone.
    assert_eq!(pid_in(&pidfile), first.0.id());

    // The first dies without cleaning up: its pidfile is stale and taken over.
    first.signal(Signal::KILL);
    wait_exit(&mut first.0, Duration::from_secs(15));
    assert_eq!(
        pid_in(&pidfile),
        first.0.id(),
        "a killed proxy cannot clean up"
    );
    let (mut cmd, admin) = proxy_with_pidfile(&certs, app, &pidfile);
    let mut third = ChildGuard(cmd.spawn().expect("spawn mtls-proxy"));
    wait_ready(admin).await;
    assert_eq!(pid_in(&pidfile), third.0.id());
    third.signal(Signal::TERM);
    assert!(wait_exit(&mut third.0, Duration::from_secs(15)).success());
    assert!(!pidfile.exists(), "its own pidfile is removed on exit");

    // A live pid that is some other program: stale too.
    let other = ChildGuard(
        Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep"),
    );
    std::fs::write(&pidfile, format!("{}\n", other.0.id())).unwrap();
    let (mut cmd, admin) = proxy_with_pidfile(&certs, app, &pidfile);
    let mut fourth = ChildGuard(cmd.spawn().expect("spawn mtls-proxy"));
    wait_ready(admin).await;
    assert_eq!(pid_in(&pidfile), fourth.0.id());
    // Someone else takes the pidfile while it runs: on exit it is left in place.
    std::fs::write(&pidfile, format!("{}\n", other.0.id())).unwrap();
    fourth.signal(Signal::TERM);
    assert!(wait_exit(&mut fourth.0, Duration::from_secs(15)).success());
    assert_eq!(pid_in(&pidfile), other.0.id());
}
