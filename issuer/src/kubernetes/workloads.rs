//! Linkerd `ExternalWorkload`s (`workload.linkerd.io`, `v1beta1` and `v1alpha1`, where the
//! TLS field is spelled `meshTls`), and the binding they give (`[auth] external_workloads =
//! true`): a credential for identity X used from address P is honoured only while a watched
//! ExternalWorkload has `meshTLS.identity` = X's SPIFFE ID (or X itself, the DNS form some
//! guides write) and lists P in `workloadIPs`.
//!
//! Linkerd's destination controller tells meshed pods to verify such a host by a URI SAN equal
//! to `meshTLS.identity` and to send SNI = `meshTLS.serverName`: for our leaves that is the
//! SPIFFE ID (`spiffe://<td>/ns/<ns>/sa/<sa>`, the URI SAN) and the Linkerd DNS identity (the
//! DNS SAN). The resources are followed with `kube`'s watcher (a 410 Gone relists; errors are
//! retried with backoff, the last list kept); a version the API server does not serve (404) is
//! an empty set, logged once at info, and watched for.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use kube::runtime::watcher;
use kube::{Api, CustomResource, Resource, ResourceExt};
use proxy_lib::identity::Identity;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::auth::Binding;
use crate::error::AuthError;

/// The API group.
pub const GROUP: &str = "workload.linkerd.io";
/// The versions watched (both: an API server serving one of them is enough).
pub const VERSIONS: [&str; 2] = ["v1beta1", "v1alpha1"];
/// The label the objects `issuer workload register` creates carry.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "issuer");

/// `meshTLS`: how pods verify the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshTls {
    /// The URI SAN (or DNS name) pods require of the host's certificate.
    pub identity: String,
    /// The SNI pods send.
    pub server_name: String,
}

/// One port of an ExternalWorkload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// The port's name (a Service's `targetPort` may name it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The port number.
    pub port: u16,
    /// `TCP` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// One address of an ExternalWorkload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadIp {
    /// The address, as written.
    pub ip: String,
}

/// One served version of the `ExternalWorkload` CRD: the versions differ only in the spelling
/// of the `meshTLS` field.
macro_rules! external_workload_version {
    ($(#[$doc:meta])* $module:ident, $version:literal, $mesh_tls:literal) => {
        $(#[$doc])*
        pub mod $module {
            use super::*;

            /// The spec of an `ExternalWorkload` of this version.
            #[derive(CustomResource, Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
            #[kube(
                group = "workload.linkerd.io",
                version = $version,
                kind = "ExternalWorkload",
                namespaced,
                schema = "disabled"
            )]
            #[serde(rename_all = "camelCase")]
            pub struct ExternalWorkloadSpec {
                /// How pods verify the host.
                #[serde(rename = $mesh_tls)]
                pub mesh_tls: MeshTls,
                /// The ports it serves.
                #[serde(default, skip_serializing_if = "Vec::is_empty")]
                pub ports: Vec<PortSpec>,
                /// Its address (Linkerd allows one).
                #[serde(default, rename = "workloadIPs", skip_serializing_if = "Vec::is_empty")]
                pub workload_ips: Vec<WorkloadIp>,
            }
        }
    };
}

external_workload_version!(
    /// `workload.linkerd.io/v1beta1`.
    v1beta1,
    "v1beta1",
    "meshTLS"
);
external_workload_version!(
    /// `workload.linkerd.io/v1alpha1` (`meshTls`).
    v1alpha1,
    "v1alpha1",
    "meshTls"
);

/// An ExternalWorkload of either version, as the binding and `issuer workload list` see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// The version it was read as.
    pub version: &'static str,
    /// `meshTLS.identity`, as written.
    pub identity: String,
    /// `meshTLS.serverName`.
    pub server_name: String,
    /// `workloadIPs`, as written.
    pub ips: Vec<String>,
    /// Its labels.
    pub labels: std::collections::BTreeMap<String, String>,
}

impl Registered {
    fn new(
        meta: &kube::api::ObjectMeta,
        version: &'static str,
        tls: &MeshTls,
        ips: &[WorkloadIp],
    ) -> Self {
        Self {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            version,
            identity: tls.identity.clone(),
            server_name: tls.server_name.clone(),
            ips: ips.iter().map(|i| i.ip.clone()).collect(),
            labels: meta.labels.clone().unwrap_or_default(),
        }
    }

