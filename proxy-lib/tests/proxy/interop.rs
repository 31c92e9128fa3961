//! Acceptance 6: `openssl s_client` with a client certificate completes a handshake with the
//! inbound listener, and `curl` reaches an HTTP app through outbound → inbound. With
//! `REQUIRE_INTEROP=1` a missing tool fails the test; otherwise the test is skipped with a
//! printed reason.

use std::path::PathBuf;
use std::time::Duration;

use proxy_lib::test_util::{TestPki, write_data_dir};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::process::Command;

use crate::support::*;

fn tool_available(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    if std::env::var("REQUIRE_INTEROP").is_ok_and(|v| v == "1") {
        panic!("{tool} is not installed but REQUIRE_INTEROP=1: interop tests must run");
    }
    eprintln!("skipping: {tool} is not installed (set REQUIRE_INTEROP=1 to make this fail)");
    false
}

async fn output(cmd: &mut Command) -> std::process::Output {
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("tool timed out")
        .expect("run tool")
}

/// An app that greets every connection and closes it.
async fn greeting_app(text: &'static str) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(text.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn openssl_s_client_handshakes_with_the_inbound_listener() {
    init();
    if !tool_available("openssl") {
        return;
    }
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &me));
    let app = greeting_app("hello from the app\n").await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;

    let files = tempfile::tempdir().unwrap();
    let client = leaf(&pki, &id("web", "apps"));
    let (_, key, ca) = pem_of(&client);
    let (cert_p, chain_p, key_p, ca_p) = (
        files.path().join("client.crt"),
        files.path().join("chain.crt"),
        files.path().join("client.key"),
        files.path().join("ca.crt"),
    );
    // s_client takes the leaf from -cert and the intermediates from -cert_chain.
    std::fs::write(&cert_p, proxy_lib::pem::certs_to_pem(&client.chain[..1])).unwrap();
    std::fs::write(&chain_p, proxy_lib::pem::certs_to_pem(&client.chain[1..])).unwrap();
    std::fs::write(&key_p, key).unwrap();
    std::fs::write(&ca_p, ca).unwrap();
    let connect = proxy.inbound[0].to_string();
    let name = me.to_string();
    let base = |with_cert: bool| {
        let mut c = Command::new("openssl");
        c.args(["s_client", "-connect", &connect, "-servername", &name])
            .args(["-verify_hostname", &name, "-verify_return_error", "-tls1_3"])
            .arg("-CAfile")
            .arg(&ca_p)
            .arg("-ign_eof");
        if with_cert {
            c.arg("-cert").arg(&cert_p).arg("-key").arg(&key_p);
            c.arg("-cert_chain").arg(&chain_p);
        }
        c
    };

    let out = output(&mut base(true)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openssl failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("Verify return code: 0 (ok)"),
        "server cert not verified:\n{stdout}"
    );
    assert!(stdout.contains("TLSv1.3"), "{stdout}");
    // Our suite preference (AES-128-GCM first) wins over the client's.
    assert!(stdout.contains("TLS_AES_128_GCM_SHA256"), "{stdout}");
    assert!(
        stdout.contains("hello from the app"),
        "app bytes did not come through:\n{stdout}\n{stderr}"
    );
    wait_metric(
        proxy.admin,
        r#"proxy_tls_handshakes_total{direction="inbound",result="ok"}"#,
        1.0,
    )
    .await;

    // Without a client certificate the proxy refuses, and the app is never reached.
    let out = output(&mut base(false)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("hello from the app"), "{stdout}");
    wait_metric(
        proxy.admin,
        r#"proxy_tls_handshakes_total{direction="inbound",result="no_client_cert"}"#,
        1.0,
    )
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn curl_reaches_an_http_app_through_outbound_and_inbound() {
    init();
    if !tool_available("curl") {
        return;
    }
    let pki = TestPki::new(now());
    let db = id("db", "data");
    let web = id("web", "apps");
    let body = "hello through the mesh\n";
    let app = http_app(body).await;

    let db_dir = tempfile::tempdir().unwrap();
    write_data_dir(db_dir.path(), &leaf(&pki, &db));
    let mut db_cfg = config(db_dir.path());
    db_cfg.inbound.push(inbound_to(app));
    db_cfg.allow_client = vec![web.to_string()];
    let (_, clock) = fake_clock();
    let server = start(&db_cfg, clock.clone()).await;

    let web_dir = tempfile::tempdir().unwrap();
    write_data_dir(web_dir.path(), &leaf(&pki, &web));
    let mut web_cfg = config(web_dir.path());
    web_cfg.outbound.push(outbound_to(server.inbound[0], &db));
    let client = start(&web_cfg, clock).await;

    let url = format!("http://{}/hello", client.outbound[0]);
    let out = output(Command::new("curl").args(["-sS", "--max-time", "20", &url])).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), body);
    wait_metric(
        server.admin,
        r#"proxy_tls_handshakes_total{direction="inbound",result="ok"}"#,
        1.0,
    )
    .await;
    wait_metric(
        client.admin,
        r#"proxy_tls_handshakes_total{direction="outbound",result="ok"}"#,
        1.0,
    )
    .await;
    client.stop().await;
    server.stop().await;
}

