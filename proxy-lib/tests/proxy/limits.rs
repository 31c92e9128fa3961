//! The connection limit, the handshake timeout, an unreachable app, and the `..data` watcher.

use std::time::Duration;

use proxy_lib::test_util::{TestPki, write_data_dir};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::support::*;

#[tokio::test]
async fn connection_limit_holds_new_connections_until_one_closes() {
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &me));
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    cfg.limits.max_connections = 2;
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let cc = client_config(&pki.anchors(), Some(&leaf(&pki, &id("web", "apps"))));

    let a = tls_connect(proxy.inbound[0], cc.clone(), &me)
        .await
        .unwrap();
    let b = tls_connect(proxy.inbound[0], cc.clone(), &me)
        .await
        .unwrap();
    // The third waits in the backlog: its handshake cannot complete while two are open.
    let (addr, cc3, me3) = (proxy.inbound[0], cc.clone(), me.clone());
    let third = tokio::spawn(async move { tls_connect(addr, cc3, &me3).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "a third connection was served over the limit"
    );
    drop(a);
    let c = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("the third connection is served once one closes")
        .unwrap()
        .unwrap();
    drop((b, c));
    proxy.stop().await;
}

#[tokio::test]
async fn silent_clients_hit_the_handshake_timeout() {
    init();
    let pki = TestPki::new(now());
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &id("db", "data")));
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    cfg.limits.handshake_timeout = Duration::from_millis(200);
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let mut tcp = TcpStream::connect(proxy.inbound[0]).await.unwrap();
    let mut buf = [0u8; 1];
    // The proxy closes the connection (EOF or reset) instead of holding it forever.
    let r = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("proxy closed the silent connection");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    wait_metric(
        proxy.admin,
        r#"proxy_tls_handshakes_total{direction="inbound",result="timeout"}"#,
        1.0,
    )
    .await;
    proxy.stop().await;
}

#[tokio::test]
async fn unreachable_app_closes_the_client_connection() {
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &me));
    // A port with nothing listening.
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(gone));
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let cc = client_config(&pki.anchors(), Some(&leaf(&pki, &id("web", "apps"))));
    let tls = tls_connect(proxy.inbound[0], cc, &me).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(10), round_trip(tls, b"hello"))
        .await
        .expect("connection closed promptly");
    assert!(back.map(|b| b.is_empty()).unwrap_or(true));
    proxy.stop().await;
}

#[tokio::test]
async fn watcher_reloads_when_data_link_changes() {
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    let first = leaf(&pki, &me);
    write_data_dir(dir.path(), &first);
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    cfg.watch_interval = Some(Duration::from_millis(50));
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    assert_eq!(
        proxy.reloader.current().unwrap().leaf.sha256,
        first.leaf.sha256
    );
    let second = leaf(&pki, &me);
    write_data_dir(dir.path(), &second);
    let mut updates = proxy.reloader.subscribe();
    tokio::time::timeout(
        Duration::from_secs(10),
        updates.wait_for(|c| {
            c.as_ref()
                .is_some_and(|c| c.leaf.sha256 == second.leaf.sha256)
        }),
    )
    .await
    .expect("watcher picked up the new version")
    .unwrap();
    proxy.stop().await;
}