    /// The addresses that parse (IPv4-mapped IPv6 as IPv4).
    pub fn addrs(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ips
            .iter()
            .filter_map(|s| s.trim().parse::<IpAddr>().ok())
            .map(|a| a.to_canonical())
    }

    /// Whether `meshTLS.identity` names `identity`: its SPIFFE ID, or the DNS name itself.
    pub fn names(&self, identity: &Identity) -> bool {
        let written = self.identity.trim();
        written == identity.spiffe_id()
            || proxy_lib::identity::matches_san(written, identity.as_str())
    }

    /// `ns/name [ips]`, for messages.
    pub fn describe(&self) -> String {
        format!("{}/{} [{}]", self.namespace, self.name, self.ips.join(", "))
    }
}

/// Either version, read the same way.
pub trait AsRegistered {
    /// The common view.
    fn registered(&self) -> Registered;
}

impl AsRegistered for v1beta1::ExternalWorkload {
    fn registered(&self) -> Registered {
        Registered::new(
            &self.metadata,
            "v1beta1",
            &self.spec.mesh_tls,
            &self.spec.workload_ips,
        )
    }
}

impl AsRegistered for v1alpha1::ExternalWorkload {
    fn registered(&self) -> Registered {
        Registered::new(
            &self.metadata,
            "v1alpha1",
            &self.spec.mesh_tls,
            &self.spec.workload_ips,
        )
    }
}

/// The ExternalWorkloads last seen, indexed by `meshTLS.identity` (trimmed, lowercase).
#[derive(Debug, Default)]
struct Index {
    by_identity: HashMap<String, Vec<Registered>>,
}

/// One watch's share of the cache: `None` until its first list (or its first 404).
type Slots = Vec<Option<Vec<Registered>>>;

/// The binding check over a cache of watched ExternalWorkloads (see the module docs). Fed by
/// [`watch`]; also usable with [`WorkloadBinding::replace`] alone.
#[derive(Debug)]
pub struct WorkloadBinding {
    slots: Mutex<Slots>,
    index: ArcSwap<Index>,
    synced: tokio::sync::watch::Sender<bool>,
}

impl WorkloadBinding {
    /// A binding fed by `feeds` sources (watches), synced once each has reported.
    pub fn new(feeds: usize) -> Self {
        let (synced, _) = tokio::sync::watch::channel(feeds == 0);
        Self {
            slots: Mutex::new(vec![None; feeds]),
            index: ArcSwap::from_pointee(Index::default()),
            synced,
        }
    }

    /// Sets what source `slot` sees (a version not served: empty) and republishes; false
    /// (nothing republished) when the slot already held exactly `items`. [`Registered`]
    /// holds no annotations, so the issuer's own `meshcerts.io/last-issued` patches, which
    /// its watch sees as changes, cause no churn.
    pub fn replace(&self, slot: usize, items: Vec<Registered>) -> bool {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.get_mut(slot) {
            if s.as_ref() == Some(&items) {
                return false;
            }
            *s = Some(items);
        }
        let mut index = Index::default();
        for w in slots.iter().flatten().flatten() {
            index
                .by_identity
                .entry(w.identity.trim().to_ascii_lowercase())
                .or_default()
                .push(w.clone());
        }
        let all = slots.iter().all(Option::is_some);
        self.index.store(Arc::new(index));
        drop(slots);
        self.synced.send_if_modified(|s| {
            let changed = *s != all;
            *s = all;
            changed
        });
        true
    }

    /// Becomes true once every watch has listed (or found its version not served).
    pub fn synced(&self) -> tokio::sync::watch::Receiver<bool> {
        self.synced.subscribe()
    }

    /// Whether every watch has listed.
    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// The ExternalWorkloads that name `identity`.
    pub fn registered_for(&self, identity: &Identity) -> Vec<Registered> {
        let index = self.index.load();
        let spiffe = identity.spiffe_id();
        let dns = identity.as_str().to_ascii_lowercase();
        let mut out: Vec<Registered> = [spiffe.as_str(), dns.as_str()]
            .iter()
            .filter_map(|k| index.by_identity.get(*k))
            .flatten()
            .filter(|w| w.names(identity))
            .cloned()
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out.dedup_by(|a, b| a.namespace == b.namespace && a.name == b.name && a.ips == b.ips);
        out
    }
}

