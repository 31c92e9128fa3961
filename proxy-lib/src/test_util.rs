//! Test fixtures (feature `test-util`): a throwaway PKI made with rcgen at test time, cert
//! dirs written by the real [`crate::certdir::Writer`], fast temp dirs, and log capture. Never
//! used by shipped code paths.

pub mod bench;
#[cfg(feature = "fake-kube")]
pub mod fake_kube;
mod kit;

pub use kit::{ChildGuard, free_port, http_get, metric, wait_for};

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::CertificateDer;

use crate::bundle::CertBundle;
use crate::certdir::{NewSet, RealFs, Writer};
use crate::clock::{Clock, SystemClock};
use crate::identity::Identity;
use crate::pem::PrivateKey;
use crate::verify::TrustAnchors;

/// A trust anchor and an issuer CA under it, valid around `now`.
pub struct TestPki {
    /// The anchor certificate (self-signed root).
    pub anchor: CertificateDer<'static>,
    /// The anchor's key.
    pub anchor_key: KeyPair,
    /// The issuer CA certificate (pathlen 0).
    pub issuer: CertificateDer<'static>,
    /// The issuer CA's key.
    pub issuer_key: KeyPair,
    issuer_params: CertificateParams,
}

impl TestPki {
    /// A fresh anchor (valid 10 years around `now`) and issuer CA (valid 1 year around `now`).
    pub fn new(now: SystemTime) -> Self {
        let anchor_key = KeyPair::generate().expect("keygen");
        let mut ap = CertificateParams::new(Vec::new()).expect("params");
        ap.distinguished_name
            .push(DnType::CommonName, "root.linkerd.cluster.local");
        ap.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ap.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ap.not_before = (now - Duration::from_secs(3600)).into();
        ap.not_after = (now + Duration::from_secs(3650 * 86_400)).into();
        let anchor = ap.self_signed(&anchor_key).expect("sign anchor");
        let anchor_issuer = Issuer::new(ap, &anchor_key);

        let issuer_key = KeyPair::generate().expect("keygen");
        let mut ip = CertificateParams::new(Vec::new()).expect("params");
        ip.distinguished_name
            .push(DnType::CommonName, "identity.linkerd.cluster.local");
        ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ip.use_authority_key_identifier_extension = true;
        ip.not_before = (now - Duration::from_secs(3600)).into();
        ip.not_after = (now + Duration::from_secs(365 * 86_400)).into();
        let issuer = ip
            .signed_by(&issuer_key, &anchor_issuer)
            .expect("sign issuer");
        Self {
            anchor: anchor.der().clone(),
            anchor_key,
            issuer: issuer.der().clone(),
            issuer_key,
            issuer_params: ip,
        }
    }

    /// The anchors as `TrustAnchors`.
    pub fn anchors(&self) -> TrustAnchors {
        TrustAnchors::from_certs(vec![self.anchor.clone()]).expect("anchor")
    }

