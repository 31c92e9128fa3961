//! Loopback benchmark of the mTLS proxy (`cargo bench -p proxy-lib --bench proxy`).
//!
//! Prints, in one run on the same cores: connect+echo rate and bulk echo throughput for plain
//! TCP to the app, through the inbound listener (full mTLS handshake per connection, no
//! resumption), and through outbound → inbound; and the ratios to plain TCP the project aims for
//! aims for (bulk ≥ 30 %, handshakes ≥ 20 %); and the reload latency (new `..data` version →
//! `POST /reload` answered → first handshake serving the new cert; the aim is p50 < 20 ms);
//! and the Linkerd inbound downgrade: HTTP/1.1 requests/s straight to an HTTP/1.1 app (kept-alive
//! connections) vs the same requests sent as linkerd2-proxy sends them (HTTP/2 over mTLS with
//! `l5d-orig-proto: HTTP/1.1`) through a Linkerd inbound listener that downgrades them.
//!
//! It also measures the handshake crypto ceiling: full TLS 1.3 mTLS handshakes (no resumption)
//! between a rustls `ClientConnection` and `ServerConnection` through in-memory buffers, one
//! loop per core, with the configs the proxies build (`proxy_lib::tls::server_config` and
//! `client_config`: the same certificates, verifiers, suites and key exchange). That is what the
//! signatures, chain verifications and key agreement of both sides cost on this machine with
//! no I/O at all, and the proxy's inbound full-handshake rate is printed as a share of it, beside
//! its share of plain connect+echo. Interleaved with the other figures in the same rounds.
//! Because wall-clock rates move with whatever else the machine runs, the on-CPU time per
//! connection (Linux `schedstat`) is printed too for plain, inbound and the ceiling.
//!
//! It ends with the headline figures as Markdown table rows (`| what | measured | aim |`).
//! `BENCH_SECS` sets the seconds per figure (default 3).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_lib::bundle::CertBundle;
use proxy_lib::clock::{Clock, SystemClock};
use proxy_lib::identity::{Identity, TrustDomain};
use proxy_lib::proxy::config::{Inbound, Limits, Outbound};
use proxy_lib::proxy::linkerd::LinkerdListener;
use proxy_lib::proxy::{Config, Proxy};
use proxy_lib::test_util::bench::{thousands, thread_cpu, threads_cpu};
use proxy_lib::test_util::{TestPki, write_data_dir};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Concurrent clients for the connection-rate figures.
const CONNECT_CLIENTS: usize = 4;
/// Parallel streams for the bulk figures.
const BULK_STREAMS: usize = 2;
/// Bytes per echo in the connection-rate figures.
const PING: &[u8] = b"0123456789abcdef";
/// Write size in the bulk figures.
const CHUNK: usize = 64 * 1024;

fn main() {
    proxy_lib::install_crypto_provider();
    let secs: u64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dur = Duration::from_secs(secs);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(dur));
}

struct Setup {
    app: SocketAddr,
    http_app: SocketAddr,
    linkerd: SocketAddr,
    inbound: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
    server: Identity,
    client_tls: Arc<rustls::ClientConfig>,
    /// The inbound proxy's config without resumption, for the crypto ceiling.
    ceiling_server: Arc<rustls::ServerConfig>,
    /// The outbound proxy's config without resumption, for the crypto ceiling.
    ceiling_client: Arc<rustls::ClientConfig>,
    pki: TestPki,
    server_dir: tempfile::TempDir,
    _client_dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let now = SystemClock.now();
    let pki = TestPki::new(now);
    let td = TrustDomain::default();
    let server = Identity::new("db", "data", &td).expect("identity");
    let client = Identity::new("web", "apps", &td).expect("identity");
    let day = Duration::from_secs(86_400);
    let leaf = |id: &Identity| -> CertBundle { pki.leaf(id, now - day, now + day) };
    let app = echo_app().await;
    let http_app = http_app().await;

