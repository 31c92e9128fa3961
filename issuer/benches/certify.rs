//! Issuance benchmark (`cargo bench -p issuer --bench certify`).
//!
//! Prints, in one run on the same cores, three figures measured in interleaved half-second
//! rounds (so that a busy machine skews them alike):
//!
//! - **ceiling**: the in-process issuance ceiling, CSR parse + signature check + leaf sign on
//!   every core with pre-generated CSRs, no transport at all;
//! - **issuer**: end-to-end Certify over TLS 1.3 on loopback against the real server (token
//!   authentication, rate and concurrency limits, the audit line written to a file before the
//!   answer, metrics), from a load generator in the same process on a runtime of its own;
//! - **naive**: the same load against a reference server built the obvious way, on a runtime
//!   of its own with as many threads: tonic and the `linkerd2-proxy-api` Identity service behind
//!   tokio-rustls with a serving certificate of the same kind from the same CA, the CSR parsed
//!   and its signature checked by rcgen and a leaf signed with the same issuer key; no
//!   authentication, audit, limits or metrics.
//!
//! and the ratios issuer / ceiling (aim ≥ 50 %) and issuer / naive (aim ≥ 1.1 ×). It then
//! prints where the cores went, as on-CPU time per request from Linux `schedstat` (so other
//! load on the machine does not skew it): the ceiling's verify+sign, the issuer's server and
//! audit threads, the naive server's threads and the load generator; and the end-to-end share a
//! server doing nothing but verify+sign could reach while this client shares its cores. It ends
//! with the headline figures as Markdown table rows (`| what | measured | aim |`).
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
use proxy_lib::test_util::bench::{thousands, thread_cpu, threads_cpu};
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
    let ceiling_round = |d: Duration| -> Round {
        let done = AtomicU64::new(0);
        let cpu_ns = AtomicU64::new(0);
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..cores {
                let (shared, csrs, id, done, cpu_ns) = (&shared, &csrs, &id, &done, &cpu_ns);
                let worker = move || {
                    let cpu0 = thread_cpu();
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
                    let cpu = thread_cpu().saturating_sub(cpu0);
                    cpu_ns.fetch_add(cpu.as_nanos() as u64, Ordering::Relaxed);
                };
                std::thread::Builder::new()
                    .name("ceiling".into())
                    .spawn_scoped(s, worker)
                    .expect("ceiling thread");
            }
        });
        Round {
            n: done.load(Ordering::Relaxed),
            took: start.elapsed(),
            server_cpu: Duration::from_nanos(cpu_ns.load(Ordering::Relaxed)),
            ..Round::default()
        }
    };

    // End to end over TLS on loopback: the issuer on one runtime, the load on another.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("issuer-server")
        .worker_threads(cores)
        .enable_all()
        .build()
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let wait_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let listener = server_rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = server_rt.spawn(
        server
            .clone()
            .run(listener, None, wait_stop(stop_rx.clone())),
    );
    // The reference server on a runtime of its own (its threads apart in a profile).
    let naive_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("naive-server")
        .worker_threads(cores)
        .enable_all()
        .build()
        .unwrap();
    let naive_addr = naive_rt.block_on(naive::start(
        &dir,
        &cfg.server_name,
        wait_stop(stop_rx.clone()),
    ));
    let anchors = std::fs::read(dir.join("ca.crt")).unwrap();
    let load_rt = tokio::runtime::Builder::new_multi_thread()
        .thread_name("load-generator")
        .worker_threads(cores)
        .enable_all()
        .build()
        .unwrap();
    let quit = Arc::new(AtomicBool::new(false));
    let start_load = |addr, server_threads| {
        load_rt.block_on(Load::start(
            addr,
            server_threads,
            &anchors,
            &cfg.server_name,
            clients,
            &csrs,
            &token,
            &quit,
        ))
    };
    let real = start_load(addr, &["issuer-server", "audit"]);
    let reference = start_load(naive_addr, &["naive-server"]);

    // Interleave short rounds so that load from other processes hits every figure alike.
    let rounds = secs.as_secs().max(1) * 2;
    let round = Duration::from_millis(500);
    let mut ceiling = Round::default();
    let mut e2e = Round::default();
    let mut naive = Round::default();
    for _ in 0..rounds {
        ceiling.add(ceiling_round(round));
        e2e.add(real.round(round));
        naive.add(reference.round(round));
    }
    quit.store(true, Ordering::SeqCst);
    load_rt.block_on(async {
        for t in real.tasks.into_iter().chain(reference.tasks) {
            let _ = t.await;
        }
    });
    let _ = stop_tx.send(true);
    server_rt.block_on(serving).unwrap().unwrap();

    // On-CPU time per request (Linux schedstat), whatever else the machine runs: where the
    // cores go, and the end-to-end share a server doing nothing but the ceiling's work could
    // reach with this load generator on the same cores.
    let us = |t: Duration, n: u64| t.as_secs_f64() * 1e6 / n.max(1) as f64;
    let crypto_us = us(ceiling.server_cpu, ceiling.n);
    let issuer_us = us(e2e.server_cpu, e2e.n);
    let naive_us = us(naive.server_cpu, naive.n);
    let load_us = us(e2e.load_cpu + naive.load_cpu, e2e.n + naive.n);
    let (ceiling, e2e, naive) = (ceiling.per_sec(), e2e.per_sec(), naive.per_sec());
    let share = 100.0 * e2e / ceiling;
    let times = e2e / naive;
    println!("cores:                                   {cores}");
    println!("in-process ceiling (verify+sign):        {ceiling:>9.0} /s");
    println!("end-to-end Certify over TLS, {clients:>3} in flight: {e2e:>9.0} /s");
    println!("naive tonic+rcgen server, same load:     {naive:>9.0} /s");
    println!("ratio end-to-end / ceiling:              {share:>9.1} %  (aim: >= 50 %)");
    println!("ratio end-to-end / naive server:         {times:>9.2} x  (aim: >= 1.1 x)");
    if crypto_us > 0.0 {
        println!("CPU per request (on-CPU time, µs):");
        println!("  ceiling, verify+sign                   {crypto_us:>9.1}");
        println!(
            "  issuer server threads + audit writer   {issuer_us:>9.1}   verify+sign is {:.0} % of it",
            100.0 * crypto_us / issuer_us
        );
        println!(
            "  naive server threads                   {naive_us:>9.1}   verify+sign is {:.0} % of it",
            100.0 * crypto_us / naive_us
        );
        println!("  load generator (client side)           {load_us:>9.1}");
        println!(
            "  end-to-end bound with this client on the same cores, zero-overhead server: \
             {:.0} % of the ceiling",
            100.0 * crypto_us / (crypto_us + load_us)
        );
    }
    println!(
        "| issuer Certify over TLS vs in-process ceiling | {} vs {} /s = **{share:.0} %** | ≥ 50 % |",
        thousands(e2e),
        thousands(ceiling)
    );
    println!(
        "| issuer Certify vs naive tonic+rcgen server (no auth, audit, limits) | {} vs {} /s = **{times:.2} ×** | ≥ 1.1 × |",
        thousands(e2e),
        thousands(naive)
    );
    if crypto_us > 0.0 {
        println!(
            "| issuer Certify on-CPU per request: issuer vs naive server vs verify+sign alone (client {load_us:.0} µs) | {issuer_us:.0} vs {naive_us:.0} vs {crypto_us:.0} µs | |"
        );
    }
}

