//! `[auth] external_workloads`: bootstrap tokens honoured only from the address a watched
//! Linkerd ExternalWorkload registers for the identity, against the in-process fake API
//! server (the unmodified kube client); and the example RBAC for it.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use issuer::config::Config;
use issuer::kubernetes::{Names, REVIEW_RULES, Rule, WORKLOAD_OPERATOR_RULES, WORKLOAD_RULES};
use issuer::server::Server;
use linkerd2_proxy_api::identity::CertifyResponse;
use linkerd2_proxy_api::identity::identity_client::IdentityClient;
use proxy_lib::clock::{Clock, FakeClock, SystemClock};
use proxy_lib::identity::Identity;
use proxy_lib::test_util::LogCapture;
use proxy_lib::test_util::fake_kube::{FakeKube, MERGE_PATCH};
use rcgen::KeyPair;
use serde_json::{Value, json};
use tonic::Code;

const BETA: &str = "workload.linkerd.io/v1beta1/externalworkloads";
const ALPHA: &str = "workload.linkerd.io/v1alpha1/externalworkloads";
const NS: &str = "external-services";
const SA_TOKEN: &str = "fake.emojivoto-web.sig";

/// An ExternalWorkload as Linkerd's CRD spells it in `version`.
fn ew(version: &str, ns: &str, name: &str, identity: &str, ip: &str) -> Value {
    let field = if version == "v1alpha1" {
        "meshTls"
    } else {
        "meshTLS"
    };
    json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            field: {"identity": identity, "serverName": ID},
            "workloadIPs": [{"ip": ip}],
            "ports": [{"port": 5432, "name": "postgres"}],
        }
    })
}

fn spiffe() -> String {
    Identity::parse(ID).unwrap().spiffe_id()
}

async fn client_for(fake: &FakeKube) -> kube::Client {
    let kc = kube::config::Kubeconfig::from_yaml(&fake.kubeconfig("linkerd")).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

/// The fake API server, serving `versions` of the CRD and answering TokenReviews: the token
/// [`SA_TOKEN`] is `system:serviceaccount:emojivoto:web`.
async fn fake_api(versions: &[&str]) -> FakeKube {
    let fake = FakeKube::start().await;
    for v in versions {
        fake.register(v, "ExternalWorkload");
    }
    fake.on_create(
        "authentication.k8s.io/v1/tokenreviews",
        "TokenReview",
        Arc::new(|req: &Value| {
            let ok = req["spec"]["token"] == SA_TOKEN;
            let status = if ok {
                json!({"authenticated": true, "audiences": ["identity.l5d.io"],
                       "user": {"username": "system:serviceaccount:emojivoto:web"}})
            } else {
                json!({"authenticated": false})
            };
            Ok(json!({"metadata": {}, "spec": req["spec"].clone(), "status": status}))
        }),
    );
    fake
}

/// `issuer init` in `dir`, and a bootstrap token for [`ID`] usable from any address (the
/// binding is what restricts it).
fn init_with_token(dir: &Path, now: std::time::SystemTime) -> String {
    issuer::init::run_at(&issuer::init::InitOptions::new(dir), now).unwrap();
    issuer::tokens::create(
        &dir.join("tokens"),
        &issuer::tokens::CreateOptions::new(Identity::parse(ID).unwrap()),
        now,
    )
    .unwrap()
    .secret
    .to_string()
}

type Running = (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<issuer::error::Result<()>>,
);

/// Serves `server` on an ephemeral port of 127.0.0.1 (and the admin endpoints on `admin`)
/// until the sender returned is used.
async fn serve(server: Arc<Server>, admin: Option<tokio::net::TcpListener>) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(server.run(listener, admin, async move {
        let _ = stopped.await;
    }));
    (addr, stop, join)
}

struct Issuer {
    addr: SocketAddr,
    admin: SocketAddr,
    token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<issuer::error::Result<()>>,
}

