//! The running issuer: gRPC Certify over TLS 1.3 (tokio-rustls, no ALPN required) or
//! loopback plaintext, a serving certificate minted from the issuer CA and re-minted before
//! expiry and on CA reload, the reload loop, and the admin endpoints.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use proxy_lib::clock::SharedClock;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::audit::AuditLog;
use crate::auth::{AuthChain, TokenAuthenticator};
use crate::ca::Ca;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::kubernetes::ca::KubeCaSource;
use crate::kubernetes::last_issued::Recorder as LastIssuedRecorder;
use crate::metrics::Metrics;
use crate::reload::{Watch, fingerprint};
use crate::service::Shared;
use crate::tokens::TokenStore;

mod conn;

use conn::accept_loop;
pub use conn::{
    CONNECTION_DEADLINES, Conn, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE,
    MAX_PENDING_PER_SOURCE, conn_caps,
};

/// How often the maintenance loop runs (CA file poll, serving-cert check, expiry warning).
pub const TICK: Duration = Duration::from_secs(1);
/// Lifetime of the serving certificate (capped at the issuer's notAfter).
pub const SERVING_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Facts about the serving certificate in use.
#[derive(Debug, Clone)]
pub struct ServingInfo {
    /// SHA-256 of the serving leaf (hex).
    pub sha256: String,
    /// SHA-256 of the issuer certificate that signed it.
    pub issuer_sha256: String,
    /// Its notAfter.
    pub not_after: SystemTime,
    /// When it will be re-minted.
    pub renew_at: SystemTime,
    /// The CA (anchors and issuer) it was minted from and whose anchors verify clients.
    ca: Arc<Ca>,
}

/// How long `Server::open` waits for the first list of the Kubernetes objects it needs.
pub const KUBE_SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// What runs for the `kubernetes` sources: the CA watch, the token watch's task, the
/// ExternalWorkload watch with the client that records last issuances on them.
#[derive(Debug, Default)]
struct KubeParts {
    ca: Option<Arc<KubeCaSource>>,
    tokens_task: Option<tokio::task::JoinHandle<()>>,
    workloads: Option<crate::kubernetes::workloads::WorkloadWatch>,
    /// Where replaced issuers are recorded (the CA from Kubernetes), and what it held at start.
    retired: Option<(
        crate::kubernetes::retired::RetiredIssuers,
        crate::renewal::Retired,
    )>,
    workloads_client: Option<WorkloadsClient>,
    last_issued: Option<Arc<LastIssuedRecorder>>,
}

/// The client the ExternalWorkloads are watched (and patched) with.
#[derive(Clone)]
struct WorkloadsClient(kube::Client);

impl std::fmt::Debug for WorkloadsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("kube::Client")
    }
}

impl Drop for KubeParts {
    fn drop(&mut self) {
        if let Some(t) = &self.tokens_task {
            t.abort();
        }
    }
}

/// The issuer server: shared state, TLS config, reload state.
pub struct Server {
    config: Config,
    shared: Arc<Shared>,
    tokens: Arc<TokenStore>,
    kube: KubeParts,
    registry: Arc<Registry>,
    tls: ArcSwap<proxy_lib::tls::Acceptor>,
    serving: ArcSwap<ServingInfo>,
    watch: Mutex<Watch>,
    warned: Mutex<Option<SystemTime>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("listen", &self.config.listen)
            .field("shared", &self.shared)
            .finish()
    }
}

impl Server {
    /// Loads the CA (errors name the missing or bad file), the token store and the audit log,
    /// and mints the first serving certificate. Blocks. For the `kubernetes` sources use
    /// [`Server::open`].
    pub fn new(config: Config, clock: SharedClock) -> Result<Arc<Self>> {
        Self::with_authenticators(config, clock, Vec::new())
    }

