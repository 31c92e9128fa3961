//! Compatibility with a real linkerd2-proxy, pinned with a client built the way the proxy
//! builds its identity client (linkerd2-proxy `linkerd/meshtls/rustls`, `linkerd/proxy/
//! identity-client`): TLS 1.3 only, the cipher suites of each of its backends, no ALPN, SNI
//! and server identity = `LINKERD2_PROXY_IDENTITY_SVC_NAME`, the token file's bytes as read
//! (trailing newline included), the same DER CSR (CN and one DNS SAN = identity) for every
//! renewal, and once certified, its own leaf presented as a client certificate. The answer is
//! checked the way the proxy checks it before using it: `valid_until` present and in the
//! future, the leaf verified as a server certificate through the intermediates to the
//! anchors, its DNS SAN = the local name, the key.p8 loaded and matching, the leaf accepted by
//! a peer's client verifier, and a mesh handshake both ways with it.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::ID;
use hyper_util::rt::TokioIo;
use issuer::audit::AuditTarget;
use issuer::config::{Config, Overrides};
use issuer::server::Server;
use issuer::tokens::{self, CreateOptions};
use linkerd2_proxy_api::identity::identity_client::IdentityClient;
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse};
use proxy_lib::cert::CertInfo;
use proxy_lib::clock::{Clock, FakeClock, SystemClock};
use proxy_lib::identity::Identity;
use rustls::crypto::{CryptoProvider, ring as ring_provider};
use rustls::{RootCertStore, SupportedCipherSuite};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

/// The cipher suites each linkerd2-proxy TLS backend offers (all TLS 1.3 only).
fn proxy_suite_sets() -> Vec<(&'static str, Vec<SupportedCipherSuite>)> {
    use ring_provider::cipher_suite::*;
    vec![
        // meshtls-rustls before the provider split: ChaCha20 alone.
        ("rustls-chacha-only", vec![TLS13_CHACHA20_POLY1305_SHA256]),
        // backend/aws_lc.rs (the default build): ChaCha20, then AES-256.
        (
            "aws-lc",
            vec![TLS13_CHACHA20_POLY1305_SHA256, TLS13_AES_256_GCM_SHA384],
        ),
        // backend/aws_lc.rs with the fips feature: AES-256 first, ChaCha20 as a fallback.
        (
            "aws-lc-fips",
            vec![TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256],
        ),
        // Each of aws-lc's suites must work on its own, whichever the server prefers.
        ("aes-256-only", vec![TLS13_AES_256_GCM_SHA384]),
        // backend/ring.rs.
        (
            "ring",
            vec![
                TLS13_AES_128_GCM_SHA256,
                TLS13_AES_256_GCM_SHA384,
                TLS13_CHACHA20_POLY1305_SHA256,
            ],
        ),
    ]
}

fn provider_with(suites: Vec<SupportedCipherSuite>) -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: suites,
        ..ring_provider::default_provider()
    })
}

fn roots(anchors_pem: &[u8]) -> RootCertStore {
    proxy_lib::verify::TrustAnchors::from_bytes(anchors_pem, "ca.crt")
        .unwrap()
        .root_store()
}

/// The proxy's client config: TLS 1.3, its backend's suites, no ALPN, no session resumption,
/// the server verified against the anchors (and its name), and — once certified — its own
/// chain offered as the client certificate.
fn proxy_client_config(
    provider: Arc<CryptoProvider>,
    anchors_pem: &[u8],
    client_cert: Option<(Vec<CertificateDer<'static>>, Vec<u8>)>,
) -> rustls::ClientConfig {
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots(anchors_pem));
    let mut cfg = match client_cert {
        None => b.with_no_client_auth(),
        Some((chain, key)) => b
            .with_client_auth_cert(chain, PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)))
            .unwrap(),
    };
    cfg.resumption = rustls::client::Resumption::disabled();
    assert!(cfg.alpn_protocols.is_empty());
    cfg
}