    /// A workload leaf for `identity` valid `[not_before, not_after]`, chained through the
    /// issuer, with a fresh key: the bundle (leaf + issuer, key, anchors).
    pub fn leaf(
        &self,
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> CertBundle {
        let key = PrivateKey::from_pkcs8_der(KeyPair::generate().expect("keygen").serialize_der());
        self.leaf_for_key(identity, &key, not_before, not_after)
    }

    /// [`TestPki::leaf`] for a given key (any algorithm rcgen can put in a certificate, e.g.
    /// one openssl made: see [`crate::test_keys`]).
    pub fn leaf_for_key(
        &self,
        identity: &Identity,
        key: &PrivateKey,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> CertBundle {
        let pair = key.to_rcgen().expect("rcgen reads the key");
        let cert = self.sign(&Self::leaf_params(identity, not_before, not_after), &pair);
        CertBundle::from_parts(vec![cert, self.issuer.clone()], key.clone(), self.anchors())
            .expect("bundle")
    }

    /// The params of a workload leaf for `identity` valid `[not_before, not_after]`, as the
    /// issuer makes them (DNS and SPIFFE URI SANs, serverAuth + clientAuth, an authority key
    /// id); tests change them before [`TestPki::sign`] to make a leaf with one thing wrong.
    pub fn leaf_params(
        identity: &Identity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> CertificateParams {
        let mut p = CertificateParams::new(vec![identity.to_string()]).expect("params");
        p.subject_alt_names.push(SanType::URI(
            identity
                .spiffe_id()
                .try_into()
                .expect("spiffe id is an ia5 string"),
        ));
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.not_before = not_before.into();
        p.not_after = not_after.into();
        p
    }

    /// Signs `params` for `public_key` with the issuer CA.
    pub fn sign(
        &self,
        params: &CertificateParams,
        public_key: &impl rcgen::PublicKeyData,
    ) -> CertificateDer<'static> {
        let issuer = Issuer::from_params(&self.issuer_params, &self.issuer_key);
        params
            .signed_by(public_key, &issuer)
            .expect("sign leaf")
            .der()
            .clone()
    }
}

/// What a [`FakeConsumer`] serves.
#[derive(Debug, Clone)]
pub enum Serve {
    /// Always this bundle (a consumer that never reloads).
    Fixed(Box<CertBundle>),
    /// Whatever the cert dir holds at each handshake (a consumer that reloads).
    FromDir(PathBuf),
}

#[derive(Debug)]
struct ServeResolver(Arc<Mutex<Serve>>);

impl rustls::server::ResolvesServerCert for ServeResolver {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let serve = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let bundle = match serve {
            Serve::Fixed(b) => *b,
            Serve::FromDir(d) => CertBundle::load_dir(&d).ok()?.0,
        };
        bundle.certified_key().ok()
    }
}

/// A consumer of the cert dir such as nginx or postgres, for the rotator's verify step: a TLS
/// listener (TLS 1.2 and 1.3) that requires a client cert chaining to the anchors, serves
/// what [`Serve`] says, and records the SHA-256 of each client cert it saw. Stops when
/// dropped.
pub struct FakeConsumer {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    serve: Arc<Mutex<Serve>>,
    seen: tokio::sync::watch::Receiver<Vec<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeConsumer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeConsumer {
    /// Starts one on 127.0.0.1 (a free port) on the current tokio runtime.
    pub async fn start(serve: Serve, anchors: &TrustAnchors) -> Self {
        Self::start_on("127.0.0.1:0", serve, anchors).await
    }

    /// [`FakeConsumer::start`] on a given address.
    pub async fn start_on(listen: &str, serve: Serve, anchors: &TrustAnchors) -> Self {
        let serve = Arc::new(Mutex::new(serve));
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(anchors.root_store()),
            crate::crypto_provider(),
        )
        .build()
        .expect("client verifier");
        let config = rustls::ServerConfig::builder_with_provider(crate::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(ServeResolver(serve.clone())));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .unwrap_or_else(|e| panic!("binding the fake consumer to {listen}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        let (tx, seen) = tokio::sync::watch::channel(Vec::new());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await
                        && let Some(c) = tls.get_ref().1.peer_certificates().and_then(|c| c.first())
                    {
                        let sha = crate::cert::sha256_hex(c);
                        tx.send_modify(|v| v.push(sha));
                    }
                });
            }
        });
        Self {
            addr,
            serve,
            seen,
            task,
        }
    }

    /// Changes what new handshakes are served.
    pub fn set(&self, serve: Serve) {
        *self.serve.lock().unwrap_or_else(|e| e.into_inner()) = serve;
    }

    /// The client certs seen so far (SHA-256, hex), in order.
    pub fn seen_now(&self) -> Vec<String> {
        self.seen.borrow().clone()
    }

    /// The client certs seen, once there are at least `n` (the server side of a TLS 1.3
    /// handshake finishes after the client's); what there is after 10 s otherwise.
    pub async fn seen(&self, n: usize) -> Vec<String> {
        let mut rx = self.seen.clone();
        let enough = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|v| v.len() >= n));
        let _ = enough.await;
        self.seen_now()
    }
}

/// Writes `bundle` into the cert dir `dir` with the real crash-safe writer (key 0600, version
/// dir named after the system clock's now), as the rotator does: `..data` and the top-level
/// symlinks then point at the new version, and version dirs older than the previous one are
/// pruned. Returns the new version dir. Panics on a failed write (tests only).
pub fn write_data_dir(dir: &Path, bundle: &CertBundle) -> PathBuf {
    let set = NewSet {
        chain: &bundle.chain,
        key: &bundle.key,
        anchors: bundle.anchors.certs(),
        anchors_sig: None,
    };
    Writer::new(dir, None)
        .write(&RealFs, &set, SystemClock.now())
        .unwrap_or_else(|e| panic!("writing the cert dir {}: {e}", dir.display()))
}

