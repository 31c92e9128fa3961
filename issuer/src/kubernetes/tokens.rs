//! Token store `kubernetes`: one Secret per bootstrap-token record (SHA-256, identity,
//! expiry, allowed IPs, revocation — never the token), labelled for the issuer, in one
//! namespace. Every replica watches them, so replicas behind one Service share the records;
//! `issuer token create|list|revoke --kubernetes` writes and reads them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use crate::error::{Error, Result};
use crate::tokens::{CreateOptions, NewToken, TokenRecord, TokenStore};

/// The labels every token Secret carries (the store lists by them).
pub const LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/managed-by", "issuer"),
    ("app.kubernetes.io/component", "bootstrap-token"),
];
/// The Secret key holding the record (JSON).
pub const RECORD_KEY: &str = "record.json";
/// Token Secrets are named this prefix plus the token id.
pub const NAME_PREFIX: &str = "issuer-token-";

/// The label selector of the token Secrets.
pub fn selector() -> String {
    LABELS
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The Secret name of token `id`.
pub fn secret_name(id: &str) -> String {
    format!("{NAME_PREFIX}{id}")
}

fn kube_err(what: &str, e: kube::Error) -> Error {
    Error::Kubernetes(format!("{what}: {e}"))
}

/// The record a token Secret holds.
pub fn record_of(secret: &Secret) -> std::result::Result<TokenRecord, String> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(RECORD_KEY))
        .ok_or_else(|| format!("no {RECORD_KEY} key"))?;
    serde_json::from_slice(&bytes.0)
        .map_err(|e| format!("{RECORD_KEY} is not a token record ({e})"))
}

fn secret_for(record: &TokenRecord) -> Result<Secret> {
    let json = serde_json::to_vec(record)
        .map_err(|e| Error::Kubernetes(format!("encoding token record: {e}")))?;
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&record.id)),
            labels: Some(
                LABELS
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(RECORD_KEY.to_string(), ByteString(json))])),
        ..Secret::default()
    })
}

/// The token Secrets of one namespace, for the `issuer token` commands.
#[derive(Clone)]
pub struct KubeTokens {
    api: Api<Secret>,
    namespace: String,
}

impl std::fmt::Debug for KubeTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTokens")
            .field("namespace", &self.namespace)
            .finish()
    }
}

impl KubeTokens {
    /// The token Secrets in `namespace`.
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
        }
    }

    /// Creates a token: its record becomes a new Secret.
    pub async fn create(&self, opts: &CreateOptions, now: SystemTime) -> Result<NewToken> {
        let t = crate::tokens::mint(opts, now);
        self.api
            .create(&PostParams::default(), &secret_for(&t.record)?)
            .await
            .map_err(|e| kube_err(&format!("creating a token Secret in {}", self.namespace), e))?;
        Ok(t)
    }

    /// Every record (Secrets that hold none are reported on stderr and skipped).
    pub async fn list(&self) -> Result<Vec<TokenRecord>> {
        let list = self
            .api
            .list(&ListParams::default().labels(&selector()))
            .await
            .map_err(|e| kube_err(&format!("listing token Secrets in {}", self.namespace), e))?;
        let mut out = Vec::new();
        for s in &list.items {
            match record_of(s) {
                Ok(r) => out.push(r),
                Err(reason) => tracing::warn!(
                    secret = %s.name_any(), namespace = %self.namespace, %reason,
                    "skipping a token Secret without a valid record"
                ),
            }
        }
        out.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(out)
    }

    /// Marks token `id` revoked (the record is kept); retried on a concurrent update.
    pub async fn revoke(&self, id: &str, now: SystemTime) -> Result<TokenRecord> {
        let name = secret_name(id);
        for _ in 0..5 {
            let mut secret = match self.api.get(&name).await {
                Ok(s) => s,
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    return Err(Error::NoSuchToken(id.to_string()));
                }
                Err(e) => {
                    return Err(kube_err(
                        &format!("reading Secret {}/{name}", self.namespace),
                        e,
                    ));
                }
            };
            let mut rec = record_of(&secret).map_err(|reason| {
                Error::Kubernetes(format!("Secret {}/{name}: {reason}", self.namespace))
            })?;
            rec.revoke(now);
            secret.data = secret_for(&rec)?.data;
            match self
                .api
                .replace(&name, &PostParams::default(), &secret)
                .await
            {
                Ok(_) => return Ok(rec),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => {
                    return Err(kube_err(
                        &format!("updating Secret {}/{name}", self.namespace),
                        e,
                    ));
                }
            }
        }
        Err(Error::Kubernetes(format!(
            "Secret {}/{name} kept changing under the revoke; try again",
            self.namespace
        )))
    }
}

/// A token store fed by a watch (see [`watched_store`]).
#[derive(Debug)]
pub struct WatchedTokens {
    /// The store the authenticator reads.
    pub store: Arc<TokenStore>,
    /// Becomes true once the Secrets have been listed.
    pub synced: tokio::sync::watch::Receiver<bool>,
    /// The task feeding the store (abort it to stop).
    pub task: tokio::task::JoinHandle<()>,
}

/// The server side: a token store fed by a watch on the token Secrets of `namespace`. A
/// Secret without a valid record is logged and left out.
pub fn watched_store(client: kube::Client, namespace: &str) -> WatchedTokens {
    let (synced_tx, synced) = tokio::sync::watch::channel(false);
    let store = Arc::new(TokenStore::fed(format!(
        "token Secrets in namespace {namespace}"
    )));
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let feed = store.clone();
    let ns = namespace.to_string();
    let task = tokio::spawn(super::follow(
        api,
        watcher::Config::default().labels(&selector()),
        format!("token Secrets in {namespace}"),
        move |all| {
            let records = all
                .values()
                .filter_map(|s| match record_of(s) {
                    Ok(r) => Some(r),
                    Err(reason) => {
                        tracing::warn!(secret = %s.name_any(), namespace = %ns, %reason,
                            "ignoring a token Secret without a valid record");
                        None
                    }
                })
                .collect::<Vec<_>>();
            tracing::debug!(tokens = records.len(), "token records updated");
            feed.replace(records);
            synced_tx.send_replace(true);
        },
    ));
    WatchedTokens {
        store,
        synced,
        task,
    }
}
