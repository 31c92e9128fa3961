//! Crash safety against real process death: a child swapping cert sets in a loop is
//! SIGKILLed at ~20 seeded random moments; after each kill a reader must see one complete,
//! matching set, and a final swap must clean up whatever the kills left behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use proxy_lib::bundle::CertBundle;
use proxy_lib::certdir::leftovers;
use proxy_lib::clock::{Clock, SystemClock};
use rand::{Rng, SeedableRng};

fn swap_loop() -> PathBuf {
    let bin = proxy_lib::test_util::profile_dir()
        .join("examples")
        .join("swap_loop");
    if !bin.exists() {
        // `cargo test` builds examples, `cargo test --test kill_swap` does not.
        let status = proxy_lib::test_util::cargo_build()
            .args(["--quiet", "-p", "rotator", "--example", "swap_loop"])
            .status()
            .unwrap();
        assert!(status.success(), "building the swap_loop example failed");
    }
    assert!(bin.exists(), "{} missing", bin.display());
    bin
}

fn assert_complete_set(dir: &Path, what: &str) {
    let (b, from) = CertBundle::load_dir(dir).unwrap_or_else(|e| panic!("{what}: {e}"));
    b.check(SystemClock.now())
        .unwrap_or_else(|e| panic!("{what}: set in {} is not sound: {e}", from.display()));
}

#[test]
fn sigkill_mid_swap_leaves_a_complete_set_and_the_next_swap_cleans_up() {
    proxy_lib::install_crypto_provider();
    let bin = swap_loop();
    let d = tempfile::tempdir().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_2026);
    let mut messy = 0;
    for i in 0..20 {
        let mut child = Command::new(&bin)
            .arg(d.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "kill {i}: the child did not start");
        std::thread::sleep(Duration::from_micros(rng.random_range(0..20_000)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        assert_complete_set(d.path(), &format!("after kill {i}"));
        if !leftovers(d.path()).is_empty() || rotator::store::version_dirs(d.path()).len() > 2 {
            messy += 1;
        }
    }
    // One clean swap tidies up everything the kills left.
    let out = Command::new(&bin).arg(d.path()).arg("1").output().unwrap();
    assert!(out.status.success());
    assert_complete_set(d.path(), "after the clean swap");
    assert!(leftovers(d.path()).is_empty(), "{:?}", leftovers(d.path()));
    let versions = rotator::store::version_dirs(d.path());
    assert!(versions.len() <= 2, "{versions:?}");
    eprintln!("{messy} of 20 kills left leftovers behind that the next swap removed");
}
