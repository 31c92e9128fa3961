//! End-to-end: the quickstart demo (issuer + rotator daemon + mtls-proxy as child processes)
//! rotates for real, and a long-lived connection through the proxy survives every rotation.

use std::time::Duration;

#[test]
fn quickstart_demo_rotates_without_dropping_the_long_lived_connection() {
    // Kept (and its path printed) if anything below fails: each process's log is in it.
    let dir = testkit::TestDir::new();
    let opts = testkit::demo::Options {
        rotations: 2,
        lifetime: Duration::from_secs(6),
        dir: Some(dir.path().to_path_buf()),
    };
    let mut narration = Vec::new();
    let summary = testkit::demo::run(&opts, &mut narration).unwrap_or_else(|e| {
        panic!(
            "demo failed: {e:#}\n{}",
            String::from_utf8_lossy(&narration)
        )
    });
    let text = String::from_utf8_lossy(&narration);

    // The initial cert and two rotations, each a different serial, each served by the proxy.
    assert_eq!(summary.served_serials.len(), 3, "{text}");
    let mut unique = summary.served_serials.clone();
    unique.dedup();
    assert_eq!(unique.len(), 3, "{text}");
    assert_eq!(summary.failed_handshakes, 0, "{text}");
    assert!(summary.long_lived_bytes > 0, "{text}");
    assert!(
        text.contains("OK: valid until"),
        "rotator status not OK:\n{text}"
    );

    // The bootstrap token never shows up in any process's output.
    let token = std::fs::read_to_string(dir.path().join("host/token")).unwrap();
    let token = token.trim();
    for f in [
        "issuer.out",
        "issuer.log",
        "host/rotator.out",
        "host/rotator.log",
        "host/mtls-proxy.out",
        "host/mtls-proxy.log",
    ] {
        let body = std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
        assert!(!body.contains(token), "token leaked into {f}");
    }
}
