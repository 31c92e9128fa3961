//! The README's flow for one host, with the real binaries against an in-process fake API
//! server: `issuer workload register --ip 127.0.0.2`, then `rotator rotate` with
//! `source_addr = "127.0.0.2"` gets a certificate; the same token from 127.0.0.1 is refused;
//! the objects created are the README's; `workload remove` revokes; a name colliding with a
//! ServiceAccount is refused.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use proxy_lib::test_util::fake_kube::FakeKube;
use serde_json::{Value, json};
use testkit::{ChildGuard, bin, free_port, readme, run_ok, wait_for};

const BETA: &str = "workload.linkerd.io/v1beta1/externalworkloads";
const NS: &str = "external-services";
const ID: &str = "legacy-database.external-services.serviceaccount.identity.linkerd.cluster.local";

/// The YAML documents of the first ```` ```yaml ```` block after `marker` in the README
/// (dedented), with the README's host address replaced by `ip`.
fn readme_objects(marker: &str, ip: &str) -> Vec<Value> {
    let text = readme();
    let start = text.find(marker).expect("README marker");
    let block = &text[start..];
    let open = block.find("```yaml\n").expect("yaml block") + "```yaml\n".len();
    let close = block[open..].find("```").expect("closed yaml block");
    let body = &block[open..open + close];
    let indent = body
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    let yaml: String = body
        .lines()
        .map(|l| l.get(indent..).unwrap_or("").replace("10.0.0.5", ip) + "\n")
        .collect();
    yaml.split("\n---\n")
        .map(|d| serde_saphyr::from_str(d).unwrap_or_else(|e| panic!("README yaml: {e}")))
        .collect()
}

/// Whether every field of `want` is in `have` with the same value (objects recursively).
fn contains(have: &Value, want: &Value) -> bool {
    match (have, want) {
        (Value::Object(h), Value::Object(w)) => w
            .iter()
            .all(|(k, v)| h.get(k).is_some_and(|hv| contains(hv, v))),
        _ => have == want,
    }
}

fn issuer(kubeconfig: &Path) -> Command {
    let mut c = Command::new(bin("issuer"));
    c.env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", kubeconfig.parent().unwrap());
    c
}

