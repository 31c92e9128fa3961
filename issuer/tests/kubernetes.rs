//! The Kubernetes CA source and token store, run with the unmodified kube client against the
//! in-process fake API server (real Kubernetes JSON on 127.0.0.1, watches included), and the
//! manifests' RBAC held to what the code calls.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use issuer::config::Config;
use issuer::kubernetes::{ISSUER_RULES, Names, OPERATOR_RULES, Rule};
use issuer::server::Server;
use proxy_lib::clock::{Clock, SystemClock};
use proxy_lib::identity::Identity;
use proxy_lib::test_util::fake_kube::{Call, FakeKube};
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};
use tonic::Code;

const NS: &str = "linkerd";
const SECRET: &str = "linkerd-identity-issuer";
const ROOTS: &str = "linkerd-identity-trust-roots";
const RETIRED: &str = issuer::kubernetes::DEFAULT_RETIRED_ISSUERS;

/// An issuer Secret with `data` (k8s-openapi encodes it as Kubernetes JSON does: base64).
fn secret(data: &[(&str, &str)]) -> Value {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    let s = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(SECRET.into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    };
    serde_json::to_value(s).unwrap()
}

fn roots(bundle: &str) -> Value {
    json!({"metadata": {"name": ROOTS, "namespace": NS}, "data": {"ca-bundle.crt": bundle}})
}

/// A CA made by `issuer init` in `dir`: (anchor PEM, anchor key PEM, issuer PEM, key PEM).
fn init_ca(dir: &Path) -> [String; 4] {
    issuer::init::run_at(&issuer::init::InitOptions::new(dir), SystemClock.now()).unwrap();
    ["ca.crt", "anchor.key", "issuer.crt", "issuer.key"]
        .map(|f| std::fs::read_to_string(dir.join(f)).unwrap())
}

