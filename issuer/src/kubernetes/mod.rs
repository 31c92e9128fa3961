//! The issuer on Kubernetes: the CA read from a Secret and a ConfigMap ([`ca`]) and the
//! bootstrap-token records kept in Secrets ([`tokens`]), both followed with watches
//! (`kube::runtime::watcher`, which relists after 410 Gone and retries with backoff when the
//! API server goes away).
//!
//! The `kubernetes` authenticator ([`review`]) checks service-account tokens with
//! TokenReviews.
//!
//! ExternalWorkloads ([`workloads`]) bind bootstrap-token (and certificate) identities to the
//! addresses Linkerd knows the host by; the issuer records each one's last issuance on it
//! ([`last_issued`]).
//!
//! [`ISSUER_RULES`], [`REVIEW_RULES`], [`WORKLOAD_RULES`], [`OPERATOR_RULES`] and
//! [`WORKLOAD_OPERATOR_RULES`] list every API call the code makes, as RBAC rules; the
//! manifests in `examples/kubernetes/` grant exactly these (tests hold them to it).

pub mod ca;
pub mod last_issued;
pub mod retired;
pub mod review;
pub mod tokens;
pub mod workloads;

use std::collections::BTreeMap;
use std::fmt::Debug;

use futures_util::StreamExt;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// Default namespace of the CA objects and the token Secrets.
pub const DEFAULT_NAMESPACE: &str = "linkerd";
/// Default name of the issuer Secret.
pub const DEFAULT_SECRET: &str = "linkerd-identity-issuer";
/// Default name of the trust-roots ConfigMap.
pub const DEFAULT_TRUST_ROOTS: &str = "linkerd-identity-trust-roots";
/// Default name of the ConfigMap where replaced issuer certificates are recorded.
pub const DEFAULT_RETIRED_ISSUERS: &str = "mesh-issuer-retired-issuers";

/// Which objects an RBAC rule covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    /// Only the configured issuer Secret (`resourceNames`).
    IssuerSecret,
    /// Only the configured trust-roots ConfigMap (`resourceNames`).
    TrustRoots,
    /// Only the configured retired-issuers ConfigMap (`resourceNames`).
    RetiredIssuers,
    /// Every object of the resource in the namespace.
    All,
}

/// One RBAC rule the code needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The API group (`""` for the core group).
    pub group: &'static str,
    /// The resource (`secrets`, `configmaps`).
    pub resource: &'static str,
    /// The verbs, sorted.
    pub verbs: &'static [&'static str],
    /// Which objects.
    pub names: Names,
}

/// What `issuer serve` calls: list+watch of the CA Secret and the roots ConfigMap (a watch
/// on one object is a list and a watch with `fieldSelector=metadata.name=...`, which RBAC
/// restricts by `resourceNames`), get+update of the retired-issuers ConfigMap (by name: the
/// operator creates it, the server records replaced issuer certificates in it), and
/// list+watch of the token Secrets, with get+update to record a use of a token that has a use
/// count.
pub const ISSUER_RULES: &[Rule] = &[
    Rule {
        group: "",
        resource: "secrets",
        verbs: &["list", "watch"],
        names: Names::IssuerSecret,
    },
    Rule {
        group: "",
        resource: "configmaps",
        verbs: &["list", "watch"],
        names: Names::TrustRoots,
    },
    Rule {
        group: "",
        resource: "configmaps",
        verbs: &["get", "update"],
        names: Names::RetiredIssuers,
    },
    Rule {
        group: "",
        resource: "secrets",
        verbs: &["get", "list", "update", "watch"],
        names: Names::All,
    },
];

/// What `issuer serve` calls with `[auth] kubernetes = true`: create of TokenReviews, which
/// are cluster-scoped (a ClusterRole and ClusterRoleBinding grant it).
pub const REVIEW_RULES: &[Rule] = &[Rule {
    group: "authentication.k8s.io",
    resource: "tokenreviews",
    verbs: &["create"],
    names: Names::All,
}];

/// What `issuer token create|list|revoke --kubernetes` calls: create, list, and get+update
/// (revoke keeps the record, marked revoked).
pub const OPERATOR_RULES: &[Rule] = &[Rule {
    group: "",
    resource: "secrets",
    verbs: &["create", "get", "list", "update"],
    names: Names::All,
}];

