//! Renewal by client certificate, tokens with a use count bound to keys, and identity
//! revocation, end to end over TLS against an in-process issuer (and the CLI for the
//! operator commands).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use issuer::audit::AuditTarget;
use issuer::config::{Config, Overrides};
use issuer::server::Server;
use issuer::tokens::{self, CreateOptions};
use linkerd2_proxy_api::identity::CertifyResponse;
use proxy_lib::cert::CertInfo;
use proxy_lib::clock::{Clock, FakeClock, SystemClock};
use proxy_lib::identity::Identity;
use rcgen::KeyPair;
use tonic::Code;

const OTHER: &str = "billing.external-services.serviceaccount.identity.linkerd.cluster.local";

struct Harness {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    clock: FakeClock,
    cfg: Config,
    server: Arc<Server>,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: Option<tokio::task::JoinHandle<issuer::Result<()>>>,
}

impl Harness {
    /// An issuer with short leaves (2 min), on a fake clock starting at the real now.
    async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        proxy_lib::install_crypto_provider();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("issuer");
        let now = SystemClock.now();
        issuer::init::run_at(&issuer::init::InitOptions::new(&dir), now).unwrap();
        let mut cfg = Config::load(&dir.join("issuer.toml"), &Overrides::default()).unwrap();
        cfg.audit = AuditTarget::File(dir.join("audit.log"));
        cfg.policy.lifetime = Duration::from_secs(120);
        cfg.policy.clock_skew = Duration::from_secs(1);
        tweak(&mut cfg);
        let clock = FakeClock::new(now);
        let server = Server::new(cfg.clone(), Arc::new(clock.clone())).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn(server.clone().run(listener, None, async move {
            let _ = rx.await;
        }));
        Self {
            _tmp: tmp,
            dir,
            clock,
            cfg,
            server,
            addr,
            stop: Some(tx),
            join: Some(join),
        }
    }

    fn anchors_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("ca.crt")).unwrap()
    }

    /// A token for `identity` that certifies at most `uses` keys.
    fn token(&self, identity: &str, uses: Option<u32>) -> String {
        let o = CreateOptions {
            identity: Identity::parse(identity).unwrap(),
            ttl: None,
            allowed_ips: Vec::new(),
            uses,
        };
        let t = tokens::create(&self.cfg.tokens, &o, self.clock.now()).unwrap();
        // What the server's maintenance loop does within a second.
        self.server.refresh_tokens();
        t.secret.to_string()
    }

    /// One Certify call with `key`'s CSR, presenting `cert` (leaf + chain, with `key`) when
    /// given, sending `token`.
    async fn certify(
        &self,
        identity: &str,
        token: &str,
        key: &KeyPair,
        cert: Option<(&CertifyResponse, &KeyPair)>,
    ) -> Result<CertifyResponse, tonic::Status> {
        let mut client = match cert {
            None => tls_client(self.addr, &self.anchors_pem(), &self.cfg.server_name).await,
            Some((resp, held)) => {
                tls_client_with_cert(
                    self.addr,
                    &self.anchors_pem(),
                    &self.cfg.server_name,
                    chain_of(resp),
                    held.serialize_der(),
                )
                .await
            }
        };
        let csr = csr_with(identity, key);
        certify(&mut client, request(identity, token.as_bytes(), csr)).await
    }

    /// Renews by certificate (no token) from the loopback address `source`.
    async fn renew_from(
        &self,
        source: &str,
        identity: &str,
        key: &KeyPair,
        cert: (&CertifyResponse, &KeyPair),
    ) -> Result<CertifyResponse, tonic::Status> {
        let mut client = tls_client_with_cert_from(
            Some(source.parse().unwrap()),
            self.addr,
            &self.anchors_pem(),
            &self.cfg.server_name,
            chain_of(cert.0),
            cert.1.serialize_der(),
        )
        .await;
        certify(&mut client, request(identity, b"", csr_with(identity, key))).await
    }

    /// A token for `identity` usable only from `allowed`.
    fn token_from(&self, identity: &str, allowed: &str) -> issuer::tokens::NewToken {
        let o = CreateOptions {
            identity: Identity::parse(identity).unwrap(),
            ttl: None,
            allowed_ips: vec![allowed.parse().unwrap()],
            uses: Some(1),
        };
        let t = tokens::create(&self.cfg.tokens, &o, self.clock.now()).unwrap();
        self.server.refresh_tokens();
        t
    }

    /// Rewrites issuer.key and issuer.crt with a new pair named `cn` under the same anchor, as
    /// an operator might by hand (the server picks it up on its next CA reload).
    fn replace_pair_by_hand(&self, cn: &str) {
        let anchor_pem = std::fs::read_to_string(self.dir.join("ca.crt")).unwrap();
        let anchor_key = std::fs::read_to_string(self.dir.join("anchor.key")).unwrap();
        let now = self.clock.now();
        let (cert, new_key) = issuer_pair(
            &anchor_pem,
            &anchor_key,
            cn,
            now - Duration::from_secs(60),
            now + Duration::from_secs(86_400),
            true,
        );
        let write = |name: &str, text: &str, mode| {
            proxy_lib::fs::write_atomic(&self.dir.join(name), text.as_bytes(), mode, None).unwrap()
        };
        write("issuer.key", &new_key, 0o600);
        write("issuer.crt", &cert, 0o644);
    }

    fn audit_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("audit.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Stops the server and starts a new one on the same directory, configuration and clock
    /// (what a restart of the process sees).
    async fn restart(mut self) -> Self {
        self.halt().await;
        let server = Server::new(self.cfg.clone(), Arc::new(self.clock.clone())).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.join = Some(tokio::spawn(server.clone().run(
            listener,
            None,
            async move {
                let _ = rx.await;
            },
        )));
        self.stop = Some(tx);
        self.server = server;
        self
    }

    /// Stops the server and waits for it to finish.
    async fn halt(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.join.take().unwrap())
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }

    async fn stop(mut self) {
        self.halt().await;
    }
}

