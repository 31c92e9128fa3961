//! Acceptance 1: the inbound listener echoes for an authenticated, allowed client and refuses
//! everyone else, counting each outcome.

use proxy_lib::test_util::{TestPki, write_data_dir};

use crate::support::*;

#[tokio::test]
async fn inbound_serves_valid_clients_and_refuses_others_counting_each() {
    init();
    let pki = TestPki::new(now());
    let server_id = id("db", "data");
    let web = id("web", "apps");
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &server_id));

    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    cfg.allow_client = vec![web.to_string()];
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let addr = proxy.inbound[0];
    let anchors = pki.anchors();
    let sample = |result: &str| {
        format!(r#"proxy_tls_handshakes_total{{direction="inbound",result="{result}"}}"#)
    };

    // A valid, allowed client gets its bytes echoed by the app.
    let web_cert = leaf(&pki, &web);
    let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let back = echo_through_tls(
        addr,
        client_config(&anchors, Some(&web_cert)),
        &server_id,
        &data,
    )
    .await
    .expect("valid client is served");
    assert_eq!(back, data);
    wait_metric(proxy.admin, &sample("ok"), 1.0).await;

    // No client certificate: refused.
    let r = echo_through_tls(addr, client_config(&anchors, None), &server_id, b"x").await;
    assert!(r.is_err(), "client without a cert was served");
    wait_metric(proxy.admin, &sample("no_client_cert"), 1.0).await;

    // A client certificate from another anchor: refused.
    let foreign = TestPki::new(now());
    let foreign_cert = leaf(&foreign, &web);
    let r = echo_through_tls(
        addr,
        client_config(&anchors, Some(&foreign_cert)),
        &server_id,
        b"x",
    )
    .await;
    assert!(r.is_err(), "client from a foreign anchor was served");
    wait_metric(proxy.admin, &sample("untrusted"), 1.0).await;

    // A valid client whose identity is not on the allow-list: refused.
    let intruder = leaf(&pki, &id("intruder", "apps"));
    let r = echo_through_tls(
        addr,
        client_config(&anchors, Some(&intruder)),
        &server_id,
        b"x",
    )
    .await;
    assert!(r.is_err(), "client off the allow-list was served");
    let text = wait_metric(proxy.admin, &sample("not_allowed"), 1.0).await;

    // Each refusal was counted once and none of them counted as a success.
    assert_eq!(metric(&text, &sample("ok")), 1.0, "{text}");
    assert_eq!(
        metric(&text, r#"proxy_bytes_total{direction="inbound"}"#),
        2.0 * data.len() as f64,
        "{text}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn inbound_without_allow_list_accepts_any_client_of_the_mesh() {
    init();
    let pki = TestPki::new(now());
    let server_id = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &server_id));
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    for sa in ["a", "b"] {
        let c = leaf(&pki, &id(sa, "x"));
        echo_through_tls(
            proxy.inbound[0],
            client_config(&pki.anchors(), Some(&c)),
            &server_id,
            b"hi",
        )
        .await
        .unwrap();
    }
    proxy.stop().await;
}

