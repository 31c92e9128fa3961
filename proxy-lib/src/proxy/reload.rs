//! Reloadable credentials: the certificate snapshot read from the rotator's dir, checked, turned
//! into rustls server and client configs and published atomically.
//!
//! Each new connection takes the configs current at that instant ([`Reloader::current`] is a
//! lock-free load); open connections keep the config they started with. A snapshot that fails to
//! load or check is refused and the previous one keeps being served.
//!
//! This is also the embedding API: another Rust service builds a [`Reloader`] over the same
//! directory and either asks for the current configs per connection or subscribes to changes.
//!
//! ```no_run
//! use std::sync::Arc;
//! use proxy_lib::clock::SystemClock;
//! use proxy_lib::proxy::reload::{Reloader, Source};
//! use proxy_lib::proxy::tls::AllowList;
//!
//! # async fn serve() -> Result<(), Box<dyn std::error::Error>> {
//! proxy_lib::install_crypto_provider();
//! let source = Source::new("/var/lib/mtls/certs", None);
//! let reloader = Arc::new(Reloader::load(source, AllowList::default(), Arc::new(SystemClock))?);
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8443").await?;
//! loop {
//!     let (tcp, _) = listener.accept().await?;
//!     // The server config current now; after `reloader.reload()` (e.g. on SIGHUP) new
//!     // connections get the new certificate, this one keeps the old.
//!     let creds = reloader.current().expect("loaded above");
//!     // A verified connection: a resumed session's client chain is verified again at the
//!     // clock's now inside `accept`.
//!     let tls = creds.acceptor.accept(tcp).await?;
//!     // ... serve `tls.stream`
//!     # drop(tls);
//! }
//! # }
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;

use crate::bundle::{BundleError, CertBundle};
use crate::cert::CertInfo;
use crate::clock::{SharedClock, unix_secs};
use crate::proxy::metrics::{Metrics, ReloadResult};
use crate::tls::{self, Acceptor, AllowList, Connector, TlsError};
use crate::verify::{TrustAnchors, VerifyError};

/// Where a snapshot is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The cert dir (the rotator's layout: `..data` → version dir with `tls.crt`, `tls.key`,
    /// `ca.crt`; a plain dir with those files works too).
    pub certs_dir: PathBuf,
    /// The trust anchors used to verify peers. `None`: the snapshot's own `ca.crt`, so anchors
    /// rotate with the certificates. `Some(file)`: that file, re-read at every reload.
    pub trust_anchors: Option<PathBuf>,
}

impl Source {
    /// A source over `certs_dir`, with an optional separate anchors file.
    pub fn new(certs_dir: impl Into<PathBuf>, trust_anchors: Option<PathBuf>) -> Self {
        Self {
            certs_dir: certs_dir.into(),
            trust_anchors,
        }
    }
}

/// Why a reload was refused (the previous credentials, if any, stay in use).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The certificate set could not be read or parsed.
    #[error("cannot load the certificate set from {dir}: {source}")]
    Load {
        /// The cert dir.
        dir: PathBuf,
        /// What failed.
        #[source]
        source: BundleError,
    },
    /// The separate trust anchors file could not be read or parsed.
    #[error("cannot load the trust anchors from {path}: {source}")]
    Anchors {
        /// The anchors file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: VerifyError,
    },
    /// The set was read but is not fit to serve (key ≠ cert, expired, not chaining).
    #[error("refusing the certificate set from {dir}: {source}")]
    Refused {
        /// The version dir it was read from.
        dir: PathBuf,
        /// What the check said.
        #[source]
        source: BundleError,
    },
    /// rustls could not be configured with the set.
    #[error("cannot build TLS configs from {dir}: {source}")]
    Tls {
        /// The version dir it was read from.
        dir: PathBuf,
        /// What failed.
        #[source]
        source: TlsError,
    },
}