/// A temp dir on tmpfs when there is one (`/dev/shm`), where fsync costs nothing, so
/// simulations of many rotations stay fast; the normal temp dir otherwise.
pub fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().expect("a temp dir")
}

/// Installs, once per test binary, a global subscriber that is interested in every event
/// (and records nothing). Without it a callsite first hit by a test with no subscriber may be
/// cached as "never" while another test is installing its scoped capture subscriber, and the
/// capture then misses events. [`LogCapture::start`] calls it; so should every test rig in a
/// binary where some test captures logs.
pub fn interest_in_everything() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
}

/// Log output captured by a thread-local subscriber: in a `current_thread` test every task
/// logs through it.
#[derive(Clone, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogCapture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Captures events at `level` and above on this thread (plain text, no colours) until the
    /// guard is dropped.
    pub fn start(level: tracing::Level) -> (Self, tracing::subscriber::DefaultGuard) {
        interest_in_everything();
        let buf = Self::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || w.clone())
            .finish();
        let guard = tracing::subscriber::set_default(sub);
        // Other tests run without a subscriber; make every callsite ask ours again.
        tracing::callsite::rebuild_interest_cache();
        (buf, guard)
    }

    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// `target/<profile>` of the running test, bench or example executable (which lives in
/// `target/<profile>/deps/` or `target/<profile>/examples/`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("a test or example lives in target/<profile>/<kind>/")
        .to_path_buf()
}

/// `cargo build` for this workspace, with the running executable's profile and target dir,
/// ready for more arguments (`--bins --workspace`, `-p X --example Y`).
///
/// A process started by `cargo test` or `cargo run` inherits the variables cargo sets for the
/// running crate (`CARGO_MANIFEST_DIR`, `CARGO_PKG_*`, ...). Build scripts such as ring's watch
/// some of them, so a nested cargo that kept them would see changed inputs and rebuild ring and
/// everything above it, and the next plain `cargo build` would rebuild it all again. They are
/// removed here; the user's own cargo settings (`CARGO_HOME`, `CARGO_TARGET_DIR`,
/// `CARGO_PROFILE_*`, ...) pass through. Cargo's own progress lines (`Compiling ...`) go to
/// the inherited stderr, so a first build is not minutes of silence.
pub fn cargo_build() -> std::process::Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(is_set_by_cargo_for_the_crate) {
            cmd.env_remove(key);
        }
    }
    let profile = profile_dir();
    let target = profile.parent().expect("target/<profile> has a parent");
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
        .arg("--target-dir")
        .arg(target);
    if profile.ends_with("release") {
        cmd.arg("--release");
    }
    cmd
}

/// Variables cargo sets for the crate it builds or runs (as opposed to cargo's configuration).
fn is_set_by_cargo_for_the_crate(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_BIN_EXE_")
        || matches!(
            key,
            "CARGO_MANIFEST_DIR"
                | "CARGO_MANIFEST_PATH"
                | "CARGO_MANIFEST_LINKS"
                | "CARGO_CRATE_NAME"
                | "CARGO_BIN_NAME"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_TMPDIR"
                | "CARGO_RUSTC_CURRENT_DIR"
                | "CARGO_MAKEFLAGS"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_cargo_drops_what_cargo_set_for_the_crate_and_keeps_cargo_config() {
        for key in [
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_PKG_NAME",
            "CARGO_PKG_VERSION_MAJOR",
            "CARGO_CRATE_NAME",
            "CARGO_BIN_EXE_issuer",
            "CARGO_TARGET_TMPDIR",
        ] {
            assert!(is_set_by_cargo_for_the_crate(key), "{key}");
        }
        for key in [
            "CARGO",
            "CARGO_HOME",
            "CARGO_TARGET_DIR",
            "CARGO_PROFILE_RELEASE_DEBUG",
            "CARGO_BUILD_JOBS",
            "CARGO_TERM_COLOR",
            "CARGO_NET_OFFLINE",
        ] {
            assert!(!is_set_by_cargo_for_the_crate(key), "{key}");
        }
        // Under `cargo test` this process has CARGO_MANIFEST_DIR; the nested command must not.
        let cmd = cargo_build();
        let removed: Vec<_> = cmd
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        if std::env::var_os("CARGO_MANIFEST_DIR").is_some() {
            assert!(
                removed.iter().any(|k| k == "CARGO_MANIFEST_DIR"),
                "{removed:?}"
            );
        }
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[0], "build");
        assert!(args.iter().any(|a| a.ends_with("Cargo.toml")), "{args:?}");
    }
}
