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

/// A rotation announced by SIGHUP/`POST /reload` is loaded once: the watcher, seeing the
/// `..data` version it finds already loaded, does not load it a second time.
#[tokio::test]
async fn watcher_does_not_reload_a_version_already_loaded_by_a_signal() {
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &me));
    let mut cfg = config(dir.path());
    cfg.watch_interval = Some(Duration::from_millis(20));
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let reloads = |text: &str| metric(text, "proxy_reloads_total{result=\"ok\"}");
    let before = reloads(&metrics_text(proxy.admin).await);
    let second = leaf(&pki, &me);
    write_data_dir(dir.path(), &second);
    // What the rotator's hook does right after the swap. (A watcher tick may have beaten
    // it to the new version; either way nothing loads it again afterwards.)
    let loaded = proxy.reloader.reload().expect("reload of the new version");
    assert_eq!(loaded.leaf.sha256, second.leaf.sha256);
    let after_signal = reloads(&metrics_text(proxy.admin).await);
    assert!((before + 1.0..=before + 2.0).contains(&after_signal));
    // Several watcher ticks later: no further load of the same version.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(reloads(&metrics_text(proxy.admin).await), after_signal);
    // A version nobody announced is still picked up by the watcher.
    let third = leaf(&pki, &me);
    write_data_dir(dir.path(), &third);
    let mut updates = proxy.reloader.subscribe();
    tokio::time::timeout(
        Duration::from_secs(10),
        updates.wait_for(|c| {
            c.as_ref()
                .is_some_and(|c| c.leaf.sha256 == third.leaf.sha256)
        }),
    )
    .await
    .expect("watcher picked up the unannounced version")
    .unwrap();
    proxy.stop().await;
}

/// Shutdown: new connections are refused at once, an open connection keeps working during
/// the drain and `run` returns as soon as it closes (long before the drain timeout).
#[tokio::test]
async fn shutdown_refuses_new_connections_and_lets_open_ones_finish() {
    use tokio::io::AsyncWriteExt;
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &me));
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    cfg.limits.drain_timeout = Duration::from_secs(60);
    let (_, clock) = fake_clock();
    let mut proxy = start(&cfg, clock).await;
    let cc = client_config(&pki.anchors(), Some(&leaf(&pki, &id("web", "apps"))));
    let mut open = tls_connect(proxy.inbound[0], cc.clone(), &me)
        .await
        .unwrap();
    let mut buf = [0u8; 6];
    open.write_all(b"before").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"before");

    proxy.begin_stop();
    // The listener closes: new clients cannot get a handshake any more.
    let mut refused = false;
    for _ in 0..250 {
        if tls_connect(proxy.inbound[0], cc.clone(), &me)
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        refused,
        "new connections still accepted after shutdown began"
    );
    // The open connection is untouched by the shutdown...
    open.write_all(b"during").await.unwrap();
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"during");
    assert!(!proxy.is_finished(), "run returned with a connection open");
    // ...and once it closes, the drain ends without waiting for the timeout.
    assert_eq!(round_trip(open, b"last").await.unwrap(), b"last");
    tokio::time::timeout(Duration::from_secs(20), proxy.stop())
        .await
        .expect("the drain did not end when the last connection closed");
}

/// Shutdown: a connection still open when the drain timeout passes is cut, and `run` returns.
#[tokio::test]
async fn shutdown_cuts_connections_still_open_after_the_drain_timeout() {
    use tokio::io::AsyncWriteExt;
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &me));
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    cfg.limits.drain_timeout = Duration::from_millis(300);
    let (_, clock) = fake_clock();
    let mut proxy = start(&cfg, clock).await;
    let cc = client_config(&pki.anchors(), Some(&leaf(&pki, &id("web", "apps"))));
    let mut open = tls_connect(proxy.inbound[0], cc, &me).await.unwrap();
    open.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).await.unwrap();

    proxy.begin_stop();
    tokio::time::timeout(Duration::from_secs(20), proxy.stop())
        .await
        .expect("run did not return after the drain timeout");
    // The connection was closed by the proxy: the client reads the end (or an error).
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut rest))
        .await
        .expect("the open connection was not cut");
    assert!(end.is_err() || rest.is_empty(), "{end:?} {rest:?}");
}

