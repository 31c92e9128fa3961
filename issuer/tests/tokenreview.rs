//! The `kubernetes` authenticator against the in-process fake API server: TokenReviews of
//! service-account tokens, chained with bootstrap tokens, cached by the token's hash, rate
//! limited per source, and UNAVAILABLE (never a certificate) when the API server is away.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use issuer::config::Config;
use issuer::kubernetes::review::{DEFAULT_AUDIENCE, REVIEW_BURST_PER_SOURCE};
use issuer::kubernetes::{Names, REVIEW_RULES};
use issuer::server::Server;
use proxy_lib::clock::{Clock, FakeClock, SystemClock};
use proxy_lib::identity::Identity;
use proxy_lib::test_util::LogCapture;
use proxy_lib::test_util::fake_kube::FakeKube;
use serde_json::{Value, json};
use tonic::Code;

const REVIEWS: &str = "authentication.k8s.io/v1/tokenreviews";

/// A JWT-shaped token the fake API server authenticates as `system:serviceaccount:<ns>:<sa>`
/// for `audience` (`nonce` makes tokens distinct). Namespaces and names never hold `_`; the
/// audience's dots are written as `-` (a JWT part holds none).
fn sa_token(ns: &str, sa: &str, audience: &str, nonce: u32) -> String {
    format!("fake.{ns}_{sa}_{}.n{nonce}", audience.replace('.', "-"))
}

