//! The example configs in `examples/` are what the binaries accept: parse and validate each
//! with the same code the binaries use, so the examples cannot rot.

use std::path::{Path, PathBuf};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

#[test]
fn issuer_example_config_is_valid() {
    let config = issuer::config::Config::load(&example("issuer.toml"), &Default::default())
        .unwrap_or_else(|e| panic!("examples/issuer.toml: {e}"));
    assert_eq!(
        config.policy.lifetime,
        std::time::Duration::from_secs(24 * 3600)
    );
}

#[test]
fn rotator_example_config_is_valid() {
    let env = rotator::config::MapEnv::from_pairs([]);
    let config = rotator::config::load(Some(&example("rotator.toml")), &env)
        .unwrap_or_else(|e| panic!("examples/rotator.toml: {e}"));
    assert_eq!(
        config.identity.as_str(),
        "legacy-database.external-services.serviceaccount.identity.linkerd.cluster.local"
    );
}

#[test]
fn mtls_proxy_example_config_is_valid() {
    let raw = proxy_lib::proxy::RawConfig::read(&example("mtls-proxy.toml"))
        .unwrap_or_else(|e| panic!("examples/mtls-proxy.toml: {e}"));
    let config = proxy_lib::proxy::Config::try_from(raw)
        .unwrap_or_else(|e| panic!("examples/mtls-proxy.toml: {e}"));
    assert_eq!(config.inbound.len(), 1);
    assert_eq!(config.outbound.len(), 1);
}
