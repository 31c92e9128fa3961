//! Test fixtures: a scripted in-process issuer signing with a throwaway PKI, a clock that
//! follows tokio's paused time, and config helpers.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use proxy_lib::clock::{Clock, FakeClock, SharedClock};
use proxy_lib::identity::Identity;
use proxy_lib::pem::certs_to_pem;
use proxy_lib::test_util::TestPki;
use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::client::{CertifyRequest, CertifyResponse, Issue, IssueError};
use crate::config::{Config, MapEnv, Sources};
use crate::reload::{HookOutcome, Reload};

pub const ID: &str = "db.ext.serviceaccount.identity.linkerd.cluster.local";

pub fn identity() -> Identity {
    Identity::parse(ID).unwrap()
}

/// A wall clock that moves with tokio's (paused) time, plus jumps of its own.
///
/// FakeClock gives `now()`; tokio's paused `Instant` gives the sleeps. Reading the wall
/// time as fake + elapsed paused time moves both together exactly, whichever timer tokio's
/// auto-advance jumps to; `FakeClock::advance` alone then models a suspend or clock step
/// (wall time jumps, monotonic time does not).
#[derive(Debug, Clone)]
pub struct PausedClock {
    pub fake: FakeClock,
    start: tokio::time::Instant,
}

impl PausedClock {
    pub fn new(start: SystemTime) -> Self {
        Self {
            fake: FakeClock::new(start),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Clock for PausedClock {
    fn now(&self) -> SystemTime {
        self.fake.now() + (tokio::time::Instant::now() - self.start)
    }
}

pub use proxy_lib::test_util::{LogCapture, interest_in_everything};

/// Advances simulated time by `d` (wall clock and tokio's paused clock together).
pub async fn advance(d: Duration) {
    tokio::time::sleep(d).await;
}

pub use proxy_lib::test_util::fast_tempdir;

/// How the fake issuer answers one call.
pub type Script =
    Box<dyn FnOnce(&FakeIssuer, &CertifyRequest) -> Result<CertifyResponse, IssueError> + Send>;

/// An issuer that signs with a [`TestPki`] (or answers from a script).
pub struct FakeIssuer {
    pub pki: TestPki,
    pub clock: SharedClock,
    pub lifetime: Duration,
    pub down: AtomicBool,
    pub calls: AtomicUsize,
    pub tokens: Mutex<Vec<Vec<u8>>>,
    scripts: Mutex<VecDeque<Script>>,
}

impl FakeIssuer {
    pub fn new(clock: SharedClock, lifetime: Duration) -> Arc<Self> {
        let now = clock.now();
        Arc::new(Self {
            pki: TestPki::new(now - Duration::from_secs(86_400)),
            clock,
            lifetime,
            down: AtomicBool::new(false),
            calls: AtomicUsize::new(0),
            tokens: Mutex::new(Vec::new()),
            scripts: Mutex::new(VecDeque::new()),
        })
    }

    /// Queues a scripted answer for the next call.
    pub fn script(
        &self,
        f: impl FnOnce(&FakeIssuer, &CertifyRequest) -> Result<CertifyResponse, IssueError>
        + Send
        + 'static,
    ) {
        self.scripts.lock().unwrap().push_back(Box::new(f));
    }

    pub fn anchors_pem(&self) -> String {
        certs_to_pem([&self.pki.anchor])
    }

    /// Signs `csr` like a real issuer, with `tweak` applied to the leaf params.
    pub fn sign(
        &self,
        csr_der: &[u8],
        tweak: impl FnOnce(&mut CertificateParams),
    ) -> CertifyResponse {
        let csr =
            rcgen::CertificateSigningRequestParams::from_der(&csr_der.to_vec().into()).unwrap();
        let id = identity();
        let now = self.clock.now();
        let mut p = CertificateParams::new(vec![id.to_string()]).unwrap();
        p.subject_alt_names
            .push(SanType::URI(id.spiffe_id().try_into().unwrap()));
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = (now - Duration::from_secs(20)).into();
        p.not_after = (now + self.lifetime).into();
        p.serial_number = Some(rand::random::<u64>().to_be_bytes().to_vec().into());
        tweak(&mut p);
        let issuer = Issuer::from_ca_cert_der(&self.pki.issuer, &self.pki.issuer_key).unwrap();
        let cert = p.signed_by(&csr.public_key, &issuer).unwrap();
        CertifyResponse {
            leaf: cert.der().to_vec(),
            intermediates: vec![self.pki.issuer.to_vec()],
            valid_until: Some(now + self.lifetime),
        }
    }

    /// Signs with a key of its own choosing (not the CSR's).
    pub fn sign_with_other_key(&self) -> CertifyResponse {
        let other = KeyPair::generate().unwrap();
        let csr = CertificateParams::new(vec![ID.to_string()])
            .unwrap()
            .serialize_request(&other)
            .unwrap();
        self.sign(csr.der(), |_| {})
    }
}

impl Issue for Arc<FakeIssuer> {
    async fn certify(&self, req: CertifyRequest) -> Result<CertifyResponse, IssueError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.tokens.lock().unwrap().push(req.token.to_vec());
        let script = self.scripts.lock().unwrap().pop_front();
        if let Some(s) = script {
            return s(self, &req);
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(IssueError::Connect {
                addr: "fake".into(),
                reason: "connection refused".into(),
            });
        }
        Ok(self.sign(&req.csr_der, |_| {}))
    }
}

/// Reload hooks that only count.
#[derive(Debug, Default, Clone)]
pub struct CountingReload(pub Arc<AtomicUsize>);

impl Reload for CountingReload {
    async fn reload(&self) -> Vec<HookOutcome> {
        self.0.fetch_add(1, Ordering::SeqCst);
        vec![HookOutcome {
            hook: "exec",
            result: Ok(()),
        }]
    }
}

/// A config for `dir` with anchors and token files written there.
pub fn config_in(dir: &Path, issuer: &FakeIssuer, extra: &str) -> Config {
    let ca = dir.join("anchors.pem");
    std::fs::write(&ca, issuer.anchors_pem()).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "  the-secret-token-value\n").unwrap();
    let certs = dir.join("certs");
    let text = format!(
        "identity = \"{ID}\"\ndir = \"{}\"\ntrust_anchors = \"{}\"\ntoken_file = \"{}\"\nissuer_addr = \"127.0.0.1:1\"\n{extra}",
        certs.display(),
        ca.display(),
        token.display()
    );
    let mut raw = Sources::from_toml(&text, Path::new("test.toml")).unwrap();
    raw.apply_env(&MapEnv::default());
    raw.validate().unwrap()
}

/// What a [`FakeTlsServer`] serves.
#[derive(Debug, Clone)]
pub enum Serve {
    /// Always this bundle (a listener that never reloads).
    Fixed(Box<proxy_lib::bundle::CertBundle>),
    /// Whatever is in this cert dir at each handshake (a listener that reloads).
    FromDir(std::path::PathBuf),
}

#[derive(Debug)]
struct Resolver(Arc<Mutex<Serve>>);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let serve = self.0.lock().unwrap().clone();
        let bundle = match &serve {
            Serve::Fixed(b) => (**b).clone(),
            Serve::FromDir(d) => proxy_lib::bundle::CertBundle::load_dir(d).ok()?.0,
        };
        bundle.certified_key().ok()
    }
}