/// The fake API server's TokenReview: `fake.<ns>_<sa>_<aud>.*` authenticates when `<aud>`
/// is among the audiences asked for; anything else does not.
fn review_hook(req: &Value) -> Result<Value, (u16, String, String)> {
    let token = req["spec"]["token"].as_str().unwrap_or_default();
    let asked: Vec<&str> = req["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let parts: Vec<&str> = token.split('.').collect();
    let claims: Vec<&str> = parts
        .get(1)
        .map(|p| p.split('_').collect())
        .unwrap_or_default();
    let status = match (parts.first(), claims.as_slice()) {
        (Some(&"fake"), [ns, sa, aud]) if asked.contains(&aud.replace('-', ".").as_str()) => {
            json!({
                "authenticated": true,
                "user": {"username": format!("system:serviceaccount:{ns}:{sa}")},
                "audiences": [aud.replace('-', ".")],
            })
        }
        _ => json!({"authenticated": false, "error": "[invalid bearer token]"}),
    };
    Ok(json!({"metadata": {}, "spec": req["spec"].clone(), "status": status}))
}

async fn fake_api() -> FakeKube {
    let fake = FakeKube::start().await;
    fake.on_create(REVIEWS, "TokenReview", Arc::new(review_hook));
    fake
}

async fn client_for(fake: &FakeKube) -> kube::Client {
    let kc = kube::config::Kubeconfig::from_yaml(&fake.kubeconfig("linkerd")).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

fn reviews(fake: &FakeKube) -> usize {
    fake.calls()
        .iter()
        .filter(|c| c.plural() == "tokenreviews")
        .count()
}

/// A running issuer (CA files from `issuer init`, plaintext on loopback) with `[auth]`
/// `extra` lines, reviewing through `fake`.
struct Issuer {
    addr: SocketAddr,
    /// A bootstrap token for [`ID`], created before the server started.
    bootstrap: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<issuer::error::Result<()>>,
}

impl Issuer {
    async fn start(dir: &Path, auth: &str, fake: &FakeKube, clock: Arc<dyn Clock>) -> Self {
        issuer::init::run_at(&issuer::init::InitOptions::new(dir), clock.now()).unwrap();
        let bootstrap = issuer::tokens::create(
            &dir.join("tokens"),
            &issuer::tokens::CreateOptions::new(Identity::parse(ID).unwrap()),
            clock.now(),
        )
        .unwrap()
        .secret
        .to_string();
        let path = dir.join("issuer.toml");
        let text = format!("plaintext = true\n[auth]\nkubernetes = true\n{auth}");
        let layers = proxy_lib::config_file::Layers::from_toml(&text, &path).unwrap();
        let mut cfg = Config::from_layers(&layers, &path).unwrap();
        cfg.audit = issuer::audit::AuditTarget::File(dir.join("audit.log"));
        let server = Server::open(cfg, clock, Vec::new(), Some(client_for(fake).await))
            .await
            .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, admin_addr) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let join = tokio::spawn(server.run(listener, Some(admin), async move {
            let _ = stopped.await;
        }));
        assert_eq!(http_get(admin_addr, "/ready").await.0, 200);
        Self {
            addr,
            bootstrap,
            stop: Some(stop),
            join,
        }
    }

    async fn certify(&self, identity: &str, token: &str) -> Result<(), tonic::Status> {
        let mut client = plain_client(self.addr).await;
        let (_, csr) = p256_csr(identity);
        certify(&mut client, request(identity, token.as_bytes(), csr))
            .await
            .map(|_| ())
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.join.await.unwrap().unwrap();
    }
}

fn code(r: Result<(), tonic::Status>) -> Code {
    r.err().map_or(Code::Ok, |s| s.code())
}

// Acceptance: a valid service-account token gets a certificate for its mapped identity, a
// review that does not authenticate is UNAUTHENTICATED, a service account mapping to another
// identity PERMISSION_DENIED, a token for another audience is refused, the API server away
// is UNAVAILABLE, a repeated token within the cache time makes one review; bootstrap tokens
// work beside it and never reach the API server; no token is logged or sent anywhere but
// in the TokenReview body.
#[tokio::test]
async fn service_account_tokens_are_reviewed() {
    proxy_lib::install_crypto_provider();
    let (logs, _guard) = LogCapture::start(tracing::Level::TRACE);
    let tmp = tempfile::tempdir().unwrap();
    let fake = fake_api().await;
    let clock = FakeClock::new(SystemClock.now());
    let issuer = Issuer::start(tmp.path(), "", &fake, Arc::new(clock.clone())).await;
    // ID is legacy-database.external-services.serviceaccount.identity.linkerd.cluster.local.
    let mine = sa_token("external-services", "legacy-database", DEFAULT_AUDIENCE, 1);
    let mut sent = vec![mine.clone()];

    assert_eq!(code(issuer.certify(ID, &mine).await), Code::Ok);
    assert_eq!(reviews(&fake), 1);
    // Within the cache time: no second review.
    assert_eq!(code(issuer.certify(ID, &mine).await), Code::Ok);
    assert_eq!(reviews(&fake), 1, "a cached outcome is reused");
    // After it: reviewed again.
    clock.advance(Duration::from_secs(11));
    assert_eq!(code(issuer.certify(ID, &mine).await), Code::Ok);
    assert_eq!(reviews(&fake), 2);

    // Not authenticated (and the refusal is cached too).
    let unknown = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl".to_string();
    let e = issuer.certify(ID, &unknown).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("invalid bearer token"), "{e:?}");
    assert_eq!(
        code(issuer.certify(ID, &unknown).await),
        Code::Unauthenticated
    );
    assert_eq!(reviews(&fake), 3);
    sent.push(unknown);

    // Authenticated as a service account whose identity is not the one asked for.
    let other = sa_token("emojivoto", "web", DEFAULT_AUDIENCE, 2);
    let e = issuer.certify(ID, &other).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("system:serviceaccount:emojivoto:web"),
        "{e:?}"
    );
    // ... which is fine for its own identity.
    let web = Identity::new("web", "emojivoto", &Default::default()).unwrap();
    assert_eq!(code(issuer.certify(web.as_str(), &other).await), Code::Ok);
    sent.push(other);

    // A token for another audience is refused.
    let wrong_aud = sa_token("external-services", "legacy-database", "vault", 3);
    assert_eq!(
        code(issuer.certify(ID, &wrong_aud).await),
        Code::Unauthenticated
    );
    sent.push(wrong_aud);

    // Bootstrap tokens chain with reviews and never reach the API server, nor does a token
    // that is not shaped like a JWT.
    let before = reviews(&fake);
    let bootstrap = issuer.bootstrap.clone();
    assert!(bootstrap.starts_with(issuer::tokens::TOKEN_PREFIX));
    assert_eq!(code(issuer.certify(ID, &bootstrap).await), Code::Ok);
    let garbage = "l5dh_0000000000000000".to_string();
    assert_eq!(
        code(issuer.certify(ID, &garbage).await),
        Code::Unauthenticated
    );
    assert_eq!(reviews(&fake), before, "no review of non-JWT tokens");
    sent.push(bootstrap);
    sent.push(garbage);

    // The API server away: UNAVAILABLE, never a certificate; back: reviews again.
    fake.set_down(true);
    let fresh = sa_token("external-services", "legacy-database", DEFAULT_AUDIENCE, 4);
    let e = issuer.certify(ID, &fresh).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    fake.set_down(false);
    assert_eq!(code(issuer.certify(ID, &fresh).await), Code::Ok);
    sent.push(fresh);

    // No token in the logs, the audit log, or any request but the review's body (the fake
    // records paths and queries).
    let audit = std::fs::read_to_string(tmp.path().join("audit.log")).unwrap();
    assert!(audit.contains("serviceaccount:external-services:legacy-database"));
    let text = logs.text();
    assert!(!text.is_empty(), "logs were captured");
    let calls = format!("{:?}", fake.calls());
    for t in &sent {
        assert!(!text.contains(t.as_str()), "token logged: {t}");
        assert!(!audit.contains(t.as_str()), "token in the audit log: {t}");
        assert!(!calls.contains(t.as_str()), "token in a request line: {t}");
    }
    // Every call is one the RBAC rules declare.
    for c in fake.calls() {
        assert!(
            REVIEW_RULES.iter().any(|r| c.resource.starts_with(r.group)
                && r.resource == c.plural()
                && r.verbs.contains(&c.verb)
                && r.names == Names::All),
            "undeclared call {c:?}"
        );
    }
    issuer.stop().await;
    fake.stop().await;
}

