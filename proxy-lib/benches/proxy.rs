//! Loopback benchmark of the mTLS proxy (`cargo bench -p proxy-lib --bench proxy`).
//!
//! Prints, in one run on the same cores: connect+echo rate and bulk echo throughput for plain
//! TCP to the app, through the inbound listener (full mTLS handshake per connection, no
//! resumption), and through outbound → inbound; and the ratios to plain TCP that SPEC §8 sets
//! aims for (bulk ≥ 30 %, handshakes ≥ 20 %). `BENCH_SECS` sets the seconds per figure
//! (default 3).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use proxy_lib::bundle::CertBundle;
use proxy_lib::clock::{Clock, SystemClock};
use proxy_lib::identity::{Identity, TrustDomain};
use proxy_lib::proxy::config::{Inbound, Limits, Outbound};
use proxy_lib::proxy::{Config, Proxy};
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
    inbound: SocketAddr,
    outbound: SocketAddr,
    server: Identity,
    client_tls: Arc<rustls::ClientConfig>,
    _dirs: Vec<tempfile::TempDir>,
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

    let server_dir = tempfile::tempdir().expect("tempdir");
    write_data_dir(server_dir.path(), &leaf(&server));
    let mut cfg = config(server_dir.path());
    cfg.inbound.push(Inbound {
        listen: "127.0.0.1:0".parse().expect("addr"),
        app: app.to_string(),
    });
    let a = Proxy::bind(&cfg, Arc::new(SystemClock))
        .await
        .expect("bind");
    let inbound = a.inbound_addrs()[0];
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
    Setup {
        app,
        inbound,
        outbound,
        server,
        client_tls: Arc::new(tls),
        _dirs: vec![server_dir, client_dir],
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
    }
}

async fn echo_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = tokio::io::BufReader::with_capacity(CHUNK, r);
                let _ = tokio::io::copy_buf(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
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
        "{} s per figure; {CONNECT_CLIENTS} concurrent clients for connection rates, \
         {BULK_STREAMS} streams of {} KiB writes for bulk; client, proxies and echo app share \
         the cores",
        dur.as_secs(),
        CHUNK / 1024
    );

    // Connection rates: connect, echo 16 bytes, close.
    let app = s.app;
    let plain_conn = rate(dur, move || async move {
        let tcp = TcpStream::connect(app).await?;
        tcp.set_nodelay(true)?;
        ping(tcp).await
    })
    .await;
    let (inbound, server, tls) = (s.inbound, s.server.clone(), s.client_tls.clone());
    let in_conn = rate(dur, move || {
        let (server, tls) = (server.clone(), tls.clone());
        async move {
            let tcp = TcpStream::connect(inbound).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(server.to_string()).expect("name");
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            ping(stream).await
        }
    })
    .await;
    let outbound = s.outbound;
    let out_conn = rate(dur, move || async move {
        let tcp = TcpStream::connect(outbound).await?;
        tcp.set_nodelay(true)?;
        ping(tcp).await
    })
    .await;

    // Bulk echo throughput.
    let plain_bulk = bulk(dur, move || async move {
        let tcp = TcpStream::connect(app).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    })
    .await;
    let (server, tls) = (s.server.clone(), s.client_tls.clone());
    let in_bulk = bulk(dur, move || {
        let (server, tls) = (server.clone(), tls.clone());
        async move {
            let tcp = TcpStream::connect(inbound).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(server.to_string()).expect("name");
            tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
        }
    })
    .await;
    let out_bulk = bulk(dur, move || async move {
        let tcp = TcpStream::connect(outbound).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    })
    .await;

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

/// Completed operations per second over `dur`, `CONNECT_CLIENTS` at a time. Fails loudly on
/// any error: a benchmark that drops connections has no figure to report.
async fn rate<F, Fut>(dur: Duration, op: F) -> f64
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = std::io::Result<()>> + Send,
{
    // Warm-up.
    for _ in 0..20 {
        op().await.expect("warm-up connection");
    }
    let done = Arc::new(AtomicU64::new(0));
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
    for t in tasks {
        t.await.expect("client task");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Payload MB/s echoed over `dur` by `BULK_STREAMS` streams (written, and read back intact
/// in length).
async fn bulk<F, Fut, S>(dur: Duration, open: F) -> f64
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
    total as f64 / start.elapsed().as_secs_f64() / 1e6
}
