//! The quickstart demo: a real issuer, mtls-proxy and rotator daemon run as child processes
//! in a temp dir, certificates rotate every few seconds, and one long-lived connection through
//! the proxy keeps echoing byte-exact across every rotation. Used by
//! `examples/quickstart.rs` and by the end-to-end test that keeps the demo honest.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use proxy_lib::cert::CertInfo;
use proxy_lib::clock::{SharedClock, SystemClock};
use proxy_lib::proxy::tls::AllowList;
use proxy_lib::proxy::{Reloader, Source};
use rustls_pki_types::ServerName;

use crate::{ChildGuard, bin, free_port, http_get};

/// The workload identity the demo host gets.
pub const DEMO_IDENTITY: &str =
    "demo-db.external-services.serviceaccount.identity.linkerd.cluster.local";

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Stop after this many rotations have been seen served by the proxy.
    pub rotations: usize,
    /// Leaf lifetime the issuer grants (the rotator renews at about 70 % of it).
    pub lifetime: Duration,
    /// Working dir (kept); a temp dir (removed) when `None`.
    pub dir: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            rotations: 3,
            lifetime: Duration::from_secs(15),
            dir: None,
        }
    }
}

/// What the demo saw.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Serials the proxy served, in order (the first is the initial cert).
    pub served_serials: Vec<String>,
    /// Bytes echoed byte-exact over the one long-lived connection.
    pub long_lived_bytes: u64,
    /// Fresh handshakes with the proxy, and how many failed.
    pub handshakes: u64,
    /// Failed fresh handshakes.
    pub failed_handshakes: u64,
}

/// Runs the demo, narrating to `out`. When it fails, the working dir (configs, certs and each
/// process's log) is kept, also a temp one, and the error says where it is.
pub fn run(opts: &Options, out: &mut dyn Write) -> Result<Summary> {
    proxy_lib::install_crypto_provider();
    let tmp = match &opts.dir {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("quickstart-").tempdir()?),
    };
    let root = match (&opts.dir, &tmp) {
        (Some(d), _) => {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
            d.clone()
        }
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => unreachable!("a temp dir is made when no dir is given"),
    };
    let result = run_in(&root, opts, out);
    if result.is_err()
        && let Some(t) = tmp
    {
        let _ = t.keep();
    }
    result.with_context(|| {
        format!(
            "the working dir with every config, cert and log is kept in {}",
            root.display()
        )
    })
}