/// Writes a client's leaf, intermediates, key and the anchors as PEM files for the tools.
fn client_files(dir: &std::path::Path, client: &proxy_lib::bundle::CertBundle) -> [PathBuf; 4] {
    let (_, key, ca) = pem_of(client);
    let paths = ["client.crt", "chain.crt", "client.key", "ca.crt"].map(|n| dir.join(n));
    std::fs::write(&paths[0], proxy_lib::pem::certs_to_pem(&client.chain[..1])).unwrap();
    std::fs::write(&paths[1], proxy_lib::pem::certs_to_pem(&client.chain[1..])).unwrap();
    std::fs::write(&paths[2], key).unwrap();
    std::fs::write(&paths[3], ca).unwrap();
    paths
}

/// An OpenSSL client restricted to TLS 1.3 and a single key-exchange group (so the proxy must
/// accept that group's key share as offered, P-256 or X25519), with and without ALPN: the
/// inbound listener negotiates no ALPN and must serve both kinds of clients. A TLS 1.2-only
/// client is refused.
#[tokio::test]
async fn openssl_tls13_only_clients_with_one_group_and_with_or_without_alpn_are_served() {
    init();
    if !tool_available("openssl") {
        return;
    }
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &me));
    let app = greeting_app("hello from the app\n").await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let files = tempfile::tempdir().unwrap();
    let [cert_p, chain_p, key_p, ca_p] =
        client_files(files.path(), &leaf(&pki, &id("web", "apps")));
    let connect = proxy.inbound[0].to_string();
    let name = me.to_string();
    let mut served = 0.0;
    for group in ["P-256", "X25519"] {
        for alpn in [None, Some("h2,http/1.1")] {
            let mut c = Command::new("openssl");
            c.args(["s_client", "-connect", &connect, "-servername", &name])
                .args(["-verify_hostname", &name, "-verify_return_error", "-tls1_3"])
                .args(["-groups", group, "-ign_eof"])
                .arg("-CAfile")
                .arg(&ca_p)
                .arg("-cert")
                .arg(&cert_p)
                .arg("-key")
                .arg(&key_p)
                .arg("-cert_chain")
                .arg(&chain_p);
            if let Some(a) = alpn {
                c.args(["-alpn", a]);
            }
            let out = output(&mut c).await;
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let what = format!("group {group}, alpn {alpn:?}");
            assert!(
                out.status.success(),
                "{what}: openssl failed:\n{stdout}\n{stderr}"
            );
            assert!(
                stdout.contains("Verify return code: 0 (ok)"),
                "{what}:\n{stdout}"
            );
            assert!(stdout.contains("TLSv1.3"), "{what}:\n{stdout}");
            let group_seen = match group {
                "P-256" => "prime256v1",
                _ => "X25519",
            };
            let temp_key = stdout
                .lines()
                .find(|l| l.starts_with("Server Temp Key:"))
                .unwrap_or_default();
            assert!(
                temp_key.contains(group_seen),
                "{what}: the group offered was not the one used:\n{stdout}"
            );
            assert!(stdout.contains("No ALPN negotiated"), "{what}:\n{stdout}");
            assert!(
                stdout.contains("hello from the app"),
                "{what}: app bytes did not come through:\n{stdout}\n{stderr}"
            );
            served += 1.0;
            wait_metric(
                proxy.admin,
                r#"proxy_tls_handshakes_total{direction="inbound",result="ok"}"#,
                served,
            )
            .await;
        }
    }
    // TLS 1.2 is refused even with a valid client certificate, and the app is never reached.
    let mut c = Command::new("openssl");
    c.args([
        "s_client",
        "-connect",
        &connect,
        "-servername",
        &name,
        "-tls1_2",
    ])
    .arg("-CAfile")
    .arg(&ca_p)
    .arg("-cert")
    .arg(&cert_p)
    .arg("-key")
    .arg(&key_p)
    .arg("-cert_chain")
    .arg(&chain_p);
    let out = output(&mut c).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "a TLS 1.2 client got through:\n{stdout}"
    );
    assert!(!stdout.contains("hello from the app"), "{stdout}");
    wait_metric(
        proxy.admin,
        r#"proxy_tls_handshakes_total{direction="inbound",result="error"}"#,
        1.0,
    )
    .await;
    proxy.stop().await;
}

