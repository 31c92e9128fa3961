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
use rcgen::{CertificateParams, KeyPair};

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
    /// Every CSR sent, in order.
    pub csrs: Mutex<Vec<Vec<u8>>>,
    /// The serial of the client certificate each call presented (`None`: none).
    pub presented: Mutex<Vec<Option<String>>>,
    /// The trust bundle it serves (`None`: it serves none).
    pub bundle: Mutex<Option<proxy_lib::trust_bundle::api::Bundle>>,
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
            csrs: Mutex::new(Vec::new()),
            presented: Mutex::new(Vec::new()),
            bundle: Mutex::new(None),
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
        let now = self.clock.now();
        let mut p = TestPki::leaf_params(
            &identity(),
            now - Duration::from_secs(20),
            now + self.lifetime,
        );
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.serial_number = Some(rand::random::<u64>().to_be_bytes().to_vec().into());
        tweak(&mut p);
        let leaf = self.pki.sign(&p, &csr.public_key);
        CertifyResponse {
            leaf: leaf.to_vec(),
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
    async fn certify_presenting(
        &self,
        req: CertifyRequest,
        client_cert: Option<proxy_lib::bundle::CertBundle>,
    ) -> Result<CertifyResponse, IssueError> {
        self.presented
            .lock()
            .unwrap()
            .push(client_cert.map(|b| b.leaf.serial));
        self.certify(req).await
    }

    async fn certify(&self, req: CertifyRequest) -> Result<CertifyResponse, IssueError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.tokens.lock().unwrap().push(req.token.to_vec());
        self.csrs.lock().unwrap().push(req.csr_der.clone());
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

    async fn trust_bundle(
        &self,
    ) -> Result<Option<proxy_lib::trust_bundle::api::Bundle>, IssueError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(IssueError::Connect {
                addr: "fake".into(),
                reason: "connection refused".into(),
            });
        }
        Ok(self.bundle.lock().unwrap().clone())
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

/// The fake consumer (nginx-like) the verify step talks to.
pub use proxy_lib::test_util::{FakeConsumer, Serve};
