//! Acceptance 2: plaintext → outbound → mTLS → inbound → app round trip, and an outbound
//! target whose certificate carries another identity is refused.

use proxy_lib::test_util::{TestPki, write_data_dir};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn outbound_to_inbound_round_trip_and_wrong_identity_is_refused() {
    init();
    let pki = TestPki::new(now());
    let db = id("db", "data");
    let web = id("web", "apps");

    // Server side: inbound for `db`, only `web` may connect.
    let db_dir = tempfile::tempdir().unwrap();
    write_data_dir(db_dir.path(), &leaf(&pki, &db));
    let app = echo_app().await;
    let mut db_cfg = config(db_dir.path());
    db_cfg.inbound.push(inbound_to(app));
    db_cfg.allow_client = vec![web.to_string()];
    let (_, clock) = fake_clock();
    let server = start(&db_cfg, clock.clone()).await;

    // Client side: outbound as `web`, once expecting `db` (right) and once `cache` (wrong).
    let web_dir = tempfile::tempdir().unwrap();
    write_data_dir(web_dir.path(), &leaf(&pki, &web));
    let mut web_cfg = config(web_dir.path());
    web_cfg.outbound.push(outbound_to(server.inbound[0], &db));
    web_cfg
        .outbound
        .push(outbound_to(server.inbound[0], &id("cache", "data")));
    let client = start(&web_cfg, clock).await;

    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let tcp = TcpStream::connect(client.outbound[0]).await.unwrap();
    let back = round_trip(tcp, &data).await.unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "payload changed in transit");

    // Wrong identity: the outbound side refuses the server, the local client gets nothing.
    let tcp = TcpStream::connect(client.outbound[1]).await.unwrap();
    let back = round_trip(tcp, b"secret").await.unwrap_or_default();
    assert!(
        back.is_empty(),
        "data went to a server with the wrong identity"
    );

    let text = wait_metric(
        client.admin,
        r#"proxy_tls_handshakes_total{direction="outbound",result="wrong_identity"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &text,
            r#"proxy_tls_handshakes_total{direction="outbound",result="ok"}"#
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, r#"proxy_bytes_total{direction="outbound"}"#),
        2.0 * data.len() as f64
    );
    let stext = metrics_text(server.admin).await;
    assert_eq!(
        metric(
            &stext,
            r#"proxy_tls_handshakes_total{direction="inbound",result="ok"}"#
        ),
        1.0,
        "{stext}"
    );
    client.stop().await;
    server.stop().await;
}

/// The outbound side resumes TLS 1.3 sessions with a target; a resumed session is not
/// verified again by rustls, so the proxy re-checks the target's chain by its own clock: once
/// the target's cert has expired (by the outbound proxy's clock) a resumption is refused and
/// counted `untrusted`, and no byte goes out.
#[tokio::test]
async fn outbound_refuses_a_resumed_session_once_the_target_cert_expired_by_its_clock() {
    init();
    let pki = TestPki::new(now());
    let db = id("db", "data");
    let web = id("web", "apps");
    let n = now();

    let db_dir = tempfile::tempdir().unwrap();
    write_data_dir(db_dir.path(), &pki.leaf(&db, n - HOUR, n + HOUR));
    let app = echo_app().await;
    let mut db_cfg = config(db_dir.path());
    db_cfg.inbound.push(inbound_to(app));
    let (_, server_clock) = fake_clock();
    let server = start(&db_cfg, server_clock).await;

    let web_dir = tempfile::tempdir().unwrap();
    write_data_dir(web_dir.path(), &pki.leaf(&web, n - HOUR, n + 24 * HOUR));
    let mut web_cfg = config(web_dir.path());
    web_cfg.outbound.push(outbound_to(server.inbound[0], &db));
    let (fake, client_clock) = fake_clock();
    let client = start(&web_cfg, client_clock).await;

    for (i, msg) in [&b"first"[..], b"second"].into_iter().enumerate() {
        let tcp = TcpStream::connect(client.outbound[0]).await.unwrap();
        assert_eq!(round_trip(tcp, msg).await.unwrap(), msg, "connection {i}");
    }
    // The second connection was a resumption (the server counts two handshakes either way).
    wait_metric(
        server.admin,
        r#"proxy_tls_handshakes_total{direction="inbound",result="ok"}"#,
        2.0,
    )
    .await;

    fake.advance(2 * HOUR);
    let tcp = TcpStream::connect(client.outbound[0]).await.unwrap();
    let back = round_trip(tcp, b"late").await.unwrap_or_default();
    assert!(back.is_empty(), "resumed with a target whose cert expired");
    let text = wait_metric(
        client.admin,
        r#"proxy_tls_handshakes_total{direction="outbound",result="untrusted"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &text,
            r#"proxy_tls_handshakes_total{direction="outbound",result="ok"}"#
        ),
        2.0
    );
    client.stop().await;
    server.stop().await;
}

/// A target whose certificate chains to the anchors but carries only a wildcard DNS SAN
/// (`*.data.serviceaccount…`), which webpki's hostname matching would accept for
/// `db.data.serviceaccount…`: an identity is an exact name, so the outbound side refuses it
/// as `wrong_identity` and no byte goes out.
#[tokio::test]
async fn outbound_refuses_a_target_whose_cert_carries_the_identity_only_as_a_wildcard() {
    use rcgen::{
        CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    init();
    let pki = TestPki::new(now());
    let db = id("db", "data");
    let web = id("web", "apps");
    let wildcard = db.to_string().replacen("db.", "*.", 1);
    assert!(wildcard.starts_with("*.data.serviceaccount."));
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![wildcard]).unwrap();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.use_authority_key_identifier_extension = true;
    let n = now();
    p.not_before = (n - HOUR).into();
    p.not_after = (n + HOUR).into();
    let issuer = Issuer::from_ca_cert_der(&pki.issuer, &pki.issuer_key).unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    let bundle = proxy_lib::bundle::CertBundle::from_parts(
        vec![cert.der().clone(), pki.issuer.clone()],
        proxy_lib::pem::PrivateKey::from_pkcs8_der(key.serialize_der()),
        pki.anchors(),
    )
    .unwrap();

    let db_dir = tempfile::tempdir().unwrap();
    write_data_dir(db_dir.path(), &bundle);
    let app = echo_app().await;
    let mut db_cfg = config(db_dir.path());
    db_cfg.inbound.push(inbound_to(app));
    let (_, clock) = fake_clock();
    let server = start(&db_cfg, clock.clone()).await;
    assert!(
        server.reloader.is_ready(),
        "the wildcard cert itself is servable"
    );

    let web_dir = tempfile::tempdir().unwrap();
    write_data_dir(web_dir.path(), &leaf(&pki, &web));
    let mut web_cfg = config(web_dir.path());
    web_cfg.outbound.push(outbound_to(server.inbound[0], &db));
    let client = start(&web_cfg, clock).await;

    let tcp = TcpStream::connect(client.outbound[0]).await.unwrap();
    let back = round_trip(tcp, b"secret").await.unwrap_or_default();
    assert!(back.is_empty(), "data went to a wildcard-named server");
    let text = wait_metric(
        client.admin,
        r#"proxy_tls_handshakes_total{direction="outbound",result="wrong_identity"}"#,
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &text,
            r#"proxy_tls_handshakes_total{direction="outbound",result="ok"}"#
        ),
        0.0
    );
    client.stop().await;
    server.stop().await;
}