impl Issuer {
    /// An issuer with `[auth] external_workloads = true` and `extra` `[auth]` lines, and a
    /// bootstrap token for [`ID`] usable from any address (the binding is what restricts it).
    async fn start(dir: &Path, extra: &str, fake: &FakeKube) -> Self {
        let token = init_with_token(dir, SystemClock.now());
        let path = dir.join("issuer.toml");
        let text = format!("plaintext = true\n[auth]\nexternal_workloads = true\n{extra}");
        let layers = proxy_lib::config_file::Layers::from_toml(&text, &path).unwrap();
        let mut cfg = Config::from_layers(&layers, &path).unwrap();
        cfg.audit = issuer::audit::AuditTarget::File(dir.join("audit.log"));
        let server = Server::open(
            cfg,
            Arc::new(SystemClock),
            Vec::new(),
            Some(client_for(fake).await),
        )
        .await
        .unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let (addr, stop, join) = serve(server, Some(admin)).await;
        Self {
            addr,
            admin: admin_addr,
            token,
            stop: Some(stop),
            join,
        }
    }

    /// Certify for `identity` with `token`, connecting from `from`.
    async fn certify_from(
        &self,
        from: &str,
        identity: &str,
        token: &str,
    ) -> Result<(), tonic::Status> {
        let mut client = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .local_address(Some(from.parse().unwrap()))
            .connect()
            .await
            .map(IdentityClient::new)
            .unwrap();
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

/// Retries `f` (bounded) until it yields `Some`: the watch delay is asynchronous and there
/// is nothing else to wait on from outside the server.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn denied(r: Result<(), tonic::Status>, needle: &str) -> Option<()> {
    let s = r.err()?;
    (s.code() == Code::PermissionDenied && s.message().contains(needle)).then_some(())
}

// Acceptance: identity with a matching resource and address gets a certificate; no
// resource, another address, or the resource deleted (after the watch delay) is
// PERMISSION_DENIED naming what is missing; v1alpha1 and v1beta1 objects (and the DNS form
// of meshTLS.identity) all bind. Service-account tokens are not bound. No token reaches a
// log or any request but the TokenReview's body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_tokens_are_bound_to_external_workloads() {
    proxy_lib::install_crypto_provider();
    let (logs, _guard) = LogCapture::start(tracing::Level::TRACE);
    let tmp = tempfile::tempdir().unwrap();
    let fake = fake_api(&[BETA, ALPHA]).await;
    let issuer = Issuer::start(tmp.path(), "kubernetes = true\n", &fake).await;
    assert_eq!(http_get(issuer.admin, "/ready").await.0, 200);
    let token = issuer.token.clone();

    // No resource.
    let e = issuer
        .certify_from("127.0.0.2", ID, &token)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("no ExternalWorkload") && e.message().contains(&spiffe()),
        "{e:?}"
    );

    // Registered at 127.0.0.2: a cert from there, refused from 127.0.0.1 naming both.
    fake.put(
        BETA,
        ew("v1beta1", NS, "legacy-database", &spiffe(), "127.0.0.2"),
    );
    eventually("the v1beta1 resource to bind", || async {
        issuer.certify_from("127.0.0.2", ID, &token).await.ok()
    })
    .await;
    let e = issuer
        .certify_from("127.0.0.1", ID, &token)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("127.0.0.1")
            && e.message()
                .contains("external-services/legacy-database [127.0.0.2]"),
        "{e:?}"
    );

    // Deleted: refused again within the watch delay.
    assert!(fake.delete(BETA, NS, "legacy-database"));
    eventually("the deletion to stop issuance", || async {
        denied(
            issuer.certify_from("127.0.0.2", ID, &token).await,
            "no ExternalWorkload",
        )
    })
    .await;

    // v1alpha1 (`meshTls`), with the DNS form of the identity.
    fake.put(
        ALPHA,
        ew("v1alpha1", NS, "legacy-database", ID, "127.0.0.2"),
    );
    eventually("the v1alpha1 resource to bind", || async {
        issuer.certify_from("127.0.0.2", ID, &token).await.ok()
    })
    .await;
    assert!(
        denied(
            issuer.certify_from("127.0.0.1", ID, &token).await,
            "127.0.0.1"
        )
        .is_some()
    );

    // A pod's service-account token needs no ExternalWorkload.
    let web = Identity::new("web", "emojivoto", &Default::default()).unwrap();
    issuer
        .certify_from("127.0.0.1", web.as_str(), SA_TOKEN)
        .await
        .unwrap();

    // Every call is a declared one; the watches are cluster-wide by default.
    let requests = fake.requests();
    for (c, _) in &requests {
        let allowed = WORKLOAD_RULES.iter().chain(REVIEW_RULES).any(|r| {
            c.resource.starts_with(r.group) && r.resource == c.plural() && r.verbs.contains(&c.verb)
        });
        assert!(allowed, "undeclared call {c:?}");
        if c.plural() == "externalworkloads" {
            assert_eq!(c.namespace, None, "{c:?}");
        }
    }
    for version in ["v1beta1", "v1alpha1"] {
        assert!(
            requests
                .iter()
                .any(|(c, _)| c.verb == "watch" && c.resource.contains(version)),
            "no watch of {version}"
        );
    }
    // No token in any log line, nor in any request but the TokenReview's body.
    let text = logs.text();
    assert!(!text.is_empty());
    for t in [token.as_str(), SA_TOKEN] {
        assert!(!text.contains(t), "token logged");
        for (c, body) in &requests {
            let in_request = format!("{c:?}").contains(t) || body.contains(t);
            assert!(
                !in_request || (c.plural() == "tokenreviews" && t == SA_TOKEN),
                "token sent in {c:?}"
            );
        }
    }
    issuer.stop().await;
    fake.stop().await;
}