    let server_dir = tempfile::tempdir().expect("tempdir");
    write_data_dir(server_dir.path(), &leaf(&server));
    let mut cfg = config(server_dir.path());
    cfg.inbound.push(Inbound {
        listen: "127.0.0.1:0".parse().expect("addr"),
        app: app.to_string(),
    });
    cfg.linkerd.listen.push(LinkerdListener {
        addr: "127.0.0.1:0".parse().expect("addr"),
        app: Some(http_app.to_string()),
    });
    let a = Proxy::bind(&cfg, Arc::new(SystemClock))
        .await
        .expect("bind");
    let inbound = a.inbound_addrs()[0];
    let linkerd = a.linkerd_addrs()[0];
    let admin = a.admin_addr();
    assert!(a.reloader().is_ready(), "server proxy has no certificate");
    tokio::spawn(a.run(std::future::pending()));

    let client_dir = tempfile::tempdir().expect("tempdir");
    write_data_dir(client_dir.path(), &leaf(&client));
    let mut cfg = config(client_dir.path());
    cfg.outbound.push(Outbound {
        listen: "127.0.0.1:0".parse().expect("addr"),
        target: inbound.to_string(),
        identity: ServerName::try_from(server.to_string()).expect("name"),
    });
    let b = Proxy::bind(&cfg, Arc::new(SystemClock))
        .await
        .expect("bind");
    let outbound = b.outbound_addrs()[0];
    tokio::spawn(b.run(std::future::pending()));

    let me = leaf(&client);
    let mut tls = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(pki.anchors().root_store())
        .with_client_auth_cert(me.chain.clone(), me.key.to_rustls())
        .expect("client config");
    tls.resumption = rustls::client::Resumption::disabled();
    let clock: proxy_lib::clock::SharedClock = Arc::new(SystemClock);
    let (server_leaf, client_leaf) = (leaf(&server), leaf(&client));
    let ceiling_server = proxy_lib::tls::server_config(
        &server_leaf,
        &server_leaf.anchors,
        &proxy_lib::tls::AllowList::default(),
        &clock,
    )
    .expect("server config");
    let ceiling_client = proxy_lib::tls::client_config(&client_leaf, &client_leaf.anchors, &clock)
        .expect("client config");
    Setup {
        app,
        http_app,
        linkerd,
        inbound,
        outbound,
        admin,
        server,
        client_tls: Arc::new(tls),
        ceiling_server: Arc::new(ceiling_server),
        ceiling_client: Arc::new(ceiling_client),
        pki,
        server_dir,
        _client_dir: client_dir,
    }
}

fn config(dir: &std::path::Path) -> Config {
    Config {
        certs: dir.to_path_buf(),
        trust_anchors: None,
        inbound: Vec::new(),
        outbound: Vec::new(),
        admin: "127.0.0.1:0".parse().expect("addr"),
        pidfile: None,
        allow_client: Vec::new(),
        limits: Limits::default(),
        watch_interval: None,
        linkerd: Default::default(),
    }
}

/// A loopback app: each accepted connection (no Nagle) is handed to `handle` in a task of its
/// own.
async fn app<F, Fut>(handle: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(handle(s));
        }
    });
    addr
}

async fn echo_app() -> SocketAddr {
    app(|s| async move {
        let (r, mut w) = s.into_split();
        let mut r = tokio::io::BufReader::with_capacity(CHUNK, r);
        let _ = tokio::io::copy_buf(&mut r, &mut w).await;
        let _ = w.shutdown().await;
    })
    .await
}

/// An HTTP/1.1-only app answering every request with a 2-byte body, keeping connections alive.
async fn http_app() -> SocketAddr {
    app(|s| async move {
        let svc = hyper::service::service_fn(|_req| async {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                b"ok",
            ))))
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(s), svc)
            .await;
    })
    .await
}

