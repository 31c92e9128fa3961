//! Issuer: signs short-lived workload certificates over the Linkerd identity API.
//!
//! Layout:
//! - [`error`]: the error type and its mapping to gRPC status codes.
//! - [`csr`]: CSR validation (pure).
//! - [`policy`]: identities and validity windows (pure).
//! - [`ca`]: loading and validating the issuer CA.
//! - [`signer`]: building leaves from policy.
//! - [`bundle`]: the trust bundle served to hosts, and the offline `ca sign-bundle`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod audit;
pub mod auth;
pub mod bundle;
pub mod ca;
pub mod cli;
pub mod config;
pub mod csr;
pub mod error;
pub mod front;
pub mod init;
pub mod kubernetes;
pub mod metrics;
pub mod policy;
pub mod reload;
pub mod renewal;
pub mod server;
pub mod service;
pub mod signer;
pub mod throttle;
pub mod tokens;

pub use error::{Error, RequestError, Result};
