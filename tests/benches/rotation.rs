//! Rotation latency, measured from outside (`cargo bench -p e2e --bench rotation`).
//!
//! A real issuer, mtls-proxy (in front of an echo app) and rotator daemon run as release
//! processes. Each of `ROTATIONS` (default 100) forced rotations is a SIGHUP to the rotator;
//! the bench then makes fresh mTLS handshakes with the proxy's inbound listener until one sees
//! the new serial, and reads the rotator's `/status` (`last_rotation`) for the moment it
//! decided to renew and the time of each stage. It prints p50/p99 of decision → first
//! handshake that sees the new serial (and of SIGHUP → that handshake), and of each stage.
//!
//! Each setup runs twice: the reload hook as an HTTP POST to the proxy's `/reload` (which
//! answers once the proxy has loaded the new set), and as a SIGHUP to the proxy (the rotator's
//! verify handshake then polls until the proxy serves it). The cert dir is put on tmpfs
//! (`/dev/shm`) and on the disk (the system temp dir); the filesystem type of each and
//! whether its fsync is real (tmpfs has nothing to persist) are printed.
//! `ROTATION_DIRS` (colon-separated parent dirs) replaces the two cert dir places.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use proxy_lib::cert::CertInfo;
use proxy_lib::clock::{SharedClock, SystemClock};
use proxy_lib::proxy::tls::AllowList;
use proxy_lib::proxy::{Reloader, Source};
use rotator::timing::RotationTiming;
use rustls_pki_types::ServerName;
use testkit::bench::{fs_kind, fsync_cost, issuer_init, issuer_serve, quantile};
use testkit::demo::{DEMO_IDENTITY, echo_app, spawn, wait_admin};
use testkit::{ChildGuard, bin, free_port, http_get, run_ok};

