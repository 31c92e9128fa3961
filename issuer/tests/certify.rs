//! In-process tests of the issuer: a real server on 127.0.0.1:0 with an injected fake clock,
//! a client built on linkerd2-proxy-api's `IdentityClient` over TLS verified against ca.crt.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use issuer::audit::AuditTarget;
use issuer::config::{Config, Overrides};
use issuer::server::Server;
use issuer::tokens::{self, CreateOptions};
use proxy_lib::cert::CertInfo;
use proxy_lib::clock::{Clock, FakeClock, SystemClock};
use proxy_lib::identity::Identity;
use proxy_lib::verify::{TrustAnchors, Usage};
use tonic::Code;

struct Harness {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    clock: FakeClock,
    cfg: Config,
    server: Arc<Server>,
    addr: SocketAddr,
    admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<issuer::Result<()>>>,
}

impl Harness {
    /// init a CA into a temp dir (at the real current time, so openssl agrees), apply
    /// `tweak` to the config, and start the server with a fake clock.
    async fn start(tweak: impl FnOnce(&mut Config, &std::path::Path)) -> Self {
        proxy_lib::install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("issuer");
        let now = SystemClock.now();
        issuer::init::run_at(&issuer::init::InitOptions::new(&dir), now).unwrap();
        let mut cfg = Config::load(&dir.join("issuer.toml"), &Overrides::default()).unwrap();
        cfg.audit = AuditTarget::File(dir.join("audit.log"));
        tweak(&mut cfg, &dir);
        Self::launch(tmp, dir, cfg, FakeClock::new(now)).await
    }

    async fn launch(tmp: tempfile::TempDir, dir: PathBuf, cfg: Config, clock: FakeClock) -> Self {
        Self::launch_with(tmp, dir, cfg, clock, Vec::new()).await
    }

