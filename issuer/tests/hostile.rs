//! The issuer under hostile clients with no token: an attacker on another loopback address
//! (127.0.0.2) holding thousands of sockets that never speak, and thousands of completed TLS
//! connections that never send a request, does not stop a host on 127.0.0.1 from renewing.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{ID, certify, http_get, metric, p256_csr, request, tls_client};
use issuer::audit::AuditTarget;
use issuer::config::{Config, Overrides};
use issuer::server::Server;
use issuer::tokens::{self, CreateOptions};
use proxy_lib::clock::{Clock, SystemClock};
use proxy_lib::identity::Identity;
use rustls_pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};

/// How many sockets the attacker opens of each kind.
const ATTACK_SOCKETS: usize = 2000;
/// How long the host keeps renewing while the attacker holds on.
const RENEWING_FOR: Duration = Duration::from_secs(30);

struct Issuer {
    _tmp: tempfile::TempDir,
    dir: std::path::PathBuf,
    cfg: Config,
    server: Arc<Server>,
    addr: SocketAddr,
    admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<issuer::Result<()>>>,
}

impl Issuer {
    async fn start() -> Self {
        Self::start_with(|dir| AuditTarget::File(dir.join("audit.log"))).await
    }

    /// Starts with the audit log where `audit` says (given the issuer's dir).
    async fn start_with(audit: impl FnOnce(&std::path::Path) -> AuditTarget) -> Self {
        proxy_lib::install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("issuer");
        issuer::init::run_at(&issuer::init::InitOptions::new(&dir), SystemClock.now()).unwrap();
        let mut cfg = Config::load(&dir.join("issuer.toml"), &Overrides::default()).unwrap();
        cfg.audit = audit(&dir);
        let server = Server::new(cfg.clone(), Arc::new(SystemClock)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn(server.clone().run(listener, Some(admin), async move {
            let _ = rx.await;
        }));
        Self {
            _tmp: tmp,
            dir,
            cfg,
            server,
            addr,
            admin: admin_addr,
            stop: Some(tx),
            join: Some(join),
        }
    }

    fn anchors_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("ca.crt")).unwrap()
    }

    fn token(&self) -> String {
        let o = CreateOptions::new(Identity::parse(ID).unwrap());
        let secret = tokens::create(&self.cfg.tokens, &o, SystemClock.now())
            .unwrap()
            .secret
            .to_string();
        // Requests read a snapshot of the store, refreshed every second: take it in now.
        self.server.refresh_tokens();
        secret
    }

    async fn metric(&self, name: &str) -> f64 {
        let (code, body) = http_get(self.admin, "/metrics").await;
        assert_eq!(code, 200);
        metric(&body, name).unwrap_or(0.0)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.join.take().unwrap())
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

/// A TCP connection to `to` from the attacker's address.
async fn from_attacker(to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind("127.0.0.2:0".parse().unwrap())?;
    s.connect(to).await
}