fn chain_of(resp: &CertifyResponse) -> Vec<Vec<u8>> {
    std::iter::once(resp.leaf_certificate.clone())
        .chain(resp.intermediate_certificates.iter().cloned())
        .collect()
}

fn csr_with(identity: &str, key: &KeyPair) -> Vec<u8> {
    let mut p = rcgen::CertificateParams::new(vec![identity.to_string()]).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.serialize_request(key).unwrap().der().to_vec()
}

fn serial(resp: &CertifyResponse) -> String {
    CertInfo::from_der(&resp.leaf_certificate).unwrap().serial
}

fn last_audit(h: &Harness) -> serde_json::Value {
    h.audit_lines().pop().expect("an audit line")
}

// Acceptance 1.
#[tokio::test]
async fn a_single_use_token_bootstraps_once_and_certificates_renew() {
    let h = Harness::start(|_| {}).await;
    let token = h.token(ID, Some(1));

    // Host A bootstraps, then renews five times by certificate (a new key each time, no token).
    let mut key = KeyPair::generate().unwrap();
    let mut cert = h.certify(ID, &token, &key, None).await.expect("bootstrap");
    assert_eq!(last_audit(&h)["authenticator"], "tokens");
    for i in 0..5 {
        let next_key = KeyPair::generate().unwrap();
        let next = h
            .certify(ID, "", &next_key, Some((&cert, &key)))
            .await
            .unwrap_or_else(|st| panic!("renewal {i}: {st:?}"));
        assert_ne!(serial(&next), serial(&cert));
        let line = last_audit(&h);
        assert_eq!(line["decision"], "issued");
        assert_eq!(line["authenticator"], "certificate");
        assert_eq!(line["credential"], format!("cert:{}", serial(&cert)));
        (cert, key) = (next, next_key);
        h.clock.advance(Duration::from_secs(10));
    }

    // Host B copied the token: another key is refused.
    let other_key = KeyPair::generate().unwrap();
    let st = h.certify(ID, &token, &other_key, None).await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    assert!(st.message().contains("bound to the key"), "{st:?}");
    // The first key, retried with the token alone (a lost answer), is still fine.
    let list = tokens::list(&h.cfg.tokens).unwrap();
    assert_eq!(list[0].uses_left(), Some(0));
    assert_eq!(list[0].bound_keys.len(), 1);

    // A real-proxy-style client: one key for ever, token and current certificate each time.
    let proxy_token = h.token(OTHER, Some(1));
    let proxy_key = KeyPair::generate().unwrap();
    let mut current = h
        .certify(OTHER, &proxy_token, &proxy_key, None)
        .await
        .expect("proxy bootstrap");
    for _ in 0..3 {
        current = h
            .certify(
                OTHER,
                &proxy_token,
                &proxy_key,
                Some((&current, &proxy_key)),
            )
            .await
            .expect("proxy renewal");
        assert_eq!(
            last_audit(&h)["authenticator"],
            "certificate",
            "the cert wins"
        );
    }
    // "Restart": only the key and the token, no certificate.
    h.certify(OTHER, &proxy_token, &proxy_key, None)
        .await
        .expect("restart with the bound key");
    assert_eq!(last_audit(&h)["authenticator"], "tokens");

    // A certificate from another issuer under the same anchor is no renewal credential.
    let anchor_pem = std::fs::read_to_string(h.dir.join("ca.crt")).unwrap();
    let anchor_key = std::fs::read_to_string(h.dir.join("anchor.key")).unwrap();
    let now = h.clock.now();
    let (other_cert, other_key_pem) = issuer_pair(
        &anchor_pem,
        &anchor_key,
        "another issuer",
        now - Duration::from_secs(60),
        now + Duration::from_secs(86_400),
        true,
    );
    let other_ca = issuer::ca::Ca::from_pem(
        anchor_pem.as_bytes(),
        other_cert.as_bytes(),
        other_key_pem.as_bytes(),
        now,
        &issuer::ca::CaFiles::in_dir(Path::new("/nonexistent")),
    )
    .unwrap();
    let foreign_key = KeyPair::generate().unwrap();
    let grant = proxy_lib::validity::Window::grant(
        now,
        Duration::from_secs(120),
        Duration::from_secs(1),
        other_ca.window(),
    );
    let foreign = issuer::signer::sign_leaf(
        &other_ca,
        &Identity::parse(ID).unwrap(),
        &foreign_key,
        &grant,
        issuer::signer::LeafKind::Workload,
    )
    .unwrap();
    let foreign_resp = CertifyResponse {
        leaf_certificate: foreign.der.to_vec(),
        intermediate_certificates: other_ca.chain().iter().map(|c| c.to_vec()).collect(),
        valid_until: None,
    };
    let st = h
        .certify(ID, "", &foreign_key, Some((&foreign_resp, &foreign_key)))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    let line = last_audit(&h);
    assert_eq!(line["decision"], "refused");
    assert!(line["authenticator"].is_null());

    // A leaf of ours for another identity is not a credential for this one either.
    let st = h
        .certify(ID, "", &proxy_key, Some((&current, &proxy_key)))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    h.stop().await;
}

