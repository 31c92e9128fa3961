//! The last issuance, recorded on the ExternalWorkload it was made for (`[auth]
//! external_workloads = true`), so `issuer workload list` and `kubectl get externalworkload
//! -o yaml` show when each host last got a certificate.
//!
//! After every issuance whose identity and source address matched a watched ExternalWorkload
//! (a bootstrap token or a renewal by certificate: the credentials the binding applies to),
//! the issuer sets two annotations on it, [`LAST_ISSUED`] (RFC 3339, UTC) and
//! [`LAST_ISSUED_SERIAL`] (the leaf's serial, hex), with a JSON merge patch that names only
//! those two keys (never the spec, never another annotation), in the version the object was
//! read as (`v1beta1` or `v1alpha1`).
//!
//! Never on the request path: an issuance only queues the record (coalesced per workload, the
//! newest kept; at most [`MAX_PENDING`] workloads, beyond that it is dropped and counted in
//! `issuer_last_issued_dropped_total`). A background task writes the queue at most once per
//! flush interval (`[auth] last_issued_flush`, default [`DEFAULT_FLUSH`], judged by the
//! injectable clock), so each workload is patched at most once per interval. A failed patch
//! is counted (`issuer_last_issued_patches_total{result="failed"}`), logged at warn (one
//! line per flush) and queued again for the next flush unless something newer is; issuance
//! never fails because of it. When the server stops, what is queued is written once more,
//! for at most [`FINAL_FLUSH_TIMEOUT`].

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::{Api, Resource};
use proxy_lib::clock::SharedClock;
use proxy_lib::identity::Identity;
use serde::de::DeserializeOwned;

use super::workloads::{WorkloadBinding, v1alpha1, v1beta1};
use crate::metrics::Metrics;

/// The annotation holding the time of the last issuance (RFC 3339, UTC).
pub const LAST_ISSUED: &str = "meshcerts.io/last-issued";
/// The annotation holding the serial (hex) of the last leaf issued.
pub const LAST_ISSUED_SERIAL: &str = "meshcerts.io/last-issued-serial";
/// How often the queue is written by default.
pub const DEFAULT_FLUSH: Duration = Duration::from_secs(10);
/// The most workloads queued at once.
pub const MAX_PENDING: usize = 4096;
/// How long the last write at shutdown may take.
pub const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one patch may take before it counts as failed.
const PATCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Patches in flight at once during a flush.
const CONCURRENT_PATCHES: usize = 8;
/// How often the task looks at the clock to see whether a flush is due.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What an ExternalWorkload's annotations say about its last issuance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LastIssued {
    /// [`LAST_ISSUED`], as written.
    pub at: Option<String>,
    /// [`LAST_ISSUED_SERIAL`], as written.
    pub serial: Option<String>,
}

impl LastIssued {
    /// Reads the annotations of `meta`.
    pub fn of(meta: &ObjectMeta) -> Self {
        let get = |k: &str| meta.annotations.as_ref().and_then(|a| a.get(k)).cloned();
        Self {
            at: get(LAST_ISSUED),
            serial: get(LAST_ISSUED_SERIAL),
        }
    }
}

/// One issuance waiting to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Issued {
    version: &'static str,
    at: SystemTime,
    serial: String,
}

/// (namespace, name).
type Key = (String, String);

/// Queues the issuances matched to ExternalWorkloads and writes them (see the module docs).
pub struct Recorder {
    client: kube::Client,
    binding: Arc<WorkloadBinding>,
    clock: SharedClock,
    metrics: Metrics,
    limits: Limits,
    pending: Mutex<HashMap<Key, Issued>>,
    last_flush: Mutex<SystemTime>,
    flushes: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("limits", &self.limits)
            .field("queued", &self.queued())
            .finish()
    }
}

/// How often a [`Recorder`] writes, and how much it queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// At most one flush per this interval (by the recorder's clock).
    pub every: Duration,
    /// The most workloads queued at once.
    pub capacity: usize,
}

impl Limits {
    /// Flushes every `every`, at most [`MAX_PENDING`] workloads queued.
    pub fn every(every: Duration) -> Self {
        Self {
            every,
            capacity: MAX_PENDING,
        }
    }
}