    async fn launch_with(
        tmp: tempfile::TempDir,
        dir: PathBuf,
        cfg: Config,
        clock: FakeClock,
        extra: Vec<Arc<dyn issuer::auth::Authenticator>>,
    ) -> Self {
        let server =
            Server::with_authenticators(cfg.clone(), Arc::new(clock.clone()), extra).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn(server.clone().run(listener, Some(admin), async move {
            let _ = rx.await;
        }));
        Self {
            _tmp: tmp,
            dir,
            clock,
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

    async fn client(&self) -> Client {
        tls_client(self.addr, &self.anchors_pem(), &self.cfg.server_name).await
    }

    fn token(&self, identity: &str, f: impl FnOnce(&mut CreateOptions)) -> (String, String) {
        let mut o = CreateOptions::new(Identity::parse(identity).unwrap());
        f(&mut o);
        let t = tokens::create(&self.cfg.tokens, &o, self.clock.now()).unwrap();
        // What the server's maintenance loop does within a second.
        self.server.refresh_tokens();
        (t.secret.to_string(), t.record.id)
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    async fn metrics(&self) -> String {
        let (code, body) = http_get(self.admin, "/metrics").await;
        assert_eq!(code, 200);
        body
    }

    async fn ready(&self) -> u16 {
        http_get(self.admin, "/ready").await.0
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

fn info(der: &[u8]) -> CertInfo {
    CertInfo::from_der(der).unwrap()
}

// Acceptance 2: a valid token and a DER P-256 CSR over TLS yield a leaf that webpki and
// openssl accept, with the SANs, EKUs, CA:FALSE, AKI = issuer SKI, lifetime + skew, and a
// fresh serial for every request with the same CSR.
#[tokio::test]
async fn issues_a_valid_leaf_over_tls() {
    let h = Harness::start(|_, _| {}).await;
    let (token, _) = h.token(ID, |_| {});
    let mut client = h.client().await;
    let (key, csr) = p256_csr(ID);
    let a = certify(
        &mut client,
        request(ID, format!(" {token}\n").as_bytes(), csr.clone()),
    )
    .await
    .expect("issued");
    let b = certify(&mut client, request(ID, token.as_bytes(), csr))
        .await
        .unwrap();

    let issuer_der = std::fs::read(h.dir.join("issuer.crt")).unwrap();
    let issuer_der =
        proxy_lib::pem::certs_from_bytes(&issuer_der, "issuer.crt").unwrap()[0].to_vec();
    assert_eq!(a.intermediate_certificates, vec![issuer_der.clone()]);
    let leaf = info(&a.leaf_certificate);
    let id = Identity::parse(ID).unwrap();
    assert_eq!(leaf.dns_sans, vec![ID.to_string()]);
    assert_eq!(leaf.uri_sans, vec![id.spiffe_id()]);
    assert_eq!(leaf.other_sans, 0);
    assert!(!leaf.is_ca);
    assert_eq!(leaf.aki, info(&issuer_der).ski);
    assert_eq!(
        leaf.spki_der,
        rcgen::PublicKeyData::subject_public_key_info(&key)
    );
    assert_eq!(leaf.lifetime(), Duration::from_secs(24 * 3600 + 20));
    let valid_until = a.valid_until.unwrap();
    assert_eq!(
        valid_until.seconds as u64,
        proxy_lib::clock::unix_secs(leaf.not_after)
    );
    assert_ne!(leaf.serial, info(&b.leaf_certificate).serial);

    let anchors = TrustAnchors::from_bytes(&h.anchors_pem(), "ca.crt").unwrap();
    for usage in [Usage::Server, Usage::Client] {
        anchors
            .verify_leaf(
                &a.leaf_certificate.clone().into(),
                &[a.intermediate_certificates[0].clone().into()],
                h.clock.now(),
                usage,
            )
            .unwrap();
    }
    if openssl_available() {
        let (ok, out) = openssl_verify_leaf(
            &h.dir,
            &h.dir.join("ca.crt"),
            &a.intermediate_certificates[0],
            &a.leaf_certificate,
        );
        assert!(ok, "openssl verify: {out}");
        let (ok, text) = openssl(
            &h.dir,
            &[
                "x509",
                "-noout",
                "-text",
                "-in",
                &format!("{}", write_pem(&h.dir, &a.leaf_certificate).display()),
            ],
        );
        assert!(ok);
        assert!(
            text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
            "{text}"
        );
        assert!(text.contains("CA:FALSE"), "{text}");
    }
    let audit = h.audit_lines();
    assert_eq!(audit.len(), 2);
    assert_eq!(audit[0]["decision"], "issued");
    assert_eq!(audit[0]["serial"], leaf.serial);
    assert_eq!(audit[0]["sha256"], leaf.sha256);
    assert_eq!(audit[0]["authenticator"], "tokens");
    assert!(audit[0]["peer"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(audit[0]["not_after"].is_string());
    h.stop().await;
}

fn write_pem(dir: &std::path::Path, der: &[u8]) -> PathBuf {
    let p = dir.join(format!("c-{:x}.pem", rand::random::<u64>()));
    std::fs::write(&p, proxy_lib::pem::der_to_pem("CERTIFICATE", der)).unwrap();
    p
}

// Acceptance 2 (last sentence): with an issuer pair made by openssl, openssl verify passes
// and the leaf's AKI is that issuer's (SHA-1 style) SKI.
#[tokio::test]
async fn openssl_made_issuer_pair_interoperates() {
    if !openssl_available() {
        return;
    }
    let h0 = tempfile::tempdir().unwrap();
    let dir = h0.path().join("issuer");
    let now = SystemClock.now();
    issuer::init::run_at(&issuer::init::InitOptions::new(&dir), now).unwrap();
    std::fs::remove_file(dir.join("issuer.crt")).unwrap();
    std::fs::remove_file(dir.join("issuer.key")).unwrap();
    std::fs::write(
        dir.join("ext.cnf"),
        "[v3]\nbasicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .unwrap();
    for args in [
        vec![
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "issuer.key",
        ],
        vec![
            "req",
            "-new",
            "-key",
            "issuer.key",
            "-subj",
            "/C=US/O=Example Org/CN=openssl issuer",
            "-out",
            "issuer.csr",
        ],
        vec![
            "x509",
            "-req",
            "-in",
            "issuer.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "anchor.key",
            "-set_serial",
            "0x5eed1234abcd",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
            "-extensions",
            "v3",
            "-out",
            "issuer.crt",
        ],
    ] {
        let (ok, out) = openssl(&dir, &args);
        assert!(ok, "openssl {args:?}: {out}");
    }
    let mut cfg = Config::load(&dir.join("issuer.toml"), &Overrides::default()).unwrap();
    cfg.audit = AuditTarget::File(dir.join("audit.log"));
    // openssl stamps notBefore = the time it ran, after `now` above
    let h = Harness::launch(h0, dir, cfg, FakeClock::new(SystemClock.now())).await;
    let (token, _) = h.token(ID, |_| {});
    let mut client = h.client().await;
    let (_, csr) = p256_csr(ID);
    let r = certify(&mut client, request(ID, token.as_bytes(), csr))
        .await
        .expect("issued");
    let issuer = info(&r.intermediate_certificates[0]);
    assert!(issuer.subject.contains("openssl issuer"));
    assert_eq!(info(&r.leaf_certificate).aki, issuer.ski);
    assert_eq!(issuer.ski.as_ref().map(Vec::len), Some(20));
    let (ok, out) = openssl_verify_leaf(
        &h.dir,
        &h.dir.join("ca.crt"),
        &r.intermediate_certificates[0],
        &r.leaf_certificate,
    );
    assert!(ok, "openssl verify: {out}");
    h.stop().await;
}

// Acceptance 3: every bad input gets its documented gRPC code and a naming message, is audited as a
// refusal, and nothing is issued.
#[tokio::test]
async fn bad_inputs_are_refused_with_the_right_code_and_audited() {
    let h = Harness::start(|_, _| {}).await;
    let (good, _) = h.token(ID, |_| {});
    let (revoked, rid) = h.token(ID, |_| {});
    tokens::revoke(&h.cfg.tokens, &rid, h.clock.now()).unwrap();
    let expired = {
        let o = CreateOptions {
            identity: Identity::parse(ID).unwrap(),
            ttl: Some(Duration::from_secs(60)),
            allowed_ips: Vec::new(),
            uses: None,
        };
        tokens::create(&h.cfg.tokens, &o, h.clock.now() - Duration::from_secs(120))
            .unwrap()
            .secret
            .to_string()
    };
    let other_id = "other.external-services.serviceaccount.identity.linkerd.cluster.local";
    let (for_other, _) = h.token(other_id, |_| {});
    let (ip_bound, _) = h.token(ID, |o| o.allowed_ips = vec!["10.0.0.0/8".parse().unwrap()]);
    h.server.refresh_tokens();
    let key = rcgen::KeyPair::generate().unwrap();
    let ok_csr = csr_with(&key, ID, |_| {});
    let mut cases: Vec<(
        &str,
        linkerd2_proxy_api::identity::CertifyRequest,
        Code,
        &str,
    )> = vec![
        (
            "no token",
            request(ID, b"", ok_csr.clone()),
            Code::Unauthenticated,
            "no token",
        ),
        (
            "unknown token",
            request(ID, b"0123456789abcdef", ok_csr.clone()),
            Code::Unauthenticated,
            "not recognised",
        ),
        (
            "revoked token",
            request(ID, revoked.as_bytes(), ok_csr.clone()),
            Code::Unauthenticated,
            "revoked",
        ),
        (
            "expired token",
            request(ID, expired.as_bytes(), ok_csr.clone()),
            Code::Unauthenticated,
            "expired",
        ),
        (
            "token for another identity",
            request(ID, for_other.as_bytes(), ok_csr.clone()),
            Code::PermissionDenied,
            "not valid for identity",
        ),
        (
            "source ip not allowed",
            request(ID, ip_bound.as_bytes(), ok_csr.clone()),
            Code::PermissionDenied,
            "may not be used from 127.0.0.1",
        ),
        (
            "garbage csr",
            request(ID, good.as_bytes(), b"\x30\x03garbage".to_vec()),
            Code::InvalidArgument,
            "malformed",
        ),
        (
            "csr signature",
            request(ID, good.as_bytes(), tampered(&key)),
            Code::InvalidArgument,
            "signature",
        ),
        (
            "csr san != identity",
            request(
                ID,
                good.as_bytes(),
                csr_with(&key, other_id, |p| {
                    p.distinguished_name = rcgen::DistinguishedName::new();
                }),
            ),
            Code::InvalidArgument,
            "DNS SAN",
        ),
        (
            "cn != identity",
            request(
                ID,
                good.as_bytes(),
                csr_with(&key, ID, |p| {
                    p.distinguished_name = rcgen::DistinguishedName::new();
                    p.distinguished_name
                        .push(rcgen::DnType::CommonName, other_id);
                }),
            ),
            Code::InvalidArgument,
            "common name",
        ),
        (
            "two dns sans",
            request(
                ID,
                good.as_bytes(),
                csr_with(&key, ID, |p| {
                    p.subject_alt_names
                        .push(rcgen::SanType::DnsName(other_id.try_into().unwrap()));
                }),
            ),
            Code::InvalidArgument,
            "exactly one DNS SAN",
        ),
        (
            "ip san",
            request(
                ID,
                good.as_bytes(),
                csr_with(&key, ID, |p| {
                    p.subject_alt_names
                        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
                }),
            ),
            Code::InvalidArgument,
            "IP SAN",
        ),
        (
            "uri san",
            request(
                ID,
                good.as_bytes(),
                csr_with(&key, ID, |p| {
                    p.subject_alt_names.push(rcgen::SanType::URI(
                        "spiffe://cluster.local/ns/x/sa/y".try_into().unwrap(),
                    ));
                }),
            ),
            Code::InvalidArgument,
            "URI SAN",
        ),
        (
            "ca request",
            request(
                ID,
                good.as_bytes(),
                csr_with(&key, ID, |p| {
                    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
                }),
            ),
            Code::InvalidArgument,
            "CA certificate",
        ),
        (
            "p-384 key",
            request(
                ID,
                good.as_bytes(),
                csr_with(
                    &rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
                    ID,
                    |_| {},
                ),
            ),
            Code::InvalidArgument,
            "key type not allowed",
        ),
        (
            "outside trust domain",
            request(
                "legacy-database.external-services.serviceaccount.identity.linkerd.example.org",
                good.as_bytes(),
                ok_csr.clone(),
            ),
            Code::InvalidArgument,
            "outside the trust domain",
        ),
        (
            "over max_request_bytes",
            request(ID, good.as_bytes(), {
                let mut v = ok_csr.clone();
                v.resize(70_000, 0);
                v
            }),
            Code::InvalidArgument,
            "max_request_bytes",
        ),
    ];
    if openssl_available() {
        cases.push((
            "rsa key (openssl)",
            request(ID, good.as_bytes(), openssl_rsa_csr(&h.dir, ID)),
            Code::InvalidArgument,
            "rsaEncryption",
        ));
    }
    let mut client = h.client().await;
    for (name, req, code, needle) in &cases {
        let st = certify(&mut client, req.clone()).await.expect_err(name);
        assert_eq!(st.code(), *code, "{name}: {st:?}");
        assert!(
            st.message().contains(needle),
            "{name}: message {:?} lacks {needle:?}",
            st.message()
        );
        for secret in [&good, &revoked, &expired, &for_other, &ip_bound] {
            assert!(
                !st.message().contains(secret.as_str()),
                "{name}: token echoed"
            );
        }
    }
    let audit = h.audit_lines();
    assert_eq!(audit.len(), cases.len());
    for (line, (name, _, _, needle)) in audit.iter().zip(&cases) {
        assert_eq!(line["decision"], "refused", "{name}");
        assert!(
            line["reason"].as_str().unwrap().contains(needle),
            "{name}: {line}"
        );
        assert!(line["serial"].is_null());
    }
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "issuer_certify_total{result=\"issued\"}").unwrap_or(0.0),
        0.0
    );
    // the good token still works: nothing above was a side effect on it
    certify(&mut client, request(ID, good.as_bytes(), ok_csr))
        .await
        .unwrap();
    h.stop().await;
}

fn tampered(key: &rcgen::KeyPair) -> Vec<u8> {
    let mut der = csr_with(key, ID, |_| {});
    let other = rcgen::KeyPair::generate().unwrap();
    let pos = der
        .windows(65)
        .position(|w| w == key.public_key_raw())
        .unwrap();
    der[pos..pos + 65].copy_from_slice(other.public_key_raw());
    der
}

// Acceptance 6 + 8: an issuer with 2 h left caps a 24 h leaf at its notAfter; once less than
// the minimum lifetime is left, UNAVAILABLE and /ready false — all on the fake clock.
#[tokio::test]
async fn leaf_is_capped_at_issuer_expiry_and_refused_under_min_lifetime() {
    let h = Harness::start(|_, dir| {
        let now = SystemClock.now();
        let (cert, key) = issuer_pair(
            &std::fs::read_to_string(dir.join("ca.crt")).unwrap(),
            &std::fs::read_to_string(dir.join("anchor.key")).unwrap(),
            "short-lived issuer",
            now - Duration::from_secs(60),
            now + Duration::from_secs(2 * 3600),
            true,
        );
        std::fs::write(dir.join("issuer.crt"), cert).unwrap();
        std::fs::write(dir.join("issuer.key"), key).unwrap();
    })
    .await;
    // 2 h left is under the default 30 d warning threshold
    assert!(h.server.ca_expires_soon());
    let (token, _) = h.token(ID, |_| {});
    let mut client = h.client().await;
    let (_, csr) = p256_csr(ID);
    let r = certify(&mut client, request(ID, token.as_bytes(), csr.clone()))
        .await
        .unwrap();
    let issuer = info(&r.intermediate_certificates[0]);
    assert_eq!(info(&r.leaf_certificate).not_after, issuer.not_after);
    assert_eq!(h.ready().await, 200);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "issuer_ca_expiration_timestamp_seconds"),
        Some(proxy_lib::clock::unix_secs(issuer.not_after) as f64)
    );

    // 1 h 1 s later: 59 min 59 s left < 1 h minimum
    h.clock.advance(Duration::from_secs(3601));
    let st = certify(&mut client, request(ID, token.as_bytes(), csr.clone()))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(st.message().contains("minimum leaf lifetime"), "{st:?}");
    assert_eq!(h.ready().await, 503);
    // and after expiry too
    h.clock.advance(Duration::from_secs(2 * 3600));
    let st = certify(&mut client, request(ID, token.as_bytes(), csr))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unavailable);
    assert_eq!(h.ready().await, 503);
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "issuer_certify_total{result=\"unavailable\"}"),
        Some(2.0)
    );
    h.stop().await;
}

// Acceptance 7: /metrics counts match what the test did; /live and /ready answer.
#[tokio::test]
async fn metrics_count_the_requests_made() {
    let h = Harness::start(|_, _| {}).await;
    assert!(!h.server.ca_expires_soon());
    let (token, _) = h.token(ID, |_| {});
    let mut client = h.client().await;
    for _ in 0..3 {
        let (_, csr) = p256_csr(ID);
        certify(&mut client, request(ID, token.as_bytes(), csr))
            .await
            .unwrap();
    }
    for _ in 0..2 {
        let (_, csr) = p256_csr(ID);
        certify(&mut client, request(ID, b"bogus", csr))
            .await
            .unwrap_err();
    }
    let (_, csr) = p256_csr(ID);
    certify(
        &mut client,
        request(ID, token.as_bytes(), csr[..10].to_vec()),
    )
    .await
    .unwrap_err();
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "issuer_certify_total{result=\"issued\"}"),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "issuer_certify_total{result=\"unauthenticated\"}"),
        Some(2.0)
    );
    assert_eq!(
        metric(&m, "issuer_certify_total{result=\"invalid_argument\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "issuer_certify_duration_seconds_count"),
        Some(6.0)
    );
    assert_eq!(http_get(h.admin, "/live").await.0, 200);
    assert_eq!(h.ready().await, 200);
    h.stop().await;
}

