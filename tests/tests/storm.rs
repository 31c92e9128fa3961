//! Renewal storm: a fleet of hosts (rotator library clients in this process, each with its own
//! key, identity and token, spread over source addresses 127.0.x.y so the issuer's per-source
//! limits see a fleet) renews at the same moment against one issuer with its default limits.
//! Every host must hold a valid certificate within the backoff window; the only refusals
//! allowed are RESOURCE_EXHAUSTED (back off and retry). Prints the time to converge, the
//! refusals and the process's memory (issuer and clients share it).
//!
//! `STORM_HOSTS` sets the fleet's size (default 1,000).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use issuer::audit::AuditTarget;
use issuer::config::{Config, Overrides};
use issuer::server::Server;
use issuer::tokens::{self, CreateOptions};
use proxy_lib::clock::{Clock, SystemClock};
use proxy_lib::identity::Identity;
use rotator::client::{CertifyRequest, GrpcIssuer, Issue, IssueError};
use rotator::config::HostPort;
use rotator::schedule::{Policy, backoff};

/// How long the fleet may take: well inside the backoff window of a renewal that starts at
/// 70 % of a 24 h certificate.
const CONVERGE_WITHIN: Duration = Duration::from_secs(300);

fn hosts() -> usize {
    std::env::var("STORM_HOSTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// Host `i`'s source address: 127.0.x.y, never 127.0.0.1.
fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        (i / 250 + 1) as u8,
        (i % 250 + 1) as u8,
    ))
}

/// `/proc/self/status` field in KiB (Linux).
fn status_kib(field: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[derive(Debug, Default)]
struct HostResult {
    attempts: u32,
    exhausted: u32,
    other: Vec<String>,
    done_after: Option<Duration>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_renewing_at_once_converges_with_only_resource_exhausted_refusals() {
    let n = hosts();
    proxy_lib::install_crypto_provider();
    // Both ends of every connection live in this process.
    proxy_lib::net::raise_open_file_limit(4 * n as u64);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("issuer");
    let now = SystemClock.now();
    issuer::init::run_at(&issuer::init::InitOptions::new(&dir), now).unwrap();
    let mut cfg = Config::load(&dir.join("issuer.toml"), &Overrides::default()).unwrap();
    cfg.audit = AuditTarget::File(dir.join("audit.log"));

    // One identity and token per host, made before the issuer starts.
    let fleet: Vec<(Identity, String)> = (0..n)
        .map(|i| {
            let id = Identity::parse(&format!(
                "host-{i}.fleet.serviceaccount.identity.linkerd.cluster.local"
            ))
            .unwrap();
            let o = CreateOptions::new(id.clone());
            let t = tokens::create(&cfg.tokens, &o, now).unwrap();
            (id, t.secret.to_string())
        })
        .collect();

    let rss_before = status_kib("VmRSS:");
    let server = Server::new(cfg.clone(), Arc::new(SystemClock)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(server.run(listener, None, async move {
        let _ = stopped.await;
    }));
    let anchors = proxy_lib::verify::TrustAnchors::read(&dir.join("ca.crt")).unwrap();

    let policy = Policy::default();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (id, token)) in fleet.into_iter().enumerate() {
        let client = GrpcIssuer::tls(
            HostPort {
                host: "127.0.0.1".into(),
                port: addr.port(),
            },
            cfg.server_name.clone(),
            anchors.clone(),
            Duration::from_secs(30),
        )
        .with_source(Some(source(i)));
        let (anchors, policy) = (anchors.clone(), policy);
        tasks.spawn(async move {
            let mut r = HostResult::default();
            let k = rotator::keygen::generate(&id, true).unwrap();
            while started.elapsed() < CONVERGE_WITHIN {
                r.attempts += 1;
                let req = CertifyRequest {
                    identity: id.to_string(),
                    token: zeroize::Zeroizing::new(token.clone().into_bytes()),
                    csr_der: k.csr_der.clone(),
                };
                match client.certify(req).await {
                    Ok(resp) => {
                        let now = SystemClock.now();
                        if let Err(e) = rotator::validate::validate(
                            &resp.leaf,
                            &resp.intermediates,
                            &id,
                            &k.spki_der,
                            &anchors,
                            now,
                            Duration::from_secs(60),
                        ) {
                            r.other.push(format!("invalid answer: {e}"));
                        }
                        r.done_after = Some(started.elapsed());
                        return r;
                    }
                    Err(IssueError::Status {
                        code: tonic::Code::ResourceExhausted,
                        ..
                    }) => {
                        r.exhausted += 1;
                        // The rotator's own backoff: full jitter, doubling from 1 s.
                        let wait = backoff(r.exhausted - 1, &policy, rand::random::<f64>());
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) => {
                        r.other.push(e.to_string());
                        return r;
                    }
                }
            }
            r
        });
    }
    let mut results = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        results.push(r.unwrap());
    }
    let converged = started.elapsed();
    let rss_after = status_kib("VmRSS:");
    let peak = status_kib("VmHWM:");
    let _ = stop.send(());
    join.await.unwrap().unwrap();

    let done = results.iter().filter(|r| r.done_after.is_some()).count();
    let exhausted: u32 = results.iter().map(|r| r.exhausted).sum();
    let attempts: u32 = results.iter().map(|r| r.attempts).sum();
    let max_attempts = results.iter().map(|r| r.attempts).max().unwrap_or(0);
    let others: Vec<&String> = results.iter().flat_map(|r| &r.other).collect();
    println!(
        "storm: {n} hosts, {done} certified in {:.1} s; {attempts} requests, {exhausted} RESOURCE_EXHAUSTED, at most {max_attempts} attempts per host",
        converged.as_secs_f64()
    );
    println!(
        "storm: process RSS (issuer and all clients) {} KiB before, {} KiB after, peak {} KiB",
        rss_before.unwrap_or(0),
        rss_after.unwrap_or(0),
        peak.unwrap_or(0)
    );
    assert!(
        others.is_empty(),
        "refusals other than RESOURCE_EXHAUSTED: {others:?}"
    );
    assert_eq!(done, n, "every host holds a valid certificate");
}