fn run_in(root: &Path, opts: &Options, out: &mut dyn Write) -> Result<Summary> {
    let iss = root.join("issuer");
    let host = root.join("host");
    let certs = host.join("certs");
    std::fs::create_dir_all(&certs)?;
    writeln!(
        out,
        "quickstart: working dir {}{}",
        root.display(),
        if opts.dir.is_some() {
            " (kept: configs, certs and logs of each process)"
        } else {
            " (removed at exit unless the demo fails; --dir DIR keeps the configs, certs and logs)"
        }
    )?;
    // `cargo run --example` does not build the binaries; the first run builds them here, which
    // takes minutes on a small machine: say so rather than sit silent.
    writeln!(
        out,
        "quickstart: building issuer, rotator and mtls-proxy if needed (cargo build --workspace; the first time takes a few minutes, cargo's progress is on stderr)"
    )?;
    out.flush()?;
    bin("issuer");

    // 1. The issuer: CA material, a bootstrap token for the host, then `issuer serve`.
    run_cmd(
        Command::new(bin("issuer"))
            .args(["init", "--dir"])
            .arg(&iss),
    )?;
    writeln!(
        out,
        "[issuer]  init: trust anchor + issuer CA in {}",
        iss.display()
    )?;
    let token = host.join("token");
    run_cmd(
        Command::new(bin("issuer"))
            .args(["token", "create", "--dir"])
            .arg(&iss)
            .args(["--identity", DEMO_IDENTITY, "--out"])
            .arg(&token),
    )?;
    writeln!(
        out,
        "[issuer]  bootstrap token for {DEMO_IDENTITY} written to {} (0600)",
        token.display()
    )?;
    let issuer_port = free_port();
    let issuer_admin = free_port();
    let lifetime = humantime::format_duration(opts.lifetime).to_string();
    let mut issuer = spawn(
        Command::new(bin("issuer"))
            .args(["serve", "--dir"])
            .arg(&iss)
            .args(["--listen", &format!("127.0.0.1:{issuer_port}")])
            .args(["--admin", &format!("127.0.0.1:{issuer_admin}")])
            .args(["--lifetime", &lifetime]),
        &root.join("issuer"),
    )?;
    wait_ready(
        &mut issuer,
        "the issuer",
        issuer_admin,
        Duration::from_secs(30),
    )?;
    writeln!(
        out,
        "[issuer]  serving Identity/Certify over TLS on 127.0.0.1:{issuer_port}, leaf lifetime {lifetime}"
    )?;

    // 2. The app (an echo server) and mtls-proxy in front of it.
    let app = echo_app()?;
    let inbound = free_port();
    let outbound = free_port();
    let proxy_admin = free_port();
    let pidfile = host.join("mtls-proxy.pid");
    let mut proxy = spawn(
        Command::new(bin("mtls-proxy"))
            .arg("--certs")
            .arg(&certs)
            .args(["--inbound", &format!("127.0.0.1:{inbound}={app}")])
            .args([
                "--outbound",
                &format!("127.0.0.1:{outbound}=127.0.0.1:{inbound}@{DEMO_IDENTITY}"),
            ])
            .args(["--admin", &format!("127.0.0.1:{proxy_admin}")])
            .arg("--pidfile")
            .arg(&pidfile),
        &host.join("mtls-proxy"),
    )?;
    wait_live(
        &mut proxy,
        "mtls-proxy",
        proxy_admin,
        Duration::from_secs(30),
    )?;
    writeln!(
        out,
        "[proxy]   mtls-proxy: mTLS 127.0.0.1:{inbound} -> app {app}; app -> 127.0.0.1:{outbound} -> mTLS peer"
    )?;

    // 3. The rotator daemon: key made on the host, renewed through the issuer, swapped
    //    atomically, proxy reloaded by SIGHUP and the served cert verified.
    let config = host.join("rotator.toml");
    std::fs::write(
        &config,
        format!(
            "identity = \"{DEMO_IDENTITY}\"\n\
             dir = \"{}\"\n\
             trust_anchors = \"{}\"\n\
             token_file = \"{}\"\n\
             issuer_addr = \"127.0.0.1:{issuer_port}\"\n\
             [reload]\n\
             signal = \"HUP\"\n\
             pidfile = \"{}\"\n\
             process_name = \"mtls-proxy\"\n\
             [verify]\n\
             addr = \"127.0.0.1:{inbound}\"\n",
            certs.display(),
            iss.join("ca.crt").display(),
            token.display(),
            pidfile.display(),
        ),
    )?;
    let mut rotator = spawn(
        Command::new(bin("rotator"))
            .args(["run", "--config"])
            .arg(&config),
        &host.join("rotator"),
    )?;
    writeln!(
        out,
        "[rotator] daemon started with {} (renews at ~70 % of each lifetime)",
        config.display()
    )?;

    // 4. Watch: one long-lived connection through outbound -> inbound -> app, and a fresh
    //    handshake with the proxy every 250 ms to see which cert it serves.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let clock: SharedClock = Arc::new(SystemClock);
    // The long-lived connection starts only once the proxy serves the first cert (its
    // `/ready`): the files landing on disk come before the rotator's SIGHUP reaches it.
    wait_ready(
        &mut proxy,
        "mtls-proxy",
        proxy_admin,
        Duration::from_secs(90),
    )
    .map_err(|e| {
        let rotator_log = host.join("rotator.log");
        match rotator.0.try_wait() {
            Ok(Some(status)) => e.context(format!(
                "the rotator exited ({status}); see {}",
                rotator_log.display()
            )),
            _ => e.context(format!("the rotator's log is {}", rotator_log.display())),
        }
    })?;
    writeln!(
        out,
        "[proxy]   ready: serving the rotator's first certificate"
    )?;
    let watcher_creds = Reloader::load(
        Source::new(&certs, None),
        AllowList::default(),
        clock.clone(),
    )
    .context("load the cert dir the proxy serves")?;
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let long_lived = {
        let (stop, echoed) = (stop.clone(), echoed.clone());
        std::thread::spawn(move || long_lived_stream(outbound, &stop, &echoed))
    };

    let started = Instant::now();
    let deadline = started + opts.lifetime * (opts.rotations as u32 + 2) + Duration::from_secs(30);
    let mut summary = Summary {
        served_serials: Vec::new(),
        long_lived_bytes: 0,
        handshakes: 0,
        failed_handshakes: 0,
    };
    while summary.served_serials.len() <= opts.rotations {
        if Instant::now() > deadline {
            stop.store(true, Ordering::SeqCst);
            bail!(
                "only {} seen before the deadline",
                proxy_lib::human::count(
                    summary.served_serials.len().saturating_sub(1) as u64,
                    "rotation"
                ),
            );
        }
        if long_lived.is_finished() {
            break;
        }
        let _ = watcher_creds.reload();
        summary.handshakes += 1;
        match rt.block_on(served_leaf(&watcher_creds, inbound)) {
            Ok(leaf) if summary.served_serials.last() != Some(&leaf.serial) => {
                let n = summary.served_serials.len();
                let what = if n == 0 {
                    "first cert".to_string()
                } else {
                    format!("rotation {n}")
                };
                let left = leaf
                    .not_after
                    .duration_since(proxy_lib::clock::Clock::now(&*clock))
                    .unwrap_or_default();
                writeln!(
                    out,
                    "t={:>5.1}s  {what:<11} proxy serves serial {} (sha256 {}…, {}s left); long-lived connection: {} bytes echoed intact",
                    started.elapsed().as_secs_f64(),
                    &leaf.serial,
                    &leaf.sha256[..16],
                    left.as_secs(),
                    echoed.load(Ordering::SeqCst),
                )?;
                summary.served_serials.push(leaf.serial);
            }
            Ok(_) => {}
            Err(e) => {
                summary.failed_handshakes += 1;
                writeln!(out, "handshake with the proxy failed: {e:#}")?;
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, Ordering::SeqCst);
    long_lived
        .join()
        .map_err(|_| anyhow::anyhow!("long-lived stream thread panicked"))?
        .context("the long-lived connection through the proxy broke")?;
    summary.long_lived_bytes = echoed.load(Ordering::SeqCst);

    let status = Command::new(bin("rotator"))
        .args(["status", "--config"])
        .arg(&config)
        .output()?;
    writeln!(out, "\n$ rotator status --config {}", config.display())?;
    out.write_all(&status.stdout)?;
    writeln!(
        out,
        "\ndone: {} served by the proxy; the long-lived connection echoed {} bytes byte-exact across all of them; {} fresh handshakes, {} failed",
        proxy_lib::human::count(
            summary.served_serials.len().saturating_sub(1) as u64,
            "rotation"
        ),
        summary.long_lived_bytes,
        summary.handshakes,
        summary.failed_handshakes
    )?;
    Ok(summary)
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Spawns a child with stdout/stderr to `<base>.out` / `<base>.log`.
pub fn spawn(cmd: &mut Command, base: &Path) -> Result<ChildGuard> {
    let stdout = std::fs::File::create(base.with_extension("out"))?;
    let stderr = std::fs::File::create(base.with_extension("log"))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    Ok(ChildGuard(child))
}

/// Waits for `GET /ready` on the child's admin port to answer 200.
fn wait_ready(child: &mut ChildGuard, what: &str, admin: u16, timeout: Duration) -> Result<()> {
    wait_admin(child, what, admin, "/ready", timeout)
}

/// Waits for `GET /live` on the child's admin port to answer 200.
fn wait_live(child: &mut ChildGuard, what: &str, admin: u16, timeout: Duration) -> Result<()> {
    wait_admin(child, what, admin, "/live", timeout)
}

/// Polls an admin endpoint every 50 ms until it answers 200; fails early when the child exits.
pub fn wait_admin(
    child: &mut ChildGuard,
    what: &str,
    admin: u16,
    path: &str,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.0.try_wait()? {
            bail!("{what} exited ({status}) before {path} answered 200");
        }
        match http_get(admin, path) {
            Ok((200, _)) => return Ok(()),
            _ if Instant::now() > deadline => {
                bail!(
                    "{what}: {path} on 127.0.0.1:{admin} did not answer 200 within {}s",
                    timeout.as_secs()
                )
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// An echo server on 127.0.0.1 (a thread per connection); returns its address.
pub fn echo_app() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { break };
            std::thread::spawn(move || {
                let mut r = match conn.try_clone() {
                    Ok(r) => r,
                    Err(_) => return,
                };
                let _ = io::copy(&mut r, &mut conn);
            });
        }
    });
    Ok(addr)
}

/// Sends 4 KiB every 50 ms through the outbound listener and checks each echo byte-exact.
fn long_lived_stream(port: u16, stop: &AtomicBool, echoed: &AtomicU64) -> Result<()> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    let mut n: u64 = 0;
    let mut back = vec![0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        let chunk: Vec<u8> = (0..4096u64).map(|i| ((n + i) % 251) as u8).collect();
        s.write_all(&chunk)?;
        s.read_exact(&mut back)?;
        if back != chunk {
            bail!("echo mismatch after {n} bytes");
        }
        n += chunk.len() as u64;
        echoed.store(n, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A fresh, full mTLS handshake (no resumption) with the inbound listener, presenting the
/// current cert from the cert dir; returns what the proxy served. (The bare client config
/// never resumes, so every call is a full handshake.)
async fn served_leaf(creds: &Reloader, port: u16) -> Result<CertInfo> {
    let config = creds.client_config().context("no credentials loaded")?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = ServerName::try_from(DEMO_IDENTITY.to_string())?;
    let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp)).await??;
    let (_, conn) = tls.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .context("proxy sent no certificate")?;
    Ok(CertInfo::from_der(leaf)?)
}