// A token's allowed addresses bind renewal by certificate too: from another address the
// identity's certificate is refused (PERMISSION_DENIED naming it, audited), unless another
// non-revoked token of the identity allows that address; an identity whose tokens restrict
// nothing renews from anywhere.
#[tokio::test]
async fn renewal_by_certificate_only_from_addresses_the_tokens_allow() {
    let h = Harness::start(|_| {}).await;
    let t = h.token_from(ID, "127.0.0.1");
    let key = KeyPair::generate().unwrap();
    let cert = h
        .certify(ID, &t.secret, &key, None)
        .await
        .expect("bootstrap");
    // The token is used up; its record still restricts renewals.
    assert_eq!(tokens::list(&h.cfg.tokens).unwrap()[0].uses_left(), Some(0));
    let k2 = KeyPair::generate().unwrap();
    let renewed = h
        .renew_from("127.0.0.1", ID, &k2, (&cert, &key))
        .await
        .expect("renewal from the allowed address");
    assert_eq!(last_audit(&h)["authenticator"], "certificate");

    let k3 = KeyPair::generate().unwrap();
    let st = h
        .renew_from("127.0.0.2", ID, &k3, (&renewed, &k2))
        .await
        .expect_err("renewal from another host");
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("127.0.0.2"), "{st:?}");
    let line = last_audit(&h);
    assert_eq!(line["decision"], "refused");
    assert_eq!(
        line["peer"].as_str().unwrap().split(':').next(),
        Some("127.0.0.2")
    );
    assert!(
        line["reason"].as_str().unwrap().contains("127.0.0.2"),
        "{line}"
    );

    // Another token of the identity allowing 127.0.0.2: the union is allowed.
    let second = h.token_from(ID, "127.0.0.2/32");
    h.renew_from("127.0.0.2", ID, &k3, (&renewed, &k2))
        .await
        .expect("renewal from an address another token allows");
    // Revoked records restrict nothing and allow nothing: back to 127.0.0.1 only.
    tokens::revoke(&h.cfg.tokens, &second.record.id, h.clock.now()).unwrap();
    h.server.refresh_tokens();
    let k4 = KeyPair::generate().unwrap();
    let st = h
        .renew_from("127.0.0.2", ID, &k4, (&renewed, &k2))
        .await
        .expect_err("the revoked token's address no longer counts");
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");

    // An identity whose tokens restrict no address renews from any.
    let free = h.token(OTHER, Some(1));
    let ok = KeyPair::generate().unwrap();
    let other = h.certify(OTHER, &free, &ok, None).await.expect("bootstrap");
    h.renew_from("127.0.0.2", OTHER, &k4, (&other, &ok))
        .await
        .expect("unrestricted identity renews from another host");
    h.stop().await;
}