#[tokio::test]
async fn inbound_refuses_clients_whose_cert_expired_by_the_proxy_clock() {
    init();
    let pki = TestPki::new(now());
    let server_id = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    // The server's own cert is valid for a day so it stays servable after the clock moves.
    let n = now();
    write_data_dir(dir.path(), &pki.leaf(&server_id, n - HOUR, n + 24 * HOUR));
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    let (fake, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let client = leaf(&pki, &id("web", "apps")); // valid now ± 1 h
    let cc = client_config(&pki.anchors(), Some(&client));
    echo_through_tls(proxy.inbound[0], cc.clone(), &server_id, b"ok")
        .await
        .unwrap();
    fake.advance(2 * HOUR);
    assert!(
        echo_through_tls(proxy.inbound[0], cc, &server_id, b"late")
            .await
            .is_err()
    );
    wait_metric(
        proxy.admin,
        r#"proxy_tls_handshakes_total{direction="inbound",result="untrusted"}"#,
        1.0,
    )
    .await;
    proxy.stop().await;
}

/// A TLS 1.3 resumption carries the client certificate of the original handshake without
/// verifying it again: the proxy must still judge it by its own clock, so a session resumed
/// after the client's cert expired is refused (and counted `untrusted`), while a resumption
/// with a still-valid cert is served.
#[tokio::test]
async fn resumed_sessions_are_refused_once_the_client_cert_expired_by_the_proxy_clock() {
    init();
    let pki = TestPki::new(now());
    let server_id = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    let n = now();
    write_data_dir(dir.path(), &pki.leaf(&server_id, n - HOUR, n + 24 * HOUR));
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    let (fake, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let client = pki.leaf(&id("web", "apps"), n - HOUR, n + HOUR);
    // The client's own clock is the real one; resumption on (rustls' default in-memory cache).
    let cc = {
        let mut c = (*client_config(&pki.anchors(), Some(&client))).clone();
        c.resumption = rustls::client::Resumption::default();
        std::sync::Arc::new(c)
    };
    let kind = |tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>| {
        tls.get_ref().1.handshake_kind()
    };
    // A full handshake; reading to the end also takes in the session tickets.
    let tls = tls_connect(proxy.inbound[0], cc.clone(), &server_id)
        .await
        .unwrap();
    assert_eq!(kind(&tls), Some(rustls::HandshakeKind::Full));
    assert_eq!(round_trip(tls, b"first").await.unwrap(), b"first");
    // Resumed while the client cert is valid: served.
    let tls = tls_connect(proxy.inbound[0], cc.clone(), &server_id)
        .await
        .unwrap();
    assert_eq!(kind(&tls), Some(rustls::HandshakeKind::Resumed));
    assert_eq!(round_trip(tls, b"second").await.unwrap(), b"second");

    fake.advance(2 * HOUR);
    let tls = tls_connect(proxy.inbound[0], cc.clone(), &server_id)
        .await
        .unwrap();
    assert_eq!(kind(&tls), Some(rustls::HandshakeKind::Resumed));
    let back = round_trip(tls, b"late").await.unwrap_or_default();
    assert!(
        back.is_empty(),
        "a resumed session with an expired client cert was served"
    );
    let text = wait_metric(
        proxy.admin,
        r#"proxy_tls_handshakes_total{direction="inbound",result="untrusted"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &text,
            r#"proxy_tls_handshakes_total{direction="inbound",result="ok"}"#
        ),
        2.0
    );
    proxy.stop().await;
}

/// A client without a certificate; returns its local address once the proxy has refused it
/// (closed the connection).
async fn refused_once(
    addr: std::net::SocketAddr,
    cc: std::sync::Arc<rustls::ClientConfig>,
    server: &proxy_lib::identity::Identity,
) -> std::net::SocketAddr {
    use tokio::io::AsyncReadExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let local = tcp.local_addr().unwrap();
    let name = rustls_pki_types::ServerName::try_from(server.to_string()).unwrap();
    // TLS 1.3: the client may finish its side before the server refuses; the refusal then
    // arrives as an alert or EOF on the first read.
    if let Ok(mut tls) = tokio_rustls::TlsConnector::from(cc)
        .connect(name, tcp)
        .await
    {
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), tls.read(&mut buf))
            .await
            .expect("the proxy closes a refused connection");
        assert!(!matches!(read, Ok(n) if n > 0), "a refused client got data");
    }
    local
}

#[tokio::test(flavor = "current_thread")]
async fn refused_handshakes_are_logged_at_info_with_peer_and_reason_and_a_flood_is_limited() {
    // current_thread: the proxy's tasks log on this thread, into the capture.
    let (logs, _guard) = proxy_lib::test_util::LogCapture::start(tracing::Level::INFO);
    init();
    let pki = TestPki::new(now());
    let server_id = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    let served = leaf(&pki, &server_id);
    write_data_dir(dir.path(), &served);
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(echo_app().await));
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let addr = proxy.inbound[0];
    let no_cert = client_config(&pki.anchors(), None);
    let refusals = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains("inbound handshake refused"))
            .map(str::to_string)
            .collect()
    };

    let peer = refused_once(addr, no_cert.clone(), &server_id).await;
    let lines = refusals(&logs.text());
    assert_eq!(lines.len(), 1, "{}", logs.text());
    for want in [
        " INFO ".to_string(),
        format!("peer={peer}"),
        "reason=peer sent no certificates".to_string(),
        "result=no_client_cert".to_string(),
        "suppressed=0".to_string(),
    ] {
        assert!(
            lines[0].contains(&want),
            "{want:?} missing from {}",
            lines[0]
        );
    }
    // Nothing of the certificates themselves.
    assert!(!logs.text().contains("BEGIN"));

    // A flood: at most a burst per second is logged...
    const FLOOD: usize = 60;
    for _ in 0..FLOOD {
        refused_once(addr, no_cert.clone(), &server_id).await;
    }
    // ...and once the window has passed (a sleep for the limiter's one-second window, not a
    // readiness wait) the next line counts every refusal left out.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    refused_once(addr, no_cert.clone(), &server_id).await;
    let lines = refusals(&logs.text());
    let suppressed: Vec<usize> = lines
        .iter()
        .map(|l| {
            let v = l.split("suppressed=").nth(1).expect("a suppressed field");
            v.split_whitespace().next().unwrap().parse().unwrap()
        })
        .collect();
    assert!(
        lines.len() < FLOOD,
        "{} lines for {FLOOD} refusals",
        lines.len()
    );
    assert!(*suppressed.last().unwrap() > 0, "{lines:#?}");
    assert_eq!(
        lines.len() + suppressed.iter().sum::<usize>(),
        FLOOD + 2,
        "every refusal is either logged or counted: {lines:#?}"
    );
    proxy.stop().await;
}