/// `curl` as an HTTPS client with a client certificate, straight at the inbound listener
/// (curl offers ALPN h2 and http/1.1; the proxy negotiates none and curl falls back to
/// HTTP/1.1), verifying the proxy's certificate against the anchors by the identity name.
#[tokio::test]
async fn curl_https_with_a_client_cert_reaches_the_app_through_inbound() {
    init();
    if !tool_available("curl") {
        return;
    }
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let body = "hello over mtls\n";
    let app = http_app(body).await;
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &me));
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let files = tempfile::tempdir().unwrap();
    let [cert_p, chain_p, key_p, ca_p] =
        client_files(files.path(), &leaf(&pki, &id("web", "apps")));
    // curl takes the client chain (leaf first) from one file.
    let full = files.path().join("full.crt");
    let mut pem = std::fs::read(&cert_p).unwrap();
    pem.extend(std::fs::read(&chain_p).unwrap());
    std::fs::write(&full, pem).unwrap();
    let port = proxy.inbound[0].port();
    let url = format!("https://{me}:{port}/hello");
    let resolve = format!("{me}:{port}:127.0.0.1");
    let curl = |with_cert: bool| {
        let mut c = Command::new("curl");
        c.args([
            "-sS",
            "--max-time",
            "20",
            "--tlsv1.3",
            "--resolve",
            &resolve,
        ])
        .arg("--cacert")
        .arg(&ca_p);
        if with_cert {
            c.arg("--cert").arg(&full).arg("--key").arg(&key_p);
        }
        c.arg(&url);
        c
    };
    let out = output(&mut curl(true)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "curl failed: {stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), body);
    // Without a client certificate curl gets no response from the app.
    let out = output(&mut curl(false)).await;
    assert!(!out.status.success(), "served without a client cert");
    assert!(!String::from_utf8_lossy(&out.stdout).contains(body));
    let text = wait_metric(
        proxy.admin,
        r#"proxy_tls_handshakes_total{direction="inbound",result="no_client_cert"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &text,
            r#"proxy_tls_handshakes_total{direction="inbound",result="ok"}"#
        ),
        1.0
    );
    proxy.stop().await;
}

/// mtls-proxy serves from a plain cert dir (`tls.crt`, `tls.key`, `ca.crt`; no `..data`)
/// whose key openssl wrote as SEC1, PKCS#1 or PKCS#8, PEM or DER: the handshake succeeds, the
/// served leaf is that cert, and bytes reach the app.
#[tokio::test]
async fn serves_a_plain_cert_dir_whose_key_openssl_wrote_in_each_encoding() {
    use proxy_lib::certdir::{CA_FILE, CERT_FILE, KEY_FILE};
    use proxy_lib::key::PrivateKey;
    init();
    let keys_dir = tempfile::tempdir().unwrap();
    let Some(keys) = proxy_lib::test_keys::openssl_keys(keys_dir.path()) else {
        return;
    };
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let client = leaf(&pki, &id("web", "shop"));
    let app = echo_app().await;
    for k in keys {
        let key = PrivateKey::read(&k.path).unwrap();
        let served = pki.leaf_for_key(&me, &key, now() - HOUR, now() + HOUR);
        let (cert, _, ca) = pem_of(&served);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CERT_FILE), cert).unwrap();
        std::fs::copy(&k.path, dir.path().join(KEY_FILE)).unwrap();
        std::fs::write(dir.path().join(CA_FILE), ca).unwrap();
        let mut cfg = config(dir.path());
        cfg.inbound.push(inbound_to(app));
        let (_, clock) = fake_clock();
        let proxy = start(&cfg, clock).await;
        let config = client_config(&pki.anchors(), Some(&client));
        let tls = tls_connect_within(proxy.inbound[0], config, &me).await;
        assert_eq!(served_fingerprint(&tls), served.leaf.sha256, "{}", k.name);
        let back = round_trip(tls, k.name.as_bytes()).await.unwrap();
        assert_eq!(back, k.name.as_bytes(), "{}", k.name);
        proxy.stop().await;
    }
}