// A stranger's random JWT-shaped tokens from one source cost at most a burst of reviews;
// valid tokens from one source are rate limited before reviewing too, while another
// source is not affected.
#[tokio::test]
async fn reviews_are_rate_limited_per_source() {
    proxy_lib::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let fake = fake_api().await;
    let issuer = Issuer::start(
        tmp.path(),
        "review_cache = \"0s\"\n",
        &fake,
        Arc::new(SystemClock),
    )
    .await;
    let burst = REVIEW_BURST_PER_SOURCE as usize;
    let mut refused = Vec::new();
    for n in 0..burst as u32 + 5 {
        let t = sa_token("external-services", "legacy-database", DEFAULT_AUDIENCE, n);
        refused.push(issuer.certify(ID, &t).await.err());
    }
    assert!(refused[..burst].iter().all(Option::is_none), "{refused:?}");
    for r in &refused[burst..] {
        let s = r.as_ref().expect("refused after the burst");
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        assert!(s.message().contains("token reviews"), "{s:?}");
    }
    assert_eq!(reviews(&fake), burst, "no review beyond the burst");

    // Random tokens from a fresh source: failures throttle it before any review is made,
    // and the reviews it causes stay within a burst.
    let before = reviews(&fake);
    let mut client = tonic::transport::Endpoint::from_shared(format!("http://{}", issuer.addr))
        .unwrap()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .connect()
        .await
        .map(linkerd2_proxy_api::identity::identity_client::IdentityClient::new)
        .unwrap();
    for n in 0..burst + 10 {
        let (_, csr) = p256_csr(ID);
        let t = format!("eyJhbGciOiJSUzI1NiJ9.cmFuZG9t{n}.c2ln");
        let e = certify(&mut client, request(ID, t.as_bytes(), csr))
            .await
            .unwrap_err();
        assert!(
            matches!(e.code(), Code::Unauthenticated | Code::ResourceExhausted),
            "{e:?}"
        );
    }
    assert!(reviews(&fake) - before <= burst);
    issuer.stop().await;
    fake.stop().await;
}

// The example manifests grant the review rule in a ClusterRole bound to the issuer.
#[test]
fn example_rbac_grants_token_reviews() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes/rbac.yaml"),
    )
    .unwrap();
    let docs: Vec<Value> = text
        .split("\n---")
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| serde_saphyr::from_str(d).unwrap())
        .collect();
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "mesh-issuer-review")
        .expect("ClusterRole mesh-issuer-review");
    let mut granted: Vec<(String, String, Vec<String>)> = Vec::new();
    for r in role["rules"].as_array().unwrap() {
        for g in r["apiGroups"].as_array().unwrap() {
            for res in r["resources"].as_array().unwrap() {
                let mut verbs: Vec<String> = r["verbs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect();
                verbs.sort();
                granted.push((
                    g.as_str().unwrap().to_string(),
                    res.as_str().unwrap().to_string(),
                    verbs,
                ));
            }
        }
    }
    let declared: Vec<(String, String, Vec<String>)> = REVIEW_RULES
        .iter()
        .map(|r| {
            (
                r.group.to_string(),
                r.resource.to_string(),
                r.verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect();
    assert_eq!(granted, declared);
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding" && d["roleRef"]["name"] == "mesh-issuer-review")
        .expect("ClusterRoleBinding of mesh-issuer-review");
    assert_eq!(binding["subjects"][0]["kind"], "ServiceAccount");
    assert_eq!(binding["subjects"][0]["name"], "mesh-issuer");
}