/// A TLS listener on 127.0.0.1 that requires a client cert chaining to `anchors` and
/// records the SHA-256 of each client cert it saw.
pub struct FakeTlsServer {
    pub addr: std::net::SocketAddr,
    pub client_certs: Arc<Mutex<Vec<String>>>,
    serve: Arc<Mutex<Serve>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeTlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeTlsServer {
    /// The client certs seen, once there are at least `n` (the server side of a TLS 1.3
    /// handshake may finish after the client's), waiting up to 5 s.
    pub async fn seen(&self, n: usize) -> Vec<String> {
        for _ in 0..500 {
            let v = self.client_certs.lock().unwrap().clone();
            if v.len() >= n {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.client_certs.lock().unwrap().clone()
    }

    /// Changes what new handshakes are served.
    pub fn set(&self, serve: Serve) {
        *self.serve.lock().unwrap() = serve;
    }

    pub async fn start(serve: Serve, anchors: &proxy_lib::verify::TrustAnchors) -> Self {
        let serve = Arc::new(Mutex::new(serve));
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(anchors.root_store()),
            proxy_lib::crypto_provider(),
        )
        .build()
        .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(proxy_lib::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Resolver(serve.clone())));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client_certs = Arc::new(Mutex::new(Vec::new()));
        let seen = client_certs.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let (_, conn) = tls.get_ref();
                    if let Some(c) = conn.peer_certificates().and_then(|c| c.first()) {
                        seen.lock().unwrap().push(proxy_lib::cert::sha256_hex(c));
                    }
                }
            }
        });
        Self {
            addr,
            client_certs,
            serve,
            task,
        }
    }
}