/// The host renews once a second over a fresh connection each time (as the rotator does)
/// for [`RENEWING_FOR`]; returns (successes, failures with their reasons).
async fn renew_for_a_while(iss: &Issuer, token: &str) -> (usize, Vec<String>) {
    let (mut ok, mut failed) = (0, Vec::new());
    let end = tokio::time::Instant::now() + RENEWING_FOR;
    while tokio::time::Instant::now() < end {
        let attempt = async {
            let mut client = tls_client(iss.addr, &iss.anchors_pem(), &iss.cfg.server_name).await;
            let (_key, csr) = p256_csr(ID);
            certify(&mut client, request(ID, token.as_bytes(), csr)).await
        };
        // Generous per-request bound: successes are counted, not timed.
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(status)) => failed.push(format!("{status:?}")),
            Err(_) => failed.push("no answer within 10 s".into()),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    (ok, failed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_from_one_source_do_not_stop_renewals_from_another() {
    // Both ends of every attacker socket live in this process.
    proxy_lib::net::raise_open_file_limit(3 * ATTACK_SOCKETS as u64);
    let iss = Issuer::start().await;
    let token = iss.token();

    // Sockets that never send a byte: the issuer holds a few per source, refuses the rest.
    let mut idle = Vec::new();
    for _ in 0..ATTACK_SOCKETS {
        if let Ok(s) = from_attacker(iss.addr).await {
            idle.push(s);
        }
    }
    let (ok, failed) = renew_for_a_while(&iss, &token).await;
    assert!(failed.is_empty(), "{ok} renewed, failed: {failed:?}");
    assert!(ok >= 10, "only {ok} renewals in {RENEWING_FOR:?}");
    assert!(
        iss.metric("issuer_connections_refused_total{reason=\"source_pending\"}")
            .await
            > 0.0,
        "the attacker's surplus was refused"
    );
    drop(idle);
    iss.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_connections_from_one_source_do_not_stop_renewals_from_another() {
    proxy_lib::net::raise_open_file_limit(3 * ATTACK_SOCKETS as u64);
    let iss = Issuer::start().await;
    let token = iss.token();
    let anchors =
        proxy_lib::verify::TrustAnchors::from_bytes(&iss.anchors_pem(), "ca.crt").unwrap();
    let clock: proxy_lib::clock::SharedClock = Arc::new(SystemClock);
    let connector = proxy_lib::tls::Connector::without_client_cert(&anchors, &clock).unwrap();
    let name = ServerName::try_from(iss.cfg.server_name.clone()).unwrap();

    // Completed TLS handshakes, then silence: each source may hold a bounded number, and
    // a connection that sends no request is closed after its deadline.
    let mut held = Vec::new();
    let mut completed = 0;
    for _ in 0..ATTACK_SOCKETS {
        let Ok(tcp) = from_attacker(iss.addr).await else {
            continue;
        };
        if let Ok(tls) = connector.connect(name.clone(), tcp).await {
            completed += 1;
            held.push(tls);
        }
    }
    assert!(
        completed <= issuer::server::MAX_CONNECTIONS_PER_SOURCE,
        "{completed} completed handshakes from one source"
    );
    let (ok, failed) = renew_for_a_while(&iss, &token).await;
    assert!(failed.is_empty(), "{ok} renewed, failed: {failed:?}");
    assert!(ok >= 10, "only {ok} renewals in {RENEWING_FOR:?}");
    assert!(
        iss.metric("issuer_connections_refused_total{reason=\"source_connections\"}")
            .await
            > 0.0,
        "the attacker's surplus was refused"
    );
    drop(held);
    iss.stop().await;
}

/// A Certify client over TLS whose connections come from `source` (another loopback address
/// plays another host).
async fn client_from(iss: &Issuer, source: &str) -> common::Client {
    linkerd2_proxy_api::identity::identity_client::IdentityClient::new(
        channel_from(iss, source).await,
    )
}

/// A gRPC channel to the issuer over TLS from `source`.
async fn channel_from(iss: &Issuer, source: &str) -> tonic::transport::Channel {
    use hyper_util::rt::TokioIo;
    let anchors =
        proxy_lib::verify::TrustAnchors::from_bytes(&iss.anchors_pem(), "ca.crt").unwrap();
    let clock: proxy_lib::clock::SharedClock = Arc::new(SystemClock);
    let connector = proxy_lib::tls::Connector::without_client_cert(&anchors, &clock).unwrap();
    let name = ServerName::try_from(iss.cfg.server_name.clone()).unwrap();
    let (addr, source): (SocketAddr, SocketAddr) =
        (iss.addr, format!("{source}:0").parse().unwrap());
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let (connector, name) = (connector.clone(), name.clone());
            async move {
                let s = TcpSocket::new_v4()?;
                s.bind(source)?;
                let tcp = s.connect(addr).await?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(std::io::Error::other)?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .expect("connect to issuer")
}

fn audit_bytes(iss: &Issuer) -> Vec<u8> {
    std::fs::read(iss.dir.join("audit.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_failing_requests_is_throttled_and_bounded_in_the_audit_log() {
    let iss = Issuer::start().await;
    let before = audit_bytes(&iss).len();

    // No token, 60 KB identities, for 5 s as fast as one client goes.
    let mut flood = client_from(&iss, "127.0.0.2").await;
    let huge = "a".repeat(60_000);
    let (_key, csr) = p256_csr(ID);
    let (mut sent, mut throttled) = (0, 0);
    let end = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < end {
        let r = certify(&mut flood, request(&huge, b"", csr.clone())).await;
        let status = r.expect_err("nothing is issued to a flood");
        sent += 1;
        if status.code() == tonic::Code::ResourceExhausted {
            throttled += 1;
        }
    }
    let grown = audit_bytes(&iss);
    let grown = &grown[before..];
    assert!(
        grown.len() < 1 << 20,
        "{sent} requests grew the audit log by {} bytes",
        grown.len()
    );
    for line in grown.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        assert!(line.len() < 2048, "audit line of {} bytes", line.len());
    }
    assert!(
        throttled > 0 && throttled < sent,
        "{throttled} of {sent} throttled"
    );

    // The same with a wrong token, from another address: throttled once over the rate.
    let mut wrong = client_from(&iss, "127.0.0.3").await;
    let mut codes = Vec::new();
    for _ in 0..(issuer::throttle::DEFAULT_BURST + 5) {
        let r = certify(&mut wrong, request(ID, b"not-a-token", csr.clone())).await;
        codes.push(r.expect_err("a wrong token gets nothing").code());
    }
    let burst = issuer::throttle::DEFAULT_BURST as usize;
    assert!(
        codes[..burst]
            .iter()
            .all(|c| *c == tonic::Code::Unauthenticated),
        "{codes:?}"
    );
    assert!(
        codes[burst..]
            .iter()
            .all(|c| *c == tonic::Code::ResourceExhausted),
        "{codes:?}"
    );

    // A host renewing from 127.0.0.1 meanwhile is not affected.
    let token = iss.token();
    let mut host = tls_client(iss.addr, &iss.anchors_pem(), &iss.cfg.server_name).await;
    let (_key, csr) = p256_csr(ID);
    certify(&mut host, request(ID, token.as_bytes(), csr))
        .await
        .expect("the host renews");
    iss.stop().await;
}

/// The audit log is a pipe nobody reads: once it is full, Certify answers UNAVAILABLE (no
/// certificate without its record) while `/live` keeps answering and `/ready` says no; once
/// the pipe is broken, still no certificate is issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_or_broken_audit_sink_withholds_certificates_and_the_issuer_stays_live() {
    use std::os::unix::fs::OpenOptionsExt;
    let fifo_dir = tempfile::tempdir().unwrap();
    let fifo = fifo_dir.path().join("audit.pipe");
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o600),
        0,
    )
    .unwrap();
    // The reader end, opened and never read from.
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(&fifo)
        .unwrap();
    let path = fifo.clone();
    let iss = Issuer::start_with(move |_| AuditTarget::File(path)).await;
    let token = iss.token();
    let mut client = tls_client(iss.addr, &iss.anchors_pem(), &iss.cfg.server_name).await;

    // Issue until the pipe is full (a pipe holds 64 KiB: a few hundred records).
    let mut issued = 0;
    let unavailable = loop {
        let (_key, csr) = p256_csr(ID);
        match certify(&mut client, request(ID, token.as_bytes(), csr)).await {
            Ok(_) => issued += 1,
            Err(status) => break status,
        }
        assert!(issued < 5_000, "the pipe never filled");
    };
    assert_eq!(
        unavailable.code(),
        tonic::Code::Unavailable,
        "{unavailable:?}"
    );
    let live = tokio::time::timeout(Duration::from_secs(1), http_get(iss.admin, "/live"))
        .await
        .expect("/live answers within 1 s");
    assert_eq!(live.0, 200);
    assert_eq!(http_get(iss.admin, "/ready").await.0, 503);
    assert!(
        iss.metric("issuer_audit_failures_total{reason=\"timeout\"}")
            .await
            >= 1.0
    );

    // Broken: the reader goes away; nothing is issued any more.
    drop(reader);
    for _ in 0..3 {
        let (_key, csr) = p256_csr(ID);
        let status = certify(&mut client, request(ID, token.as_bytes(), csr))
            .await
            .expect_err("no certificate without its audit record");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    assert_eq!(http_get(iss.admin, "/ready").await.0, 503);
    iss.stop().await;
}

/// Sends raw bytes as the Certify message (what a broken or hostile client may send).
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = linkerd2_proxy_api::identity::CertifyResponse;
    type Encoder = RawEncoder;
    type Decoder = ResponseDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ResponseDecoder {
        ResponseDecoder
    }
}

#[derive(Debug)]
struct ResponseDecoder;

impl tonic::codec::Decoder for ResponseDecoder {
    type Item = linkerd2_proxy_api::identity::CertifyResponse;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, tonic::Status> {
        prost::Message::decode(src)
            .map(Some)
            .map_err(|e| tonic::Status::internal(e.to_string()))
    }
}

async fn certify_raw(
    channel: tonic::transport::Channel,
    bytes: Vec<u8>,
) -> Result<linkerd2_proxy_api::identity::CertifyResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/io.linkerd.proxy.identity.Identity/Certify",
    );
    grpc.unary(tonic::Request::new(bytes), path, RawCodec)
        .await
        .map(|r| r.into_inner())
}