    /// Like [`Server::new`], with `extra` authenticators tried after renewal by client
    /// certificate and the token store (the Kubernetes authenticator plugs in here).
    pub fn with_authenticators(
        config: Config,
        clock: SharedClock,
        extra: Vec<Arc<dyn crate::auth::Authenticator>>,
    ) -> Result<Arc<Self>> {
        if config.ca_kubernetes.is_some()
            || config.tokens_kubernetes.is_some()
            || config.auth_kubernetes.is_some()
            || config.auth_external_workloads.is_some()
        {
            return Err(Error::Kubernetes(
                "the kubernetes CA source, token store, authenticator and ExternalWorkload \
                 binding start with Server::open"
                    .into(),
            ));
        }
        let ca = Ca::load(&config.ca_files, clock.now())?;
        let tokens = Arc::new(TokenStore::open(&config.tokens)?);
        Self::build(config, clock, extra, ca, tokens, KubeParts::default())
    }

    /// Starts the server from any source: files are read as by [`Server::new`]; with
    /// `[ca] source = "kubernetes"` or `[auth] store = "kubernetes"` the objects are watched
    /// through `client` (or, when `None`, a client from the environment: in-cluster config
    /// or the kubeconfig), and the first list must arrive within [`KUBE_SYNC_TIMEOUT`].
    /// With `[auth] kubernetes = true` service-account tokens are reviewed through that
    /// client too (after the bootstrap tokens, before `extra`).
    pub async fn open(
        config: Config,
        clock: SharedClock,
        mut extra: Vec<Arc<dyn crate::auth::Authenticator>>,
        client: Option<kube::Client>,
    ) -> Result<Arc<Self>> {
        if config.ca_kubernetes.is_none()
            && config.tokens_kubernetes.is_none()
            && config.auth_kubernetes.is_none()
            && config.auth_external_workloads.is_none()
        {
            return Self::with_authenticators(config, clock, extra);
        }
        let client = match client {
            Some(c) => c,
            None => crate::kubernetes::client().await?,
        };
        if let Some(review) = &config.auth_kubernetes {
            let a = crate::kubernetes::review::TokenReviewAuthenticator::new(
                client.clone(),
                review.clone(),
                config.policy.trust_domain.clone(),
                config.ca_control_plane_namespace.clone(),
                clock.clone(),
            );
            extra.insert(0, Arc::new(a));
        }
        let mut kube = KubeParts::default();
        if let Some(namespaces) = &config.auth_external_workloads {
            let w = crate::kubernetes::workloads::watch(client.clone(), namespaces);
            let mut synced = w.binding.synced();
            kube.workloads = Some(w);
            kube.workloads_client = Some(WorkloadsClient(client.clone()));
            if tokio::time::timeout(KUBE_SYNC_TIMEOUT, synced.wait_for(|s| *s))
                .await
                .is_err()
            {
                return Err(Error::Kubernetes(format!(
                    "could not list the ExternalWorkloads ({}) within {}s (is the API server \
                     reachable, and does RBAC allow list and watch of externalworkloads?)",
                    if namespaces.is_empty() {
                        "all namespaces".to_string()
                    } else {
                        namespaces.join(", ")
                    },
                    KUBE_SYNC_TIMEOUT.as_secs()
                )));
            }
        }
        let tokens = match &config.tokens_kubernetes {
            Some(ns) => {
                let mut w = crate::kubernetes::tokens::watched_store(client.clone(), ns);
                kube.tokens_task = Some(w.task);
                if tokio::time::timeout(KUBE_SYNC_TIMEOUT, w.synced.wait_for(|s| *s))
                    .await
                    .is_err()
                {
                    return Err(Error::Kubernetes(format!(
                        "could not list the token Secrets in namespace {ns} within {}s \
                         (is the API server reachable, and does RBAC allow list and watch?)",
                        KUBE_SYNC_TIMEOUT.as_secs()
                    )));
                }
                tracing::info!(namespace = %ns, tokens = w.store.len(), "token Secrets listed");
                w.store
            }
            None => Arc::new(TokenStore::open(&config.tokens)?),
        };
        let ca = match &config.ca_kubernetes {
            Some(names) => {
                let retired = crate::kubernetes::retired::RetiredIssuers::new(
                    client.clone(),
                    &names.namespace,
                    &names.retired,
                );
                let seed = retired.read().await.unwrap_or_else(|error| {
                    // Not fatal: renewal by certificate then knows only the issuer in use.
                    tracing::warn!(%error, "replaced issuers not read");
                    Vec::new()
                });
                kube.retired = Some((retired, seed));
                let src = KubeCaSource::start(client, names.clone());
                src.synced(KUBE_SYNC_TIMEOUT).await?;
                let ca = src.load(clock.now())?;
                kube.ca = Some(Arc::new(src));
                ca
            }
            None => Ca::load(&config.ca_files, clock.now())?,
        };
        Self::build(config, clock, extra, ca, tokens, kube)
    }

