//! Fleet simulation (`cargo bench -p e2e --bench fleet`; not run by CI, which only builds it).
//!
//! Two `issuer serve` processes (release binaries) share one state dir and token store on
//! loopback. `FLEET_HOSTS` (default 100,000) simulated hosts, light clients on this process's
//! runtime, each with its own P-256 keys, its own bootstrap token and its own source address
//! (127.x.y.z), talk to them the way the rotator does: a new TLS connection per Certify (the
//! installed cert presented as client certificate once there is one), a fresh key per
//! renewal, the answer validated as the rotator validates it, and retries with exponential
//! backoff and jitter. At most `FLEET_INFLIGHT` (default 1,000) requests are in flight, so
//! the fd limit holds; host `i` asks issuer `i % 2`. Phases:
//!
//! 1. bootstrap: every host gets its first cert by token;
//! 2. steady state for `FLEET_STEADY_SECS` (default 120): each host renews every 864 s (a 24 h
//!    fleet's rate scaled up 100×: 100,000 hosts / 86,400 s × 100 ≈ 116/s), the fleet's cert
//!    ages spread evenly; the leaf lifetime is 864 s / 0.7 (the rotator renews at 70 %);
//! 3. full-fleet restart: every host asks at once, by its cert.
//!
//! For each phase: Certify/s, p50/p99 latency, answers refused by gRPC code, issuer CPU (from
//! `/proc/<pid>/stat`, both processes) and peak RSS (`VmHWM`, reset at the phase start), and
//! the time until every host holds a valid cert from that phase. The state dir (token store,
//! audit log) is a temp dir, removed at the end.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use proxy_lib::bundle::CertBundle;
use proxy_lib::identity::Identity;
use proxy_lib::key::PrivateKey;
use proxy_lib::verify::TrustAnchors;
use rand::Rng;
use rotator::client::{CertifyRequest, GrpcIssuer, Issue, IssueError};
use rustls_pki_types::CertificateDer;
use testkit::ChildGuard;
use testkit::bench::{ProcUsage, issuer_init, issuer_serve, proc_usage, quantile};
use zeroize::Zeroizing;