// Two keys racing for the last use of a token over the wire: exactly one is certified.
#[tokio::test]
async fn two_keys_racing_for_one_use_one_wins() {
    let h = Harness::start(|_| {}).await;
    let token = h.token(ID, Some(1));
    let (a, b) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let (ra, rb) = tokio::join!(
        h.certify(ID, &token, &a, None),
        h.certify(ID, &token, &b, None)
    );
    assert!(ra.is_ok() != rb.is_ok(), "{ra:?} {rb:?}");
    let loser = ra.err().or(rb.err()).unwrap();
    assert_eq!(loser.code(), Code::Unauthenticated);
    assert_eq!(tokens::list(&h.cfg.tokens).unwrap()[0].bound_keys.len(), 1);
    h.stop().await;
}

// Acceptance 2.
#[tokio::test]
async fn revoking_an_identity_stops_its_renewals_only() {
    let h = Harness::start(|_| {}).await;
    let tx = h.token(ID, Some(1));
    let ty = h.token(OTHER, None);
    let (kx, ky) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let cx = h.certify(ID, &tx, &kx, None).await.unwrap();
    let cy = h.certify(OTHER, &ty, &ky, None).await.unwrap();

    // Issued in an earlier second than the revocation.
    h.clock.advance(Duration::from_secs(2));
    let r = tokens::revoke_identity_in_file(
        &h.cfg.tokens,
        &Identity::parse(ID).unwrap(),
        Some("host decommissioned"),
        h.clock.now(),
    )
    .unwrap();
    assert_eq!(r.reason.as_deref(), Some("host decommissioned"));
    h.server.refresh_tokens();

    let k2 = KeyPair::generate().unwrap();
    let st = h.certify(ID, "", &k2, Some((&cx, &kx))).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("revoked"), "{st:?}");
    let line = last_audit(&h);
    assert_eq!(line["decision"], "refused");
    assert_eq!(line["code"], "permission_denied");
    assert!(line["reason"].as_str().unwrap().contains("revoked"));
    // The old token (created before the revocation) does not bring it back either.
    let st = h.certify(ID, &tx, &kx, None).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");

    // Another identity keeps renewing.
    let ky2 = KeyPair::generate().unwrap();
    h.certify(OTHER, "", &ky2, Some((&cy, &ky)))
        .await
        .expect("other identities renew");

    // A token created after the revocation bootstraps X again, even while the host still
    // presents its revoked certificate; the new certificate renews.
    let fresh = h.token(ID, Some(1));
    let k3 = KeyPair::generate().unwrap();
    let again = h
        .certify(ID, &fresh, &k3, Some((&cx, &kx)))
        .await
        .expect("a new token works again");
    assert_eq!(last_audit(&h)["authenticator"], "tokens");
    let k4 = KeyPair::generate().unwrap();
    h.certify(ID, "", &k4, Some((&again, &k3)))
        .await
        .expect("a certificate issued after the revocation renews");
    h.stop().await;
}