    fn build(
        config: Config,
        clock: SharedClock,
        extra: Vec<Arc<dyn crate::auth::Authenticator>>,
        ca: Ca,
        tokens: Arc<TokenStore>,
        mut kube: KubeParts,
    ) -> Result<Arc<Self>> {
        let files = config.ca_files.clone();
        let watch = Watch::new(fingerprint(&files));
        let audit = AuditLog::open(&config.audit)?;
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let issuers = Arc::new(crate::renewal::KnownIssuers::new(
            ca.cert(),
            crate::renewal::retirement_keep(
                config.policy.lifetime,
                config.limits.max_lifetime,
                config.policy.clock_skew,
            ),
        ));
        let retired = match &kube.retired {
            Some((_, seed)) => Ok(seed.clone()),
            None => crate::renewal::read_retired(&crate::renewal::retired_path(&files.cert)),
        };
        match retired {
            Ok(retired) => {
                for (cert, at) in retired {
                    issuers.remember(cert, at);
                }
            }
            // Not fatal: renewal by certificate then knows only the issuer in use.
            Err(e) => tracing::warn!(error = %e, "replaced issuers not read"),
        }
        // A client certificate of ours wins over a token sent with it (a linkerd2-proxy sends
        // both); a token decides when no certificate of ours is presented.
        let mut chain: Vec<Arc<dyn crate::auth::Authenticator>> = Vec::new();
        if config.renew_by_certificate {
            chain.push(Arc::new(crate::renewal::CertAuthenticator::new(
                issuers.clone(),
                tokens.clone(),
                crate::renewal::RenewalPolicy {
                    backdate: config.policy.clock_skew,
                    max_renewal_age: config.max_renewal_age,
                },
                clock.clone(),
            )));
        }
        chain.push(Arc::new(TokenAuthenticator::new(
            tokens.clone(),
            clock.clone(),
        )));
        chain.extend(extra);
        let binding = kube
            .workloads
            .as_ref()
            .map(|w| w.binding.clone() as Arc<dyn crate::auth::Binding>);
        let auth = AuthChain::new(chain).with_binding(binding);
        kube.last_issued = match (&kube.workloads, &kube.workloads_client) {
            (Some(w), Some(client)) => Some(Arc::new(LastIssuedRecorder::new(
                client.0.clone(),
                w.binding.clone(),
                clock.clone(),
                metrics.clone(),
                crate::kubernetes::last_issued::Limits::every(config.last_issued_flush),
            ))),
            _ => None,
        };
        let mut shared = Shared::new(
            ca,
            config.policy.clone(),
            auth,
            config.limits.clone(),
            audit,
            metrics,
            clock,
        )
        .with_renewal(issuers, tokens.clone(), &config.server_name);
        shared.last_issued = kube.last_issued.clone();
        let shared = Arc::new(shared);
        let (tls, serving) = mint_serving(&shared, &config.server_name)?;
        let server = Arc::new(Self {
            config,
            shared,
            tokens,
            kube,
            registry: Arc::new(registry),
            tls: ArcSwap::new(tls),
            serving: ArcSwap::from_pointee(serving),
            watch: Mutex::new(watch),
            warned: Mutex::new(None),
        });
        server.warn_if_expiring();
        Ok(server)
    }

    /// Re-reads the token file if it changed (the maintenance loop does this every tick; a
    /// Kubernetes store follows its watch instead). Blocks (one `stat`).
    pub fn refresh_tokens(&self) {
        self.tokens.refresh();
    }

    /// The shared state (CA, policy, metrics...).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// With `[auth] external_workloads`: what records the last issuances on the
    /// ExternalWorkloads (tests wait on its flushes).
    pub fn last_issued(&self) -> Option<&Arc<LastIssuedRecorder>> {
        self.kube.last_issued.as_ref()
    }

