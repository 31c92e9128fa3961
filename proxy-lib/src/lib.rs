//! The mesh-TLS floor that issuer, rotator and mtls-proxy stand on, and the proxy itself.
//!
//! Layout:
//! - [`clock`]: the injectable wall clock.
//! - [`identity`]: Linkerd identity names and SPIFFE IDs.
//! - [`pem`]: PEM/DER loading of certificates.
//! - [`key`]: private keys in PKCS#8, SEC1 or PKCS#1, PEM or DER, held as PKCS#8.
//! - [`cert`]: facts read from a certificate (names, validity, fingerprint).
//! - [`verify`]: path validation against trust anchors.
//! - [`validity`]: validity windows and the one rule for granting one.
//! - [`tls`]: the one TLS policy; every rustls config and verified connection comes from it.
//! - [`bundle`]: a cert chain + key + anchors checked as one unit.
//! - [`certdir`]: the cert-dir layout (`..data` → version dir), its reader and its crash-safe
//!   writer.
//! - [`fs`]: atomic, mode-correct file writes.
//! - [`net`]: the accept step every listener shares, and rate-limited logging of noisy events.
//! - [`process`]: pidfiles and the programs live pids run.
//! - [`human`]: durations and counts in messages.
//! - [`account`]: users and groups by name or id, for handing files to a service's user.
//! - `admin` (feature `admin`): the admin HTTP endpoints every binary serves.
//! - `cli`, `config_file` (feature `cli`): the command-line convention of the three binaries
//!   (exit codes, `--log-format`, JSON on stderr) and config files whose errors name the key.
//! - `proxy` (feature `proxy`): the reloadable mTLS proxy behind the `mtls-proxy` binary, and
//!   the embedding API (`proxy::Reloader`) for services that want rustls configs that follow
//!   certificate reloads.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod account;
#[cfg(feature = "admin")]
pub mod admin;
pub mod bundle;
pub mod cert;
pub mod certdir;
#[cfg(feature = "cli")]
pub mod cli;
pub mod clock;
#[cfg(feature = "cli")]
pub mod config_file;
pub mod fs;
pub mod human;
pub mod identity;
pub mod key;
pub mod net;
pub mod pem;
pub mod process;
#[cfg(feature = "proxy")]
pub mod proxy;
#[cfg(any(test, feature = "test-util"))]
pub mod test_keys;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod tls;
pub mod trust_bundle;
pub mod validity;
pub mod verify;

/// Installs the workspace's one rustls crypto provider (ring) as the process default.
///
/// Every `main` calls this first; calling it again is harmless.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The crypto provider used everywhere (ring), for building rustls configs explicitly.
pub fn crypto_provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
