//! Rotator: keeps a short-lived mesh identity on disk and rotates it atomically.
//!
//! Layout:
//! - [`cli`]: the command line and the entry point of the `rotator` binary.
//! - [`config`]: `rotator.toml` + environment, validated into [`config::Config`].
//! - [`schedule`]: the pure renewal rule, backoff and cron schedules.
//! - [`store`]: the `..data` cert dir and its crash-safe swap.
//! - [`keygen`]: fresh P-256 keys and DER CSRs.
//! - [`client`]: the [`client::Issue`] trait and the gRPC client for the issuer.
//! - [`validate`]: checks an answer before anything touches disk.
//! - [`trust`]: what the host trusts (bootstrap anchors, then the signed bundle it installed)
//!   and whether it takes the bundle the issuer offers.
//! - [`reload`]: signal / HTTP / exec hooks; [`verify`]: the served-cert check.
//! - [`renew`]: one renewal cycle shared by `run` and `rotate`; [`daemon`]: the daemon, a
//!   sans-IO state machine ([`daemon::machine`]) and the small IO loop that drives it.
//! - [`status`], [`state`], [`metrics`], [`notify`], [`signals`], [`bootstrap`]; [`timing`]: where
//!   the time of the last rotation went (`/status` shows it).
//!
//! In-process use (what `rotator rotate` does):
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! let config = rotator::config::load(Some("rotator.toml".as_ref()), &rotator::config::ProcessEnv)?;
//! let issuer = rotator::cli::issuer_for(&config);
//! let hooks = rotator::reload::Hooks::new(config.reload.clone(), config.dir.clone());
//! let clock = Arc::new(proxy_lib::clock::SystemClock);
//! let mut r = rotator::renew::Rotator::new(config, clock, issuer, hooks, rotator::metrics::Metrics::new());
//! println!("{:?}", r.cycle(false).await?);
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bootstrap;
pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod keygen;
pub mod metrics;
pub mod notify;
pub mod reload;
pub mod renew;
pub mod schedule;
pub mod signals;
pub mod state;
pub mod status;
pub mod store;
pub mod timing;
pub mod trust;
pub mod validate;
pub mod verify;

#[cfg(test)]
mod testing;

pub use config::Config;
pub use renew::{Outcome, Rotator};
