//! Shared helpers: a throwaway PKI, in-process proxies on 127.0.0.1:0, a tiny echo app,
//! TLS test clients and a minimal HTTP/1.1 client for the admin endpoints.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proxy_lib::bundle::CertBundle;
use proxy_lib::clock::{Clock, FakeClock, SharedClock, SystemClock};
use proxy_lib::identity::{Identity, TrustDomain};
use proxy_lib::proxy::config::{Inbound, Limits, Outbound};
use proxy_lib::proxy::{Config, Proxy, Reloader};
use proxy_lib::test_util::TestPki;
use proxy_lib::verify::TrustAnchors;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

pub const HOUR: Duration = Duration::from_secs(3600);

pub fn now() -> SystemTime {
    SystemClock.now()
}

pub fn id(sa: &str, ns: &str) -> Identity {
    Identity::new(sa, ns, &TrustDomain::default()).unwrap()
}

/// A leaf for `identity` valid for an hour either side of now.
pub fn leaf(pki: &TestPki, identity: &Identity) -> CertBundle {
    let n = now();
    pki.leaf(identity, n - HOUR, n + HOUR)
}

pub fn init() {
    proxy_lib::install_crypto_provider();
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
}

/// A config with nothing but a cert dir; tests add listeners.
pub fn config(certs: &Path) -> Config {
    Config {
        certs: certs.to_path_buf(),
        trust_anchors: None,
        inbound: Vec::new(),
        outbound: Vec::new(),
        admin: "127.0.0.1:0".parse().unwrap(),
        pidfile: None,
        allow_client: Vec::new(),
        limits: Limits {
            drain_timeout: Duration::from_secs(2),
            ..Limits::default()
        },
        watch_interval: None,
        linkerd: Default::default(),
    }
}

pub fn inbound_to(app: SocketAddr) -> Inbound {
    Inbound {
        listen: "127.0.0.1:0".parse().unwrap(),
        app: app.to_string(),
    }
}

pub fn outbound_to(target: SocketAddr, identity: &Identity) -> Outbound {
    Outbound {
        listen: "127.0.0.1:0".parse().unwrap(),
        target: target.to_string(),
        identity: ServerName::try_from(identity.to_string()).unwrap(),
    }
}

/// An in-process proxy, stopped when dropped.
pub struct Running {
    pub inbound: Vec<SocketAddr>,
    pub outbound: Vec<SocketAddr>,
    pub linkerd: Vec<SocketAddr>,
    pub admin: SocketAddr,
    pub reloader: Arc<Reloader>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops the proxy and waits for it (drain included).
    pub async fn stop(mut self) {
        self.begin_stop();
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }

