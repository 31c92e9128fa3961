//! What a Certify request carries, end to end up to signing: the protobuf message, the
//! requested identity (in and out of the trust domain) and the CSR.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use linkerd2_proxy_api::identity::CertifyRequest;
use prost::Message;
use proxy_lib::identity::{Identity, TrustDomain};

static TD: LazyLock<TrustDomain> =
    LazyLock::new(|| TrustDomain::new("cluster.local").expect("trust domain"));

fuzz_target!(|data: &[u8]| {
    let Ok(req) = CertifyRequest::decode(data) else {
        return;
    };
    let _ = Identity::parse(&req.identity);
    if let Ok(id) = Identity::parse_in_mesh(&req.identity, &TD, "linkerd") {
        let _ = issuer::csr::validate(&req.certificate_signing_request, &id);
    }
});