// Limits: rate per credential+peer with a burst, and signing concurrency.
#[tokio::test]
async fn rate_and_concurrency_limits_answer_resource_exhausted() {
    let h = Harness::start(|c, _| {
        c.limits.per_credential_per_minute = std::num::NonZeroU32::new(3).unwrap();
    })
    .await;
    let (a, _) = h.token(ID, |_| {});
    let (b, _) = h.token(ID, |_| {});
    let mut client = h.client().await;
    let (_, csr) = p256_csr(ID);
    for _ in 0..3 {
        certify(&mut client, request(ID, a.as_bytes(), csr.clone()))
            .await
            .unwrap();
    }
    let st = certify(&mut client, request(ID, a.as_bytes(), csr.clone()))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    // another credential has its own budget
    certify(&mut client, request(ID, b.as_bytes(), csr.clone()))
        .await
        .unwrap();

    // hold every signing permit: the next request is turned away, not queued
    let permits = h
        .server
        .shared()
        .signing
        .try_acquire_many(h.cfg.limits.max_concurrent_signing as u32)
        .unwrap();
    let st = certify(&mut client, request(ID, b.as_bytes(), csr.clone()))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted);
    assert!(st.message().contains("in flight"));
    drop(permits);
    certify(&mut client, request(ID, b.as_bytes(), csr))
        .await
        .unwrap();
    h.stop().await;
}