/// What the handshake settled on, recorded by the connector.
#[derive(Debug, Clone, Default)]
struct Negotiated {
    suite: Option<rustls::CipherSuite>,
    alpn: Option<Vec<u8>>,
    version: Option<rustls::ProtocolVersion>,
}

async fn proxy_client(
    addr: SocketAddr,
    cfg: rustls::ClientConfig,
    svc_name: &str,
) -> (IdentityClient<Channel>, Arc<Mutex<Negotiated>>) {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    // The proxy sends SNI = the identity service name and checks the server's identity.
    let name = ServerName::try_from(svc_name.to_string()).unwrap();
    let seen = Arc::new(Mutex::new(Negotiated::default()));
    let rec = seen.clone();
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            let name = name.clone();
            let rec = rec.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                let c = tls.get_ref().1;
                *rec.lock().unwrap() = Negotiated {
                    suite: c.negotiated_cipher_suite().map(|s| s.suite()),
                    alpn: c.alpn_protocol().map(|a| a.to_vec()),
                    version: c.protocol_version(),
                };
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .expect("connect to the issuer like linkerd2-proxy");
    (IdentityClient::new(channel), seen)
}

/// The proxy's `LINKERD2_PROXY_IDENTITY_DIR` documents: key.p8 and csr.der.
struct Documents {
    key_pkcs8: Vec<u8>,
    csr_der: Vec<u8>,
}

fn documents(identity: &str) -> Documents {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr_der = common::csr_with(&key, identity, |_| {});
    Documents {
        key_pkcs8: key.serialize_der(),
        csr_der,
    }
}

/// What `certify.rs` + `creds/store.rs` do with an answer before installing it; returns the
/// chain.
fn check_like_the_proxy(
    resp: &CertifyResponse,
    docs: &Documents,
    local_name: &str,
    anchors_pem: &[u8],
    now: SystemTime,
) -> Vec<CertificateDer<'static>> {
    // certify.rs: valid_until must be there and in the future.
    let exp: SystemTime = resp
        .valid_until
        .expect("identity certification missing expiration")
        .try_into()
        .unwrap();
    assert!(exp > now, "certificate already expired");
    let mut chain = vec![CertificateDer::from(resp.leaf_certificate.clone())];
    chain.extend(
        resp.intermediate_certificates
            .iter()
            .map(|d| CertificateDer::from(d.clone())),
    );
    let provider = Arc::new(ring_provider::default_provider());
    let roots = Arc::new(roots(anchors_pem));
    let unix = UnixTime::since_unix_epoch(now.duration_since(SystemTime::UNIX_EPOCH).unwrap());
    // creds/verify.rs AnySanVerifier: the leaf as a server cert through the intermediates.
    let parsed = rustls::server::ParsedCertificate::try_from(&chain[0]).unwrap();
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        &roots,
        &chain[1..],
        unix,
        provider.signature_verification_algorithms.all,
    )
    .expect("leaf verifies as a server certificate through the intermediates");
    // meshtls verifier verify_id: a DNS SAN equal to the local name.
    let info = CertInfo::from_der(&chain[0]).unwrap();
    assert!(
        info.dns_sans.iter().any(|d| d == local_name),
        "no DNS SAN {local_name}: {:?}",
        info.dns_sans
    );
    assert_eq!(
        exp, info.not_after,
        "valid_until must be the leaf's notAfter"
    );
    // Peers verify it as a client certificate (WebPkiClientVerifier over the same roots).
    let client_verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .allow_unauthenticated()
            .build()
            .unwrap();
    client_verifier
        .verify_client_cert(&chain[0], &chain[1..], unix)
        .expect("leaf verifies as a client certificate");
    // Older proxies load key.p8 with ring's P-256 PKCS#8 loader ...
    ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &docs.key_pkcs8,
        &ring::rand::SystemRandom::new(),
    )
    .expect("key.p8 loads with ring");
    // ... newer ones build a CertifiedKey from it; the key must be the leaf's.
    let ck = rustls::sign::CertifiedKey::from_der(
        chain.clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(docs.key_pkcs8.clone())),
        &provider,
    )
    .expect("certified key");
    ck.keys_match().expect("key.p8 matches the leaf");
    chain
}

