//! Bring your own Linkerd trust: an openssl-made Linkerd-like PKI (two roots in the bundle,
//! root → intermediate → issuer with SEC1 keys, and a cert-manager-style issuer without
//! pathlen whose tls.crt ends with the root), taken by `issuer init --trust-anchors` each way;
//! leaves issued over Certify verify with openssl and webpki through the whole chain, and
//! chains with a bad link are refused naming it. Also `issuer ca new-issuer` and `ca show`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use issuer::audit::AuditTarget;
use issuer::config::{Config, Overrides};
use issuer::server::Server;
use proxy_lib::clock::{Clock, SystemClock};
use proxy_lib::identity::Identity;
use proxy_lib::verify::{TrustAnchors, Usage};

fn issuer_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_issuer"))
}

/// Runs `issuer ARGS`: (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let out = issuer_bin().args(args).output().expect("run issuer");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ossl(dir: &Path, line: &str) {
    let args: Vec<&str> = line.split(' ').collect();
    let (ok, out) = openssl(dir, &args);
    assert!(ok, "openssl {line}: {out}");
}

/// The extensions of a CA certificate with `basic` constraints.
fn ext_file(dir: &Path, name: &str, basic: &str) -> String {
    let file = format!("{name}.ext");
    std::fs::write(
        dir.join(&file),
        format!(
            "[v3]\nbasicConstraints=critical,{basic}\nkeyUsage=critical,keyCertSign,cRLSign\n\
             subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        ),
    )
    .unwrap();
    file
}

/// A SEC1 (`EC PRIVATE KEY`) P-256 key `NAME.key` and a CA certificate `NAME.crt` for `cn`,
/// signed by `parent` (`None`: self-signed), with `basic` constraints, valid `days`.
fn ca_cert(dir: &Path, name: &str, cn: &str, parent: Option<&str>, basic: &str, days: u32) {
    ossl(
        dir,
        &format!("ecparam -name prime256v1 -genkey -noout -out {name}.key"),
    );
    let ext = ext_file(dir, name, basic);
    match parent {
        None => ossl(
            dir,
            &format!(
                "req -x509 -new -key {name}.key -subj /CN={cn} -days {days} -sha256 \
                 -config {ext} -extensions v3 -out {name}.crt"
            ),
        ),
        Some(p) => {
            ossl(
                dir,
                &format!("req -new -key {name}.key -subj /CN={cn} -out {name}.csr"),
            );
            ossl(
                dir,
                &format!(
                    "x509 -req -in {name}.csr -CA {p}.crt -CAkey {p}.key -CAcreateserial \
                     -days {days} -sha256 -extfile {ext} -extensions v3 -out {name}.crt"
                ),
            );
        }
    }
}

fn cat(dir: &Path, out: &str, parts: &[&str]) -> PathBuf {
    let mut text = String::new();
    for p in parts {
        text.push_str(&std::fs::read_to_string(dir.join(p)).unwrap());
    }
    std::fs::write(dir.join(out), text).unwrap();
    dir.join(out)
}

/// The Linkerd-like trust, made with openssl in `dir`.
fn make_trust(dir: &Path) {
    ca_cert(
        dir,
        "old-root",
        "old-root.linkerd.cluster.local",
        None,
        "CA:TRUE",
        3650,
    );
    ca_cert(
        dir,
        "root",
        "root.linkerd.cluster.local",
        None,
        "CA:TRUE",
        3650,
    );
    cat(dir, "anchors.pem", &["old-root.crt", "root.crt"]);
    ca_cert(
        dir,
        "inter",
        "intermediate.linkerd",
        Some("root"),
        "CA:TRUE,pathlen:1",
        1000,
    );
    ca_cert(
        dir,
        "issuer",
        "identity.linkerd.cluster.local",
        Some("inter"),
        "CA:TRUE,pathlen:0",
        365,
    );
    cat(dir, "chain.pem", &["issuer.crt", "inter.crt"]);
    // cert-manager: no pathlen, and tls.crt carries the root after the issuer.
    ca_cert(
        dir,
        "cm",
        "identity.linkerd.cluster.local",
        Some("root"),
        "CA:TRUE",
        365,
    );
    cat(dir, "cm-tls.crt", &["cm.crt", "root.crt"]);
    // Bad intermediates, each with an issuer under it.
    ca_cert(
        dir,
        "short",
        "short-lived-intermediate",
        Some("root"),
        "CA:TRUE",
        1,
    );
    ca_cert(
        dir,
        "under-short",
        "identity.linkerd.cluster.local",
        Some("short"),
        "CA:TRUE,pathlen:0",
        365,
    );
    ca_cert(
        dir,
        "notca",
        "not-a-ca-intermediate",
        Some("root"),
        "CA:FALSE",
        1000,
    );
    ca_cert(
        dir,
        "under-notca",
        "identity.linkerd.cluster.local",
        Some("notca"),
        "CA:TRUE,pathlen:0",
        365,
    );
    ca_cert(
        dir,
        "tight",
        "pathlen0-intermediate",
        Some("root"),
        "CA:TRUE,pathlen:0",
        1000,
    );
    ca_cert(
        dir,
        "under-tight",
        "identity.linkerd.cluster.local",
        Some("tight"),
        "CA:TRUE,pathlen:0",
        365,
    );
    for (out, a, b) in [
        ("short-chain.pem", "under-short.crt", "short.crt"),
        ("notca-chain.pem", "under-notca.crt", "notca.crt"),
        ("tight-chain.pem", "under-tight.crt", "tight.crt"),
    ] {
        cat(dir, out, &[a, b]);
    }
    let key = std::fs::read_to_string(dir.join("issuer.key")).unwrap();
    assert!(key.contains("BEGIN EC PRIVATE KEY"), "openssl wrote SEC1");
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `issuer init --dir DIR --trust-anchors ANCHORS` + `flags` (FLAG, PATH pairs).
fn init_with(dir: &Path, anchors: &Path, flags: &[(&str, &Path)]) -> (i32, String, String) {
    let mut args = vec![
        "init",
        "--dir",
        path_str(dir),
        "--trust-anchors",
        path_str(anchors),
    ];
    for (flag, path) in flags {
        args.extend([*flag, path_str(path)]);
    }
    run(&args)
}

/// Starts the issuer of `dir` in-process (real clock: openssl made the certificates now),
/// certifies `id` over TLS and returns (Certify response, serving chain); stops the server.
async fn certify_once(
    dir: &Path,
    id: &str,
) -> (linkerd2_proxy_api::identity::CertifyResponse, Vec<Vec<u8>>) {
    let mut cfg = Config::load(&dir.join("issuer.toml"), &Overrides::default()).unwrap();
    cfg.audit = AuditTarget::File(dir.join("audit.log"));
    let clock: proxy_lib::clock::SharedClock = Arc::new(SystemClock);
    let server = Server::new(cfg.clone(), clock.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let join = tokio::spawn(server.clone().run(listener, None, async move {
        let _ = rx.await;
    }));
    let anchors = std::fs::read(dir.join("ca.crt")).unwrap();
    let token = issuer::tokens::create(
        &cfg.tokens,
        &issuer::tokens::CreateOptions::new(Identity::parse(id).unwrap()),
        clock.now(),
    )
    .unwrap();
    // Requests read a snapshot of the token store, refreshed every second: take it in now.
    server.refresh_tokens();
    let mut client = tls_client(addr, &anchors, &cfg.server_name).await;
    let (_key, csr) = p256_csr(id);
    let resp = certify(
        &mut client,
        request(id, token.secret.to_string().as_bytes(), csr),
    )
    .await
    .expect("certified");
    let serving = serving_chain(addr, &anchors, &cfg.server_name, clock).await;
    drop(client);
    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(10), join)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
    (resp, serving)
}

/// The leaf verifies with webpki against `dir`'s ca.crt and with `openssl verify -CAfile
/// anchors -untrusted chain`, for both uses.
fn check_leaf(tmp: &Path, dir: &Path, resp: &linkerd2_proxy_api::identity::CertifyResponse) {
    let anchors = TrustAnchors::read(&dir.join("ca.crt")).unwrap();
    let inter: Vec<rustls_pki_types::CertificateDer<'static>> = resp
        .intermediate_certificates
        .iter()
        .map(|c| c.clone().into())
        .collect();
    let leaf = rustls_pki_types::CertificateDer::from(resp.leaf_certificate.clone());
    let now = SystemClock.now();
    for usage in [Usage::Client, Usage::Server] {
        anchors.verify_leaf(&leaf, &inter, now, usage).unwrap();
    }
    let untrusted = tmp.join(format!("untrusted-{:x}.pem", rand::random::<u64>()));
    std::fs::write(&untrusted, proxy_lib::pem::certs_to_pem(&inter)).unwrap();
    let leaf_pem = tmp.join(format!("leaf-{:x}.pem", rand::random::<u64>()));
    std::fs::write(
        &leaf_pem,
        proxy_lib::pem::der_to_pem("CERTIFICATE", &resp.leaf_certificate),
    )
    .unwrap();
    let (ok, out) = openssl(
        tmp,
        &[
            "verify",
            "-CAfile",
            path_str(&dir.join("ca.crt")),
            "-untrusted",
            path_str(&untrusted),
            path_str(&leaf_pem),
        ],
    );
    assert!(ok, "openssl verify: {out}");
}

fn der_of(dir: &Path, file: &str) -> Vec<u8> {
    proxy_lib::pem::read_certs(&dir.join(file)).unwrap()[0].to_vec()
}

// Acceptance: init with each option; leaves verify through the whole chain; the serving
// chain and every Certify answer carry the intermediates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clusters_trust_is_taken_each_way_and_leaves_verify_through_the_chain() {
    if !openssl_available() {
        return;
    }
    proxy_lib::install_crypto_provider();
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    make_trust(&pki);
    let anchors = pki.join("anchors.pem");

    // 1. Linkerd's issuer pair under an intermediate, SEC1 key.
    let linkerd = tmp.path().join("linkerd");
    let (code, _, err) = init_with(
        &linkerd,
        &anchors,
        &[
            ("--issuer-cert", &pki.join("chain.pem")),
            ("--issuer-key", &pki.join("issuer.key")),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(!linkerd.join("anchor.key").exists());
    assert!(!err.contains("offline"), "{err}");
    assert_eq!(
        proxy_lib::pem::read_certs(&linkerd.join("ca.crt"))
            .unwrap()
            .len(),
        2
    );
    let (resp, serving) = certify_once(&linkerd, ID).await;
    assert_eq!(
        resp.intermediate_certificates,
        vec![der_of(&pki, "issuer.crt"), der_of(&pki, "inter.crt")]
    );
    assert_eq!(
        serving.len(),
        3,
        "serving chain: leaf + issuer + intermediate"
    );
    assert_eq!(serving[1..], resp.intermediate_certificates[..]);
    check_leaf(tmp.path(), &linkerd, &resp);

    // 2. A cert-manager-style issuer: no pathlen, the root at the end of tls.crt.
    let cm = tmp.path().join("cert-manager");
    let (code, _, err) = init_with(
        &cm,
        &anchors,
        &[
            ("--issuer-cert", &pki.join("cm-tls.crt")),
            ("--issuer-key", &pki.join("cm.key")),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        proxy_lib::pem::read_certs(&cm.join("issuer.crt")).unwrap(),
        proxy_lib::pem::read_certs(&pki.join("cm.crt")).unwrap(),
        "the trailing root is dropped"
    );
    let (resp, _) = certify_once(&cm, ID).await;
    assert_eq!(resp.intermediate_certificates, vec![der_of(&pki, "cm.crt")]);
    check_leaf(tmp.path(), &cm, &resp);

    // 3. A new issuer signed with the root's key (read, never copied).
    let own = tmp.path().join("own-issuer");
    let (code, _, err) = run(&[
        "init",
        "--dir",
        path_str(&own),
        "--trust-anchors",
        path_str(&anchors),
        "--anchor-key",
        path_str(&pki.join("root.key")),
        "--control-plane-namespace",
        "mesh-system",
    ]);
    assert_eq!(code, 0, "{err}");
    let files: Vec<_> = std::fs::read_dir(&own)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(!files.iter().any(|f| f.contains("anchor")), "{files:?}");
    // Linkerd installed in namespace mesh-system: identities, the issuer's name and its
    // serving name all carry it.
    let id = "web.prod.serviceaccount.identity.mesh-system.cluster.local";
    let cfg = Config::load(&own.join("issuer.toml"), &Overrides::default()).unwrap();
    assert_eq!(
        cfg.server_name,
        "linkerd-identity.mesh-system.serviceaccount.identity.mesh-system.cluster.local"
    );
    assert!(
        cfg.policy.identity(ID).is_err(),
        "identity.linkerd. names refused"
    );
    let (resp, _) = certify_once(&own, id).await;
    assert_eq!(resp.intermediate_certificates.len(), 1);
    let issuer = proxy_lib::cert::CertInfo::from_der(&resp.intermediate_certificates[0]).unwrap();
    assert_eq!(issuer.subject, "CN=identity.mesh-system.cluster.local");
    let leaf = proxy_lib::cert::CertInfo::from_der(&resp.leaf_certificate).unwrap();
    assert_eq!(leaf.dns_sans, vec![id.to_string()]);
    check_leaf(tmp.path(), &own, &resp);
}

// Acceptance: a chain whose intermediate is expired, not a CA, or has a pathlen that forbids
// the issuer is refused, naming the link, and nothing is written.
#[test]
fn chains_with_a_bad_link_are_refused_naming_it() {
    if !openssl_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    make_trust(&pki);
    let anchors = pki.join("anchors.pem");
    for (chain, key, needles) in [
        (
            "notca-chain.pem",
            "under-notca.key",
            vec!["intermediate #1 of the issuer chain (CN=not-a-ca-intermediate) is not a CA"],
        ),
        (
            "tight-chain.pem",
            "under-tight.key",
            vec![
                "intermediate #1 of the issuer chain (CN=pathlen0-intermediate) has pathlen 0, \
                 which forbids the 1 CA",
            ],
        ),
    ] {
        let dir = tmp.path().join(chain);
        let (code, _, err) = init_with(
            &dir,
            &anchors,
            &[
                ("--issuer-cert", &pki.join(chain)),
                ("--issuer-key", &pki.join(key)),
            ],
        );
        assert_eq!(code, 1, "{chain}: {err}");
        for n in needles {
            assert!(err.contains(n), "{chain}: {err}");
        }
        assert!(err.contains(chain), "names the file: {err}");
        assert!(!dir.exists(), "{chain}: nothing written");
    }
    // Expired: the intermediate lives one day; init two days from now.
    let dir = tmp.path().join("short");
    let mut opts = issuer::init::InitOptions::new(&dir);
    opts.trust = Some(issuer::init::Trust {
        anchors,
        issuer: issuer::init::TrustIssuer::Pair {
            cert: pki.join("short-chain.pem"),
            key: pki.join("under-short.key"),
        },
    });
    let later = SystemClock.now() + Duration::from_secs(2 * 86_400);
    let err = issuer::init::run_at(&opts, later).unwrap_err().to_string();
    assert!(
        err.contains("intermediate #1 of the issuer chain (CN=short-lived-intermediate)")
            && err.contains("is not valid now"),
        "{err}"
    );
    assert!(!dir.exists());
    // Bad flag combinations are usage errors.
    let (code, _, err) = run(&[
        "init",
        "--dir",
        path_str(&tmp.path().join("x")),
        "--trust-anchors",
        path_str(&pki.join("anchors.pem")),
    ]);
    assert_eq!(code, 64, "{err}");
    let bad_ns = tmp.path().join("bad-ns");
    let (code, _, err) = run(&[
        "init",
        "--dir",
        path_str(&bad_ns),
        "--control-plane-namespace",
        "Linkerd_CP",
    ]);
    assert_eq!(code, 78, "{err}");
    assert!(
        err.contains("--control-plane-namespace: \"Linkerd_CP\" is not a namespace name"),
        "{err}"
    );
    assert!(!bad_ns.exists());
}

#[test]
fn ca_new_issuer_and_ca_show() {
    if !openssl_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki = tmp.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    make_trust(&pki);
    let dir = tmp.path().join("d");
    let d = path_str(&dir);
    let (code, _, err) = init_with(
        &dir,
        &pki.join("anchors.pem"),
        &[
            ("--issuer-cert", &pki.join("chain.pem")),
            ("--issuer-key", &pki.join("issuer.key")),
        ],
    );
    assert_eq!(code, 0, "{err}");

    let (code, out, err) = run(&["ca", "show", "--dir", d]);
    assert_eq!(code, 0, "{out}{err}");
    for needle in [
        "CN=identity.linkerd.cluster.local",
        "CN=intermediate.linkerd",
        "CN=root.linkerd.cluster.local",
        "CN=old-root.linkerd.cluster.local  (not in the path in use)",
        &proxy_lib::cert::sha256_hex(&der_of(&pki, "inter.crt")),
        "ok: the pair loads",
    ] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }

    // Signed by the intermediate's key: the new issuer.crt keeps the intermediate.
    let old = std::fs::read(dir.join("issuer.crt")).unwrap();
    let (code, _, err) = run(&[
        "ca",
        "new-issuer",
        "--dir",
        d,
        "--anchor-key",
        path_str(&pki.join("inter.key")),
        "--lifetime",
        "30d",
    ]);
    assert_eq!(code, 0, "{err}");
    let chain = proxy_lib::pem::read_certs(&dir.join("issuer.crt")).unwrap();
    assert_ne!(std::fs::read(dir.join("issuer.crt")).unwrap(), old);
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[1].to_vec(), der_of(&pki, "inter.crt"));
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(dir.join("issuer.key")).unwrap().mode() & 0o777,
        0o600
    );
    issuer::ca::Ca::load(&issuer::ca::CaFiles::in_dir(&dir), SystemClock.now()).unwrap();

    // Signed by the root's key: a two-level chain.
    let (code, _, err) = run(&[
        "ca",
        "new-issuer",
        "--dir",
        d,
        "--anchor-key",
        path_str(&pki.join("root.key")),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        proxy_lib::pem::read_certs(&dir.join("issuer.crt"))
            .unwrap()
            .len(),
        1
    );
    // A key that signs nothing here is refused and changes nothing.
    let before = std::fs::read(dir.join("issuer.crt")).unwrap();
    let (code, _, err) = run(&[
        "ca",
        "new-issuer",
        "--dir",
        d,
        "--anchor-key",
        path_str(&pki.join("cm.key")),
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("belongs to none of the 2 trust anchor(s)"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.join("issuer.crt")).unwrap(), before);

    // The new issuer lives 365 days: a warn_before of 400 days makes show fail, naming it.
    let toml = dir.join("issuer.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    std::fs::write(
        &toml,
        text.replace("[ca]\n", "[ca]\nwarn_before = \"400d\"\n"),
    )
    .unwrap();
    let (code, _, err) = run(&["ca", "show", "--dir", d]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("issuer certificate (CN=identity.linkerd.cluster.local) expires")
            && err.contains("under warn_before = 400 days"),
        "{err}"
    );
}
