//! The mTLS proxy (feature `proxy`): inbound listeners that terminate mTLS and forward to a
//! local app, outbound listeners that originate mTLS to a named identity, certificates reloaded
//! from the rotator's dir without touching open connections, and the admin server.
//!
//! Layout:
//! - [`config`]: command line and TOML file, validated into [`Config`].
//! - [`reload`]: [`Reloader`], the atomically swapped credentials (also the embedding API).
//! - [`tls`]: the floor's TLS policy ([`crate::tls`]), re-exported under its old path.
//! - [`listener`]: accept loops and byte forwarding.
//! - [`linkerd`]: the Linkerd inbound mode (SNI check, HTTP/2 with `l5d-orig-proto`
//!   downgrade, the opaque transport header).
//! - [`admin`]: `/metrics`, `/live`, `/ready`, `POST /reload`.
//! - [`metrics`]: the proxy's public metrics.
//! - [`signal`]: SIGHUP / SIGTERM / SIGINT.
//! - [`pidfile`]: the pidfile the rotator signals through.
//!
//! In-process use (tests, embedding the whole proxy):
//! ```no_run
//! # async fn demo(config: proxy_lib::proxy::Config) -> Result<(), proxy_lib::proxy::Error> {
//! let proxy = proxy_lib::proxy::Proxy::bind(&config, std::sync::Arc::new(proxy_lib::clock::SystemClock)).await?;
//! println!("inbound on {:?}, admin on {}", proxy.inbound_addrs(), proxy.admin_addr());
//! proxy.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod admin;
pub mod config;
pub mod linkerd;
pub mod listener;
pub mod metrics;
pub mod pidfile;
pub mod reload;
pub mod signal;
pub use crate::tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

pub use config::{Args, Config, ConfigError, RawConfig};
pub use metrics::Metrics;
pub use reload::{Credentials, ReloadError, Reloader, Source};

use crate::clock::{SharedClock, SystemClock};
use crate::fs::FileStamp;
use config::Limits;
use listener::Shared;
use tls::AllowList;

/// Why the proxy could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The pidfile names another running instance, or could not be written.
    #[error(transparent)]
    Pidfile(#[from] pidfile::PidfileError),
    /// The admin server failed.
    #[error("admin server failed: {0}")]
    Admin(std::io::Error),
}

struct InboundListener {
    listener: TcpListener,
    app: Arc<str>,
}

struct OutboundListener {
    listener: TcpListener,
    target: Arc<str>,
    identity: rustls_pki_types::ServerName<'static>,
}

/// A proxy with its listeners bound and its first certificate load attempted.
pub struct Proxy {
    inbound: Vec<InboundListener>,
    linkerd: Vec<(TcpListener, Option<linkerd::http::App>)>,
    linkerd_routes: linkerd::Routes,
    outbound: Vec<OutboundListener>,
    admin: TcpListener,
    reloader: Arc<Reloader>,
    metrics: Metrics,
    registry: Arc<Registry>,
    limits: Limits,
    watch_interval: Option<Duration>,
    stamp: Option<Stamp>,
}