/// With room for a single connection, every way a connection can end gives its slot back (a
/// leaked task or descriptor would keep the slot and the next client would never be served):
/// a peer reset mid-stream, a refused handshake, a slowloris trickling a ClientHello (cut by
/// the handshake deadline, which is total, not per read), an app that refuses connections,
/// and a connection left idle. A normal half-closing echo after each proves the slot is free.
#[tokio::test]
async fn every_way_a_connection_ends_gives_its_slot_back() {
    use tokio::io::AsyncWriteExt;
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &me));
    let app = echo_app().await;
    let gone = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    cfg.inbound.push(inbound_to(gone));
    cfg.limits.max_connections = 1;
    cfg.limits.handshake_timeout = Duration::from_millis(300);
    cfg.limits.idle_timeout = Duration::from_millis(400);
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let cc = client_config(&pki.anchors(), Some(&leaf(&pki, &id("web", "apps"))));
    let served = |what: &'static str| {
        let (addr, cc, me) = (proxy.inbound[0], cc.clone(), me.clone());
        async move {
            let r = tokio::time::timeout(
                Duration::from_secs(10),
                echo_through_tls(addr, cc, &me, b"still served"),
            )
            .await;
            assert!(
                matches!(r, Ok(Ok(_))),
                "after {what}: the slot was not given back ({r:?})"
            );
        }
    };
    served("nothing").await;

    // Peer reset in the middle of a stream.
    let mut tls = tls_connect_within(proxy.inbound[0], cc.clone(), &me).await;
    let mut buf = [0u8; 4];
    tls.write_all(b"half").await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut buf))
        .await
        .expect("echo within 10 s")
        .unwrap();
    let (tcp, _) = tls.into_inner();
    tcp.set_zero_linger().unwrap();
    drop(tcp);
    served("a peer reset").await;

    // A handshake refused (no client certificate).
    let no_cert = client_config(&pki.anchors(), None);
    assert!(
        echo_through_tls(proxy.inbound[0], no_cert, &me, b"x")
            .await
            .is_err()
    );
    served("a refused handshake").await;

    // Slowloris: a TLS record header announcing 512 bytes, then one byte every 50 ms.
    let mut slow = TcpStream::connect(proxy.inbound[0]).await.unwrap();
    slow.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .unwrap();
    let trickle = async {
        for _ in 0..200 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if slow.write_all(&[0]).await.is_err() {
                return true; // the proxy closed it
            }
        }
        false
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(10), trickle)
            .await
            .unwrap_or(false),
        "a trickling handshake was not cut"
    );
    wait_metric(
        proxy.admin,
        r#"proxy_tls_handshakes_total{direction="inbound",result="timeout"}"#,
        1.0,
    )
    .await;
    served("a slowloris").await;

    // The app refuses the connection.
    let tls = tls_connect_within(proxy.inbound[1], cc.clone(), &me).await;
    let back = tokio::time::timeout(Duration::from_secs(10), round_trip(tls, b"nobody"))
        .await
        .expect("closed when the app refused");
    assert!(back.map(|b| b.is_empty()).unwrap_or(true));
    served("an app that refuses connections").await;

    // Idle after the handshake: closed by the idle timeout.
    let mut idle = tls_connect_within(proxy.inbound[0], cc.clone(), &me).await;
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), idle.read_to_end(&mut rest))
        .await
        .expect("the idle connection was not closed");
    assert!(end.is_err() || rest.is_empty(), "{end:?}");
    served("an idle connection").await;

    wait_metric(
        proxy.admin,
        r#"proxy_open_connections{direction="inbound"}"#,
        0.0,
    )
    .await;
    proxy.stop().await;
}

/// The connection limit is shared by all listeners, and a listener with no clients must not
/// sit on a free slot while another listener's clients wait: with room for one connection and
/// two listeners, each listener serves in turn.
#[tokio::test]
async fn a_shared_connection_limit_does_not_starve_a_listener() {
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &me));
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    cfg.inbound.push(inbound_to(app));
    cfg.limits.max_connections = 1;
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let cc = client_config(&pki.anchors(), Some(&leaf(&pki, &id("web", "apps"))));
    for (round, listener) in [0, 1, 0, 1, 1, 0].into_iter().enumerate() {
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            echo_through_tls(proxy.inbound[listener], cc.clone(), &me, b"turn"),
        )
        .await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "round {round}: listener {listener} not served ({r:?})"
        );
    }
    proxy.stop().await;
}