/// Two proxies meshing with the certificate: server requests (not requires) a client cert
/// and verifies it against the anchors; the client verifies the server's identity.
async fn mesh_handshake(chain: Vec<CertificateDer<'static>>, key: Vec<u8>, anchors_pem: &[u8]) {
    let provider = Arc::new(ring_provider::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots(anchors_pem)),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            chain.clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.clone())),
        )
        .unwrap();
    let client = proxy_client_config(provider, anchors_pem, Some((chain, key)));
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let name = ServerName::try_from(ID.to_string()).unwrap();
    let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
    let s = s.expect("mesh server handshake");
    c.expect("mesh client handshake");
    let peer = s.get_ref().1.peer_certificates().expect("client cert sent");
    let info = CertInfo::from_der(&peer[0]).unwrap();
    assert!(info.dns_sans.iter().any(|d| d == ID));
}

struct Issuer {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    cfg: Config,
    clock: FakeClock,
    server: Arc<Server>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<issuer::Result<()>>>,
}

impl Issuer {
    async fn start(extra: Vec<Arc<dyn issuer::auth::Authenticator>>) -> Self {
        proxy_lib::install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("issuer");
        let now = SystemClock.now();
        issuer::init::run_at(&issuer::init::InitOptions::new(&dir), now).unwrap();
        let mut cfg = Config::load(&dir.join("issuer.toml"), &Overrides::default()).unwrap();
        cfg.audit = AuditTarget::File(dir.join("audit.log"));
        let clock = FakeClock::new(now);
        let server =
            Server::with_authenticators(cfg.clone(), Arc::new(clock.clone()), extra).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn(server.clone().run(listener, None, async move {
            let _ = rx.await;
        }));
        Self {
            _tmp: tmp,
            dir,
            cfg,
            clock,
            server,
            addr,
            stop: Some(tx),
            join: Some(join),
        }
    }