/// One client connection of the request-rate figures.
enum HttpConn {
    /// HTTP/1.1 straight to the app.
    Http1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    /// HTTP/2 over mTLS with `l5d-orig-proto: HTTP/1.1`, as linkerd2-proxy upgrades HTTP/1.1.
    Upgraded(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl HttpConn {
    async fn http1(app: SocketAddr) -> Self {
        let tcp = TcpStream::connect(app).await.expect("connect app");
        tcp.set_nodelay(true).expect("nodelay");
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("HTTP/1 handshake");
        tokio::spawn(conn);
        Self::Http1(send)
    }

    async fn upgraded(s: &Setup) -> Self {
        let tcp = TcpStream::connect(s.linkerd).await.expect("connect proxy");
        tcp.set_nodelay(true).expect("nodelay");
        let name = ServerName::try_from(s.server.to_string()).expect("name");
        let tls = tokio_rustls::TlsConnector::from(s.client_tls.clone())
            .connect(name, tcp)
            .await
            .expect("mTLS handshake");
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        Self::Upgraded(send)
    }

    /// One GET, its 2-byte body read.
    async fn get(&mut self) {
        let req = hyper::Request::builder().uri("http://bench.example/x");
        let rsp = match self {
            Self::Http1(send) => {
                send.ready().await.expect("ready");
                let req = req
                    .header("host", "bench.example")
                    .body(Empty::new())
                    .expect("request");
                send.send_request(req).await
            }
            Self::Upgraded(send) => {
                send.ready().await.expect("ready");
                let req = req
                    .version(hyper::Version::HTTP_2)
                    .header("l5d-orig-proto", "HTTP/1.1")
                    .body(Empty::new())
                    .expect("request");
                send.send_request(req).await
            }
        }
        .expect("response");
        assert_eq!(rsp.status(), 200, "request failed during the benchmark");
        let body = rsp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"ok");
    }
}

/// Requests completed over `dur` by `CONNECT_CLIENTS` clients, each sending one request after
/// another on its own connection (opened before the clock starts).
async fn request_rate(dur: Duration, conns: Vec<HttpConn>) -> Tally {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for mut c in conns {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                c.get().await; // warm-up (the proxy's pooled app connection included)
            }
            while Instant::now() < deadline {
                c.get().await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tally(start, &done, tasks).await
}

async fn run(dur: Duration) {
    let s = setup().await;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("mtls-proxy loopback benchmark: {cores} cores ({cpu})");
    println!(
        "{} s per figure in {ROUNDS} interleaved rounds; {CONNECT_CLIENTS} concurrent clients for connection rates, \
         {BULK_STREAMS} streams of {} KiB writes for bulk; client, proxies and echo app share \
         the cores",
        dur.as_secs(),
        CHUNK / 1024
    );

    // The three paths, as stream openers.
    let app = s.app;
    let plain = move || async move {
        let tcp = TcpStream::connect(app).await?;
        tcp.set_nodelay(true)?;
        Ok::<_, std::io::Error>(tcp)
    };
    let (inbound, server, tls) = (s.inbound, s.server.clone(), s.client_tls.clone());
    let mtls = move || {
        let (server, tls) = (server.clone(), tls.clone());
        async move {
            let tcp = TcpStream::connect(inbound).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(server.to_string()).expect("name");
            tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
        }
    };
    let outbound = s.outbound;
    let via_outbound = move || async move {
        let tcp = TcpStream::connect(outbound).await?;
        tcp.set_nodelay(true)?;
        Ok::<_, std::io::Error>(tcp)
    };

    // Figures are measured in interleaved rounds so that load from anything else on the
    // machine drifts into every figure alike and the ratios stay meaningful.
    let slice = dur / ROUNDS;
    let mut t = [Tally::default(); 9];
    let ceiling_name = ServerName::try_from(s.server.to_string()).expect("name");
    for _ in 0..ROUNDS {
        t[8] += handshake_ceiling(slice, &s.ceiling_server, &s.ceiling_client, &ceiling_name);
        // Connection rates: connect (+ handshake), echo 16 bytes, close.
        t[0] += rate(slice, move || async move { ping(plain().await?).await }).await;
        let m = mtls.clone();
        t[1] += rate(slice, move || {
            let m = m.clone();
            async move { ping(m().await?).await }
        })
        .await;
        t[2] += rate(
            slice,
            move || async move { ping(via_outbound().await?).await },
        )
        .await;
        // Bulk echo throughput.
        t[3] += bulk(slice, plain).await;
        t[4] += bulk(slice, mtls.clone()).await;
        t[5] += bulk(slice, via_outbound).await;
        // HTTP request rates: straight to the app, and downgraded through the proxy.
        let mut direct = Vec::new();
        let mut upgraded = Vec::new();
        for _ in 0..CONNECT_CLIENTS {
            direct.push(HttpConn::http1(s.http_app).await);
            upgraded.push(HttpConn::upgraded(&s).await);
        }
        t[6] += request_rate(slice, direct).await;
        t[7] += request_rate(slice, upgraded).await;
    }
    let plain_conn = t[0].per_sec();
    let in_conn = t[1].per_sec();
    let out_conn = t[2].per_sec();
    let plain_bulk = t[3].per_sec() / 1e6;
    let in_bulk = t[4].per_sec() / 1e6;
    let out_bulk = t[5].per_sec() / 1e6;
    let h1_direct = t[6].per_sec();
    let h2_downgraded = t[7].per_sec();
    let ceiling = t[8].per_sec();
    // On-CPU time per connection, which other load on the machine does not skew: every
    // thread of this process (client, proxies, app) for the connection rates, the ceiling's
    // own threads for the ceiling.
    let (plain_cpu, in_cpu, ceiling_cpu) = (t[0].cpu_us(), t[1].cpu_us(), t[8].cpu_us());

    let (answered, serving) = reload_latency(&s).await;

    let pct = |x: f64, base: f64| 100.0 * x / base;
    println!();
    println!("connect+echo (connections/s)");
    println!("  plain TCP to the app                 {plain_conn:>10.0}");
    println!(
        "  inbound, full mTLS handshake         {in_conn:>10.0}   {:>5.1} % of plain   (aim >= 20 %)",
        pct(in_conn, plain_conn)
    );
    println!(
        "  outbound -> inbound                  {out_conn:>10.0}   {:>5.1} % of plain   \
         (proxy-to-proxy resumption allowed)",
        pct(out_conn, plain_conn)
    );
    println!(
        "  handshake crypto ceiling (in memory) {ceiling:>10.0}   inbound is {:>5.1} % of it   \
         (aim >= 80 %)",
        pct(in_conn, ceiling)
    );
    if in_cpu > 0.0 {
        println!("  on-CPU time per connection (µs, every thread of the process):");
        println!(
            "    plain {plain_cpu:.0}, inbound full handshake {in_cpu:.0}, ceiling handshake \
             {ceiling_cpu:.0}: the ceiling is {:.1} % of the inbound cost, plain is {:.1} %",
            pct(ceiling_cpu, in_cpu),
            pct(plain_cpu, in_cpu)
        );
    }
    println!("bulk echo (MB/s of payload each way)");
    println!("  plain TCP to the app                 {plain_bulk:>10.1}");
    println!(
        "  inbound (TLS terminated)             {in_bulk:>10.1}   {:>5.1} % of plain   (aim >= 30 %)",
        pct(in_bulk, plain_bulk)
    );
    println!(
        "  outbound -> inbound (TLS both hops)  {out_bulk:>10.1}   {:>5.1} % of plain",
        pct(out_bulk, plain_bulk)
    );
    println!("HTTP requests (requests/s, {CONNECT_CLIENTS} kept-alive connections)");
    println!("  HTTP/1.1 straight to the app         {h1_direct:>10.0}");
    println!(
        "  HTTP/2 -> HTTP/1 downgrade (Linkerd) {h2_downgraded:>10.0}   {:>5.1} % of direct",
        pct(h2_downgraded, h1_direct)
    );
    println!("reload latency over {RELOADS} reloads (ms, p50 / p99)");
    println!(
        "  POST /reload answered                {:>6.2} / {:>6.2}",
        answered.0, answered.1
    );
    println!(
        "  ... and a new handshake has the cert {:>6.2} / {:>6.2}   (aim p50 < 20 ms)",
        serving.0, serving.1
    );
    println!(
        "| mtls-proxy full mTLS handshakes vs plain TCP connect+echo | {} vs {} /s = **{:.1} %** | ≥ 20 % |",
        thousands(in_conn),
        thousands(plain_conn),
        pct(in_conn, plain_conn)
    );
    println!(
        "| mtls-proxy full mTLS handshakes vs handshake crypto ceiling (both sides, in memory) | {} vs {} /s = **{:.0} %** (by CPU per handshake: {:.0} %) | ≥ 80 % |",
        thousands(in_conn),
        thousands(ceiling),
        pct(in_conn, ceiling),
        pct(ceiling_cpu, in_cpu)
    );
    println!(
        "| mtls-proxy bulk echo through inbound vs plain TCP | {in_bulk:.0} vs {plain_bulk:.0} MB/s = **{:.0} %** | ≥ 30 % |",
        pct(in_bulk, plain_bulk)
    );
    println!(
        "| mtls-proxy HTTP/2 → HTTP/1 downgrade vs HTTP/1.1 direct | {} vs {} req/s = **{:.0} %** | |",
        thousands(h2_downgraded),
        thousands(h1_direct),
        pct(h2_downgraded, h1_direct)
    );
    println!(
        "| mtls-proxy reload → new cert served, p50 / p99 | {:.2} / {:.2} ms | p50 < 20 ms |",
        serving.0, serving.1
    );
}

/// Full TLS 1.3 mTLS handshakes completed over `dur`, one loop per core, each between a fresh
/// `ClientConnection` and `ServerConnection` through in-memory buffers (no I/O, no
/// resumption): the crypto and protocol work of both sides alone.
fn handshake_ceiling(
    dur: Duration,
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
    name: &ServerName<'static>,
) -> Tally {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let done = AtomicU64::new(0);
    let cpu_ns = AtomicU64::new(0);
    let start = std::time::Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..cores {
            let (done, cpu_ns) = (&done, &cpu_ns);
            scope.spawn(move || {
                let cpu0 = thread_cpu();
                let mut n = 0;
                let mut buf = Vec::with_capacity(8192);
                while start.elapsed() < dur {
                    in_memory_handshake(server, client, name, &mut buf);
                    n += 1;
                }
                done.fetch_add(n, Ordering::Relaxed);
                let cpu = thread_cpu().saturating_sub(cpu0);
                cpu_ns.fetch_add(cpu.as_nanos() as u64, Ordering::Relaxed);
            });
        }
    });
    Tally {
        units: done.load(Ordering::Relaxed) as f64,
        secs: start.elapsed().as_secs_f64(),
        cpu: cpu_ns.load(Ordering::Relaxed) as f64 / 1e9,
    }
}