fn rotator_config(dir: &Path, name: &str, port: u16, source: Option<&str>) -> std::path::PathBuf {
    let certs = dir.join(format!("{name}-certs"));
    let mut text = format!(
        "identity = \"{ID}\"\ndir = \"{}\"\ntrust_anchors = \"{}\"\ntoken_file = \"{}\"\n\
         issuer_addr = \"127.0.0.1:{port}\"\nplaintext = true\n",
        certs.display(),
        dir.join("iss/ca.crt").display(),
        dir.join("token").display(),
    );
    if let Some(ip) = source {
        text.push_str(&format!("source_addr = \"{ip}\"\n"));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_rotate_from_the_registered_address_and_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let iss = tmp.path().join("iss");
    run_ok(
        Command::new(bin("issuer"))
            .args(["init", "--dir"])
            .arg(&iss),
    );
    let cfg = iss.join("issuer.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[auth]\n",
        "[auth]\nexternal_workloads = true\nlast_issued_flush = \"1s\"\n",
    );
    std::fs::write(&cfg, text).unwrap();

    let fake = FakeKube::start().await;
    fake.register(BETA, "ExternalWorkload");
    fake.register(
        "workload.linkerd.io/v1alpha1/externalworkloads",
        "ExternalWorkload",
    );
    fake.register("v1/services", "Service");
    fake.register("v1/serviceaccounts", "ServiceAccount");
    fake.put(
        "v1/serviceaccounts",
        json!({"metadata": {"name": "web", "namespace": NS}}),
    );
    let kubeconfig = tmp.path().join("kubeconfig");
    fake.write_kubeconfig(&kubeconfig, "default");

    let (port, admin) = (free_port(), free_port());
    let log = tmp.path().join("issuer.log");
    let _server = ChildGuard(
        issuer(&kubeconfig)
            .args(["serve", "--plaintext", "--config"])
            .arg(&cfg)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for("the issuer to be ready", Duration::from_secs(60), || {
        testkit::http_get(admin, "/ready")
            .ok()
            .filter(|(code, _)| *code == 200)
    });

    // Register: the objects are the README's, the token goes to the file, 0600.
    let token_file = tmp.path().join("token");
    let out = run_ok(
        issuer(&kubeconfig)
            .args(["workload", "register", "--dir"])
            .arg(&iss)
            .args(["--name", "legacy-database", "--namespace", NS])
            .args(["--ip", "127.0.0.2", "--port", "5432:postgres"])
            .args(["--service", "legacy-database", "--out"])
            .arg(&token_file),
    );
    assert!(out.stdout.is_empty(), "the token went to --out only");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_string();
    let shown = readme_objects("<!-- workload-register-objects -->", "127.0.0.2");
    assert_eq!(shown.len(), 2);
    for want in &shown {
        let resource = match want["kind"].as_str().unwrap() {
            "ExternalWorkload" => BETA,
            _ => "v1/services",
        };
        let have = fake
            .get(resource, NS, want["metadata"]["name"].as_str().unwrap())
            .unwrap_or_else(|| panic!("no {resource} created"));
        assert_eq!(
            have["spec"], want["spec"],
            "{resource}: spec differs from the README"
        );
        assert!(
            contains(&have, want),
            "{resource}: {have:#} is not the README's {want:#}"
        );
    }

    // The rotator from the registered address gets a cert, within the watch delay.
    let good = rotator_config(tmp.path(), "good", port, Some("127.0.0.2"));
    wait_for("the first certificate", Duration::from_secs(30), || {
        let out = Command::new(bin("rotator"))
            .args(["rotate", "--config"])
            .arg(&good)
            .output()
            .unwrap();
        out.status.success().then_some(())
    });
    assert!(tmp.path().join("good-certs/tls.crt").exists());

    // The same token from 127.0.0.1: refused, naming the address (the token itself is bound
    // to the registered address, and so is the identity by the ExternalWorkload).
    let other = rotator_config(tmp.path(), "other", port, None);
    let out = Command::new(bin("rotator"))
        .args(["rotate", "--config"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PermissionDenied") && err.contains("127.0.0.1"),
        "{err}"
    );

    // list shows it with its token and, once the issuer has flushed (every second here),
    // the time of its last issuance.
    let listed: Value = wait_for(
        "the last issuance recorded",
        Duration::from_secs(30),
        || {
            let out = run_ok(
                issuer(&kubeconfig)
                    .args(["workload", "list", "--json", "--dir"])
                    .arg(&iss),
            );
            let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
            listed[0]["last_issued"].is_string().then_some(listed)
        },
    );
    let at = listed[0]["last_issued"].as_str().unwrap();
    assert!(at.len() == 20 && at.ends_with('Z'), "{at}");
    let table = run_ok(
        issuer(&kubeconfig)
            .args(["workload", "list", "--dir"])
            .arg(&iss),
    );
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table
            .lines()
            .nth(1)
            .is_some_and(|l| l.ends_with(&format!("  {at}"))),
        "{table}"
    );
    assert_eq!(listed[0]["name"], "legacy-database");
    assert_eq!(listed[0]["ips"], json!(["127.0.0.2"]));
    let id = listed[0]["tokens"][0].as_str().unwrap().to_string();

    // Registering it again (an update) keeps the record of its last issuance.
    run_ok(
        issuer(&kubeconfig)
            .args(["workload", "register", "--dir"])
            .arg(&iss)
            .args(["--name", "legacy-database", "--namespace", NS])
            .args(["--ip", "127.0.0.2", "--port", "5432:postgres"])
            .args(["--service", "legacy-database", "--out"])
            .arg(tmp.path().join("token-again")),
    );
    let again = fake.get(BETA, NS, "legacy-database").unwrap();
    assert_eq!(
        again["metadata"]["annotations"]["meshcerts.io/last-issued"], at,
        "{again:#}"
    );

    // A name colliding with an existing ServiceAccount is refused, nothing created.
    let out = issuer(&kubeconfig)
        .args(["workload", "register", "--dir"])
        .arg(&iss)
        .args(["--name", "web", "--namespace", NS, "--ip", "127.0.0.3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("ServiceAccount external-services/web exists"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fake.get(BETA, NS, "web").is_none());

    // remove: the objects go, the token is revoked, renewals stop.
    run_ok(
        issuer(&kubeconfig)
            .args(["workload", "remove", "--dir"])
            .arg(&iss)
            .args(["--name", "legacy-database", "--namespace", NS]),
    );
    assert!(fake.get(BETA, NS, "legacy-database").is_none());
    assert!(fake.get("v1/services", NS, "legacy-database").is_none());
    let records = issuer::tokens::list(&iss.join("tokens")).unwrap();
    assert!(records.iter().any(|r| r.id == id && r.revoked.is_some()));
    wait_for("renewals to stop", Duration::from_secs(30), || {
        let out = Command::new(bin("rotator"))
            .args(["rotate", "--force", "--config"])
            .arg(&good)
            .output()
            .unwrap();
        (!out.status.success()).then_some(())
    });

    // The token is in no log and in no request to the API server.
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.is_empty() && !text.contains(&token), "token logged");
    for (c, body) in fake.requests() {
        assert!(
            !body.contains(&token) && !format!("{c:?}").contains(&token),
            "token sent in {c:?}"
        );
    }
    fake.stop().await;
}