impl Proxy {
    /// Binds every listener and loads the certificates once. A missing or refused set is
    /// logged and the proxy starts not ready (connections are refused until a reload
    /// succeeds), so it can start before the rotator's first certificate.
    pub async fn bind(config: &Config, clock: SharedClock) -> Result<Self, Error> {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        let reloader = Arc::new(Reloader::with_metrics(
            Source::new(config.certs.clone(), config.trust_anchors.clone()),
            AllowList::new(config.allow_client.iter().cloned()),
            clock,
            metrics.clone(),
        ));
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Bind { what, addr, source })
        };
        let mut inbound = Vec::new();
        for i in &config.inbound {
            inbound.push(InboundListener {
                listener: bind("inbound", i.listen).await?,
                app: i.app.as_str().into(),
            });
        }
        let mut outbound = Vec::new();
        for o in &config.outbound {
            outbound.push(OutboundListener {
                listener: bind("outbound", o.listen).await?,
                target: o.target.as_str().into(),
                identity: o.identity.clone(),
            });
        }
        let linkerd_routes = linkerd::Routes::new(&config.linkerd, config.limits.connect_timeout);
        let mut linkerd = Vec::new();
        for l in &config.linkerd.listen {
            let listener = bind("linkerd inbound", l.addr).await?;
            let port = listener.local_addr().map_or(l.addr.port(), |a| a.port());
            let default = linkerd_routes.default_app(l, port, config.limits.connect_timeout);
            linkerd.push((listener, default));
        }
        let admin = bind("admin", config.admin).await?;
        // The stamp is taken before the load: a change in between makes the watcher reload
        // (perhaps redundantly) rather than miss it.
        let source = reloader.source().clone();
        let stamp = tokio::task::spawn_blocking(move || stamp(&source))
            .await
            .ok();
        let r = reloader.clone();
        // Errors are logged and counted by the reloader itself.
        let _ = tokio::task::spawn_blocking(move || r.reload()).await;
        Ok(Self {
            inbound,
            linkerd,
            linkerd_routes,
            outbound,
            admin,
            reloader,
            metrics,
            registry: Arc::new(registry),
            limits: config.limits,
            watch_interval: config.watch_interval,
            stamp,
        })
    }

    /// The credentials (reload them, subscribe to them, ask readiness).
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Bound inbound addresses, in config order.
    pub fn inbound_addrs(&self) -> Vec<SocketAddr> {
        addrs(self.inbound.iter().map(|l| &l.listener))
    }

    /// Bound Linkerd inbound addresses, in config order.
    pub fn linkerd_addrs(&self) -> Vec<SocketAddr> {
        addrs(self.linkerd.iter().map(|(l, _)| l))
    }

    /// Bound outbound addresses, in config order.
    pub fn outbound_addrs(&self) -> Vec<SocketAddr> {
        addrs(self.outbound.iter().map(|l| &l.listener))
    }

    /// Bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// Serves until `shutdown` completes, then stops accepting, gives open connections the
    /// drain timeout to finish, and cuts the rest.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let (stop_tx, stop_rx) = watch::channel(false);
        let (cut_tx, cut_rx) = watch::channel(false);
        let max = self.limits.max_connections;
        let permits = Arc::new(Semaphore::new(max));
        let shared = Shared {
            reloader: self.reloader.clone(),
            metrics: self.metrics.clone(),
            limits: self.limits,
            permits: permits.clone(),
            cut: cut_rx,
            stop: stop_rx.clone(),
            refusals: Arc::new(crate::net::LogLimit::default()),
            pending: listener::pending_caps(&self.limits),
        };
        let mut tasks = tokio::task::JoinSet::new();
        for l in self.inbound {
            tasks.spawn(listener::serve_inbound(
                l.listener,
                l.app,
                shared.clone(),
                stop_rx.clone(),
            ));
        }
        for (l, default) in self.linkerd {
            tasks.spawn(linkerd::serve(
                l,
                self.linkerd_routes.clone(),
                default,
                shared.clone(),
                stop_rx.clone(),
            ));
        }
        for l in self.outbound {
            tasks.spawn(listener::serve_outbound(
                l.listener,
                l.target,
                l.identity,
                shared.clone(),
                stop_rx.clone(),
            ));
        }
        if let Some(every) = self.watch_interval {
            tasks.spawn(watch_dir(
                self.reloader.clone(),
                self.stamp,
                every,
                stop_rx.clone(),
            ));
        }
        let mut admin_stop = stop_rx.clone();
        let admin = tokio::spawn(crate::admin::serve(
            self.admin,
            admin::router(self.reloader.clone(), self.registry.clone()),
            async move {
                let _ = admin_stop.wait_for(|s| *s).await;
            },
        ));
        tracing::info!("proxy started");

        let admin_failed = tokio::select! {
            () = shutdown => None,
            r = admin => Some(r),
        };
        tracing::info!("shutting down: no new connections");
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        let all = u32::try_from(max).unwrap_or(u32::MAX);
        match tokio::time::timeout(self.limits.drain_timeout, permits.acquire_many(all)).await {
            Ok(_) => tracing::info!("all connections closed"),
            Err(_) => {
                let open = max - permits.available_permits();
                tracing::warn!(open, "drain timeout: cutting open connections");
                let _ = cut_tx.send(true);
            }
        }
        match admin_failed {
            Some(Ok(Ok(()))) | None => Ok(()),
            Some(Ok(Err(e))) => Err(Error::Admin(e)),
            Some(Err(e)) => Err(Error::Admin(std::io::Error::other(e))),
        }
    }
}