// max_renewal_age: a chain of renewals ends that long after its bootstrap, however recent
// its last certificate.
#[tokio::test]
async fn a_renewal_chain_ends_at_max_renewal_age() {
    let h = Harness::start(|c| c.max_renewal_age = Some(Duration::from_secs(100))).await;
    let token = h.token(ID, Some(1));
    let mut key = KeyPair::generate().unwrap();
    let mut cert = h.certify(ID, &token, &key, None).await.unwrap();
    for _ in 0..2 {
        h.clock.advance(Duration::from_secs(45));
        let k = KeyPair::generate().unwrap();
        cert = h.certify(ID, "", &k, Some((&cert, &key))).await.unwrap();
        key = k;
    }
    h.clock.advance(Duration::from_secs(15));
    let k = KeyPair::generate().unwrap();
    let st = h
        .certify(ID, "", &k, Some((&cert, &key)))
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    assert!(st.message().contains("max_renewal_age"), "{st:?}");
    h.stop().await;
}

// The issuer never issues its own serving name, whatever the credential.
#[tokio::test]
async fn the_serving_name_is_never_issued() {
    let h = Harness::start(|_| {}).await;
    let name = h.cfg.server_name.clone();
    let token = h.token(&name, None);
    let st = h
        .certify(&name, &token, &KeyPair::generate().unwrap(), None)
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("serving name"), "{st:?}");
    h.stop().await;
}

fn issuer_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_issuer"))
        .args(args)
        .output()
        .expect("run issuer");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn cli_creates_counted_tokens_lists_their_uses_and_revokes_identities() {
    let h = Harness::start(|_| {}).await;
    let dir = h.dir.to_str().unwrap();
    let (code, out, err) = issuer_cli(&[
        "token",
        "create",
        "--dir",
        dir,
        "--identity",
        ID,
        "--uses",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("for 2 key(s)"), "{err}");
    let token = out.trim().to_string();
    assert_ne!(
        issuer_cli(&[
            "token",
            "create",
            "--dir",
            dir,
            "--identity",
            ID,
            "--uses",
            "0"
        ])
        .0,
        0
    );
    h.server.refresh_tokens();
    let key = KeyPair::generate().unwrap();
    h.certify(ID, &token, &key, None).await.unwrap();
    let fp = tokens::key_fingerprint(&rcgen::PublicKeyData::subject_public_key_info(&key));

    let (code, list, err) = issuer_cli(&["token", "list", "--dir", dir]);
    assert_eq!(code, 0, "{err}");
    let mut lines = list.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID",
            "STATUS",
            "EXPIRES",
            "USES-LEFT",
            "BOUND-KEY",
            "ALLOWED-IPS",
            "IDENTITY"
        ]
    );
    let row: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(row[3], "1/2", "{list}");
    assert_eq!(row[4], &fp[..16], "{list}");
    let (_, json, _) = issuer_cli(&["token", "list", "--dir", dir, "--json"]);
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(rows[0]["uses_left"], 1);
    assert_eq!(rows[0]["bound_keys"][0], fp);

    let (code, _, err) = issuer_cli(&[
        "revoke",
        "--dir",
        dir,
        "--identity",
        ID,
        "--reason",
        "lost laptop",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("revoked identity"), "{err}");
    let revs = tokens::list_revocations(&h.cfg.tokens).unwrap();
    assert_eq!(revs.len(), 1);
    assert_eq!(revs[0].identity, ID);
    assert_eq!(revs[0].reason.as_deref(), Some("lost laptop"));
    // An identity outside the trust domain is named in the error.
    let (code, _, err) = issuer_cli(&["revoke", "--dir", dir, "--identity", "nope.example"]);
    assert_ne!(code, 0);
    assert!(err.contains("nope.example"), "{err}");
    h.stop().await;
}