/// One full handshake between fresh connections over `buf`; panics if it fails or stalls (a
/// ceiling that skips work is no ceiling).
fn in_memory_handshake(
    server: &Arc<rustls::ServerConfig>,
    client: &Arc<rustls::ClientConfig>,
    name: &ServerName<'static>,
    buf: &mut Vec<u8>,
) {
    let mut c: rustls::Connection = rustls::ClientConnection::new(client.clone(), name.clone())
        .expect("client")
        .into();
    let mut s: rustls::Connection = rustls::ServerConnection::new(server.clone())
        .expect("server")
        .into();
    while c.is_handshaking() || s.is_handshaking() {
        let moved_c = flight(&mut c, &mut s, buf);
        let moved_s = flight(&mut s, &mut c, buf);
        assert!(moved_c || moved_s, "in-memory handshake stalled");
    }
    assert!(
        s.peer_certificates().is_some_and(|c| !c.is_empty()),
        "the client certificate was not presented"
    );
}

/// Moves what `from` has to send into `to` through `buf` and lets `to` process it; whether
/// anything moved.
fn flight(from: &mut rustls::Connection, to: &mut rustls::Connection, buf: &mut Vec<u8>) -> bool {
    buf.clear();
    while from.wants_write() {
        from.write_tls(buf).expect("write_tls");
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).expect("read_tls");
        to.process_new_packets().expect("handshake refused");
    }
    !buf.is_empty()
}