/// Requests the gRPC layer cannot decode get the documented codes and an audit line: over
/// the decoder's limit RESOURCE_EXHAUSTED (not OUT_OF_RANGE), not a CertifyRequest
/// INVALID_ARGUMENT (not INTERNAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_malformed_requests_get_documented_codes_and_an_audit_line() {
    let iss = Issuer::start().await;
    let channel = channel_from(&iss, "127.0.0.1").await;

    // 2 MiB: over the decoder's limit.
    let (_key, csr) = p256_csr(ID);
    let huge = request(&"a".repeat(2 << 20), b"", csr);
    let mut client =
        linkerd2_proxy_api::identity::identity_client::IdentityClient::new(channel.clone());
    let status = certify(&mut client, huge).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("largest message"), "{status:?}");

    // Bytes that are no protobuf message at all.
    let status = certify_raw(channel, vec![0xff; 16]).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().starts_with("malformed request"),
        "{status:?}"
    );

    let audit = String::from_utf8(audit_bytes(&iss)).unwrap();
    let lines: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let codes: Vec<_> = lines
        .iter()
        .map(|l| l["code"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(codes, ["resource_exhausted", "invalid_argument"], "{audit}");
    assert!(lines.iter().all(|l| l["decision"] == "refused"));
    iss.stop().await;
}
