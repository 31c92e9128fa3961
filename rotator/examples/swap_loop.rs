//! Test helper for the crash-safety test (`tests/kill_swap.rs`): swaps freshly made cert
//! sets into DIR through the real store, over and over, so the test can SIGKILL it at a
//! random moment mid-swap. Not part of the shipped binary.
//!
//! Usage: `swap_loop DIR [COUNT]` (COUNT 0 or absent: forever). Prints `ready` after the
//! first complete swap.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use proxy_lib::clock::{Clock, SystemClock};
use proxy_lib::identity::Identity;
use proxy_lib::test_util::TestPki;
use rotator::store::{NewSet, RealFs, Store};

fn main() {
    proxy_lib::install_crypto_provider();
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: swap_loop DIR [COUNT]"));
    let count: u64 = args
        .next()
        .map_or(0, |c| c.parse().expect("COUNT is a number"));
    let now = SystemClock.now();
    let pki = TestPki::new(now);
    let id = Identity::parse("db.ext.serviceaccount.identity.linkerd.cluster.local").unwrap();
    let bundles: Vec<_> = (0..4)
        .map(|_| {
            pki.leaf(
                &id,
                now - Duration::from_secs(60),
                now + Duration::from_secs(86_400),
            )
        })
        .collect();
    let store = Store::new(&dir, None);
    let mut n = 0u64;
    loop {
        let b = &bundles[(n % 4) as usize];
        let _lock = store.lock().expect("lock");
        store
            .swap(
                &RealFs,
                &NewSet {
                    chain: &b.chain,
                    key: &b.key,
                    anchors: b.anchors.certs(),
                    anchors_sig: None,
                },
                SystemClock.now(),
            )
            .expect("swap");
        n += 1;
        if n == 1 {
            println!("ready");
            std::io::stdout().flush().unwrap();
        }
        if count != 0 && n >= count {
            break;
        }
    }
}