/// Reloads measured.
const RELOADS: usize = 50;

/// (p50, p99) in ms of: `POST /reload` answered, and answered plus the first new handshake
/// seeing the new certificate.
async fn reload_latency(s: &Setup) -> ((f64, f64), (f64, f64)) {
    let now = SystemClock.now();
    let day = Duration::from_secs(86_400);
    let mut answered = Vec::new();
    let mut serving = Vec::new();
    for _ in 0..RELOADS {
        let next = s.pki.leaf(&s.server, now - day, now + day);
        write_data_dir(s.server_dir.path(), &next);
        let start = Instant::now();
        let status = post_reload(s.admin).await;
        answered.push(start.elapsed());
        assert_eq!(status, 200, "reload refused");
        let tcp = TcpStream::connect(s.inbound).await.expect("connect");
        let name = ServerName::try_from(s.server.to_string()).expect("name");
        let tls = tokio_rustls::TlsConnector::from(s.client_tls.clone())
            .connect(name, tcp)
            .await
            .expect("handshake after reload");
        serving.push(start.elapsed());
        let served = tls.get_ref().1.peer_certificates().expect("certs")[0].clone();
        assert_eq!(
            proxy_lib::cert::sha256_hex(&served),
            next.leaf.sha256,
            "the new certificate is not served after the reload"
        );
    }
    (percentiles(answered), percentiles(serving))
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99))
}