    /// The metrics registry served on `/metrics`.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// `/ready`: the CA in use can issue now, the audit log keeps up, and (with
    /// `[auth] external_workloads`) the ExternalWorkloads have been listed.
    pub fn ready(&self) -> bool {
        self.shared.ca_usable()
            && self.shared.audit.healthy()
            && self
                .kube
                .workloads
                .as_ref()
                .is_none_or(|w| w.binding.is_synced())
    }

    /// The serving certificate in use.
    pub fn serving(&self) -> Arc<ServingInfo> {
        self.serving.load_full()
    }

    /// Reloads the CA now (what SIGHUP does): the files, or the Kubernetes objects as last
    /// seen. Blocks.
    pub fn reload_ca(&self) -> Result<()> {
        let replaced = if let Some(src) = &self.kube.ca {
            crate::reload::apply(&self.shared, src.load(self.shared.clock.now()))
        } else {
            let files = &self.config.ca_files;
            self.watch
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .tried(fingerprint(files));
            crate::reload::reload(&self.shared, files)
        };
        let res = replaced.map(|r| self.retire(r));
        self.refresh_serving(true);
        self.warn_if_expiring();
        res
    }

    /// Records the issuer certificate a CA reload replaced, so an issuer restarted within one
    /// leaf lifetime still renews the leaves it signed: in `retired-issuers.json` beside
    /// `issuer.crt` (file source; blocks briefly), or in the retired-issuers ConfigMap (the CA
    /// from Kubernetes; written in the background). A failure is logged: the replaced issuer
    /// is then remembered in memory only.
    fn retire(&self, replaced: Option<rustls_pki_types::CertificateDer<'static>>) {
        let Some(cert) = replaced else {
            return;
        };
        let now = self.shared.clock.now();
        let keep = self.shared.issuers.keep();
        match &self.kube.retired {
            Some((store, _)) => {
                let store = store.clone();
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    tracing::warn!("replaced issuer not recorded: no runtime to write with");
                    return;
                };
                rt.spawn(async move {
                    match store.record(&cert, now, keep).await {
                        Ok(()) => tracing::info!(at = ?store, "replaced issuer recorded"),
                        Err(error) => tracing::warn!(%error, "replaced issuer not recorded"),
                    }
                });
            }
            None => {
                let path = crate::renewal::retired_path(&self.config.ca_files.cert);
                match crate::renewal::record_retired(&path, &cert, now, Some(keep)) {
                    Ok(()) => tracing::info!(path = %path.display(), "replaced issuer recorded"),
                    Err(error) => tracing::warn!(
                        %error,
                        "replaced issuer not recorded (is the CA dir writable?): after a restart \
                         within one leaf lifetime, hosts holding its leaves must bootstrap again"
                    ),
                }
            }
        }
    }

    /// One maintenance step: re-read a changed token file, reload changed CA files
    /// (debounced), re-mint the serving certificate when due (and after any CA reload),
    /// warn about an expiring issuer. Blocks briefly.
    pub fn tick(&self) {
        self.tokens.refresh();
        let files = &self.config.ca_files;
        let due = self.kube.ca.is_none()
            && self
                .watch
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .poll(fingerprint(files));
        if due {
            if let Ok(replaced) = crate::reload::reload(&self.shared, files) {
                self.retire(replaced);
            }
            self.warn_if_expiring();
        }
        self.refresh_serving(false);
    }

    fn refresh_serving(&self, force: bool) {
        let now = self.shared.clock.now();
        let cur = self.serving.load();
        let ca = self.shared.ca.load();
        // Any reload (a new issuer pair, or new anchors with the same issuer) re-mints, so the
        // client verifier follows the anchors too.
        let ca_changed = !Arc::ptr_eq(&cur.ca, &ca);
        if !force && !ca_changed && now < cur.renew_at {
            return;
        }
        if !ca.window().contains(now) {
            return;
        }
        match mint_serving(&self.shared, &self.config.server_name) {
            Ok((tls, info)) => {
                tracing::info!(
                    sha256 = %info.sha256,
                    not_after = %proxy_lib::clock::rfc3339(info.not_after),
                    "serving certificate minted"
                );
                self.tls.store(tls);
                self.serving.store(Arc::new(info));
            }
            Err(error) => tracing::error!(%error, "serving certificate could not be minted"),
        }
    }

    /// Whether the issuer certificate in use has less than `ca.warn_before` left (the server
    /// then logs a warning, at most once an hour).
    pub fn ca_expires_soon(&self) -> bool {
        let now = self.shared.clock.now();
        let ca = self.shared.ca.load();
        ca.window().remaining(now) < self.config.ca_warn_before
    }

    fn warn_if_expiring(&self) {
        if !self.ca_expires_soon() {
            return;
        }
        let now = self.shared.clock.now();
        let ca = self.shared.ca.load();
        let left = ca.window().remaining(now);
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        if warned
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() < Duration::from_secs(3600))
        {
            return;
        }
        *warned = Some(now);
        tracing::warn!(
            not_after = %proxy_lib::clock::rfc3339(ca.window().not_after),
            seconds_left = left.as_secs(),
            "issuer certificate expires soon; rotate it"
        );
    }

    /// Serves Certify on `listener` (and the admin endpoints on `admin`) until `shutdown`
    /// completes. In-flight requests finish; new connections stop.
    pub async fn run(
        self: Arc<Self>,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let local = listener
            .local_addr()
            .map_err(|e| Error::Server(format!("listener address: {e}")))?;
        if self.config.plaintext && !local.ip().is_loopback() {
            return Err(Error::Server(format!(
                "plaintext serving is only allowed on a loopback address, not {local}"
            )));
        }
        // One descriptor per connection, plus the admin server's.
        proxy_lib::net::raise_open_file_limit(self.config.limits.max_connections as u64 + 256);
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopper = tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let mut tasks = Vec::new();
        if let Some(admin) = admin {
            let me = self.clone();
            let ready: proxy_lib::admin::ReadyFn = Arc::new(move || me.ready());
            let router = proxy_lib::admin::router(self.registry.clone(), ready);
            let stop = wait_stop(stop_rx.clone());
            if let Ok(addr) = admin.local_addr() {
                tracing::info!(%addr, "admin listening");
            }
            tasks.push(tokio::spawn(async move {
                if let Err(error) = proxy_lib::admin::serve(admin, router, stop).await {
                    tracing::error!(%error, "admin server failed");
                }
            }));
        }
        {
            let me = self.clone();
            let mut stop = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                let mut every = tokio::time::interval(TICK);
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let mut n: u64 = 0;
                loop {
                    tokio::select! {
                        _ = stop.changed() => break,
                        _ = every.tick() => {
                            let m = me.clone();
                            let _ = tokio::task::spawn_blocking(move || m.tick()).await;
                            n += 1;
                            if n.is_multiple_of(60) {
                                me.shared.limiter.retain_recent();
                                me.shared.throttle.retain_recent();
                                me.warn_if_expiring();
                            }
                        }
                    }
                }
            }));
        }
        if let Some(src) = self.kube.ca.clone() {
            tasks.push(tokio::spawn(follow_kube_ca(self.clone(), src)));
        }
        // Stopped after the gRPC server, so the issuances it made are written.
        let (recorder_stop, recorder_stopped) = watch::channel(false);
        let recorder = self
            .kube
            .last_issued
            .clone()
            .map(|r| tokio::spawn(r.run(wait_stop(recorder_stopped))));
        let (tx, rx) = mpsc::channel::<io::Result<Conn>>(256);
        tasks.push(tokio::spawn(accept_loop(
            self.clone(),
            listener,
            tx,
            stop_rx.clone(),
        )));
        tracing::info!(
            addr = %local,
            tls = !self.config.plaintext,
            server_name = %self.config.server_name,
            "issuer listening"
        );
        let svc = crate::front::Front::new(
            self.shared.clone(),
            self.config
                .limits
                .max_request_bytes
                .saturating_mul(4)
                .max(1 << 20),
        );
        // Where the anchors' signature is published: beside ca.crt, or in the trust-roots
        // ConfigMap.
        let sig = Some(match &self.kube.ca {
            Some(src) => crate::bundle::Published::ConfigMap(src.clone()),
            None => crate::bundle::Published::File(crate::bundle::sig_path(
                &self.config.ca_files.anchors,
            )),
        });
        let res = tonic::transport::Server::builder()
            .add_service(svc)
            .add_service(crate::bundle::service(self.shared.clone(), sig))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                wait_stop(stop_rx.clone()),
            )
            .await
            .map_err(|e| Error::Server(e.to_string()));
        stopper.abort();
        let _ = recorder_stop.send(true);
        if let Some(t) = recorder {
            let abort = t.abort_handle();
            let grace = crate::kubernetes::last_issued::FINAL_FLUSH_TIMEOUT + TICK;
            if tokio::time::timeout(grace, t).await.is_err() {
                abort.abort();
            }
        }
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
        tracing::info!("issuer stopped");
        res
    }
}