/// A stage: its name and how to read it from a rotation's timing.
type Stage = (&'static str, fn(&RotationTiming) -> u64);

const STAGES: [Stage; 9] = [
    ("prepare (read anchors, set, token)", |t| t.prepare_us),
    ("keygen + CSR", |t| t.keygen_csr_us),
    ("Certify + bundle round trips (together)", |t| t.certify_us),
    ("validation", |t| t.validate_us),
    ("trust bundle decision", |t| t.bundle_us),
    ("swap with fsyncs + state file", |t| t.swap_us),
    ("reload hook", |t| t.hook_us),
    ("proxy reload wait", |t| t.reload_wait_us),
    ("verify handshake", |t| t.verify_us),
];

fn main() -> Result<()> {
    proxy_lib::install_crypto_provider();
    let rotations: usize = std::env::var("ROTATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let places: Vec<PathBuf> = match std::env::var("ROTATION_DIRS") {
        Ok(v) => v.split(':').map(PathBuf::from).collect(),
        Err(_) => [PathBuf::from("/dev/shm"), std::env::temp_dir()]
            .into_iter()
            .filter(|p| p.is_dir())
            .collect(),
    };
    let root = tempfile::Builder::new()
        .prefix("rotation-bench-")
        .tempdir()?;
    let issuer = Issuer::start(root.path())?;
    let mut rows = Vec::new();
    for place in &places {
        for hook in [Hook::Http, Hook::Signal] {
            let run = Run::start(&issuer, place, hook)
                .with_context(|| format!("set up in {}", place.display()))?;
            rows.extend(run.measure(rotations)?);
        }
    }
    println!();
    for r in rows {
        println!("{r}");
    }
    Ok(())
}

/// The issuer: one for every run.
struct Issuer {
    dir: PathBuf,
    port: u16,
    _child: ChildGuard,
}

impl Issuer {
    fn start(root: &Path) -> Result<Self> {
        let dir = root.join("issuer");
        // A hundred forced rotations a minute for one host is what this bench does.
        issuer_init(
            &dir,
            &[(
                "per_credential_per_minute = 600",
                "per_credential_per_minute = 100000",
            )],
        );
        let (child, port) = issuer_serve(&dir, &root.join("issuer"), Duration::from_secs(3600))?;
        Ok(Self {
            dir,
            port,
            _child: child,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hook {
    Http,
    Signal,
}

/// A proxy and a rotator with their cert dir in one place.
struct Run {
    label: String,
    inbound: u16,
    rotator_admin: u16,
    rotator: ChildGuard,
    _proxy: ChildGuard,
    creds: Reloader,
    rt: tokio::runtime::Runtime,
    _host: tempfile::TempDir,
}

impl Run {
    fn start(issuer: &Issuer, place: &Path, hook: Hook) -> Result<Self> {
        let host = tempfile::Builder::new()
            .prefix("rotation-bench-host-")
            .tempdir_in(place)?;
        let certs = host.path().join("certs");
        std::fs::create_dir(&certs)?;
        let kind = fs_kind(&certs)?;
        let fsync = fsync_cost(&certs, 20)?;
        let hook_name = match hook {
            Hook::Http => "HTTP POST /reload",
            Hook::Signal => "SIGHUP",
        };
        let label = format!("{} ({}), hook {hook_name}", kind.name, place.display());
        println!(
            "\n== cert dir {} on {} (f_type {:#x}): fsync {} (median 4 KiB write+fsync {:.0} us); reload hook: {hook_name}",
            certs.display(),
            kind.name,
            kind.magic,
            if kind.fsync_is_real {
                "is real"
            } else {
                "is a no-op (memory-backed)"
            },
            fsync.as_secs_f64() * 1e6,
        );
        let token = host.path().join("token");
        run_ok(
            Command::new(bin("issuer"))
                .args(["token", "create", "--dir"])
                .arg(&issuer.dir)
                .args(["--identity", DEMO_IDENTITY, "--out"])
                .arg(&token),
        );
        let app = echo_app()?;
        let (inbound, proxy_admin) = (free_port(), free_port());
        let pidfile = host.path().join("mtls-proxy.pid");
        // No dir watcher: the proxy loads a new set only when the hook tells it to.
        let mut proxy = spawn(
            Command::new(bin("mtls-proxy"))
                .arg("--certs")
                .arg(&certs)
                .args(["--inbound", &format!("127.0.0.1:{inbound}={app}")])
                .args(["--admin", &format!("127.0.0.1:{proxy_admin}")])
                .args(["--watch-interval", "0s"])
                .arg("--pidfile")
                .arg(&pidfile),
            &host.path().join("mtls-proxy"),
        )?;
        wait_admin(
            &mut proxy,
            "mtls-proxy",
            proxy_admin,
            "/live",
            Duration::from_secs(30),
        )?;
        let reload = match hook {
            Hook::Http => format!("http = \"http://127.0.0.1:{proxy_admin}/reload\"\n"),
            Hook::Signal => format!(
                "signal = \"HUP\"\npidfile = \"{}\"\nprocess_name = \"mtls-proxy\"\n",
                pidfile.display()
            ),
        };
        // The verify handshake starts right after the hook and, while the proxy still serves
        // the old cert, runs the hook and tries again every millisecond.
        let rotator_admin = free_port();
        let config = host.path().join("rotator.toml");
        std::fs::write(
            &config,
            format!(
                "identity = \"{DEMO_IDENTITY}\"\ndir = \"{}\"\ntrust_anchors = \"{}\"\n\
                 token_file = \"{}\"\nissuer_addr = \"127.0.0.1:{}\"\n\
                 [metrics]\nlisten = \"127.0.0.1:{rotator_admin}\"\n\
                 [reload]\n{reload}\
                 [verify]\naddr = \"127.0.0.1:{inbound}\"\ndelay = \"{}\"\nattempts = 100\n",
                certs.display(),
                issuer.dir.join("ca.crt").display(),
                token.display(),
                issuer.port,
                match hook {
                    Hook::Http => "0s",
                    Hook::Signal => "1ms",
                },
            ),
        )?;
        let rotator = spawn(
            Command::new(bin("rotator"))
                .args(["run", "--config"])
                .arg(&config),
            &host.path().join("rotator"),
        )?;
        wait_admin(
            &mut proxy,
            "mtls-proxy",
            proxy_admin,
            "/ready",
            Duration::from_secs(60),
        )?;
        let clock: SharedClock = Arc::new(SystemClock);
        let creds = Reloader::load(Source::new(&certs, None), AllowList::default(), clock)
            .context("load the cert dir the proxy serves")?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            label,
            inbound,
            rotator_admin,
            rotator,
            _proxy: proxy,
            creds,
            rt,
            _host: host,
        })
    }

    /// The serial a fresh full handshake with the proxy's inbound listener sees.
    fn served(&self) -> Result<String> {
        let config = self.creds.client_config().context("no credentials")?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = ServerName::try_from(DEMO_IDENTITY.to_string())?;
        self.rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.inbound)).await?;
            let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp))
                .await??;
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .context("the proxy sent no certificate")?;
            Ok(CertInfo::from_der(leaf)?.serial)
        })
    }

    /// The rotator's `last_rotation` once it is the rotation that installed `serial`.
    fn timing_of(&self, serial: &str) -> Result<RotationTiming> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok((200, body)) = http_get(self.rotator_admin, "/status") {
                let report: rotator::status::Report = serde_json::from_str(&body)?;
                if let Some(t) = report.last_rotation.filter(|t| t.serial == serial) {
                    return Ok(t);
                }
            }
            if Instant::now() > deadline {
                bail!("the rotator's /status never showed the rotation to serial {serial}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn measure(mut self, rotations: usize) -> Result<Vec<String>> {
        let pid = rustix::process::Pid::from_raw(self.rotator.0.id() as i32)
            .context("the rotator's pid")?;
        let mut serial = self.served()?;
        let (mut outside, mut from_hup, mut total) = (Vec::new(), Vec::new(), Vec::new());
        let mut stages: Vec<Vec<u64>> = vec![Vec::new(); STAGES.len()];
        let mut handshakes = 0u64;
        for i in 0..rotations {
            if let Some(status) = self.rotator.0.try_wait()? {
                bail!("the rotator exited ({status})");
            }
            let hup = proxy_lib::clock::Clock::now(&proxy_lib::clock::SystemClock);
            rustix::process::kill_process(pid, rustix::process::Signal::HUP)?;
            let deadline = Instant::now() + Duration::from_secs(10);
            let seen = loop {
                handshakes += 1;
                let now_serial = self.served();
                let at = proxy_lib::clock::Clock::now(&proxy_lib::clock::SystemClock);
                match now_serial {
                    Ok(s) if s != serial => break (s, at),
                    _ if Instant::now() > deadline => {
                        bail!("rotation {i}: no handshake saw a new serial within 10 s")
                    }
                    // Room for the rotator and the proxy on a small machine.
                    _ => std::thread::sleep(Duration::from_micros(500)),
                }
            };
            let t = self.timing_of(&seen.0)?;
            let seen_us = micros_since_epoch(seen.1);
            outside.push(seen_us.saturating_sub(t.decided_unix_us));
            from_hup.push(seen_us.saturating_sub(micros_since_epoch(hup)));
            total.push(t.total_us);
            for (s, (_, get)) in stages.iter_mut().zip(STAGES) {
                s.push(get(&t));
            }
            serial = seen.0;
        }
        let ms = |us: u64| us as f64 / 1000.0;
        let (p50, p99) = (quantile(&mut outside, 0.5), quantile(&mut outside, 0.99));
        println!(
            "{rotations} rotations, {handshakes} probe handshakes; p50 / p99 in ms:\n  \
             decision -> first handshake seeing the new serial  {:>8.2} / {:>8.2}\n  \
             SIGHUP to the rotator -> that handshake             {:>8.2} / {:>8.2}\n  \
             rotation total inside the rotator (to verify done)  {:>8.2} / {:>8.2}",
            ms(p50),
            ms(p99),
            ms(quantile(&mut from_hup, 0.5)),
            ms(quantile(&mut from_hup, 0.99)),
            ms(quantile(&mut total, 0.5)),
            ms(quantile(&mut total, 0.99)),
        );
        let mut split = Vec::new();
        for (s, (name, _)) in stages.iter_mut().zip(STAGES) {
            let (a, b) = (quantile(s, 0.5), quantile(s, 0.99));
            println!("    {name:<36} {:>8.2} / {:>8.2}", ms(a), ms(b));
            split.push(format!("{} {:.1}", short(name), ms(a)));
        }
        Ok(vec![
            format!(
                "| rotation, decision → first new handshake, {} | p50 {:.1} ms, p99 {:.1} ms | p50 < 5 ms |",
                self.label,
                ms(p50),
                ms(p99)
            ),
            format!(
                "| rotation stages p50 (ms), {} | {} | |",
                self.label,
                split.join(", ")
            ),
        ])
    }
}

fn short(stage: &str) -> &str {
    stage.split(" (").next().unwrap_or(stage)
}

fn micros_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