/// Each host renews this often: 24 h / 100.
const PERIOD: Duration = Duration::from_secs(864);
/// The issuer's name in its serving cert (`issuer init`'s default).
const SERVER_NAME: &str = "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    proxy_lib::install_crypto_provider();
    let hosts = env("FLEET_HOSTS", 100_000) as usize;
    let inflight = env("FLEET_INFLIGHT", 1_000) as usize;
    let steady = Duration::from_secs(env("FLEET_STEADY_SECS", 120));
    let deadline = Duration::from_secs(env("FLEET_PHASE_DEADLINE_SECS", 1_800));
    if hosts == 0 || hosts > 16_000_000 {
        bail!("FLEET_HOSTS must be from 1 to 16,000,000, got {hosts}");
    }
    let root = tempfile::Builder::new().prefix("fleet-bench-").tempdir()?;
    let lifetime = Duration::from_secs_f64(PERIOD.as_secs_f64() / 0.7);
    println!(
        "fleet: {hosts} hosts, {inflight} requests in flight at most, 2 issuers; leaf lifetime {}s, each host renews every {}s ({:.1}/s for the fleet)",
        lifetime.as_secs(),
        PERIOD.as_secs(),
        hosts as f64 / PERIOD.as_secs_f64()
    );
    let state = root.path().join("issuer");
    let audit = state.join("audit.log");
    issuer_init(
        &state,
        &[("path = \"-\"", &format!("path = \"{}\"", audit.display()))],
    );

    let t = Instant::now();
    let tokens = make_tokens(&state, hosts)?;
    println!(
        "{hosts} tokens written to the shared token store in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    let issuers = [
        IssuerProc::start(&state, root.path(), 0, lifetime)?,
        IssuerProc::start(&state, root.path(), 1, lifetime)?,
    ];
    let anchors = TrustAnchors::read(&state.join("ca.crt"))?;
    let clients = issuers
        .iter()
        .map(|i| {
            GrpcIssuer::tls(
                format!("127.0.0.1:{}", i.port).parse().expect("host:port"),
                SERVER_NAME.to_string(),
                anchors.clone(),
                Duration::from_secs(30),
            )
        })
        .collect();
    let fleet = Arc::new(Fleet {
        hosts: tokens
            .into_iter()
            .enumerate()
            .map(|(i, (identity, token))| Host {
                identity,
                token,
                source: IpAddr::V4(Ipv4Addr::from(0x7f01_0000u32 + i as u32 + 1)),
                issuer: i % 2,
                cred: Mutex::new(None),
            })
            .collect(),
        clients,
        anchors,
        inflight: tokio::sync::Semaphore::new(inflight),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut rows = Vec::new();

    // 1. Bootstrap by token.
    let boot = rt.block_on(run_phase(&fleet, &issuers, "bootstrap", deadline, |f| {
        all_at_once(f, false)
    }))?;
    rows.push(boot.row(
        &format!("fleet bootstrap by token, {hosts} hosts, 2 issuers"),
        hosts,
    ));

    // 2. Steady state.
    let st = rt.block_on(run_phase(&fleet, &issuers, "steady state", deadline, |f| {
        steady_state(f, steady)
    }))?;
    let expired = fleet.expired(proxy_lib::clock::Clock::now(&proxy_lib::clock::SystemClock));
    println!("  hosts without a valid cert at the end of the steady state: {expired}");
    rows.push(format!(
        "| fleet steady state, {hosts} hosts at 100× a 24 h fleet's renewal rate ({:.0}/s asked) | {:.0} Certify/s, p50 {:.1} ms, p99 {:.1} ms, refused {}, issuers {:.0} % CPU, peak RSS {} MiB; {expired} hosts without a valid cert | every host valid |",
        hosts as f64 / PERIOD.as_secs_f64(),
        st.rate(),
        st.p50_ms,
        st.p99_ms,
        st.refusals_text(),
        st.cpu_percent(),
        st.peak_rss_mib(),
    ));

    // 3. Full-fleet restart: every host asks at once, by its cert.
    let restart = rt.block_on(run_phase(
        &fleet,
        &issuers,
        "full-fleet restart",
        deadline,
        |f| all_at_once(f, true),
    ))?;
    let expired = fleet.expired(proxy_lib::clock::Clock::now(&proxy_lib::clock::SystemClock));
    if expired > 0 {
        bail!("{expired} hosts hold no valid cert after the full-fleet restart");
    }
    rows.push(restart.row(
        &format!("fleet full-fleet restart, {hosts} hosts, 2 issuers: every host valid after"),
        hosts,
    ));

    // Scale-out: issuer CPU per Certify in the restart (the busiest phase).
    let cpu_per_certify = restart.issuer_cpu.as_secs_f64() / restart.ok.max(1) as f64;
    let per_core = 1.0 / cpu_per_certify;
    println!(
        "\nscale-out: the issuers spent {:.0} us of CPU per Certify in the restart: {:.0} Certify/s per issuer core",
        cpu_per_certify * 1e6,
        per_core
    );
    rows.push(format!(
        "| issuer CPU per Certify in the full-fleet restart (TLS handshake, auth, sign, audit) | {:.0} us = {:.0} Certify/s per core | |",
        cpu_per_certify * 1e6,
        per_core
    ));
    println!();
    for r in rows {
        println!("{r}");
    }
    drop(issuers);
    drop(rt);
    Ok(())
}

/// One simulated host.
struct Host {
    identity: Identity,
    token: Zeroizing<Vec<u8>>,
    source: IpAddr,
    issuer: usize,
    cred: Mutex<Option<Cred>>,
}

/// A host's installed cert and key.
struct Cred {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKey,
    not_after: SystemTime,
}

struct Fleet {
    hosts: Vec<Host>,
    clients: Vec<GrpcIssuer>,
    anchors: TrustAnchors,
    inflight: tokio::sync::Semaphore,
}

impl Fleet {
    fn expired(&self, now: SystemTime) -> usize {
        self.hosts
            .iter()
            .filter(|h| {
                h.cred
                    .lock()
                    .unwrap()
                    .as_ref()
                    .is_none_or(|c| c.not_after <= now)
            })
            .count()
    }
}

/// What one phase saw.
#[derive(Default)]
struct Tally {
    latencies_us: Vec<u64>,
    refusals: BTreeMap<String, u64>,
    ok: u64,
    last_ok: Option<Instant>,
}

struct PhaseResult {
    ok: u64,
    wall: Duration,
    converged: Duration,
    p50_ms: f64,
    p99_ms: f64,
    refusals: BTreeMap<String, u64>,
    issuer_cpu: Duration,
    /// This process's CPU: the simulated hosts' keygen, TLS and validation.
    hosts_cpu: Duration,
    peak_rss: u64,
}

impl PhaseResult {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.wall.as_secs_f64()
    }

    fn cpu_percent(&self) -> f64 {
        self.issuer_cpu.as_secs_f64() / self.wall.as_secs_f64() * 100.0
    }

    fn peak_rss_mib(&self) -> u64 {
        self.peak_rss / (1024 * 1024)
    }

    fn refusals_text(&self) -> String {
        if self.refusals.is_empty() {
            return "none".into();
        }
        self.refusals
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn row(&self, what: &str, hosts: usize) -> String {
        format!(
            "| {what} | {:.1} s ({:.0} Certify/s), p50 {:.1} ms, p99 {:.1} ms, refused {}, issuers {:.0} % CPU, peak RSS {} MiB | all {hosts} valid |",
            self.converged.as_secs_f64(),
            hosts as f64 / self.converged.as_secs_f64(),
            self.p50_ms,
            self.p99_ms,
            self.refusals_text(),
            self.cpu_percent(),
            self.peak_rss_mib(),
        )
    }
}

/// Runs one phase: resets the issuers' peak RSS, runs `work`, and reports.
async fn run_phase<F, Fut>(
    fleet: &Arc<Fleet>,
    issuers: &[IssuerProc; 2],
    name: &str,
    deadline: Duration,
    work: F,
) -> Result<PhaseResult>
where
    F: FnOnce(Arc<Fleet>) -> Fut,
    Fut: std::future::Future<Output = Tally>,
{
    for i in issuers {
        // "5" resets the peak RSS (VmHWM) to the current RSS.
        std::fs::write(format!("/proc/{}/clear_refs", i.pid()), "5")
            .context("reset an issuer's peak RSS")?;
    }
    let before: Vec<ProcUsage> = issuers.iter().map(|i| i.usage()).collect::<Result<_>>()?;
    let hosts_before = proc_usage(std::process::id())?.cpu;
    let start = Instant::now();
    let tally = tokio::time::timeout(deadline, work(fleet.clone()))
        .await
        .with_context(|| format!("{name}: not done within {}s", deadline.as_secs()))?;
    let wall = start.elapsed();
    let hosts_cpu = proc_usage(std::process::id())?
        .cpu
        .saturating_sub(hosts_before);
    let after: Vec<ProcUsage> = issuers.iter().map(|i| i.usage()).collect::<Result<_>>()?;
    let issuer_cpu = after
        .iter()
        .zip(&before)
        .map(|(a, b)| a.cpu.saturating_sub(b.cpu))
        .sum();
    let mut lat = tally.latencies_us;
    let r = PhaseResult {
        ok: tally.ok,
        wall,
        converged: tally.last_ok.map_or(wall, |t| t - start),
        p50_ms: quantile(&mut lat, 0.5) as f64 / 1000.0,
        p99_ms: quantile(&mut lat, 0.99) as f64 / 1000.0,
        refusals: tally.refusals,
        issuer_cpu,
        hosts_cpu,
        peak_rss: after.iter().map(|u| u.peak_rss).max().unwrap_or(0),
    };
    println!(
        "\n== {name}: {} Certify in {:.1}s ({:.0}/s); last host done at {:.1}s\n  latency p50 {:.1} ms, p99 {:.1} ms; refused: {}\n  issuers: {:.1} s CPU together ({:.0} % of one core), peak RSS {} MiB (the larger); the simulated hosts: {:.1} s CPU ({:.0} %)",
        r.ok,
        wall.as_secs_f64(),
        r.rate(),
        r.converged.as_secs_f64(),
        r.p50_ms,
        r.p99_ms,
        r.refusals_text(),
        issuer_cpu.as_secs_f64(),
        r.cpu_percent(),
        r.peak_rss_mib(),
        r.hosts_cpu.as_secs_f64(),
        r.hosts_cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
    );
    Ok(r)
}

/// Every host asks at once (bounded by the in-flight limit) until it holds a new cert: by
/// token (`by_cert` false) or by presenting its cert.
async fn all_at_once(fleet: Arc<Fleet>, by_cert: bool) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..fleet.hosts.len() {
        let (fleet, tally) = (fleet.clone(), tally.clone());
        tasks.spawn(async move { until_renewed(&fleet, i, by_cert, &tally).await });
    }
    while tasks.join_next().await.is_some() {}
    take(tally)
}