fn der(pem: &str) -> Vec<u8> {
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

async fn client_for(fake: &FakeKube) -> kube::Client {
    let kc = kube::config::Kubeconfig::from_yaml(&fake.kubeconfig(NS)).unwrap();
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    kube::Client::try_from(cfg).unwrap()
}

fn config(dir: &Path, text: &str) -> Config {
    let path = dir.join("issuer.toml");
    let layers = proxy_lib::config_file::Layers::from_toml(text, &path).unwrap();
    let mut cfg = Config::from_layers(&layers, &path).unwrap();
    cfg.audit = issuer::audit::AuditTarget::File(dir.join("audit.log"));
    cfg
}

/// Retries `f` (bounded, a short pause between tries) until it yields `Some`: the watch
/// delay is asynchronous, there is nothing else to wait on from outside the server.
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

/// The issuer certificate (DER) that signed a leaf for `token`, or the refusal.
async fn issued_by(addr: SocketAddr, token: &str) -> Result<Vec<u8>, tonic::Status> {
    let mut client = plain_client(addr).await;
    let (_, csr) = p256_csr(ID);
    let r = certify(&mut client, request(ID, token.as_bytes(), csr)).await?;
    Ok(r.intermediate_certificates[0].clone())
}

fn assert_calls_within(calls: &[Call], rules: &[Rule]) {
    for c in calls {
        let allowed = rules.iter().any(|r| {
            r.resource == c.plural()
                && r.verbs.contains(&c.verb)
                && match r.names {
                    Names::All => true,
                    Names::IssuerSecret | Names::TrustRoots | Names::RetiredIssuers => {
                        let want = match r.names {
                            Names::IssuerSecret => SECRET,
                            Names::TrustRoots => ROOTS,
                            _ => RETIRED,
                        };
                        c.name.as_deref() == Some(want)
                            || c.query.get("fieldSelector").map(String::as_str)
                                == Some(&format!("metadata.name={want}"))
                    }
                }
        });
        assert!(allowed, "call outside the declared RBAC rules: {c:?}");
    }
}

// Acceptance: the CA from a Secret and a ConfigMap, watched: a new valid pair switches new
// leaves to it without restart, an invalid pair is refused and the old one kept, a new trust
// bundle is picked up, and the API server going away and coming back (410 Gone on resume)
// is survived. Tokens come from token Secrets, watched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_ca_and_tokens_follow_the_api_server() {
    proxy_lib::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let [anchor_a, anchor_key_a, issuer_a, key_a] = init_ca(&tmp.path().join("a"));
    let [anchor_b, _, issuer_b, key_b] = init_ca(&tmp.path().join("b"));
    let now = SystemClock.now();
    let (issuer_a2, key_a2) = issuer_pair(
        &anchor_a,
        &anchor_key_a,
        "second issuer",
        now - Duration::from_secs(60),
        now + Duration::from_secs(30 * 86_400),
        true,
    );

    let fake = FakeKube::start().await;
    fake.put("v1/configmaps", roots(&format!("{anchor_a}{anchor_b}")));
    // Linkerd's own layout first.
    fake.put(
        "v1/secrets",
        secret(&[("crt.pem", &issuer_a), ("key.pem", &key_a)]),
    );
    let client = client_for(&fake).await;

    let cfg = config(
        tmp.path(),
        "plaintext = true\n[ca]\nsource = \"kubernetes\"\n[auth]\nstore = \"kubernetes\"\n",
    );
    let server = Server::open(cfg, Arc::new(SystemClock), Vec::new(), Some(client.clone()))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, admin_addr) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(server.clone().run(listener, Some(admin), async move {
        let _ = stopped.await;
    }));
    assert_eq!(http_get(admin_addr, "/ready").await.0, 200);

    // A token created through the Kubernetes store is accepted once the watch delivers it.
    let tokens = issuer::kubernetes::tokens::KubeTokens::new(client.clone(), NS);
    let t = tokens
        .create(
            &issuer::tokens::CreateOptions::new(Identity::parse(ID).unwrap()),
            SystemClock.now(),
        )
        .await
        .unwrap();
    let token = t.secret.to_string();
    let stored = fake
        .get("v1/secrets", NS, &format!("issuer-token-{}", t.record.id))
        .unwrap();
    assert!(
        !stored.to_string().contains(&token),
        "the token itself was stored"
    );
    let first = eventually("the token to be accepted", || async {
        issued_by(addr, &token).await.ok()
    })
    .await;
    assert_eq!(first, der(&issuer_a));

    // A new valid pair, in cert-manager's layout: new leaves switch to it.
    fake.put(
        "v1/secrets",
        secret(&[
            ("tls.crt", &issuer_b),
            ("tls.key", &key_b),
            ("ca.crt", &anchor_b),
        ]),
    );
    eventually("leaves from the new pair", || async {
        (issued_by(addr, &token).await.ok()? == der(&issuer_b)).then_some(())
    })
    .await;

    // An invalid pair (key from another pair): refused, counted, the old one kept.
    fake.put(
        "v1/secrets",
        secret(&[("tls.crt", &issuer_b), ("tls.key", &key_a)]),
    );
    eventually("the refusal to be counted", || async {
        let text = http_get(admin_addr, "/metrics").await.1;
        (metric(&text, "issuer_ca_reloads_total{result=\"refused\"}")? >= 1.0).then_some(())
    })
    .await;
    assert_eq!(issued_by(addr, &token).await.unwrap(), der(&issuer_b));
    assert_eq!(http_get(admin_addr, "/ready").await.0, 200);

    // A new trust bundle (anchor A alone) with a pair under it: picked up.
    fake.put("v1/configmaps", roots(&anchor_a));
    fake.put(
        "v1/secrets",
        secret(&[("crt.pem", &issuer_a2), ("key.pem", &key_a2)]),
    );
    eventually("the new bundle and pair", || async {
        let ca = server.shared().ca.load_full();
        (ca.anchors().certs().len() == 1 && ca.cert().as_ref() == der(&issuer_a2).as_slice())
            .then_some(())
    })
    .await;
    assert_eq!(issued_by(addr, &token).await.unwrap(), der(&issuer_a2));

    // The API server goes away; meanwhile the pair changes and history is compacted, so the
    // resumed watches get 410 Gone and must relist.
    let lists_before = fake.calls().iter().filter(|c| c.verb == "list").count();
    fake.set_down(true);
    fake.put("v1/configmaps", roots(&format!("{anchor_a}{anchor_b}")));
    fake.put(
        "v1/secrets",
        secret(&[("crt.pem", &issuer_a), ("key.pem", &key_a)]),
    );
    fake.compact();
    fake.set_down(false);
    eventually(
        "leaves from the pair set while the API server was away",
        || async { (issued_by(addr, &token).await.ok()? == der(&issuer_a)).then_some(()) },
    )
    .await;
    let calls = fake.calls();
    assert!(
        calls.iter().filter(|c| c.verb == "list").count() > lists_before,
        "no relist after 410 Gone: {:#?}",
        &calls[calls.len().saturating_sub(12)..]
    );

    // Revoking through the store is honoured.
    tokens
        .revoke(&t.record.id, SystemClock.now())
        .await
        .unwrap();
    let st = eventually("the revoke to be honoured", || async {
        issued_by(addr, &token).await.err()
    })
    .await;
    assert_eq!(st.code(), Code::Unauthenticated);
    assert!(st.message().contains("revoked"), "{st:?}");

    // Everything the server and the store asked is within the declared RBAC rules, and the
    // CA objects were only ever asked for by name (the server's only other calls: the
    // retired-issuers ConfigMap, absent here).
    let (ours, operator): (Vec<_>, Vec<_>) = fake
        .calls()
        .into_iter()
        .partition(|c| matches!(c.verb, "list" | "watch") || c.plural() == "configmaps");
    assert_calls_within(&ours, ISSUER_RULES);
    assert_calls_within(&operator, OPERATOR_RULES);
    for c in &ours {
        if c.plural() == "configmaps" && c.name.is_none() {
            assert_eq!(c.query["fieldSelector"], format!("metadata.name={ROOTS}"));
        }
        if c.plural() == "secrets" && !c.query.contains_key("fieldSelector") {
            assert_eq!(
                c.query["labelSelector"],
                issuer::kubernetes::tokens::selector()
            );
        }
        assert_eq!(c.namespace.as_deref(), Some(NS));
    }
    assert!(ours.iter().any(|c| c.verb == "watch"));

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(10), join)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
    fake.stop().await;
}