/// What `issuer serve` calls with `[auth] external_workloads = true`: list+watch of
/// `externalworkloads` (both served versions, `v1beta1` and `v1alpha1`), across the cluster
/// when `[auth] namespaces` is empty (a ClusterRole), else in each namespace named; and patch
/// of them, only to record the last issuance: a JSON merge patch of the two annotations
/// [`last_issued::LAST_ISSUED`] and [`last_issued::LAST_ISSUED_SERIAL`], never the spec
/// (RBAC cannot narrow a patch to fields; the code sends nothing else).
pub const WORKLOAD_RULES: &[Rule] = &[Rule {
    group: workloads::GROUP,
    resource: "externalworkloads",
    verbs: &["list", "patch", "watch"],
    names: Names::All,
}];

/// What `issuer workload register|list|remove` calls in the workloads' namespaces: the
/// ExternalWorkload (create, or get+update; list; delete), the headless Service beside it
/// (get, create, update, delete), and a get of the ServiceAccount of the same name (the
/// collision check). The token Secrets they create or revoke are [`OPERATOR_RULES`].
pub const WORKLOAD_OPERATOR_RULES: &[Rule] = &[
    Rule {
        group: workloads::GROUP,
        resource: "externalworkloads",
        verbs: &["create", "delete", "get", "list", "update"],
        names: Names::All,
    },
    Rule {
        group: "",
        resource: "services",
        verbs: &["create", "delete", "get", "update"],
        names: Names::All,
    },
    Rule {
        group: "",
        resource: "serviceaccounts",
        verbs: &["get"],
        names: Names::All,
    },
];

/// A client from the environment: in a pod, the in-cluster config; elsewhere the kubeconfig
/// as kubectl finds it (`KUBECONFIG`, then `~/.kube/config`).
pub async fn client() -> Result<kube::Client> {
    kube::Client::try_default()
        .await
        .map_err(|e| Error::Kubernetes(format!("no usable Kubernetes configuration: {e}")))
}

/// Follows the objects `api` lists under `config` and calls `on_change` with all of them
/// (by name) after the initial list and after every change. Watch errors are logged and
/// retried with backoff; a 410 Gone relists. Runs until dropped.
pub(crate) async fn follow<K>(
    api: Api<K>,
    config: watcher::Config,
    what: String,
    on_change: impl FnMut(&BTreeMap<String, K>) + Send,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    follow_keyed(api, config, what, |o: &K| o.name_any(), on_change, || {}).await;
}

/// Whether a watch failed because the API server does not serve the resource (404: its
/// CRD, or this version of it, is not installed).
fn not_served(error: &watcher::Error) -> bool {
    match error {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// [`follow`] with the map keyed by `key`, and `on_absent` called (logged at info, once per
/// outage) while the API server answers 404 for the resource: not served is a state, an
/// empty one, not a failure. The watch keeps retrying with backoff, so a CRD installed
/// later is picked up.
pub(crate) async fn follow_keyed<K>(
    api: Api<K>,
    config: watcher::Config,
    what: String,
    key: impl Fn(&K) -> String + Send,
    mut on_change: impl FnMut(&BTreeMap<String, K>) + Send,
    mut on_absent: impl FnMut() + Send,
) where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let mut current: BTreeMap<String, K> = BTreeMap::new();
    let mut init: Option<BTreeMap<String, K>> = None;
    let mut failing = false;
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(error) => {
                if not_served(&error) {
                    if !failing {
                        tracing::info!(%what, "not served by the API server (404); watching for it");
                    }
                    current.clear();
                    on_absent();
                } else if !failing {
                    tracing::warn!(%error, %what, "Kubernetes watch failed; retrying");
                }
                failing = true;
                continue;
            }
        };
        if failing {
            tracing::info!(%what, "Kubernetes watch resumed");
            failing = false;
        }
        match ev {
            Event::Init => init = Some(BTreeMap::new()),
            Event::InitApply(o) => {
                init.get_or_insert_default().insert(key(&o), o);
            }
            Event::InitDone => {
                current = init.take().unwrap_or_default();
                on_change(&current);
            }
            Event::Apply(o) => {
                current.insert(key(&o), o);
                on_change(&current);
            }
            Event::Delete(o) => {
                current.remove(&key(&o));
                on_change(&current);
            }
        }
    }
}
