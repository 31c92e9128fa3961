//! Acceptance 5: `/ready` is false before a valid certificate is loaded and true after (and
//! false again once it expires by the proxy's clock); `/metrics` matches the traffic sent.

use proxy_lib::test_util::{TestPki, write_data_dir};
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn ready_follows_the_certificate_and_metrics_match_the_traffic() {
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap(); // empty: the rotator has not run yet
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    let (fake, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;

    assert_eq!(http(proxy.admin, "GET", "/live").await.0, 200);
    assert_eq!(http(proxy.admin, "GET", "/ready").await.0, 503);
    // Connections are refused (no certificate to serve) and counted.
    let cc = client_config(&pki.anchors(), Some(&leaf(&pki, &id("web", "apps"))));
    assert!(
        echo_through_tls(proxy.inbound[0], cc.clone(), &me, b"x")
            .await
            .is_err()
    );
    wait_metric(
        proxy.admin,
        r#"proxy_tls_handshakes_total{direction="inbound",result="no_credentials"}"#,
        1.0,
    )
    .await;
    let (status, body) = http(proxy.admin, "POST", "/reload").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(http(proxy.admin, "GET", "/ready").await.0, 503);

    let n = now();
    let cert = pki.leaf(&me, n - HOUR, n + 2 * HOUR);
    write_data_dir(dir.path(), &cert);
    let (status, body) = http(proxy.admin, "POST", "/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&cert.leaf.sha256), "{body}");
    assert_eq!(http(proxy.admin, "GET", "/ready").await.0, 200);

    // Traffic: 5 connections with different sizes, plus one plain TCP probe that never
    // handshakes (counted as an error, no bytes).
    let sizes = [1usize, 1000, 65_536, 100_000, 250_001];
    for (i, size) in sizes.iter().enumerate() {
        let data: Vec<u8> = (0..*size).map(|j| (i + j) as u8).collect();
        echo_through_tls(proxy.inbound[0], cc.clone(), &me, &data)
            .await
            .unwrap();
    }
    drop(TcpStream::connect(proxy.inbound[0]).await.unwrap());
    let text = wait_metric(
        proxy.admin,
        r#"proxy_tls_handshakes_total{direction="inbound",result="error"}"#,
        1.0,
    )
    .await;
    let text = if metric(&text, r#"proxy_open_connections{direction="inbound"}"#) != 0.0 {
        wait_metric(
            proxy.admin,
            r#"proxy_open_connections{direction="inbound"}"#,
            0.0,
        )
        .await
    } else {
        text
    };
    let sent: usize = sizes.iter().sum();
    let expect = [
        (
            r#"proxy_tls_handshakes_total{direction="inbound",result="ok"}"#,
            sizes.len() as f64,
        ),
        (
            r#"proxy_bytes_total{direction="inbound"}"#,
            2.0 * sent as f64, // each byte forwarded to the app and echoed back
        ),
        (r#"proxy_open_connections{direction="inbound"}"#, 0.0),
        (r#"proxy_reloads_total{result="ok"}"#, 1.0),
        (r#"proxy_reloads_total{result="error"}"#, 2.0), // at start and the first POST
        (
            "proxy_cert_expiration_timestamp_seconds",
            proxy_lib::clock::unix_secs(cert.leaf.not_after) as f64,
        ),
    ];
    for (sample, want) in expect {
        assert_eq!(metric(&text, sample), want, "{sample} in\n{text}");
    }
    assert!(
        text.contains("# TYPE proxy_tls_handshakes counter"),
        "{text}"
    );

    // The proxy's clock passes notAfter: not ready any more.
    fake.advance(3 * HOUR);
    assert_eq!(http(proxy.admin, "GET", "/ready").await.0, 503);
    proxy.stop().await;
}

#[tokio::test]
async fn open_connections_gauge_counts_live_connections() {
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &me));
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let cc = client_config(&pki.anchors(), Some(&leaf(&pki, &id("web", "apps"))));
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(
            tls_connect(proxy.inbound[0], cc.clone(), &me)
                .await
                .unwrap(),
        );
    }
    wait_metric(
        proxy.admin,
        r#"proxy_open_connections{direction="inbound"}"#,
        3.0,
    )
    .await;
    drop(conns);
    wait_metric(
        proxy.admin,
        r#"proxy_open_connections{direction="inbound"}"#,
        0.0,
    )
    .await;
    proxy.stop().await;
}