/// Each host renews every [`PERIOD`], its first renewal at a uniformly random point of the
/// period (the fleet's cert ages spread evenly), for `length`.
async fn steady_state(fleet: Arc<Fleet>, length: Duration) -> Tally {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut due: Vec<(Duration, usize)> = Vec::new();
    let mut rng = rand::rng();
    for i in 0..fleet.hosts.len() {
        let mut at = PERIOD.mul_f64(rng.random::<f64>());
        while at < length {
            due.push((at, i));
            at += PERIOD;
        }
    }
    due.sort_unstable();
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (at, i) in due {
        tokio::time::sleep_until(start + at).await;
        let (fleet, tally) = (fleet.clone(), tally.clone());
        tasks.spawn(async move { until_renewed(&fleet, i, true, &tally).await });
    }
    while tasks.join_next().await.is_some() {}
    take(tally)
}

fn take(tally: Arc<Mutex<Tally>>) -> Tally {
    std::mem::take(&mut *tally.lock().unwrap())
}

/// Asks until host `i` holds a new cert, backing off exponentially (50 ms doubling
/// to 5 s, each wait jittered to 50–150 %) after a refusal or a failed connection, as the
/// rotator does (with its delays scaled down like the lifetimes).
async fn until_renewed(fleet: &Fleet, i: usize, by_cert: bool, tally: &Mutex<Tally>) {
    let mut delay = Duration::from_millis(50);
    loop {
        let result = {
            let _permit = fleet.inflight.acquire().await.expect("never closed");
            renew_once(fleet, i, by_cert).await
        };
        match result {
            Ok(latency) => {
                let mut t = tally.lock().unwrap();
                t.ok += 1;
                t.latencies_us.push(latency.as_micros() as u64);
                t.last_ok = Some(Instant::now());
                return;
            }
            Err(code) => {
                *tally.lock().unwrap().refusals.entry(code).or_default() += 1;
                let jitter = rand::rng().random_range(0.5..1.5);
                tokio::time::sleep(delay.mul_f64(jitter)).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// One Certify for host `i`, validated and installed; the latency of the call, or what went
/// wrong (the gRPC code's name, or the kind of failure).
async fn renew_once(fleet: &Fleet, i: usize, by_cert: bool) -> Result<Duration, String> {
    let host = &fleet.hosts[i];
    let fresh = rotator::keygen::generate(&host.identity, false).map_err(|e| e.to_string())?;
    let presented = if by_cert {
        let cred = host.cred.lock().unwrap();
        let c = cred.as_ref().ok_or("no cert to present")?;
        Some(
            CertBundle::from_parts(c.chain.clone(), c.key.clone(), fleet.anchors.clone())
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let token = if by_cert {
        Zeroizing::new(Vec::new())
    } else {
        host.token.clone()
    };
    let client = fleet.clients[host.issuer]
        .clone()
        .with_source(Some(host.source));
    let start = Instant::now();
    let resp = client
        .certify_presenting(
            CertifyRequest {
                identity: host.identity.to_string(),
                token,
                csr_der: fresh.csr_der.clone(),
            },
            presented,
        )
        .await;
    let latency = start.elapsed();
    let resp = resp.map_err(|e| match e {
        IssueError::Status { code, .. } => format!("{code:?}"),
        IssueError::Connect { .. } | IssueError::Timeout(_) => "connect/timeout".into(),
        other => format!("other: {other}"),
    })?;
    let valid = rotator::validate::validate(
        &resp.leaf,
        &resp.intermediates,
        &host.identity,
        &fresh.spki_der,
        &fleet.anchors,
        proxy_lib::clock::Clock::now(&proxy_lib::clock::SystemClock),
        Duration::from_secs(20),
    )
    .map_err(|e| format!("invalid answer: {e}"))?;
    *host.cred.lock().unwrap() = Some(Cred {
        not_after: valid.leaf.not_after,
        chain: valid.chain,
        key: fresh.key,
    });
    Ok(latency)
}

/// Creates one token per host in the token store in one write (the CLI rewrites the whole
/// store per token): the first through `issuer::tokens::create` (which makes the file), the
/// rest minted by `issuer::tokens::mint` and appended to its records.
fn make_tokens(state: &Path, hosts: usize) -> Result<Vec<(Identity, Zeroizing<Vec<u8>>)>> {
    let store = state.join("tokens");
    let now = proxy_lib::clock::Clock::now(&proxy_lib::clock::SystemClock);
    let opts = |i: usize| -> Result<issuer::tokens::CreateOptions> {
        Ok(issuer::tokens::CreateOptions {
            identity: Identity::parse(&format!(
                "host-{i}.fleet.serviceaccount.identity.linkerd.cluster.local"
            ))?,
            ttl: None,
            allowed_ips: Vec::new(),
            uses: None,
        })
    };
    let mut out = Vec::with_capacity(hosts);
    let first = opts(0)?;
    let t = issuer::tokens::create(&store, &first, now)?;
    out.push((first.identity, Zeroizing::new(t.secret.as_bytes().to_vec())));
    let mut file: serde_json::Value = serde_json::from_slice(&std::fs::read(&store)?)?;
    let records = file["tokens"]
        .as_array_mut()
        .context("the token store has a tokens list")?;
    for i in 1..hosts {
        let o = opts(i)?;
        let t = issuer::tokens::mint(&o, now);
        records.push(serde_json::to_value(&t.record)?);
        out.push((o.identity, Zeroizing::new(t.secret.as_bytes().to_vec())));
    }
    // The file keeps its 0600 mode: it is rewritten in place.
    std::fs::write(&store, serde_json::to_vec(&file)?)?;
    Ok(out)
}

/// One `issuer serve` on the shared state dir.
struct IssuerProc {
    port: u16,
    child: ChildGuard,
}

impl IssuerProc {
    fn start(state: &Path, root: &Path, n: usize, lifetime: Duration) -> Result<Self> {
        let (child, port) = issuer_serve(state, &root.join(format!("issuer-{n}")), lifetime)?;
        Ok(Self { port, child })
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    fn usage(&self) -> Result<ProcUsage> {
        Ok(proc_usage(self.pid())?)
    }
}