/// Applies every change the Kubernetes CA watch sees (validated like a file reload), and
/// re-mints the serving certificate at once when the CA changed.
async fn follow_kube_ca(server: Arc<Server>, src: Arc<KubeCaSource>) {
    let mut seen = src.subscribe();
    let mut applied = seen.borrow_and_update().versions();
    while seen.changed().await.is_ok() {
        let now_seen = seen.borrow_and_update().clone();
        let versions = now_seen.versions();
        if versions == applied {
            continue;
        }
        applied = versions;
        let me = server.clone();
        let names = src.names().clone();
        let _ = tokio::task::spawn_blocking(move || {
            let loaded = crate::kubernetes::ca::load(&names, &now_seen, me.shared.clock.now());
            if let Ok(replaced) = crate::reload::apply(&me.shared, loaded) {
                me.retire(replaced);
                me.refresh_serving(false);
                me.warn_if_expiring();
            }
        })
        .await;
    }
}

async fn wait_stop(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Mints a serving certificate for `server_name` from the CA in use and builds the TLS 1.3
/// acceptor around it (client certificates requested, never required, and a chain that
/// does not verify is ignored rather than refused: [`proxy_lib::tls::Acceptor::deferred`]).
fn mint_serving(
    shared: &Shared,
    server_name: &str,
) -> Result<(Arc<proxy_lib::tls::Acceptor>, ServingInfo)> {
    let ca = shared.ca.load_full();
    let grant = proxy_lib::validity::Window::grant(
        shared.clock.now(),
        SERVING_LIFETIME,
        shared.policy.clock_skew,
        ca.window(),
    );
    let key = crate::ca::IssuerKey::generate().map_err(|e| Error::Sign(e.to_string()))?;
    let leaf = crate::signer::sign_server_leaf(&ca, server_name, &key, &grant)?;
    let key_der = proxy_lib::pem::PrivateKey::from_pkcs8_der(key.pkcs8_der().to_vec());
    // Offer h2, but a client without ALPN (linkerd2-proxy) is accepted as well.
    let chain: Vec<_> = std::iter::once(leaf.der.clone())
        .chain(ca.chain().iter().cloned())
        .collect();
    let acceptor =
        proxy_lib::tls::Acceptor::deferred(&chain, &key_der, ca.anchors(), &[b"h2"], &shared.clock)
            .map_err(|e| Error::Server(format!("serving certificate: {e}")))?;
    let info = ServingInfo {
        sha256: leaf.sha256.clone(),
        issuer_sha256: proxy_lib::cert::sha256_hex(ca.cert()),
        not_after: grant.not_after,
        renew_at: grant.not_before + grant.lifetime() * 2 / 3,
        ca,
    };
    Ok((Arc::new(acceptor), info))
}

/// Starts the issuer in-process: loads everything, handles SIGHUP (CA reload), and serves on
/// `listener` (+ admin) until `shutdown` completes.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    clock: SharedClock,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let server = Server::open(config, clock, Vec::new(), None).await?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| Error::Server(format!("installing the SIGHUP handler: {e}")))?;
    let me = server.clone();
    let hup_task = tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the issuer ca");
            let m = me.clone();
            let _ = tokio::task::spawn_blocking(move || m.reload_ca()).await;
        }
    });
    let res = server.run(listener, admin, shutdown).await;
    hup_task.abort();
    res
}

/// Binds `addr` (a helper for the binary).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Server(format!("cannot listen on {addr}: {e}")))
}