    /// Asks the proxy to stop (as SIGTERM does) without waiting: it stops accepting and
    /// drains; [`Running::stop`] then waits for the end.
    pub fn begin_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Whether `run` has returned.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

pub async fn start(config: &Config, clock: SharedClock) -> Running {
    let proxy = Proxy::bind(config, clock).await.expect("bind proxy");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let inbound = proxy.inbound_addrs();
    let outbound = proxy.outbound_addrs();
    let linkerd = proxy.linkerd_addrs();
    let admin = proxy.admin_addr();
    let reloader = proxy.reloader().clone();
    let task = tokio::spawn(async move {
        proxy
            .run(async {
                let _ = rx.await;
            })
            .await
            .expect("proxy run");
    });
    Running {
        inbound,
        outbound,
        linkerd,
        admin,
        reloader,
        stop: Some(tx),
        task: Some(task),
    }
}

pub fn fake_clock() -> (FakeClock, SharedClock) {
    let c = FakeClock::new(now());
    (c.clone(), Arc::new(c))
}

/// An app that echoes every byte and half-closes when its client does. Runs until the test's
/// runtime ends.
pub async fn echo_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A tiny HTTP/1.1 app answering every request with `body` and closing.
pub async fn http_app(body: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
                     connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// A TLS 1.3 client config trusting `anchors`, presenting `cert` when given, without session
/// resumption (every connection is a full handshake).
pub fn client_config(
    anchors: &TrustAnchors,
    cert: Option<&CertBundle>,
) -> Arc<rustls::ClientConfig> {
    let b = rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_root_certificates(anchors.root_store());
    let mut c = match cert {
        Some(c) => b
            .with_client_auth_cert(c.chain.clone(), c.key.to_rustls())
            .unwrap(),
        None => b.with_no_client_auth(),
    };
    c.resumption = rustls::client::Resumption::disabled();
    Arc::new(c)
}

pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server: &Identity,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(server.to_string()).unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// [`tls_connect`] that must succeed within 10 s (a test fails instead of hanging).
pub async fn tls_connect_within(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server: &Identity,
) -> TlsStream<TcpStream> {
    tokio::time::timeout(Duration::from_secs(10), tls_connect(addr, config, server))
        .await
        .unwrap_or_else(|_| panic!("no handshake with {addr} within 10 s"))
        .unwrap_or_else(|e| panic!("handshake with {addr}: {e}"))
}

/// SHA-256 of the leaf the server presented.
pub fn served_fingerprint(tls: &TlsStream<TcpStream>) -> String {
    let certs = tls.get_ref().1.peer_certificates().expect("server certs");
    proxy_lib::cert::sha256_hex(&certs[0])
}

/// Sends `data` through an established stream, half-closes, and returns all bytes read back.
pub async fn round_trip<S>(mut s: S, data: &[u8]) -> std::io::Result<Vec<u8>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(data).await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).await?;
    Ok(back)
}

/// Connects with `config` and tries one echo round trip; `Ok` only if the bytes came back.
pub async fn echo_through_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    server: &Identity,
    data: &[u8],
) -> Result<Vec<u8>, String> {
    let tls = tls_connect(addr, config, server)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let back = round_trip(tls, data)
        .await
        .map_err(|e| format!("transfer: {e}"))?;
    if back == data {
        Ok(back)
    } else {
        Err(format!(
            "got {} bytes back, sent {}",
            back.len(),
            data.len()
        ))
    }
}

/// A minimal HTTP/1.1 request: (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let text = String::from_utf8_lossy(&resp).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The value of one sample line in the /metrics text (0 when absent).
pub fn metric(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == sample).then(|| value.parse().unwrap())
        })
        .unwrap_or(0.0)
}

pub async fn metrics_text(admin: SocketAddr) -> String {
    let (status, body) = http(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    body
}

/// Polls the metrics until `sample` reaches `want` (handshake failures are counted by the
/// server task a moment after the client sees them), then returns the text.
pub async fn wait_metric(admin: SocketAddr, sample: &str, want: f64) -> String {
    for _ in 0..250 {
        let text = metrics_text(admin).await;
        if metric(&text, sample) == want {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = metrics_text(admin).await;
    panic!("{sample} never reached {want}:\n{text}");
}

/// Writes raw file contents as a new version dir and swaps `..data` to it (like
/// `write_data_dir`, for sets that are deliberately broken).
pub fn write_raw_version(dir: &Path, cert: &[u8], key: &[u8], ca: &[u8]) {
    use proxy_lib::certdir::{CA_FILE, CERT_FILE, DATA_LINK, KEY_FILE};
    let name = format!("..raw.{:016x}", rand::random::<u64>());
    let version = dir.join(&name);
    std::fs::create_dir(&version).unwrap();
    std::fs::write(version.join(CERT_FILE), cert).unwrap();
    std::fs::write(version.join(KEY_FILE), key).unwrap();
    std::fs::write(version.join(CA_FILE), ca).unwrap();
    let tmp = dir.join(format!("..tmp.{:016x}", rand::random::<u64>()));
    std::os::unix::fs::symlink(&name, &tmp).unwrap();
    std::fs::rename(&tmp, dir.join(DATA_LINK)).unwrap();
}

pub fn pem_of(b: &CertBundle) -> (String, String, String) {
    (
        proxy_lib::pem::certs_to_pem(&b.chain),
        b.key.to_pem().to_string(),
        proxy_lib::pem::certs_to_pem(b.anchors.certs()),
    )
}