impl Binding for WorkloadBinding {
    fn check(&self, identity: &Identity, peer: Option<IpAddr>) -> Result<(), AuthError> {
        let found = self.registered_for(identity);
        if found.is_empty() {
            return Err(AuthError::NotRegistered {
                identity: identity.to_string(),
                spiffe_id: identity.spiffe_id(),
            });
        }
        let peer = peer.map(|p| p.to_canonical());
        if let Some(ip) = peer
            && found.iter().any(|w| w.addrs().any(|a| a == ip))
        {
            return Ok(());
        }
        Err(AuthError::NotRegisteredFrom {
            identity: identity.to_string(),
            peer: peer.map_or_else(|| "an unknown address".to_string(), |p| p.to_string()),
            registered: found
                .iter()
                .map(Registered::describe)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }
}

/// The watches feeding a [`WorkloadBinding`]; dropping it stops them.
#[derive(Debug)]
pub struct WorkloadWatch {
    /// The binding they feed.
    pub binding: Arc<WorkloadBinding>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for WorkloadWatch {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn follow_one<K>(
    api: Api<K>,
    what: String,
    binding: Arc<WorkloadBinding>,
    slot: usize,
) -> tokio::task::JoinHandle<()>
where
    K: Resource + AsRegistered + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let absent = binding.clone();
    tokio::spawn(super::follow_keyed(
        api,
        watcher::Config::default(),
        what,
        |o: &K| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()),
        move |all| {
            let items: Vec<Registered> = all.values().map(AsRegistered::registered).collect();
            let n = items.len();
            if binding.replace(slot, items) {
                tracing::debug!(slot, workloads = n, "ExternalWorkloads updated");
            }
        },
        move || {
            absent.replace(slot, Vec::new());
        },
    ))
}

/// Watches the ExternalWorkloads of both versions: across the cluster when `namespaces` is
/// empty, else in each namespace named.
pub fn watch(client: kube::Client, namespaces: &[String]) -> WorkloadWatch {
    let scopes: Vec<Option<&str>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.iter().map(|n| Some(n.as_str())).collect()
    };
    let binding = Arc::new(WorkloadBinding::new(scopes.len() * VERSIONS.len()));
    let mut tasks = Vec::new();
    for (i, scope) in scopes.iter().enumerate() {
        let where_ = scope.map_or_else(
            || "all namespaces".to_string(),
            |n| format!("namespace {n}"),
        );
        let (beta, alpha) = match scope {
            None => (Api::all(client.clone()), Api::all(client.clone())),
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
        };
        tasks.push(follow_one::<v1beta1::ExternalWorkload>(
            beta,
            format!("ExternalWorkloads {GROUP}/v1beta1 in {where_}"),
            binding.clone(),
            2 * i,
        ));
        tasks.push(follow_one::<v1alpha1::ExternalWorkload>(
            alpha,
            format!("ExternalWorkloads {GROUP}/v1alpha1 in {where_}"),
            binding.clone(),
            2 * i + 1,
        ));
    }
    WorkloadWatch { binding, tasks }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ew(ns: &str, name: &str, identity: &str, ips: &[&str]) -> Registered {
        Registered {
            namespace: ns.into(),
            name: name.into(),
            version: "v1beta1",
            identity: identity.into(),
            server_name: String::new(),
            ips: ips.iter().map(|s| s.to_string()).collect(),
            labels: Default::default(),
        }
    }

    #[test]
    fn both_identity_forms_bind_and_the_refusal_names_what_is_missing() {
        let id = Identity::parse("db.ext.serviceaccount.identity.linkerd.cluster.local").unwrap();
        let b = WorkloadBinding::new(2);
        assert!(!b.is_synced());
        b.replace(
            0,
            vec![ew(
                "ext",
                "db",
                "spiffe://cluster.local/ns/ext/sa/db",
                &["10.0.0.5"],
            )],
        );
        assert!(!b.is_synced());
        b.replace(
            1,
            vec![ew(
                "ext",
                "db2",
                "DB.ext.serviceaccount.identity.linkerd.cluster.local",
                &["::ffff:10.0.0.6"],
            )],
        );
        assert!(b.is_synced());
        assert_eq!(b.check(&id, Some("10.0.0.5".parse().unwrap())), Ok(()));
        assert_eq!(b.check(&id, Some("10.0.0.6".parse().unwrap())), Ok(()));
        let e = b.check(&id, Some("10.0.0.7".parse().unwrap())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        let msg = e.to_string();
        assert!(
            msg.contains("10.0.0.7") && msg.contains("ext/db [10.0.0.5]"),
            "{msg}"
        );
        assert!(b.check(&id, None).is_err());
        let other =
            Identity::parse("web.ext.serviceaccount.identity.linkerd.cluster.local").unwrap();
        let e = b
            .check(&other, Some("10.0.0.5".parse().unwrap()))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("spiffe://cluster.local/ns/ext/sa/web"),
            "{e}"
        );
        // Deleted: gone from the index.
        b.replace(0, Vec::new());
        b.replace(1, Vec::new());
        assert!(b.check(&id, Some("10.0.0.5".parse().unwrap())).is_err());
    }

    #[test]
    fn an_annotation_change_republishes_nothing() {
        let obj = |annotations: serde_json::Value| -> v1beta1::ExternalWorkload {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "workload.linkerd.io/v1beta1", "kind": "ExternalWorkload",
                "metadata": {"name": "a", "namespace": "n", "annotations": annotations},
                "spec": {"meshTLS": {"identity": "spiffe://td/ns/n/sa/a", "serverName": "a.n"},
                         "workloadIPs": [{"ip": "192.0.2.1"}]}
            }))
            .unwrap()
        };
        let b = WorkloadBinding::new(1);
        assert!(b.replace(0, vec![obj(serde_json::json!({})).registered()]));
        let patched = obj(serde_json::json!({
            "meshcerts.io/last-issued": "2026-01-01T00:00:00Z",
            "meshcerts.io/last-issued-serial": "4f00",
        }));
        assert!(
            !b.replace(0, vec![patched.registered()]),
            "churn on an annotation"
        );
        assert!(b.is_synced());
        let mut moved = patched.clone();
        moved.spec.workload_ips[0].ip = "192.0.2.2".into();
        assert!(b.replace(0, vec![moved.registered()]));
        // An emptied slot (a 404) followed by the same list republishes.
        assert!(b.replace(0, Vec::new()));
        assert!(b.replace(0, vec![moved.registered()]));
    }

    #[test]
    fn the_versions_spell_mesh_tls_their_own_way() {
        let beta: v1beta1::ExternalWorkload = serde_json::from_value(serde_json::json!({
            "apiVersion": "workload.linkerd.io/v1beta1", "kind": "ExternalWorkload",
            "metadata": {"name": "a", "namespace": "n"},
            "spec": {"meshTLS": {"identity": "spiffe://td/ns/n/sa/a", "serverName": "a.n"},
                     "workloadIPs": [{"ip": "192.0.2.1"}], "ports": [{"port": 80, "name": "http"}]}
        }))
        .unwrap();
        let alpha: v1alpha1::ExternalWorkload = serde_json::from_value(serde_json::json!({
            "apiVersion": "workload.linkerd.io/v1alpha1", "kind": "ExternalWorkload",
            "metadata": {"name": "a", "namespace": "n"},
            "spec": {"meshTls": {"identity": "spiffe://td/ns/n/sa/a", "serverName": "a.n"},
                     "workloadIPs": [{"ip": "192.0.2.1"}]}
        }))
        .unwrap();
        let (b, a) = (beta.registered(), alpha.registered());
        assert_eq!(
            (b.identity.as_str(), b.server_name.as_str()),
            ("spiffe://td/ns/n/sa/a", "a.n")
        );
        assert_eq!((a.identity, a.ips), (b.identity, b.ips));
        assert_eq!(
            serde_json::to_value(&beta).unwrap()["spec"]["meshTLS"]["serverName"],
            "a.n"
        );
    }
}