// A Secret that is missing at start is a clear error naming it, not a hang or a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_issuer_secret_is_named_at_start() {
    proxy_lib::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let [anchor, ..] = init_ca(&tmp.path().join("a"));
    let fake = FakeKube::start().await;
    fake.put("v1/configmaps", roots(&anchor));
    let client = client_for(&fake).await;
    let cfg = config(tmp.path(), "[ca]\nsource = \"kubernetes\"\n");
    let e = Server::open(cfg, Arc::new(SystemClock), Vec::new(), Some(client))
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("Secret linkerd/linkerd-identity-issuer"),
        "{e}"
    );
    fake.stop().await;
}

/// A running `issuer serve` child, killed on drop.
struct Replica {
    child: Child,
    addr: SocketAddr,
    err: PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn issuer_cmd(kubeconfig: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_issuer"));
    c.env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", kubeconfig.parent().unwrap());
    c
}

// Acceptance: two issuer processes against the same API server share the token Secrets: a
// token created with `issuer token create --kubernetes` is accepted by both within the watch
// delay; a revoke is honoured by both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_token_secrets() {
    proxy_lib::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("iss");
    init_ca(&dir);
    let cfg_path = dir.join("issuer.toml");
    let text = std::fs::read_to_string(&cfg_path).unwrap().replace(
        "[auth]\n",
        "[auth]\nstore = \"kubernetes\"\nnamespace = \"mesh-tokens\"\n",
    );
    std::fs::write(&cfg_path, text).unwrap();
    let fake = FakeKube::start().await;
    let kubeconfig = tmp.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig, "default");

    let mut replicas = Vec::new();
    for i in 0..2 {
        let (port, admin) = (free_port(), free_port());
        let err = tmp.path().join(format!("issuer{i}.err"));
        let child = issuer_cmd(&kubeconfig)
            .args(["serve", "--plaintext", "--config"])
            .arg(&cfg_path)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        let r = Replica {
            child,
            addr: ([127, 0, 0, 1], port).into(),
            err,
        };
        let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
        replicas.push(r);
        let r = replicas.last_mut().unwrap();
        eventually("a replica to be ready", || {
            let exited = r.child.try_wait().unwrap();
            let log = r.err.clone();
            async move {
                if let Some(status) = exited {
                    panic!(
                        "issuer exited ({status}): {}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                }
                let up = tokio::net::TcpStream::connect(admin).await.is_ok();
                (up && http_get(admin, "/ready").await.0 == 200).then_some(())
            }
        })
        .await;
    }

    let run = |args: &[&str]| {
        let out = issuer_cmd(&kubeconfig).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let cfg = cfg_path.to_str().unwrap();
    // The namespace comes from the config's [auth] here; --namespace says it explicitly.
    let token = run(&["token", "create", "--config", cfg, "--identity", ID]);
    let token = token.trim().to_string();
    for r in &replicas {
        eventually("the new token on every replica", || async {
            issued_by(r.addr, &token).await.ok()
        })
        .await;
    }
    let listed: Value = serde_json::from_str(&run(&[
        "token",
        "list",
        "--kubernetes",
        "--namespace",
        "mesh-tokens",
        "--json",
    ]))
    .unwrap();
    let id = listed[0]["id"].as_str().unwrap().to_string();
    assert_eq!(listed[0]["status"], "active");
    assert_eq!(fake.list("v1/secrets", "mesh-tokens").len(), 1);

    run(&[
        "token",
        "revoke",
        "--kubernetes",
        "--namespace",
        "mesh-tokens",
        &id,
    ]);
    for r in &replicas {
        let st = eventually("the revoke on every replica", || async {
            issued_by(r.addr, &token).await.err()
        })
        .await;
        assert!(
            st.message().contains("revoked"),
            "{st:?}; log: {}",
            std::fs::read_to_string(&r.err).unwrap_or_default()
        );
    }
    assert!(
        run(&[
            "token",
            "list",
            "--kubernetes",
            "--namespace",
            "mesh-tokens"
        ])
        .contains("revoked")
    );
    // An unknown id is a clear error.
    let out = issuer_cmd(&kubeconfig)
        .args([
            "token",
            "revoke",
            "--kubernetes",
            "--namespace",
            "mesh-tokens",
            "nope",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no token with id \"nope\""));
    drop(replicas);
    fake.stop().await;
}

fn manifests() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/kubernetes");
    let mut docs = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in text.split("\n---") {
            if doc
                .lines()
                .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
            {
                continue;
            }
            let v: Value =
                serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            docs.push(v);
        }
    }
    docs
}