fn addrs<'a>(ls: impl Iterator<Item = &'a TcpListener>) -> Vec<SocketAddr> {
    ls.filter_map(|l| l.local_addr().ok()).collect()
}

/// What identifies the version on disk: the resolved `..data` target, the stamps of its
/// `tls.crt`, `tls.key` and `ca.crt` (plain-file dirs, which may be updated file by file: a
/// key landing after its cert must count as a change), and that of a separate anchors file.
type Stamp = (PathBuf, [Option<FileStamp>; 3], Option<FileStamp>);

fn stamp(source: &Source) -> Stamp {
    let version = crate::certdir::resolve_data_dir(&source.certs_dir);
    let files = crate::certdir::FILES.map(|f| FileStamp::of(&version.join(f)));
    let anchors = source.trust_anchors.as_deref().and_then(FileStamp::of);
    (version, files, anchors)
}

/// Reloads when the version on disk changes (a readlink and up to four stats per tick), for setups
/// where nothing sends SIGHUP or `POST /reload`. Each new version is tried once.
async fn watch_dir(
    reloader: Arc<Reloader>,
    mut last: Option<Stamp>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let source = reloader.source().clone();
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let s = source.clone();
        let r = reloader.clone();
        let Ok(now) = tokio::task::spawn_blocking(move || stamp(&s)).await else {
            continue;
        };
        if last.as_ref() == Some(&now) {
            continue;
        }
        // A version a SIGHUP or `POST /reload` already loaded is not loaded again.
        let anchors_changed = last.as_ref().map(|l| l.2) != Some(now.2);
        tracing::debug!(version = %now.0.display(), "certificate dir changed");
        last = Some(now);
        let _ = tokio::task::spawn_blocking(move || r.reload_if_new_version(anchors_changed)).await;
    }
}

/// Open files one proxied connection holds (the peer's socket and the app's or target's).
pub const FILES_PER_CONNECTION: u64 = 2;

/// The binary's entry point: installs signal handlers, binds, loads, writes the pidfile, then
/// serves until SIGTERM/SIGINT, reloading on SIGHUP; removes the pidfile on the way out.
pub async fn run(config: Config) -> Result<(), Error> {
    crate::net::raise_open_file_limit(
        (config.limits.max_connections as u64).saturating_mul(FILES_PER_CONNECTION),
    );
    // Handlers first: from the moment the pidfile exists, SIGHUP means reload, not death.
    let mut signals = signal::Signals::install().map_err(Error::Signals)?;
    // Another instance with this pidfile: say so before its ports make the bind fail.
    if let Some(path) = &config.pidfile {
        pidfile::Pidfile::check(path)?;
    }
    let proxy = Proxy::bind(&config, Arc::new(SystemClock)).await?;
    let pidfile = match &config.pidfile {
        Some(path) => Some(pidfile::Pidfile::create(path)?),
        None => None,
    };
    tracing::info!(
        inbound = ?proxy.inbound_addrs(),
        linkerd_inbound = ?proxy.linkerd_addrs(),
        outbound = ?proxy.outbound_addrs(),
        admin = %proxy.admin_addr(),
        pidfile = %pidfile
            .as_ref()
            .map_or_else(|| "none".to_string(), |p| p.path().display().to_string()),
        ready = proxy.reloader().is_ready(),
        "listening"
    );
    let reloader = proxy.reloader().clone();
    let signal_loop = async move {
        while let signal::Event::Reload = signals.recv().await {
            tracing::info!("SIGHUP: reloading certificates");
            let r = reloader.clone();
            let _ = tokio::task::spawn_blocking(move || r.reload()).await;
        }
    };
    let result = proxy.run(signal_loop).await;
    drop(pidfile);
    tracing::info!("stopped");
    result
}