// With `[auth] namespaces`, only those namespaces are watched (per-namespace watches), and
// an API server that serves only one version of the CRD (404 for the other) is no failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaced_watches_and_one_served_version() {
    proxy_lib::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let fake = fake_api(&[BETA]).await;
    fake.put(
        BETA,
        ew(
            "v1beta1",
            "elsewhere",
            "legacy-database",
            &spiffe(),
            "127.0.0.1",
        ),
    );
    let issuer = Issuer::start(tmp.path(), &format!("namespaces = [\"{NS}\"]\n"), &fake).await;
    assert_eq!(http_get(issuer.admin, "/ready").await.0, 200);
    let token = issuer.token.clone();
    // A resource in a namespace not watched does not bind.
    assert!(
        denied(
            issuer.certify_from("127.0.0.1", ID, &token).await,
            "no ExternalWorkload"
        )
        .is_some()
    );
    fake.put(
        BETA,
        ew("v1beta1", NS, "legacy-database", &spiffe(), "127.0.0.1"),
    );
    eventually("the watched namespace's resource to bind", || async {
        issuer.certify_from("127.0.0.1", ID, &token).await.ok()
    })
    .await;
    let calls = fake.calls();
    assert!(
        calls
            .iter()
            .filter(|c| c.plural() == "externalworkloads")
            .all(|c| c.namespace.as_deref() == Some(NS)),
        "{calls:#?}"
    );
    assert!(
        calls.iter().any(|c| c.resource == ALPHA),
        "v1alpha1 was asked for"
    );
    issuer.stop().await;
    fake.stop().await;
}

fn rbac() -> Vec<Value> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes/rbac.yaml"),
    )
    .unwrap();
    text.split("\n---")
        .filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .map(|d| serde_saphyr::from_str(d).unwrap())
        .collect()
}

/// (group, resource, sorted verbs) of every rule of the `kind` named `name`.
fn granted(docs: &[Value], kind: &str, name: &str) -> Vec<(String, String, Vec<String>)> {
    let role = docs
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"));
    let strs = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    };
    let mut out = Vec::new();
    for r in role["rules"].as_array().unwrap() {
        assert!(r.get("resourceNames").is_none(), "{name}: no resourceNames");
        for g in strs(&r["apiGroups"]) {
            for res in strs(&r["resources"]) {
                let mut verbs = strs(&r["verbs"]);
                verbs.sort();
                out.push((g.clone(), res, verbs));
            }
        }
    }
    out.sort();
    out
}