/// The (resource, sorted verbs, resourceNames) of a Role's rules.
fn role_rules(docs: &[Value], name: &str) -> Vec<(String, Vec<String>, Vec<String>)> {
    let role = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no Role {name}"));
    let strs = |v: &Value| -> Vec<String> {
        let mut s: Vec<String> = v
            .as_array()
            .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
            .unwrap_or_default();
        s.sort();
        s
    };
    let mut out = Vec::new();
    for r in role["rules"].as_array().unwrap() {
        assert_eq!(
            strs(&r["apiGroups"]),
            vec![String::new()],
            "{name}: core group only"
        );
        for res in strs(&r["resources"]) {
            out.push((res, strs(&r["verbs"]), strs(&r["resourceNames"])));
        }
    }
    out.sort();
    out
}

fn declared(rules: &[Rule]) -> Vec<(String, Vec<String>, Vec<String>)> {
    let mut out: Vec<_> = rules
        .iter()
        .map(|r| {
            let names = match r.names {
                Names::IssuerSecret => vec![SECRET.to_string()],
                Names::TrustRoots => vec![ROOTS.to_string()],
                Names::RetiredIssuers => vec![RETIRED.to_string()],
                Names::All => Vec::new(),
            };
            (
                r.resource.to_string(),
                r.verbs.iter().map(|v| v.to_string()).collect(),
                names,
            )
        })
        .collect();
    out.sort();
    out
}

