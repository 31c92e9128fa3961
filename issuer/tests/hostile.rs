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
    addr: SocketAddr,
    admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<issuer::Result<()>>>,
}

impl Issuer {
    async fn start() -> Self {
        proxy_lib::install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("issuer");
        issuer::init::run_at(&issuer::init::InitOptions::new(&dir), SystemClock.now()).unwrap();
        let mut cfg = Config::load(&dir.join("issuer.toml"), &Overrides::default()).unwrap();
        cfg.audit = AuditTarget::File(dir.join("audit.log"));
        let server = Server::new(cfg.clone(), Arc::new(SystemClock)).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn(server.run(listener, Some(admin), async move {
            let _ = rx.await;
        }));
        Self {
            _tmp: tmp,
            dir,
            cfg,
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
        let o = CreateOptions {
            identity: Identity::parse(ID).unwrap(),
            ttl: None,
            allowed_ips: Vec::new(),
        };
        tokens::create(&self.cfg.tokens, &o, SystemClock.now())
            .unwrap()
            .secret
            .to_string()
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