/// One published snapshot: the configs built from it and facts about the leaf.
#[derive(Debug)]
pub struct Credentials {
    /// Inbound: serves our chain, requires client certs chaining to the anchors (and on the
    /// allow-list); a resumed session is verified again at the clock's now.
    pub acceptor: Acceptor,
    /// [`Credentials::acceptor`] also answering ALPN `transport.l5d.io/v1`, for Linkerd
    /// clients that offer it (opaque transport, see [`crate::proxy::linkerd`]).
    pub transport_acceptor: Acceptor,
    /// Outbound: presents our chain, verifies servers against the anchors and the exact
    /// identity; a resumed session is verified again at the clock's now.
    pub connector: Connector,
    /// The inbound rules as a bare rustls config, for other TLS stacks; session resumption is
    /// off (prefer [`Credentials::acceptor`]).
    pub server: Arc<ServerConfig>,
    /// The outbound rules as a bare rustls config; session resumption is off (prefer
    /// [`Credentials::connector`]).
    pub client: Arc<ClientConfig>,
    /// The served leaf (its `sha256` is the fingerprint `POST /reload` reports).
    pub leaf: CertInfo,
    /// The version dir the snapshot was read from.
    pub version_dir: PathBuf,
}

/// Holds the current [`Credentials`] and replaces them on [`Reloader::reload`].
pub struct Reloader {
    source: Source,
    allow: AllowList,
    clock: SharedClock,
    metrics: Metrics,
    current: ArcSwapOption<Credentials>,
    tx: watch::Sender<Option<Arc<Credentials>>>,
    // Serialises reloads so a slower, older read can never overwrite a newer one.
    reloading: Mutex<()>,
}

impl Reloader {
    /// A reloader with nothing loaded yet (not ready until a reload succeeds).
    pub fn new(source: Source, allow: AllowList, clock: SharedClock) -> Self {
        Self::with_metrics(source, allow, clock, Metrics::default())
    }

    /// Like [`Reloader::new`], counting reloads and the served expiry in `metrics`.
    pub fn with_metrics(
        source: Source,
        allow: AllowList,
        clock: SharedClock,
        metrics: Metrics,
    ) -> Self {
        let (tx, _) = watch::channel(None);
        Self {
            source,
            allow,
            clock,
            metrics,
            current: ArcSwapOption::empty(),
            tx,
            reloading: Mutex::new(()),
        }
    }

    /// A reloader with a first snapshot loaded; fails if that snapshot is refused. Blocks.
    /// Afterwards [`Reloader::current`] is always `Some`: a failed reload keeps the old set.
    pub fn load(source: Source, allow: AllowList, clock: SharedClock) -> Result<Self, ReloadError> {
        let r = Self::new(source, allow, clock);
        r.reload()?;
        Ok(r)
    }

    /// Reads the snapshot again, checks it at the clock's `now`, and publishes it; on error the
    /// current credentials stay. Blocks (file reads and signature checks: a few ms); call it
    /// from `spawn_blocking` in async code.
    pub fn reload(&self) -> Result<Arc<Credentials>, ReloadError> {
        let _serial = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        self.reload_locked()
    }

    /// Like [`Reloader::reload`], but does nothing (`None`) when `..data` still points at the
    /// version already loaded and `anchors_changed` is false: a `..data` version dir is never
    /// changed in place, so loading it again would only repeat the log line and the count.
    /// Checked under the same lock as the reload itself, so a load announced by SIGHUP or
    /// `POST /reload` is never repeated by the dir watcher. Blocks.
    pub fn reload_if_new_version(
        &self,
        anchors_changed: bool,
    ) -> Option<Result<Arc<Credentials>, ReloadError>> {
        let _serial = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let version = crate::certdir::resolve_data_dir(&self.source.certs_dir);
        let already = self.current().is_some_and(|c| c.version_dir == version);
        if !anchors_changed && version != self.source.certs_dir && already {
            return None;
        }
        Some(self.reload_locked())
    }