    fn anchors_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("ca.crt")).unwrap()
    }

    /// Writes a token for `identity` to a file the way an operator would (`--out`, or a shell
    /// redirect that leaves a trailing newline) and returns the path.
    fn token_file(&self, identity: &str) -> PathBuf {
        let t = tokens::create(
            &self.cfg.tokens,
            &CreateOptions::new(Identity::parse(identity).unwrap()),
            self.clock.now(),
        )
        .unwrap();
        // What the server's maintenance loop does within a second.
        self.server.refresh_tokens();
        let path = self.dir.join("token");
        std::fs::write(&path, format!("{}\n", &*t.secret)).unwrap();
        path
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
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

/// `TokenSource::load`: the file's bytes, unmodified.
fn token_source_load(path: &std::path::Path) -> Vec<u8> {
    let t = std::fs::read(path).unwrap();
    assert!(!t.is_empty());
    t
}

fn proxy_request(token: Vec<u8>, docs: &Documents) -> CertifyRequest {
    CertifyRequest {
        token,
        identity: ID.to_string(),
        certificate_signing_request: docs.csr_der.clone(),
    }
}

// A client configured like linkerd2-proxy (each backend's suites, no ALPN, SNI = service
// name, token bytes with their newline, Linkerd's DER CSR) is certified, the answer passes
// the proxy's own checks and works for a mesh handshake; the renewal — same CSR, the first
// leaf presented as the client certificate — is certified as well.
#[tokio::test]
async fn a_client_built_like_linkerd2_proxy_is_certified_and_renews() {
    let iss = Issuer::start(Vec::new()).await;
    let anchors = iss.anchors_pem();
    let svc_name = iss.cfg.server_name.clone();
    assert_eq!(
        svc_name, "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local",
        "the default server name is Linkerd's identity service name"
    );
    let token_path = iss.token_file(ID);
    assert!(std::fs::read(&token_path).unwrap().ends_with(b"\n"));
    for (backend, suites) in proxy_suite_sets() {
        let offered: Vec<_> = suites.iter().map(|s| s.suite()).collect();
        let provider = provider_with(suites);
        let docs = documents(ID);
        let (mut client, seen) = proxy_client(
            iss.addr,
            proxy_client_config(provider.clone(), &anchors, None),
            &svc_name,
        )
        .await;
        let first = client
            .certify(proxy_request(token_source_load(&token_path), &docs))
            .await
            .unwrap_or_else(|s| panic!("{backend}: certify refused: {s:?}"))
            .into_inner();
        let n = seen.lock().unwrap().clone();
        assert_eq!(
            n.version,
            Some(rustls::ProtocolVersion::TLSv1_3),
            "{backend}"
        );
        assert!(offered.contains(&n.suite.unwrap()), "{backend}: {n:?}");
        assert_eq!(n.alpn, None, "{backend}: no ALPN is negotiated");
        let now = iss.clock.now();
        let chain = check_like_the_proxy(&first, &docs, ID, &anchors, now);
        mesh_handshake(chain.clone(), docs.key_pkcs8.clone(), &anchors).await;

        // Renewal: a new client (the proxy builds one per attempt) now offering its leaf.
        let (mut renewing, _) = proxy_client(
            iss.addr,
            proxy_client_config(provider, &anchors, Some((chain, docs.key_pkcs8.clone()))),
            &svc_name,
        )
        .await;
        let second = renewing
            .certify(proxy_request(token_source_load(&token_path), &docs))
            .await
            .unwrap_or_else(|s| panic!("{backend}: renewal refused: {s:?}"))
            .into_inner();
        check_like_the_proxy(&second, &docs, ID, &anchors, now);
        assert_ne!(
            CertInfo::from_der(&second.leaf_certificate).unwrap().serial,
            CertInfo::from_der(&first.leaf_certificate).unwrap().serial,
            "{backend}: a renewal with the same CSR gets a new serial"
        );
    }
    // The boring backend's connector offers TLS 1.2 as well as 1.3 (it only disables 1.0
    // and 1.1); the issuer settles on 1.3.
    let boring_like =
        rustls::ClientConfig::builder_with_provider(Arc::new(ring_provider::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots(&anchors))
            .with_no_client_auth();
    let (mut client, seen) = proxy_client(iss.addr, boring_like, &svc_name).await;
    let docs = documents(ID);
    let resp = client
        .certify(proxy_request(token_source_load(&token_path), &docs))
        .await
        .expect("a TLS 1.2+1.3 client is certified")
        .into_inner();
    check_like_the_proxy(&resp, &docs, ID, &anchors, iss.clock.now());
    assert_eq!(
        seen.lock().unwrap().version,
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    iss.stop().await;
}

/// Records whether authenticators were handed a client certificate chain.
#[derive(Debug, Default)]
struct SeesCerts(Mutex<Vec<bool>>);

#[tonic::async_trait]
impl issuer::auth::Authenticator for SeesCerts {
    fn name(&self) -> &'static str {
        "sees-certs"
    }

    async fn authenticate(
        &self,
        req: &issuer::auth::AuthRequest<'_>,
    ) -> Result<Option<issuer::auth::Principal>, issuer::error::AuthError> {
        self.0.lock().unwrap().push(req.client_certs.is_some());
        Ok(None)
    }
}

// A running proxy keeps offering its last leaf as the client certificate even after it has
// expired (the issuer was unreachable for longer than the lifetime), or after the anchor that
// issued it was rotated out. The TLS handshake must not fail on it — the proxy would never
// renew again — so such a certificate is ignored, the token decides, and authenticators are
// never handed a chain that does not verify.
#[tokio::test]
async fn an_expired_or_untrusted_client_certificate_does_not_block_renewal_by_token() {
    let sees = Arc::new(SeesCerts::default());
    let iss = Issuer::start(vec![sees.clone()]).await;
    let anchors = iss.anchors_pem();
    let svc_name = iss.cfg.server_name.clone();
    let token_path = iss.token_file(ID);
    let now = iss.clock.now();
    let id = Identity::parse(ID).unwrap();

    // An expired leaf from this very issuer, for the proxy's own key.
    let docs = documents(ID);
    let ca = issuer::ca::Ca::load(&issuer::ca::CaFiles::in_dir(&iss.dir), now).unwrap();
    let key = rcgen::KeyPair::try_from(docs.key_pkcs8.as_slice()).unwrap();
    let expired = issuer::signer::sign_leaf(
        &ca,
        &id,
        &key,
        &issuer::policy::Grant {
            not_before: now - Duration::from_secs(7200),
            not_after: now - Duration::from_secs(3600),
        },
        issuer::signer::LeafKind::Workload,
    )
    .unwrap();
    let expired_chain = vec![expired.der.clone(), ca.cert().clone()];

    // A valid leaf from an anchor the issuer no longer trusts.
    let foreign = proxy_lib::test_util::TestPki::new(now).leaf(
        &id,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    );
    let foreign_key = foreign.key.pkcs8_der().to_vec();

    let cases = [
        ("expired", expired_chain, docs.key_pkcs8.clone(), &docs),
        ("untrusted", foreign.chain.clone(), foreign_key, &docs),
    ];
    for (what, chain, key, docs) in cases {
        let cfg = proxy_client_config(
            Arc::new(ring_provider::default_provider()),
            &anchors,
            Some((chain, key)),
        );
        let (mut client, _) = proxy_client(iss.addr, cfg, &svc_name).await;
        let resp = client
            .certify(proxy_request(token_source_load(&token_path), docs))
            .await
            .unwrap_or_else(|s| panic!("{what} client cert: renewal by token refused: {s:?}"))
            .into_inner();
        check_like_the_proxy(&resp, docs, ID, &anchors, now);
        // Without a token the ignored certificate authenticates nothing.
        let st = client
            .certify(proxy_request(Vec::new(), docs))
            .await
            .unwrap_err();
        assert_eq!(st.code(), Code::Unauthenticated, "{what}");
    }
    // The extra authenticator only ran for the token-less requests, and never saw a chain.
    assert_eq!(*sees.0.lock().unwrap(), vec![false, false]);
    let issued: Vec<_> = iss
        .audit_lines()
        .into_iter()
        .filter(|l| l["decision"] == "issued")
        .map(|l| l["authenticator"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(issued, vec!["tokens", "tokens"]);

    // A certificate that does verify is still handed to the authenticators: the built-in
    // renewal by certificate (tried first) accepts this issuer's own leaf without a token.
    let (mut plain, _) = proxy_client(
        iss.addr,
        proxy_client_config(Arc::new(ring_provider::default_provider()), &anchors, None),
        &svc_name,
    )
    .await;
    let good = plain
        .certify(proxy_request(token_source_load(&token_path), &docs))
        .await
        .unwrap()
        .into_inner();
    let good_chain = check_like_the_proxy(&good, &docs, ID, &anchors, now);
    let (mut with_good, _) = proxy_client(
        iss.addr,
        proxy_client_config(
            Arc::new(ring_provider::default_provider()),
            &anchors,
            Some((good_chain, docs.key_pkcs8.clone())),
        ),
        &svc_name,
    )
    .await;
    let renewed = with_good
        .certify(proxy_request(Vec::new(), &docs))
        .await
        .expect("renewed by its certificate")
        .into_inner();
    check_like_the_proxy(&renewed, &docs, ID, &anchors, now);
    let last = iss.audit_lines().pop().unwrap();
    assert_eq!(last["authenticator"], "certificate");
    // decided before the extra authenticator was asked
    assert_eq!(*sees.0.lock().unwrap(), vec![false, false]);
    iss.stop().await;
}