/// A plain cert dir (no `..data`) updated file by file: the watcher sees the new `tls.crt`
/// first, with the old key beside it, and refuses that pair; when the new `tls.key` lands a
/// moment later the watcher must notice that change too and load the now consistent set.
#[tokio::test]
async fn watcher_reloads_a_plain_dir_when_the_key_lands_after_the_cert() {
    use proxy_lib::certdir::{CA_FILE, CERT_FILE, KEY_FILE};
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    let first = leaf(&pki, &me);
    let (cert, key, ca) = pem_of(&first);
    std::fs::write(dir.path().join(CERT_FILE), cert).unwrap();
    std::fs::write(dir.path().join(KEY_FILE), key).unwrap();
    std::fs::write(dir.path().join(CA_FILE), ca).unwrap();
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
    let (cert, key, _) = pem_of(&second);
    std::fs::write(dir.path().join(CERT_FILE), cert).unwrap();
    // The half-updated set (new cert, old key) is tried and refused.
    wait_metric(proxy.admin, r#"proxy_reloads_total{result="error"}"#, 1.0).await;
    std::fs::write(dir.path().join(KEY_FILE), key).unwrap();
    let mut updates = proxy.reloader.subscribe();
    tokio::time::timeout(
        Duration::from_secs(10),
        updates.wait_for(|c| {
            c.as_ref()
                .is_some_and(|c| c.leaf.sha256 == second.leaf.sha256)
        }),
    )
    .await
    .expect("the watcher never loaded the set once its key landed")
    .unwrap();
    proxy.stop().await;
}

/// A TCP connection to `to` from a second loopback address, the attacker's.
async fn from_attacker(to: std::net::SocketAddr) -> std::io::Result<TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind("127.0.0.2:0".parse().unwrap())?;
    s.connect(to).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_from_one_source_do_not_stop_clients_from_another() {
    const ATTACK_SOCKETS: usize = 2000;
    const SERVING_FOR: Duration = Duration::from_secs(30);
    // Both ends of every attacker socket live in this process.
    proxy_lib::net::raise_open_file_limit(3 * ATTACK_SOCKETS as u64);
    init();
    let pki = TestPki::new(now());
    let me = id("db", "data");
    let dir = tempfile::tempdir().unwrap();
    write_data_dir(dir.path(), &leaf(&pki, &me));
    let app = echo_app().await;
    let mut cfg = config(dir.path());
    cfg.inbound.push(inbound_to(app));
    // Fewer slots than attacker sockets: without the per-source cap, the attacker alone
    // would hold every slot.
    cfg.limits.max_connections = ATTACK_SOCKETS / 2;
    // Sockets that are let in hold their slot for the whole test.
    cfg.limits.handshake_timeout = SERVING_FOR * 2;
    let (_, clock) = fake_clock();
    let proxy = start(&cfg, clock).await;
    let cc = client_config(&pki.anchors(), Some(&leaf(&pki, &id("web", "apps"))));

    // Sockets that never send a byte: the proxy holds a few per source, closes the rest.
    let mut idle = Vec::new();
    for _ in 0..ATTACK_SOCKETS {
        if let Ok(s) = from_attacker(proxy.inbound[0]).await {
            idle.push(s);
        }
    }
    // A client on 127.0.0.1 connects once a second over a fresh connection; successes are
    // counted, not timed (each attempt gets a generous bound so the test cannot hang).
    let (mut ok, mut failed) = (0, Vec::new());
    let end = tokio::time::Instant::now() + SERVING_FOR;
    while tokio::time::Instant::now() < end {
        let attempt = echo_through_tls(proxy.inbound[0], cc.clone(), &me, b"ping");
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(_)) => ok += 1,
            Ok(Err(e)) => failed.push(e),
            Err(_) => failed.push("no echo within 10 s".into()),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!(failed.is_empty(), "{ok} served, failed: {failed:?}");
    assert!(ok >= 10, "only {ok} connections served in {SERVING_FOR:?}");
    let text = metrics_text(proxy.admin).await;
    let refused = metric(
        &text,
        r#"proxy_tls_handshakes_total{direction="inbound",result="source_pending"}"#,
    );
    assert!(
        refused >= ATTACK_SOCKETS.saturating_sub(cfg.limits.max_pending_per_source) as f64,
        "only {refused} of the attacker's sockets were refused"
    );
    drop(idle);
    proxy.stop().await;
}
