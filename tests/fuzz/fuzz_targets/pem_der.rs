//! PEM and DER loading of certificates, keys and anchor bundles on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proxy_lib::pem::certs_from_bytes(data, "fuzz");
    let _ = proxy_lib::key::PrivateKey::from_bytes(data, "fuzz");
    let _ = proxy_lib::cert::CertInfo::from_der(data);
    let _ = proxy_lib::verify::TrustAnchors::from_bytes(data, "fuzz");
});