impl Recorder {
    /// A recorder finding workloads in `binding` and patching them through `client`, within
    /// `limits` (judged by `clock`).
    pub fn new(
        client: kube::Client,
        binding: Arc<WorkloadBinding>,
        clock: SharedClock,
        metrics: Metrics,
        limits: Limits,
    ) -> Self {
        Self {
            last_flush: Mutex::new(clock.now()),
            client,
            binding,
            clock,
            metrics,
            limits,
            pending: Mutex::new(HashMap::new()),
            flushes: tokio::sync::watch::channel(0).0,
        }
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<Key, Issued>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues the issuance of the leaf with `serial` for `identity` to a caller at `peer`, on
    /// every watched ExternalWorkload that registers that identity at that address. Never
    /// blocks on I/O.
    pub fn issued(&self, identity: &Identity, peer: Option<IpAddr>, serial: &str) {
        let Some(ip) = peer.map(|p| p.to_canonical()) else {
            return;
        };
        let at = self.clock.now();
        let matched = self.binding.registered_for(identity);
        let mut pending = self.pending();
        for w in matched.iter().filter(|w| w.addrs().any(|a| a == ip)) {
            let key = (w.namespace.clone(), w.name.clone());
            if pending.len() >= self.limits.capacity && !pending.contains_key(&key) {
                self.metrics.last_issued_dropped.inc();
                continue;
            }
            pending.insert(
                key,
                Issued {
                    version: w.version,
                    at,
                    serial: serial.to_string(),
                },
            );
        }
    }

    /// How many workloads are queued.
    pub fn queued(&self) -> usize {
        self.pending().len()
    }

    /// Counts the flushes done so far (tests wait on it).
    pub fn flushes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.flushes.subscribe()
    }

    /// Whether a flush is due: an interval has passed since the last one (or the clock was
    /// stepped back past it).
    fn due(&self) -> bool {
        let last = *self.last_flush.lock().unwrap_or_else(|e| e.into_inner());
        match self.clock.now().duration_since(last) {
            Ok(since) => since >= self.limits.every,
            Err(_) => true,
        }
    }