/// One measured round (or their sum): operations, time, and the on-CPU time of the threads
/// doing the work (the server's, or the ceiling's) and of the load generator's.
#[derive(Debug, Default, Clone, Copy)]
struct Round {
    n: u64,
    took: Duration,
    server_cpu: Duration,
    load_cpu: Duration,
}

impl Round {
    fn add(&mut self, r: Round) {
        self.n += r.n;
        self.took += r.took;
        self.server_cpu += r.server_cpu;
        self.load_cpu += r.load_cpu;
    }

    fn per_sec(self) -> f64 {
        self.n as f64 / self.took.as_secs_f64()
    }
}

/// A load generator: `clients` Certify loops over [`CONNECTIONS`] HTTP/2 connections to one
/// server, sending only while `running`.
struct Load {
    /// The names of the server's threads, for their CPU time.
    server_threads: &'static [&'static str],
    running: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    #[allow(clippy::too_many_arguments)]
    async fn start(
        addr: SocketAddr,
        server_threads: &'static [&'static str],
        anchors: &[u8],
        server_name: &str,
        clients: usize,
        csrs: &Arc<Vec<Vec<u8>>>,
        token: &str,
        quit: &Arc<AtomicBool>,
    ) -> Self {
        let running = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let mut conns = Vec::new();
        for _ in 0..CONNECTIONS {
            conns.push(client(addr, anchors, server_name).await);
        }
        let mut tasks = Vec::new();
        for c in 0..clients {
            let mut cl = conns[c % CONNECTIONS].clone();
            let (running, quit, count, csrs, token) = (
                running.clone(),
                quit.clone(),
                count.clone(),
                csrs.clone(),
                token.to_string(),
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
                    let rsp = cl.certify(req).await.expect("certify").into_inner();
                    assert!(!rsp.leaf_certificate.is_empty(), "no leaf in the answer");
                    count.fetch_add(1, Ordering::Relaxed);
                    i += clients;
                }
            }));
        }
        Self {
            server_threads,
            running,
            count,
            tasks,
        }
    }

    /// Requests answered over `d` (after a ramp-up), then the load is paused and drained.
    fn round(&self, d: Duration) -> Round {
        const LOAD: &str = "load-generator";
        self.running.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(100)); // ramp up
        let base = self.count.load(Ordering::Relaxed);
        let cpu = || {
            (
                threads_cpu(|n| self.server_threads.contains(&n)),
                threads_cpu(|n| n == LOAD),
            )
        };
        let (server0, load0) = cpu();
        let t0 = Instant::now();
        std::thread::sleep(d);
        let n = self.count.load(Ordering::Relaxed) - base;
        let took = t0.elapsed();
        let (server1, load1) = cpu();
        self.running.store(false, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(50)); // drain
        Round {
            n,
            took,
            server_cpu: server1.saturating_sub(server0),
            load_cpu: load1.saturating_sub(load0),
        }
    }
}