// The server re-reads the token store when it changes: revoke and create while running.
#[tokio::test]
async fn token_store_changes_apply_without_restart() {
    let h = Harness::start(|_, _| {}).await;
    let mut client = h.client().await;
    let (_, csr) = p256_csr(ID);
    let (t, id) = h.token(ID, |_| {});
    certify(&mut client, request(ID, t.as_bytes(), csr.clone()))
        .await
        .unwrap();
    tokens::revoke(&h.cfg.tokens, &id, h.clock.now()).unwrap();
    h.server.refresh_tokens();
    let st = certify(&mut client, request(ID, t.as_bytes(), csr))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated);
    assert!(st.message().contains("revoked"));
    h.stop().await;
}

// Acceptance 8: the serving certificate is re-minted before it expires (fake clock), and
// whenever the CA is reloaded; clients keep verifying it against ca.crt.
#[tokio::test]
async fn serving_certificate_is_reminted_before_expiry_and_on_reload() {
    let h = Harness::start(|_, _| {}).await;
    let first = serving_chain(
        h.addr,
        &h.anchors_pem(),
        &h.cfg.server_name,
        Arc::new(h.clock.clone()),
    )
    .await;
    let s = info(&first[0]);
    assert_eq!(s.dns_sans, vec![h.cfg.server_name.clone()]);
    let before = h.server.serving();
    assert_eq!(before.sha256, s.sha256);

    // not yet due: nothing changes
    h.clock.advance(Duration::from_secs(3600));
    h.server.tick();
    assert_eq!(h.server.serving().sha256, before.sha256);
    // past 2/3 of its life: re-minted
    h.clock.set(before.renew_at + Duration::from_secs(1));
    h.server.tick();
    let after = h.server.serving();
    assert_ne!(after.sha256, before.sha256);
    assert!(after.not_after > before.not_after);
    let second = serving_chain(
        h.addr,
        &h.anchors_pem(),
        &h.cfg.server_name,
        Arc::new(h.clock.clone()),
    )
    .await;
    assert_eq!(info(&second[0]).sha256, after.sha256);

    // a new issuer pair under the same anchor: reload swaps the CA and re-mints at once
    let now = h.clock.now();
    let (cert, key) = issuer_pair(
        &std::fs::read_to_string(h.dir.join("ca.crt")).unwrap(),
        &std::fs::read_to_string(h.dir.join("anchor.key")).unwrap(),
        "second issuer",
        now - Duration::from_secs(60),
        now + Duration::from_secs(30 * 86_400),
        true,
    );
    std::fs::write(h.dir.join("issuer.crt"), &cert).unwrap();
    std::fs::write(h.dir.join("issuer.key"), &key).unwrap();
    h.server.reload_ca().unwrap();
    let third = serving_chain(
        h.addr,
        &h.anchors_pem(),
        &h.cfg.server_name,
        Arc::new(h.clock.clone()),
    )
    .await;
    assert!(info(&third[1]).subject.contains("second issuer"));
    assert_ne!(info(&third[0]).sha256, after.sha256);

    // an anchor bundle that gains a second anchor (anchor rotation) with the same issuer
    // pair is also a reload: re-minted, and the new bundle still verifies it
    let extra = tempfile::tempdir().unwrap();
    issuer::init::run_at(&issuer::init::InitOptions::new(extra.path()), now).unwrap();
    let mut bundle = std::fs::read(h.dir.join("ca.crt")).unwrap();
    bundle.extend(std::fs::read(extra.path().join("ca.crt")).unwrap());
    std::fs::write(h.dir.join("ca.crt"), &bundle).unwrap();
    let before_anchor = h.server.serving().sha256.clone();
    h.server.reload_ca().unwrap();
    assert_eq!(h.server.shared().ca.load().anchors().certs().len(), 2);
    assert_ne!(h.server.serving().sha256, before_anchor);
    let fourth = serving_chain(
        h.addr,
        &bundle,
        &h.cfg.server_name,
        Arc::new(h.clock.clone()),
    )
    .await;
    assert_eq!(info(&fourth[0]).sha256, h.server.serving().sha256);
    h.stop().await;
}