fn declared(rules: &[Rule]) -> Vec<(String, String, Vec<String>)> {
    let mut out: Vec<_> = rules
        .iter()
        .map(|r| {
            assert_eq!(r.names, Names::All);
            (
                r.group.to_string(),
                r.resource.to_string(),
                r.verbs.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect();
    out.sort();
    out
}

// The server's ClusterRole reads what it watches; the operator's Role (register/remove) is a
// separate one, never bound to the issuer's ServiceAccount.
#[test]
fn example_rbac_for_external_workloads_matches_the_code() {
    let docs = rbac();
    assert_eq!(
        granted(&docs, "ClusterRole", "mesh-issuer-workloads"),
        declared(WORKLOAD_RULES)
    );
    assert_eq!(
        granted(&docs, "Role", "mesh-workload-operator"),
        declared(WORKLOAD_OPERATOR_RULES)
    );
    let server_binding = docs
        .iter()
        .find(|d| {
            d["kind"] == "ClusterRoleBinding" && d["roleRef"]["name"] == "mesh-issuer-workloads"
        })
        .expect("ClusterRoleBinding of mesh-issuer-workloads");
    assert_eq!(server_binding["subjects"][0]["name"], "mesh-issuer");
    for d in &docs {
        let operator_role = matches!(
            d["roleRef"]["name"].as_str(),
            Some("mesh-workload-operator" | "mesh-issuer-tokens")
        );
        if operator_role {
            for s in d["subjects"].as_array().unwrap() {
                assert_ne!(s["kind"], "ServiceAccount", "operator role bound to {s}");
            }
        }
    }
}

/// An issuer over TLS with `[auth] external_workloads = true` on a fake clock, for the last
/// issuance records: flushes happen only when the test moves the clock.
struct Recording {
    dir: tempfile::TempDir,
    clock: FakeClock,
    server: Arc<Server>,
    cfg: Config,
    addr: SocketAddr,
    token: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    join: tokio::task::JoinHandle<issuer::error::Result<()>>,
}

impl Recording {
    async fn start(fake: &FakeKube) -> Self {
        proxy_lib::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let now = SystemClock.now();
        let token = init_with_token(dir.path(), now);
        let clock = FakeClock::new(now);
        let path = dir.path().join("issuer.toml");
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("[auth]\n", "[auth]\nexternal_workloads = true\n");
        std::fs::write(&path, text).unwrap();
        let mut cfg = Config::load(&path, &issuer::config::Overrides::default()).unwrap();
        assert!(cfg.auth_external_workloads.is_some(), "{path:?}");
        cfg.audit = issuer::audit::AuditTarget::File(dir.path().join("audit.log"));
        let server = Server::open(
            cfg.clone(),
            Arc::new(clock.clone()),
            Vec::new(),
            Some(client_for(fake).await),
        )
        .await
        .unwrap();
        let (addr, stop, join) = serve(server.clone(), None).await;
        Self {
            dir,
            clock,
            server,
            cfg,
            addr,
            token,
            stop: Some(stop),
            join,
        }
    }

    /// A certificate for [`ID`] with the bootstrap token, or (with `held`) renewing by the
    /// certificate and key held, without a token.
    async fn certify(
        &self,
        held: Option<(&CertifyResponse, &KeyPair)>,
    ) -> (CertifyResponse, KeyPair) {
        let anchors = std::fs::read(self.dir.path().join("ca.crt")).unwrap();
        let (mut client, token) = match held {
            None => (
                tls_client(self.addr, &anchors, &self.cfg.server_name).await,
                self.token.as_str(),
            ),
            Some((resp, key)) => (
                tls_client_with_cert(
                    self.addr,
                    &anchors,
                    &self.cfg.server_name,
                    std::iter::once(resp.leaf_certificate.clone())
                        .chain(resp.intermediate_certificates.iter().cloned())
                        .collect(),
                    key.serialize_der(),
                )
                .await,
                "",
            ),
        };
        let (key, csr) = p256_csr(ID);
        let resp = certify(&mut client, request(ID, token.as_bytes(), csr))
            .await
            .unwrap();
        (resp, key)
    }

    /// Moves the clock one flush interval on and waits for the recorder's flush to end.
    async fn flush(&self) {
        let recorder = self.server.last_issued().expect("a last-issued recorder");
        let mut flushes = recorder.flushes();
        let before = *flushes.borrow_and_update();
        self.clock
            .advance(issuer::kubernetes::last_issued::DEFAULT_FLUSH);
        tokio::time::timeout(Duration::from_secs(30), flushes.wait_for(|n| *n > before))
            .await
            .expect("a flush within 30s")
            .unwrap();
    }

    fn metric(&self, name: &str) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, self.server.registry()).unwrap();
        text.lines()
            .find(|l| l.starts_with(name))
            .map(|l| l.rsplit(' ').next().unwrap().to_string())
            .unwrap_or_default()
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.join.await.unwrap().unwrap();
    }
}

fn serial_of(resp: &CertifyResponse) -> String {
    proxy_lib::cert::CertInfo::from_der(&resp.leaf_certificate)
        .unwrap()
        .serial
}

fn patches(fake: &FakeKube) -> Vec<(proxy_lib::test_util::fake_kube::Call, String)> {
    fake.requests()
        .into_iter()
        .filter(|(c, _)| c.verb == "patch")
        .collect()
}

/// `issuer workload list --dir D [--json]` against the fake: its stdout.
async fn workload_list(fake: &FakeKube, dir: &Path, json: bool) -> String {
    let kubeconfig = dir.join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig, "default");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_issuer"));
    cmd.args(["workload", "list", "--dir"])
        .arg(dir)
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", dir);
    if json {
        cmd.arg("--json");
    }
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

// Acceptance: a certificate issued to a registered host is recorded on its ExternalWorkload
// after the flush (the two annotations, by a merge patch that touches nothing else);
// `workload list` shows it (`never` for a host without one); a renewal by certificate
// updates it; many issuances within one interval make one PATCH; only merge patches of
// registered objects are sent.
// One thread: the log capture sees the server's tasks.
#[tokio::test]
async fn the_last_issuance_is_recorded_on_the_external_workload() {
    let (logs, _guard) = LogCapture::start(tracing::Level::DEBUG);
    let fake = fake_api(&[BETA, ALPHA]).await;
    let mut db = ew("v1beta1", NS, "legacy-database", &spiffe(), "127.0.0.1");
    db["metadata"]["annotations"] = json!({"team": "dba"});
    let db = fake.put(BETA, db);
    // A v1alpha1 host that never gets a certificate.
    fake.put(
        ALPHA,
        ew(
            "v1alpha1",
            NS,
            "billing",
            "spiffe://cluster.local/ns/external-services/sa/billing",
            "127.0.0.9",
        ),
    );
    let issuer = Recording::start(&fake).await;

    // Issued: nothing is written before the flush, then exactly the two annotations.
    let (first, key) = issuer.certify(None).await;
    let issued_at = proxy_lib::clock::rfc3339(issuer.clock.now());
    assert!(patches(&fake).is_empty(), "patched on the request path");
    issuer.flush().await;
    let have = fake.get(BETA, NS, "legacy-database").unwrap();
    let annotations = &have["metadata"]["annotations"];
    assert_eq!(annotations["meshcerts.io/last-issued"], issued_at.as_str());
    assert_eq!(
        annotations["meshcerts.io/last-issued-serial"],
        serial_of(&first).as_str()
    );
    assert_eq!(annotations["team"], "dba", "another annotation was touched");
    assert_eq!(have["spec"], db["spec"], "the spec was touched");
    assert_ne!(
        have["metadata"]["resourceVersion"], db["metadata"]["resourceVersion"],
        "the patch bumps the resourceVersion"
    );
    let sent = patches(&fake);
    assert_eq!(sent.len(), 1, "{sent:#?}");
    let (call, body) = &sent[0];
    assert_eq!(
        (
            call.resource.as_str(),
            call.namespace.as_deref(),
            call.name.as_deref(),
            call.content_type.as_deref(),
        ),
        (BETA, Some(NS), Some("legacy-database"), Some(MERGE_PATCH))
    );
    let body: Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        body,
        json!({"metadata": {"annotations": {
            "meshcerts.io/last-issued": issued_at,
            "meshcerts.io/last-issued-serial": serial_of(&first),
        }}})
    );
    assert_eq!(issuer.metric("issuer_last_issued_patches_total"), "1");

    // The table and the JSON show it, and `never` for the host without one.
    let dir = issuer.dir.path().to_path_buf();
    let table = workload_list(&fake, &dir, false).await;
    let mut lines = table.lines();
    assert_eq!(
        lines.next().unwrap(),
        "NAMESPACE/NAME  IP  TOKENS  IDENTITY  LAST ISSUED"
    );
    let billing = lines.next().unwrap();
    assert!(
        billing.starts_with("external-services/billing  127.0.0.9  -  ")
            && billing.ends_with("  never"),
        "{table}"
    );
    let db_line = lines.next().unwrap();
    assert!(
        db_line.starts_with("external-services/legacy-database  127.0.0.1  ")
            && db_line.ends_with(&format!("{}  {issued_at}", spiffe())),
        "{table}"
    );
    let listed: Value = serde_json::from_str(&workload_list(&fake, &dir, true).await).unwrap();
    assert_eq!(listed[0]["last_issued"], Value::Null);
    assert_eq!(listed[1]["last_issued"], issued_at.as_str());
    assert_eq!(listed[1]["last_issued_serial"], serial_of(&first).as_str());

    // A renewal by certificate (no token) updates it.
    issuer.clock.advance(Duration::from_secs(2));
    let (renewed, _) = issuer.certify(Some((&first, &key))).await;
    let renewed_at = proxy_lib::clock::rfc3339(issuer.clock.now());
    issuer.flush().await;
    let annotations =
        fake.get(BETA, NS, "legacy-database").unwrap()["metadata"]["annotations"].clone();
    assert_eq!(annotations["meshcerts.io/last-issued"], renewed_at.as_str());
    assert_eq!(
        annotations["meshcerts.io/last-issued-serial"],
        serial_of(&renewed).as_str()
    );
    assert_eq!(patches(&fake).len(), 2);

    // Many issuances within one interval: one PATCH, with the newest.
    let mut last = None;
    for _ in 0..5 {
        last = Some(issuer.certify(None).await.0);
    }
    issuer.flush().await;
    assert_eq!(patches(&fake).len(), 3, "{:#?}", patches(&fake));
    assert_eq!(
        fake.get(BETA, NS, "legacy-database").unwrap()["metadata"]["annotations"]["meshcerts.io/last-issued-serial"],
        serial_of(&last.unwrap()).as_str()
    );
    // A flush with nothing queued sends nothing.
    issuer.flush().await;
    assert_eq!(patches(&fake).len(), 3);
    // What is queued when the server stops is written as it stops.
    let (at_stop, _) = issuer.certify(None).await;

    // Every call is a declared one (the server's, and the CLI's lists); every patch is a
    // merge patch of the registered object that got the certificates; no token anywhere.
    for (c, body) in fake.requests() {
        let allowed = WORKLOAD_RULES.iter().any(|r| {
            c.resource.starts_with(r.group) && r.resource == c.plural() && r.verbs.contains(&c.verb)
        });
        assert!(allowed, "undeclared call {c:?}");
        if c.verb == "patch" {
            assert_eq!(c.content_type.as_deref(), Some(MERGE_PATCH), "{c:?}");
            assert_eq!(c.name.as_deref(), Some("legacy-database"), "{c:?}");
        }
        assert!(!body.contains(&issuer.token), "token sent in {c:?}");
    }

    // The fake applies merge patches only, as an API server does for a custom resource.
    let api: kube::Api<issuer::kubernetes::workloads::v1beta1::ExternalWorkload> =
        kube::Api::namespaced(client_for(&fake).await, NS);
    let e = api
        .patch(
            "legacy-database",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Strategic(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .unwrap_err();
    assert!(matches!(&e, kube::Error::Api(s) if s.code == 415), "{e:?}");
    assert!(!logs.text().contains(&issuer.token), "token logged");
    issuer.stop().await;
    assert_eq!(
        fake.get(BETA, NS, "legacy-database").unwrap()["metadata"]["annotations"]["meshcerts.io/last-issued-serial"],
        serial_of(&at_stop).as_str()
    );
    fake.stop().await;
}

// The API server away: issuance still succeeds, the failed patch is counted and logged at
// warn (without the token), and the record is written once the API server is back.
// One thread: the log capture sees the server's tasks.
#[tokio::test]
async fn an_api_server_away_fails_the_record_not_the_issuance() {
    let (logs, _guard) = LogCapture::start(tracing::Level::DEBUG);
    let fake = fake_api(&[BETA]).await;
    fake.put(
        BETA,
        ew("v1beta1", NS, "legacy-database", &spiffe(), "127.0.0.1"),
    );
    let issuer = Recording::start(&fake).await;
    fake.set_down(true);
    let (leaf, _) = issuer.certify(None).await;
    issuer.flush().await;
    let failed = "issuer_last_issued_patches_total{result=\"failed\"}";
    assert_eq!(issuer.metric(failed), "1");
    let text = logs.text();
    assert!(
        text.contains("WARN") && text.contains("last issuance not recorded"),
        "{text}"
    );
    assert!(!text.contains(&issuer.token), "token logged");
    // Back: the record queued again is written at the next flush.
    fake.set_down(false);
    assert!(
        issuer.server.last_issued().unwrap().queued() == 1,
        "the failed record is queued again"
    );
    issuer.flush().await;
    assert_eq!(
        fake.get(BETA, NS, "legacy-database").unwrap()["metadata"]["annotations"]["meshcerts.io/last-issued-serial"],
        serial_of(&leaf).as_str()
    );
    issuer.stop().await;
    fake.stop().await;
}