    fn reload_locked(&self) -> Result<Arc<Credentials>, ReloadError> {
        match self.build() {
            Ok(creds) => {
                let creds = Arc::new(creds);
                self.current.store(Some(creds.clone()));
                self.tx.send_replace(Some(creds.clone()));
                self.metrics.reload(ReloadResult::Ok);
                self.metrics
                    .cert_expiration
                    .set(i64::try_from(unix_secs(creds.leaf.not_after)).unwrap_or(i64::MAX));
                tracing::info!(
                    serial = %creds.leaf.serial,
                    sha256 = %creds.leaf.sha256,
                    not_after = %crate::clock::rfc3339(creds.leaf.not_after),
                    dir = %creds.version_dir.display(),
                    "certificate loaded"
                );
                Ok(creds)
            }
            Err(error) => {
                self.metrics.reload(ReloadResult::Error);
                match self.current.load().as_ref() {
                    Some(kept) => tracing::error!(
                        %error,
                        serving = %kept.leaf.sha256,
                        "certificate reload refused, keeping the current one"
                    ),
                    None => tracing::error!(
                        %error,
                        "no valid certificate loaded; not ready until a reload succeeds"
                    ),
                }
                Err(error)
            }
        }
    }

    fn build(&self) -> Result<Credentials, ReloadError> {
        let (bundle, version_dir) = self.load_snapshot()?;
        let refused = |source| ReloadError::Refused {
            dir: version_dir.clone(),
            source,
        };
        bundle.check(self.clock.now()).map_err(refused)?;
        let tls_err = |source| ReloadError::Tls {
            dir: version_dir.clone(),
            source,
        };
        let (anchors, clock) = (&bundle.anchors, &self.clock);
        let acceptor = Acceptor::mesh(&bundle, anchors, &self.allow, clock).map_err(tls_err)?;
        let transport_acceptor = acceptor.with_alpn(&[crate::proxy::linkerd::TRANSPORT_ALPN]);
        let connector = Connector::mesh(&bundle, anchors, clock).map_err(tls_err)?;
        let server = tls::server_config(&bundle, anchors, &self.allow, clock).map_err(tls_err)?;
        let client = tls::client_config(&bundle, anchors, clock).map_err(tls_err)?;
        Ok(Credentials {
            acceptor,
            transport_acceptor,
            connector,
            server: Arc::new(server),
            client: Arc::new(client),
            leaf: bundle.leaf,
            version_dir,
        })
    }

    /// Reads chain, key and anchors through a once-resolved `..data`, retrying when a pruned
    /// version dir vanishes mid-read.
    fn load_snapshot(&self) -> Result<(CertBundle, PathBuf), ReloadError> {
        let dir = &self.source.certs_dir;
        let load_err = |source| ReloadError::Load {
            dir: dir.clone(),
            source,
        };
        let Some(anchors_path) = &self.source.trust_anchors else {
            return CertBundle::load_dir(dir).map_err(load_err);
        };
        let anchors = TrustAnchors::read(anchors_path).map_err(|source| ReloadError::Anchors {
            path: anchors_path.clone(),
            source,
        })?;
        CertBundle::load_dir_with_anchors(dir, anchors).map_err(load_err)
    }

    /// The credentials served now, if any snapshot was ever accepted. Lock-free.
    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    /// The bare server config for a new inbound connection, following reloads; session
    /// resumption is off. Prefer [`Reloader::current`]'s [`Credentials::acceptor`].
    pub fn server_config(&self) -> Option<Arc<ServerConfig>> {
        self.current.load().as_ref().map(|c| c.server.clone())
    }

    /// The bare client config for a new outbound connection, following reloads; session
    /// resumption is off. Prefer [`Reloader::current`]'s [`Credentials::connector`].
    pub fn client_config(&self) -> Option<Arc<ClientConfig>> {
        self.current.load().as_ref().map(|c| c.client.clone())
    }

    /// A receiver that sees every accepted snapshot (the current one first).
    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Credentials>>> {
        self.tx.subscribe()
    }

    /// Ready: a snapshot is loaded and its leaf is valid at the clock's `now`.
    pub fn is_ready(&self) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|c| c.leaf.is_valid_at(self.clock.now()))
    }

    /// Where snapshots are read from.
    pub fn source(&self) -> &Source {
        &self.source
    }
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("source", &self.source)
            .field("serving", &self.current().map(|c| c.leaf.sha256.clone()))
            .finish()
    }
}