// The example RBAC grants exactly the calls the code declares (and the tests above check the
// code makes no other).
#[test]
fn example_rbac_matches_what_the_code_calls() {
    let docs = manifests();
    assert_eq!(role_rules(&docs, "mesh-issuer"), declared(ISSUER_RULES));
    assert_eq!(
        role_rules(&docs, "mesh-issuer-tokens"),
        declared(OPERATOR_RULES)
    );
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    for k in [
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Deployment",
        "PodDisruptionBudget",
        "Service",
        "ConfigMap",
    ] {
        assert!(kinds.contains(&k), "no {k} in examples/kubernetes");
    }
    // The config the Deployment mounts parses, and uses the Kubernetes sources.
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"]["issuer.toml"].is_string())
        .expect("issuer.toml ConfigMap");
    let path = Path::new("/etc/issuer/issuer.toml");
    let layers = proxy_lib::config_file::Layers::from_toml(
        cm["data"]["issuer.toml"].as_str().unwrap(),
        path,
    )
    .unwrap();
    let cfg = Config::from_layers(&layers, path).unwrap();
    assert!(cfg.ca_kubernetes.is_some() && cfg.tokens_kubernetes.is_some());
}

// The fake API server is general: review resources answered by a hook (as a later
// TokenReview authenticator needs), calls awaited rather than slept on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_api_server_answers_reviews_and_records_calls() {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let fake = FakeKube::start().await;
    fake.on_create(
        "authentication.k8s.io/v1/tokenreviews",
        "TokenReview",
        Arc::new(|req: &Value| {
            let ok = req["spec"]["token"] == "good";
            Ok(json!({"metadata": {}, "spec": req["spec"].clone(),
                      "status": {"authenticated": ok}}))
        }),
    );
    let client = client_for(&fake).await;
    let api: kube::Api<TokenReview> = kube::Api::all(client.clone());
    let review = |token: &str| TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let pp = kube::api::PostParams::default();
    let good = api.create(&pp, &review("good")).await.unwrap();
    assert_eq!(good.status.unwrap().authenticated, Some(true));
    let bad = api.create(&pp, &review("bad")).await.unwrap();
    assert_eq!(bad.status.unwrap().authenticated, Some(false));
    assert!(
        fake.list("authentication.k8s.io/v1/tokenreviews", "")
            .is_empty(),
        "reviews are not stored"
    );

    // An unknown resource is a 404 Status the client reports as such.
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(client.clone(), NS);
    match leases.get("x").await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 404),
        other => panic!("{other:?}"),
    }

    // A watcher's watch request is awaited on the recorder, not slept on.
    let src = issuer::kubernetes::ca::KubeCaSource::start(
        client,
        issuer::kubernetes::ca::KubeCaNames::default(),
    );
    assert!(
        fake.wait_for_call(Duration::from_secs(10), |c| c.verb == "watch"
            && c.plural() == "configmaps")
            .await
    );
    drop(src);
    fake.stop().await;
}

