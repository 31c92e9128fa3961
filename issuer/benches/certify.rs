//! Issuance benchmark (`cargo bench -p issuer --bench certify`).
//!
//! Prints, in one run on the same cores: the in-process ceiling (CSR verify + leaf sign, one
//! thread per core, pre-generated CSRs), end-to-end Certify over TLS on loopback (the real
//! server with token auth, limits, audit and metrics, a load generator in the same process on
//! its own runtime), and their ratio — the aim is ≥ 50 %. The two are measured in
//! interleaved half-second rounds so that a busy machine skews both alike.
//! `BENCH_SECS` sets the seconds per figure (default 3); `BENCH_CLIENTS` the requests in
//! flight (default 32, over 4 HTTP/2 connections).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use issuer::audit::AuditTarget;
use issuer::config::{Config, Overrides};
use issuer::signer::LeafKind;
use linkerd2_proxy_api::identity::CertifyRequest;
use linkerd2_proxy_api::identity::identity_client::IdentityClient;
use proxy_lib::clock::{Clock, SystemClock};
use proxy_lib::identity::Identity;
use proxy_lib::verify::TrustAnchors;
use rustls_pki_types::ServerName;

const ID: &str = "legacy-database.external-services.serviceaccount.identity.linkerd.cluster.local";
const CSRS: usize = 512;
const CONNECTIONS: usize = 4;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    proxy_lib::install_crypto_provider();
    let secs = Duration::from_secs(env("BENCH_SECS", 3));
    let clients = env("BENCH_CLIENTS", 32) as usize;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("issuer");
    issuer::init::run(&issuer::init::InitOptions::new(&dir)).expect("init");
    let mut cfg = Config::load(&dir.join("issuer.toml"), &Overrides::default()).expect("config");
    cfg.audit = AuditTarget::File(dir.join("audit.log"));
    cfg.limits.per_credential_per_minute = std::num::NonZeroU32::MAX;
    let id = Identity::parse(ID).unwrap();
    let token = issuer::tokens::create(
        &cfg.tokens,
        &issuer::tokens::CreateOptions {
            identity: id.clone(),
            ttl: None,
            allowed_ips: Vec::new(),
            uses: None,
        },
        SystemClock.now(),
    )
    .expect("token")
    .secret
    .to_string();
    let csrs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..CSRS)
            .map(|_| {
                let key = rcgen::KeyPair::generate().unwrap();
                let mut p = rcgen::CertificateParams::new(vec![ID.to_string()]).unwrap();
                p.distinguished_name = rcgen::DistinguishedName::new();
                p.distinguished_name.push(rcgen::DnType::CommonName, ID);
                p.serialize_request(&key).unwrap().der().to_vec()
            })
            .collect(),
    );

    let server = issuer::server::Server::new(cfg.clone(), Arc::new(SystemClock)).expect("server");
    let shared = server.shared().clone();
    // In-process ceiling: verify + sign on every core, for `d`.
    let ceiling_round = |d: Duration| -> (u64, Duration) {
        let done = AtomicU64::new(0);
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..cores {
                let (shared, csrs, id, done) = (&shared, &csrs, &id, &done);
                s.spawn(move || {
                    let mut i = t;
                    let mut n = 0;
                    while start.elapsed() < d {
                        let csr = issuer::csr::validate(&csrs[i % CSRS], id).unwrap();
                        let ca = shared.ca.load();
                        let grant = shared
                            .policy
                            .grant(SystemClock.now(), ca.info().not_before, ca.info().not_after)
                            .unwrap();
                        issuer::signer::sign_leaf(
                            &ca,
                            id,
                            &csr.public_key,
                            &grant,
                            LeafKind::Workload,
                        )
                        .unwrap();
                        i += cores;
                        n += 1;
                    }
                    done.fetch_add(n, Ordering::Relaxed);
                });
            }
        });
        (done.load(Ordering::Relaxed), start.elapsed())
    };

    // End to end over TLS on loopback: the server on its runtime, the load on another.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("issuer-server")
        .worker_threads(cores)
        .enable_all()
        .build()
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = server_rt.spawn(server.clone().run(listener, None, async move {
        let _ = stop_rx.await;
    }));
    let anchors = std::fs::read(dir.join("ca.crt")).unwrap();
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("load-generator")
        .worker_threads(cores)
        .enable_all()
        .build()
        .unwrap();
    let running = Arc::new(AtomicBool::new(false));
    let quit = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let tasks = load_rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..CONNECTIONS {
            conns.push(client(addr, &anchors, &cfg.server_name).await);
        }
        let mut tasks = Vec::new();
        for c in 0..clients {
            let mut cl = conns[c % CONNECTIONS].clone();
            let (running, quit, count, csrs, token) = (
                running.clone(),
                quit.clone(),
                count.clone(),
                csrs.clone(),
                token.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut i = c;
                while !quit.load(Ordering::Relaxed) {
                    if !running.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        continue;
                    }
                    let req = CertifyRequest {
                        identity: ID.to_string(),
                        token: token.as_bytes().to_vec(),
                        certificate_signing_request: csrs[i % CSRS].clone(),
                    };
                    cl.certify(req).await.expect("certify");
                    count.fetch_add(1, Ordering::Relaxed);
                    i += clients;
                }
            }));
        }
        tasks
    });
    let e2e_round = |d: Duration| -> (u64, Duration) {
        running.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100)); // ramp up
        let base = count.load(Ordering::Relaxed);
        let t0 = Instant::now();
        std::thread::sleep(d);
        let n = count.load(Ordering::Relaxed) - base;
        let took = t0.elapsed();
        running.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50)); // drain
        (n, took)
    };

    // Interleave short rounds so that load from other processes hits both figures alike.
    let rounds = secs.as_secs().max(1) * 2;
    let round = Duration::from_millis(500);
    let (mut cn, mut ct, mut en, mut et) = (0, Duration::ZERO, 0, Duration::ZERO);
    for _ in 0..rounds {
        let (n, t) = ceiling_round(round);
        cn += n;
        ct += t;
        let (n, t) = e2e_round(round);
        en += n;
        et += t;
    }
    let ceiling = cn as f64 / ct.as_secs_f64();
    let e2e = en as f64 / et.as_secs_f64();
    quit.store(true, Ordering::SeqCst);
    load_rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    let _ = stop_tx.send(());
    server_rt.block_on(serving).unwrap().unwrap();

    println!("cores:                                   {cores}");
    println!("in-process ceiling (verify+sign):        {ceiling:>9.0} /s");
    println!("end-to-end Certify over TLS, {clients:>3} in flight: {e2e:>9.0} /s");
    println!(
        "ratio end-to-end / ceiling:              {:>9.1} %  (aim: >= 50 %)",
        100.0 * e2e / ceiling
    );
}

async fn client(
    addr: SocketAddr,
    anchors_pem: &[u8],
    server_name: &str,
) -> IdentityClient<tonic::transport::Channel> {
    let anchors = TrustAnchors::from_bytes(anchors_pem, "ca.crt").unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(proxy_lib::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(anchors.root_store())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            let name = name.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .unwrap();
    IdentityClient::new(channel)
}