// The reload loop notices changed files by itself (poll + debounce), and refuses a bad pair
// while keeping the old one.
#[tokio::test]
async fn changed_ca_files_are_picked_up_and_bad_pairs_refused() {
    let h = Harness::start(|_, _| {}).await;
    let (token, _) = h.token(ID, |_| {});
    let mut client = h.client().await;
    let (_, csr) = p256_csr(ID);
    let anchor = std::fs::read_to_string(h.dir.join("ca.crt")).unwrap();
    let anchor_key = std::fs::read_to_string(h.dir.join("anchor.key")).unwrap();
    let now = h.clock.now();
    // not a CA: refused, old issuer kept
    let (cert, key) = issuer_pair(
        &anchor,
        &anchor_key,
        "not a ca",
        now - Duration::from_secs(60),
        now + Duration::from_secs(86_400),
        false,
    );
    proxy_lib::fs::write_atomic(&h.dir.join("issuer.key"), key.as_bytes(), 0o600, None).unwrap();
    proxy_lib::fs::write_atomic(&h.dir.join("issuer.crt"), cert.as_bytes(), 0o644, None).unwrap();
    let err = h.server.reload_ca().unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");
    let r = certify(&mut client, request(ID, token.as_bytes(), csr.clone()))
        .await
        .unwrap();
    assert!(
        info(&r.intermediate_certificates[0])
            .subject
            .contains("identity.linkerd.cluster.local")
    );
    // a good pair written while the server runs: picked up by the poll loop
    let (cert, key) = issuer_pair(
        &anchor,
        &anchor_key,
        "polled issuer",
        now - Duration::from_secs(60),
        now + Duration::from_secs(86_400),
        true,
    );
    proxy_lib::fs::write_atomic(&h.dir.join("issuer.key"), key.as_bytes(), 0o600, None).unwrap();
    proxy_lib::fs::write_atomic(&h.dir.join("issuer.crt"), cert.as_bytes(), 0o644, None).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = certify(&mut client, request(ID, token.as_bytes(), csr.clone()))
            .await
            .unwrap();
        if info(&r.intermediate_certificates[0])
            .subject
            .contains("polled issuer")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "new issuer never picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = h.metrics().await;
    assert_eq!(
        metric(&m, "issuer_ca_reloads_total{result=\"refused\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "issuer_ca_reloads_total{result=\"loaded\"}"),
        Some(1.0),
        "{m}"
    );
    h.stop().await;
}

// --plaintext on loopback serves without TLS (what a linkerd2-proxy with a loopback identity
// address speaks).
#[tokio::test]
async fn plaintext_on_loopback() {
    let h = Harness::start(|c, _| c.plaintext = true).await;
    let (token, _) = h.token(ID, |_| {});
    let mut client = plain_client(h.addr).await;
    let (_, csr) = p256_csr(ID);
    certify(&mut client, request(ID, token.as_bytes(), csr))
        .await
        .unwrap();
    h.stop().await;
}

/// Renewal by client certificate in miniature: accepts a request without a token when the
/// peer's client certificate (already verified against the anchors by TLS) names the
/// requested identity. Proves the authenticator sees the peer's chain and address.
#[derive(Debug)]
struct ByClientCert;

#[tonic::async_trait]
impl issuer::auth::Authenticator for ByClientCert {
    fn name(&self) -> &'static str {
        "client-cert"
    }

    async fn authenticate(
        &self,
        req: &issuer::auth::AuthRequest<'_>,
    ) -> Result<Option<issuer::auth::Principal>, issuer::error::AuthError> {
        let Some(leaf) = req.client_certs.and_then(|c| c.first()) else {
            return Ok(None);
        };
        assert!(req.peer.is_some_and(|p| p.ip().is_loopback()));
        let info = CertInfo::from_der(leaf).unwrap();
        if info.dns_sans.iter().any(|d| d == req.identity.as_str()) {
            Ok(Some(issuer::auth::Principal {
                authenticator: "client-cert",
                credential: format!("cert:{}", info.serial),
            }))
        } else {
            Ok(None)
        }
    }
}