// Tokens with a use count in the Kubernetes store: the server records the use in the
// token's Secret (resourceVersion-conditional), so a second key is refused and two keys
// racing for the last use cannot both win; an identity revocation is a Secret beside them
// that the server's watch picks up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_uses_and_identity_revocations_live_in_secrets() {
    proxy_lib::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    init_ca(&dir);
    let fake = FakeKube::start().await;
    let client = client_for(&fake).await;
    let cfg = config(&dir, "plaintext = true\n[auth]\nstore = \"kubernetes\"\n");
    let server = Server::open(cfg, Arc::new(SystemClock), Vec::new(), Some(client.clone()))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(server.clone().run(listener, None, async move {
        let _ = stopped.await;
    }));

    let tokens = issuer::kubernetes::tokens::KubeTokens::new(client.clone(), NS);
    let opts = issuer::tokens::CreateOptions {
        uses: Some(1),
        ..issuer::tokens::CreateOptions::new(Identity::parse(ID).unwrap())
    };
    let t = tokens.create(&opts, SystemClock.now()).await.unwrap();
    let token = t.secret.to_string();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr_of = |k: &rcgen::KeyPair| {
        let mut p = rcgen::CertificateParams::new(vec![ID.to_string()]).unwrap();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.serialize_request(k).unwrap().der().to_vec()
    };
    let mut grpc = plain_client(addr).await;
    eventually("the token to be accepted", || {
        let mut c = grpc.clone();
        let req = request(ID, token.as_bytes(), csr_of(&key));
        async move { certify(&mut c, req).await.ok() }
    })
    .await;
    // the same key again: fine; another key: refused
    certify(&mut grpc, request(ID, token.as_bytes(), csr_of(&key)))
        .await
        .expect("the bound key stays valid");
    let st = certify(
        &mut grpc,
        request(
            ID,
            token.as_bytes(),
            csr_of(&rcgen::KeyPair::generate().unwrap()),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated, "{st:?}");
    let listed = tokens.list().await.unwrap();
    assert_eq!(listed[0].uses_left(), Some(0));
    assert_eq!(listed[0].bound_keys.len(), 1);

    // two keys racing through two writers for one use
    let t2 = tokens.create(&opts, SystemClock.now()).await.unwrap();
    let other = issuer::kubernetes::tokens::KubeTokens::new(client.clone(), NS);
    let (a, b) = tokio::join!(
        tokens.reserve(&t2.record.id, "key-a"),
        other.reserve(&t2.record.id, "key-b")
    );
    assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
    tokens.release(&t2.record.id, "key-a").await.unwrap();
    other.release(&t2.record.id, "key-b").await.unwrap();
    assert_eq!(
        tokens.reserve(&t2.record.id, "key-c").await,
        Ok(issuer::tokens::Binding::Fresh)
    );

    // the same key through two writers (a retry overlapping the first attempt): the first
    // failing does not unbind the key the second holds, and the second's success keeps it
    let t3 = tokens.create(&opts, SystemClock.now()).await.unwrap();
    assert_eq!(
        tokens.reserve(&t3.record.id, "k").await,
        Ok(issuer::tokens::Binding::Fresh)
    );
    assert_eq!(
        other.reserve(&t3.record.id, "k").await,
        Ok(issuer::tokens::Binding::Joined)
    );
    tokens.release(&t3.record.id, "k").await.unwrap();
    assert!(matches!(
        tokens.reserve(&t3.record.id, "x").await,
        Err(issuer::error::AuthError::KeyNotBound { .. })
    ));
    other.settle(&t3.record.id, "k", true).await.unwrap();
    let rec = tokens
        .list()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.id == t3.record.id)
        .unwrap();
    assert_eq!(rec.bound_keys, ["k"]);
    assert!(rec.in_flight.is_empty(), "{rec:?}");

    // an identity revocation (dated after the token's creation) stops the token
    let later = SystemClock.now() + Duration::from_secs(5);
    let backend = issuer::tokens::Backend::Kubernetes(Box::new(tokens.clone()));
    let r = issuer::tokens::revoke_identity(
        &backend,
        &Identity::parse(ID).unwrap(),
        Some("gone"),
        later,
    )
    .await
    .unwrap();
    let stored = fake
        .get(
            "v1/secrets",
            NS,
            &issuer::kubernetes::tokens::revocation_secret_name(ID),
        )
        .expect("the revocation Secret");
    assert_eq!(
        stored["metadata"]["labels"]["app.kubernetes.io/component"],
        "bootstrap-token"
    );
    assert_eq!(r.reason.as_deref(), Some("gone"));
    let st = eventually("the revocation to be honoured", || {
        let mut c = grpc.clone();
        let req = request(ID, token.as_bytes(), csr_of(&key));
        async move { certify(&mut c, req).await.err() }
    })
    .await;
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("revoked"), "{st:?}");
    // `token list` skips the revocation Secret
    assert_eq!(tokens.list().await.unwrap().len(), 3);

    let _ = stop.send(());
    join.await.unwrap().unwrap();
}