    /// Writes what is queued now (one patch per workload).
    pub async fn flush(&self) {
        *self.last_flush.lock().unwrap_or_else(|e| e.into_inner()) = self.clock.now();
        let batch: Vec<(Key, Issued)> = std::mem::take(&mut *self.pending()).into_iter().collect();
        let results: Vec<_> = futures_util::stream::iter(batch)
            .map(|(key, issued)| async move {
                let r = tokio::time::timeout(PATCH_TIMEOUT, self.patch(&key, &issued)).await;
                (key, issued, r)
            })
            .buffer_unordered(CONCURRENT_PATCHES)
            .collect()
            .await;
        let mut failed = 0;
        let mut example = None;
        for (key, issued, r) in results {
            let error = match r {
                Ok(Ok(())) => {
                    self.metrics.last_issued_patch("patched");
                    continue;
                }
                Ok(Err(kube::Error::Api(s))) if s.code == 404 => {
                    self.metrics.last_issued_patch("gone");
                    tracing::debug!(workload = %format!("{}/{}", key.0, key.1), "ExternalWorkload gone before its last issuance was recorded");
                    continue;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {}s", PATCH_TIMEOUT.as_secs()),
            };
            self.metrics.last_issued_patch("failed");
            failed += 1;
            let mut pending = self.pending();
            if example.is_none() {
                example = Some((format!("{}/{}", key.0, key.1), error));
            }
            if !pending.contains_key(&key) && pending.len() < self.limits.capacity {
                pending.insert(key, issued);
            }
        }
        if let Some((workload, error)) = example {
            tracing::warn!(
                failed,
                %workload,
                %error,
                "last issuance not recorded on ExternalWorkloads; retrying at the next flush"
            );
        }
        self.flushes.send_modify(|n| *n += 1);
    }

    async fn patch(&self, (ns, name): &Key, issued: &Issued) -> Result<(), kube::Error> {
        let body = serde_json::json!({
            "metadata": {"annotations": {
                LAST_ISSUED: proxy_lib::clock::rfc3339(issued.at),
                LAST_ISSUED_SERIAL: issued.serial,
            }}
        });
        async fn merge<K>(api: Api<K>, name: &str, body: &serde_json::Value) -> kube::Result<()>
        where
            K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
        {
            api.patch(name, &PatchParams::default(), &Patch::Merge(body))
                .await
                .map(drop)
        }
        if issued.version == "v1alpha1" {
            let api: Api<v1alpha1::ExternalWorkload> = Api::namespaced(self.client.clone(), ns);
            merge(api, name, &body).await
        } else {
            let api: Api<v1beta1::ExternalWorkload> = Api::namespaced(self.client.clone(), ns);
            merge(api, name, &body).await
        }
    }

    /// Flushes whenever one is due until `stop` completes, then writes what is left (for at
    /// most [`FINAL_FLUSH_TIMEOUT`]).
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        let mut every = tokio::time::interval(CHECK_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = every.tick() => {
                    if self.due() {
                        self.flush().await;
                    }
                }
            }
        }
        if self.queued() > 0
            && tokio::time::timeout(FINAL_FLUSH_TIMEOUT, self.flush())
                .await
                .is_err()
        {
            tracing::warn!("last issuances not recorded at shutdown: the API server was too slow");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::workloads::Registered;
    use proxy_lib::clock::{Clock, FakeClock};

    fn registered(name: &str, ip: &str) -> Registered {
        Registered {
            namespace: "ext".into(),
            name: name.into(),
            version: "v1beta1",
            identity: "spiffe://cluster.local/ns/ext/sa/db".into(),
            server_name: String::new(),
            ips: vec![ip.into()],
            labels: Default::default(),
        }
    }

    #[tokio::test]
    async fn issuances_coalesce_per_workload_and_a_full_queue_drops_and_counts() {
        let binding = Arc::new(WorkloadBinding::new(1));
        binding.replace(
            0,
            vec![registered("db", "10.0.0.5"), registered("db2", "10.0.0.5")],
        );
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        let clock = FakeClock::at_unix(1_700_000_000);
        let mut reg = prometheus_client::registry::Registry::default();
        let metrics = Metrics::new(&mut reg);
        let r = Recorder::new(
            client,
            binding,
            Arc::new(clock.clone()),
            metrics.clone(),
            Limits {
                every: DEFAULT_FLUSH,
                capacity: 1,
            },
        );
        let id = Identity::parse("db.ext.serviceaccount.identity.linkerd.cluster.local").unwrap();
        // Another address, or none: nothing matched.
        r.issued(&id, Some("10.0.0.6".parse().unwrap()), "01");
        r.issued(&id, None, "01");
        assert_eq!(r.queued(), 0);
        // Two workloads match; room for one: the other is dropped and counted.
        r.issued(&id, Some("::ffff:10.0.0.5".parse().unwrap()), "01");
        assert_eq!(r.queued(), 1);
        assert_eq!(metrics.last_issued_dropped.get(), 1);
        clock.advance(Duration::from_secs(3));
        r.issued(&id, Some("10.0.0.5".parse().unwrap()), "02");
        let p = r.pending().clone();
        let (key, newest) = p.iter().next().unwrap();
        assert_eq!(key, &("ext".to_string(), "db".to_string()));
        assert_eq!(newest.serial, "02", "the newest is kept");
        assert_eq!(newest.at, clock.now());
        // Due only once an interval has passed on the clock.
        assert!(!r.due());
        clock.advance(DEFAULT_FLUSH);
        assert!(r.due());
    }

    #[test]
    fn the_annotations_are_read_back() {
        let meta = ObjectMeta {
            annotations: Some(
                [
                    (LAST_ISSUED.to_string(), "2026-01-01T00:00:00Z".to_string()),
                    ("other".to_string(), "x".to_string()),
                ]
                .into(),
            ),
            ..ObjectMeta::default()
        };
        assert_eq!(
            LastIssued::of(&meta),
            LastIssued {
                at: Some("2026-01-01T00:00:00Z".into()),
                serial: None
            }
        );
        assert_eq!(
            LastIssued::of(&ObjectMeta::default()),
            LastIssued::default()
        );
    }
}