async fn post_reload(admin: SocketAddr) -> u16 {
    let mut s = TcpStream::connect(admin).await.expect("connect admin");
    s.write_all(
        b"POST /reload HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await
    .expect("send");
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.expect("read");
    String::from_utf8_lossy(&resp)
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("HTTP status")
}

async fn ping<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> std::io::Result<()> {
    s.write_all(PING).await?;
    let mut back = [0u8; PING.len()];
    s.read_exact(&mut back).await?;
    if back != PING {
        return Err(std::io::Error::other("echo mismatch"));
    }
    s.shutdown().await?;
    Ok(())
}

/// Waits for the client tasks, then tallies the operations they counted in `done` since
/// `start`.
async fn tally(start: Instant, done: &AtomicU64, tasks: Vec<tokio::task::JoinHandle<()>>) -> Tally {
    for t in tasks {
        t.await.expect("client task");
    }
    Tally {
        units: done.load(Ordering::Relaxed) as f64,
        secs: start.elapsed().as_secs_f64(),
        cpu: 0.0,
    }
}

/// Measurement rounds (each figure gets `BENCH_SECS / ROUNDS` per round).
const ROUNDS: u32 = 3;

/// Units done (operations or bytes) over seconds measured.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    units: f64,
    secs: f64,
    /// On-CPU seconds of the threads doing the work (Linux `schedstat`; 0 where unavailable).
    cpu: f64,
}

impl Tally {
    fn per_sec(self) -> f64 {
        self.units / self.secs
    }

    /// On-CPU microseconds per unit.
    fn cpu_us(self) -> f64 {
        1e6 * self.cpu / self.units.max(1.0)
    }
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.units += o.units;
        self.secs += o.secs;
        self.cpu += o.cpu;
    }
}

/// Completed operations over `dur`, `CONNECT_CLIENTS` at a time. Fails loudly on any error:
/// a benchmark that drops connections has no figure to report.
async fn rate<F, Fut>(dur: Duration, op: F) -> Tally
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = std::io::Result<()>> + Send,
{
    // Warm-up.
    for _ in 0..20 {
        op().await.expect("warm-up connection");
    }
    let done = Arc::new(AtomicU64::new(0));
    let cpu0 = threads_cpu(|_| true);
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for _ in 0..CONNECT_CLIENTS {
        let op = op.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                op().await.expect("connection failed during the benchmark");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut t = tally(start, &done, tasks).await;
    t.cpu = threads_cpu(|_| true).saturating_sub(cpu0).as_secs_f64();
    t
}

/// Payload bytes echoed over `dur` by `BULK_STREAMS` streams (written, and read back intact
/// in length).
async fn bulk<F, Fut, S>(dur: Duration, open: F) -> Tally
where
    F: Fn() -> Fut,
    Fut: Future<Output = std::io::Result<S>>,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut streams = Vec::new();
    for _ in 0..BULK_STREAMS {
        streams.push(open().await.expect("open bulk stream"));
    }
    let start = Instant::now();
    let deadline = start + dur;
    let mut tasks = Vec::new();
    for s in streams {
        tasks.push(tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(s);
            let writer = tokio::spawn(async move {
                let chunk = vec![0x5au8; CHUNK];
                let mut sent = 0u64;
                while Instant::now() < deadline {
                    w.write_all(&chunk).await.expect("bulk write");
                    sent += CHUNK as u64;
                }
                w.shutdown().await.expect("bulk shutdown");
                sent
            });
            let mut buf = vec![0u8; CHUNK];
            let mut got = 0u64;
            loop {
                let n = r.read(&mut buf).await.expect("bulk read");
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            let sent = writer.await.expect("writer");
            assert_eq!(got, sent, "echoed byte count differs from what was sent");
            got
        }));
    }
    let mut total = 0u64;
    for t in tasks {
        total += t.await.expect("bulk task");
    }
    Tally {
        units: total as f64,
        secs: start.elapsed().as_secs_f64(),
        cpu: 0.0,
    }
}