/// The bundle the issuer at `addr` serves (TrustBundle/Get, plaintext).
async fn served_bundle(addr: SocketAddr) -> proxy_lib::trust_bundle::api::Bundle {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    proxy_lib::trust_bundle::api::get(channel, Duration::from_secs(10))
        .await
        .unwrap()
}

// With the CA from Kubernetes, the anchors' signature is published beside them in the
// trust-roots ConfigMap (`ca-bundle.crt.sig`, as `issuer ca sign-bundle --configmap` prints
// it) and served with them, so a host accepts a bundle change; a signature that does not
// verify over the roots is not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trust_roots_configmap_publishes_the_bundle_signature() {
    proxy_lib::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let [anchor_a, _, issuer_a, key_a] = init_ca(&tmp.path().join("a"));
    let [anchor_b, ..] = init_ca(&tmp.path().join("b"));
    // Offline: sign A+B with A's key, as an operator adding a new root does.
    let both = tmp.path().join("both.pem");
    std::fs::write(&both, format!("{anchor_a}{anchor_b}")).unwrap();
    let out = tmp.path().join("signed");
    issuer::bundle::sign_bundle(
        &tmp.path().join("a/anchor.key"),
        &both,
        &out,
        Some(7),
        SystemClock.now(),
    )
    .unwrap();
    let sig = std::fs::read_to_string(out.join("ca.crt.sig")).unwrap();
    let signed_roots = std::fs::read_to_string(out.join("ca.crt")).unwrap();
    let yaml = issuer::kubernetes::ca::trust_roots_yaml(NS, ROOTS, &signed_roots, &sig);
    let cm: Value = serde_saphyr::from_str(&yaml).unwrap();
    assert_eq!(cm["data"]["ca-bundle.crt.sig"], sig.as_str(), "exact bytes");
    assert_eq!(cm["data"]["ca-bundle.crt"], signed_roots.as_str());

    let fake = FakeKube::start().await;
    fake.put("v1/configmaps", cm.clone());
    fake.put(
        "v1/secrets",
        secret(&[("crt.pem", &issuer_a), ("key.pem", &key_a)]),
    );
    let client = client_for(&fake).await;
    let cfg = config(
        tmp.path(),
        "plaintext = true\n[ca]\nsource = \"kubernetes\"\n",
    );
    let server = Server::open(cfg, Arc::new(SystemClock), Vec::new(), Some(client))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(server.clone().run(listener, None, async move {
        let _ = stopped.await;
    }));

    // Served signed; a host trusting only A accepts the change to A+B.
    let b = served_bundle(addr).await;
    assert_eq!(b.signature, sig);
    let certs: Vec<rustls_pki_types::CertificateDer<'static>> =
        b.anchors.iter().map(|d| d.clone().into()).collect();
    assert_eq!(certs.len(), 2);
    let trusted = [der(&anchor_a).into()];
    let host = proxy_lib::trust_bundle::Trusted {
        certs: &trusted,
        sequence: Some(3),
    };
    let parsed = proxy_lib::trust_bundle::Signature::parse(b.signature.as_bytes()).unwrap();
    assert_eq!(
        proxy_lib::trust_bundle::evaluate(&host, &certs, Some(&parsed)),
        Ok(proxy_lib::trust_bundle::Verdict::Accept)
    );

    // A tampered signature (another sequence than the one signed) is not served.
    let tampered = sig.replace("sequence: 7", "sequence: 8");
    assert_ne!(tampered, sig);
    let mut bad = cm.clone();
    bad["data"]["ca-bundle.crt.sig"] = Value::String(tampered);
    fake.put("v1/configmaps", bad);
    eventually("the tampered signature to be dropped", || async {
        served_bundle(addr).await.signature.is_empty().then_some(())
    })
    .await;
    assert_eq!(
        served_bundle(addr).await.anchors.len(),
        2,
        "anchors still served"
    );
    // Put right again: served signed again.
    fake.put("v1/configmaps", cm);
    eventually("the signature to be served again", || async {
        (served_bundle(addr).await.signature == sig).then_some(())
    })
    .await;

    let _ = stop.send(());
    join.await.unwrap().unwrap();
    fake.stop().await;
}