// The authenticator chain sees the peer's client certificate chain (for renewal by client
// certificate, a later issue): a leaf from this issuer authenticates its own renewal.
#[tokio::test]
async fn authenticators_see_the_client_certificate() {
    proxy_lib::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("issuer");
    let now = SystemClock.now();
    issuer::init::run_at(&issuer::init::InitOptions::new(&dir), now).unwrap();
    let mut cfg = Config::load(&dir.join("issuer.toml"), &Overrides::default()).unwrap();
    cfg.audit = AuditTarget::File(dir.join("audit.log"));
    // The built-in renewal by certificate would decide first: off, so the extra one is asked.
    cfg.renew_by_certificate = false;
    let h = Harness::launch_with(
        tmp,
        dir,
        cfg,
        FakeClock::new(now),
        vec![Arc::new(ByClientCert)],
    )
    .await;
    let (token, _) = h.token(ID, |_| {});
    let mut client = h.client().await;
    let (key, csr) = p256_csr(ID);
    let first = certify(&mut client, request(ID, token.as_bytes(), csr))
        .await
        .unwrap();

    let mut renewing = tls_client_with_cert(
        h.addr,
        &h.anchors_pem(),
        &h.cfg.server_name,
        vec![
            first.leaf_certificate.clone(),
            first.intermediate_certificates[0].clone(),
        ],
        key.serialize_der(),
    )
    .await;
    let (_, csr2) = p256_csr(ID);
    let second = certify(&mut renewing, request(ID, b"", csr2))
        .await
        .expect("renewed by cert");
    assert_ne!(
        info(&second.leaf_certificate).serial,
        info(&first.leaf_certificate).serial
    );
    // without a certificate and without a token: still refused
    let (_, csr3) = p256_csr(ID);
    let st = certify(&mut client, request(ID, b"", csr3))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated);
    let audit = h.audit_lines();
    assert_eq!(audit[1]["authenticator"], "client-cert");
    h.stop().await;
}

// `--lifetime 10s` works (the rotator's tests and the demo rotate fast): the leaf lives
// 10 s + the skew allowance, with the default 1 h minimum lifetime left as it is.
#[tokio::test]
async fn lifetimes_of_a_few_seconds_work() {
    let h = Harness::start(|c, _| {
        c.policy.lifetime = Duration::from_secs(10);
        c.policy.clock_skew = Duration::from_secs(1);
    })
    .await;
    let (token, _) = h.token(ID, |_| {});
    let mut client = h.client().await;
    let (_, csr) = p256_csr(ID);
    let r = certify(&mut client, request(ID, token.as_bytes(), csr))
        .await
        .unwrap();
    assert_eq!(
        info(&r.leaf_certificate).lifetime(),
        Duration::from_secs(11)
    );
    h.stop().await;
}
