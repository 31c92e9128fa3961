//! The issuer's CSR check on arbitrary DER: an error or a CSR whose key signed it, never a panic.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use proxy_lib::identity::Identity;

static ID: LazyLock<Identity> = LazyLock::new(|| {
    Identity::parse("db.ext.serviceaccount.identity.linkerd.cluster.local").expect("identity")
});

fuzz_target!(|data: &[u8]| {
    let _ = issuer::csr::validate(data, &ID);
});