/// Starts `cfg` against the fake API server on a loopback port: (address, stop, join).
async fn start_server(
    fake: &FakeKube,
    cfg: Config,
) -> (
    SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<issuer::Result<()>>,
) {
    let client = client_for(fake).await;
    let server = Server::open(cfg, Arc::new(SystemClock), Vec::new(), Some(client))
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(server.run(listener, None, async move {
        let _ = stopped.await;
    }));
    (addr, stop, join)
}

// With the CA from Kubernetes, the issuer a new pair replaces is recorded in the
// retired-issuers ConfigMap (get + update by name, nothing else), so an issuer restarted
// afterwards still renews by certificate the leaves the old pair signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_kubernetes_issuer_still_renews_leaves_of_the_replaced_pair() {
    proxy_lib::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let [anchor, anchor_key, issuer_a, key_a] = init_ca(&tmp.path().join("a"));
    let now = SystemClock.now();
    let (issuer_b, key_b) = issuer_pair(
        &anchor,
        &anchor_key,
        "second issuer",
        now - Duration::from_secs(60),
        now + Duration::from_secs(30 * 86_400),
        true,
    );
    let fake = FakeKube::start().await;
    fake.put("v1/configmaps", roots(&anchor));
    fake.put(
        "v1/secrets",
        secret(&[("crt.pem", &issuer_a), ("key.pem", &key_a)]),
    );
    // The operator creates the ConfigMap, empty.
    fake.put(
        "v1/configmaps",
        json!({"metadata": {"name": RETIRED, "namespace": NS}}),
    );
    let cfg = config(tmp.path(), "[ca]\nsource = \"kubernetes\"\n");
    let token = issuer::tokens::create(
        &cfg.tokens,
        &issuer::tokens::CreateOptions {
            uses: Some(1),
            ..issuer::tokens::CreateOptions::new(Identity::parse(ID).unwrap())
        },
        now,
    )
    .unwrap();

    let (addr, stop, join) = start_server(&fake, cfg.clone()).await;
    let mut client = tls_client(addr, anchor.as_bytes(), &cfg.server_name).await;
    let (key, csr) = p256_csr(ID);
    let old = certify(&mut client, request(ID, token.secret.as_bytes(), csr))
        .await
        .expect("bootstrap");
    assert_eq!(old.intermediate_certificates[0], der(&issuer_a));

    // A new pair: the replaced issuer certificate lands in the ConfigMap.
    fake.put(
        "v1/secrets",
        secret(&[("crt.pem", &issuer_b), ("key.pem", &key_b)]),
    );
    eventually("the replaced issuer to be recorded", || async {
        let cm = fake.get("v1/configmaps", NS, RETIRED)?;
        let text = cm["data"][issuer::kubernetes::retired::RETIRED_KEY].as_str()?;
        let list = issuer::renewal::parse_retired(text.as_bytes(), "test").unwrap();
        (list.len() == 1 && list[0].0.as_ref() == der(&issuer_a).as_slice()).then_some(())
    })
    .await;
    let _ = stop.send(());
    join.await.unwrap().unwrap();

    // A fresh process: it reads the record and accepts the old leaf as a renewal credential.
    let (addr, stop, join) = start_server(&fake, cfg.clone()).await;
    let mut client = tls_client_with_cert(
        addr,
        anchor.as_bytes(),
        &cfg.server_name,
        std::iter::once(old.leaf_certificate.clone())
            .chain(old.intermediate_certificates.iter().cloned())
            .collect(),
        key.serialize_der(),
    )
    .await;
    let (_, csr) = p256_csr(ID);
    let renewed = certify(&mut client, request(ID, b"", csr))
        .await
        .expect("a leaf of the replaced pair renews after a restart");
    assert_eq!(renewed.intermediate_certificates[0], der(&issuer_b));
    let _ = stop.send(());
    join.await.unwrap().unwrap();

    // Every call the servers made is one the declared rules allow.
    let calls = fake.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.verb == "update" && c.plural() == "configmaps")
    );
    assert_calls_within(&calls, ISSUER_RULES);
    fake.stop().await;
}