// After a CA reload replaces the issuer, leaves of the replaced issuer still renew (they
// stay valid for up to one leaf lifetime); the renewed leaf comes from the new issuer.
#[tokio::test]
async fn leaves_of_a_replaced_issuer_still_renew() {
    let h = Harness::start(|_| {}).await;
    let token = h.token(ID, Some(1));
    let key = KeyPair::generate().unwrap();
    let old = h.certify(ID, &token, &key, None).await.unwrap();

    h.replace_pair_by_hand("next issuer");
    h.server.reload_ca().unwrap();

    let k2 = KeyPair::generate().unwrap();
    let renewed = h
        .certify(ID, "", &k2, Some((&old, &key)))
        .await
        .expect("a leaf of the replaced issuer renews");
    assert_ne!(
        renewed.intermediate_certificates[0], old.intermediate_certificates[0],
        "signed by the new issuer"
    );
    let k3 = KeyPair::generate().unwrap();
    h.certify(ID, "", &k3, Some((&renewed, &k2)))
        .await
        .expect("and so does the new one's");
    h.stop().await;
}

// `issuer ca new-issuer` records the issuer it replaced, so an issuer restarted after the
// rotation still renews the leaves the old one signed; without that record, a restarted
// issuer knows only the issuer in use.
#[tokio::test]
async fn leaves_of_a_replaced_issuer_renew_after_a_restart() {
    let h = Harness::start(|_| {}).await;
    let token = h.token(ID, Some(1));
    let key = KeyPair::generate().unwrap();
    let old = h.certify(ID, &token, &key, None).await.unwrap();

    let files = issuer::ca::CaFiles::in_dir(&h.dir);
    issuer::ca::ops::new_issuer(
        &files,
        &h.dir.join("anchor.key"),
        "next issuer",
        Duration::from_secs(86_400),
        h.clock.now(),
        None,
    )
    .unwrap();
    let h = h.restart().await;

    let k2 = KeyPair::generate().unwrap();
    let renewed = h
        .certify(ID, "", &k2, Some((&old, &key)))
        .await
        .expect("a leaf of the replaced issuer renews after a restart");
    assert_ne!(
        renewed.intermediate_certificates[0], old.intermediate_certificates[0],
        "signed by the new issuer"
    );
    assert_eq!(last_audit(&h)["authenticator"], "certificate");

    // Without the record, a restarted issuer knows only the issuer in use.
    std::fs::remove_file(h.dir.join("retired-issuers.json")).unwrap();
    let h = h.restart().await;
    let k3 = KeyPair::generate().unwrap();
    let refused = h
        .certify(ID, "", &k3, Some((&old, &key)))
        .await
        .expect_err("an unrecorded replaced issuer's leaf is no credential");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    h.stop().await;
}

// An issuer pair replaced by hand (the files rewritten, picked up by the CA reload) is
// recorded in retired-issuers.json like one `ca new-issuer` replaced: an issuer restarted
// afterwards still renews the leaves the old pair signed.
#[tokio::test]
async fn leaves_of_an_issuer_replaced_by_hand_renew_after_a_restart() {
    let h = Harness::start(|_| {}).await;
    let token = h.token(ID, Some(1));
    let key = KeyPair::generate().unwrap();
    let old = h.certify(ID, &token, &key, None).await.unwrap();
    assert!(!h.dir.join("retired-issuers.json").exists());

    h.replace_pair_by_hand("hand-made issuer");
    // What the maintenance loop does once the files are stable (or SIGHUP).
    h.server.reload_ca().unwrap();
    let recorded = issuer::renewal::read_retired(&h.dir.join("retired-issuers.json")).unwrap();
    assert_eq!(recorded.len(), 1);
    assert_eq!(
        recorded[0].0.as_ref(),
        old.intermediate_certificates[0].as_slice()
    );
    let text = std::fs::read_to_string(h.dir.join("retired-issuers.json")).unwrap();
    assert!(!text.contains("PRIVATE"), "never a key");

    let h = h.restart().await;
    let k2 = KeyPair::generate().unwrap();
    let renewed = h
        .certify(ID, "", &k2, Some((&old, &key)))
        .await
        .expect("a leaf of the hand-replaced issuer renews after a restart");
    assert_ne!(
        renewed.intermediate_certificates[0], old.intermediate_certificates[0],
        "signed by the new issuer"
    );
    assert_eq!(last_audit(&h)["authenticator"], "certificate");
    h.stop().await;
}