/// The naive reference server: what a Certify endpoint costs without authentication, audit,
/// limits or metrics.
mod naive {
    use std::io;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use proxy_lib::clock::{Clock, SystemClock};

    use linkerd2_proxy_api::identity::identity_server::{Identity, IdentityServer};
    use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse};
    use rcgen::{CertificateParams, CertificateSigningRequestParams, Issuer, KeyPair};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::TcpStream;
    use tokio_rustls::server::TlsStream;

    struct Naive {
        issuer: Issuer<'static, KeyPair>,
        chain: Vec<Vec<u8>>,
    }

    #[tonic::async_trait]
    impl Identity for Naive {
        async fn certify(
            &self,
            request: tonic::Request<CertifyRequest>,
        ) -> Result<tonic::Response<CertifyResponse>, tonic::Status> {
            let req = request.into_inner();
            let csr =
                CertificateSigningRequestParams::from_der(&req.certificate_signing_request.into())
                    .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
            let now = SystemClock.now();
            let not_after = now + Duration::from_secs(24 * 3600);
            let mut params = csr.params;
            params.not_before = now.into();
            params.not_after = not_after.into();
            params.use_authority_key_identifier_extension = true;
            let cert = params
                .signed_by(&csr.public_key, &self.issuer)
                .map_err(|e| tonic::Status::internal(e.to_string()))?;
            Ok(tonic::Response::new(CertifyResponse {
                leaf_certificate: cert.der().to_vec(),
                intermediate_certificates: self.chain.clone(),
                valid_until: Some(not_after.into()),
            }))
        }
    }

    /// A TLS stream tonic can serve.
    struct Conn(TlsStream<TcpStream>);

    impl tonic::transport::server::Connected for Conn {
        type ConnectInfo = ();
        fn connect_info(&self) {}
    }

    impl AsyncRead for Conn {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Conn {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
        }

        fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_flush(cx)
        }

        fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
        }
    }

    /// Starts the reference server on loopback with the issuer key and certificate of the
    /// issuer in `dir` and a fresh P-256 serving certificate for `server_name` signed by it;
    /// it stops when `stop` completes.
    pub async fn start(
        dir: &Path,
        server_name: &str,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> SocketAddr {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect("issuer file");
        let issuer_pem = read("issuer.crt");
        let issuer_der = proxy_lib::pem::certs_from_bytes(issuer_pem.as_bytes(), "issuer.crt")
            .expect("issuer.crt")
            .swap_remove(0);
        let key = KeyPair::from_pem(&read("issuer.key")).expect("issuer.key");
        let issuer = Issuer::from_ca_cert_der(&issuer_der, key).expect("issuer");
        let serving_key = KeyPair::generate().expect("key");
        let serving = CertificateParams::new(vec![server_name.to_string()])
            .expect("params")
            .signed_by(&serving_key, &issuer)
            .expect("serving cert");
        let mut tls = rustls::ServerConfig::builder_with_provider(proxy_lib::crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("tls 1.3")
            .with_no_client_auth()
            .with_single_cert(
                vec![serving.der().clone(), issuer_der.clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(serving_key.serialize_der().into()),
            )
            .expect("tls config");
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Conn>>(64);
        let accepting = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = tx.send(Ok(Conn(tls))).await;
                    }
                });
            }
        });
        let svc = IdentityServer::new(Naive {
            issuer,
            chain: vec![issuer_der.to_vec()],
        });
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(rx), stop)
                .await;
            accepting.abort();
        });
        addr
    }
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
