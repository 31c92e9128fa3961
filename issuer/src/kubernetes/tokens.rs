//! Token store `kubernetes`: one Secret per bootstrap-token record (SHA-256, identity,
//! expiry, allowed IPs, revocation — never the token), labelled for the issuer, in one
//! namespace. Every replica watches them, so replicas behind one Service share the records;
//! `issuer token create|list|revoke --kubernetes` writes and reads them.
//!
//! A use of a token with a use count is recorded in its Secret by the server that certifies
//! (read, bind the key, replace with the read `resourceVersion` as precondition: a concurrent
//! change makes the replace fail with 409 and the read is redone), so replicas never spend the
//! same use twice; the server's service account then needs `update` on these Secrets.
//!
//! An identity revocation is one Secret per identity, with the same labels, named
//! [`REVOCATION_PREFIX`] plus the first 16 hex digits of the identity's SHA-256, holding
//! [`REVOCATION_KEY`] (the identity, when, why); the same watch delivers them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ListParams, ObjectMeta, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use crate::error::{AuthError, Error, Result};
use crate::tokens::{
    Binding, CreateOptions, IdentityRevocation, NewToken, TokenRecord, TokenStore,
};

/// The labels every token Secret carries (the store lists by them).
pub const LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/managed-by", "issuer"),
    ("app.kubernetes.io/component", "bootstrap-token"),
];
/// The Secret key holding the record (JSON).
pub const RECORD_KEY: &str = "record.json";
/// Token Secrets are named this prefix plus the token id.
pub const NAME_PREFIX: &str = "issuer-token-";
/// The Secret key holding an identity revocation (JSON).
pub const REVOCATION_KEY: &str = "revocation.json";
/// Identity-revocation Secrets are named this prefix plus 16 hex digits of the identity's
/// SHA-256.
pub const REVOCATION_PREFIX: &str = "issuer-revocation-";
/// How often a write that keeps losing to concurrent changes (409) is retried.
const WRITE_ATTEMPTS: usize = 8;

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

/// The Secret name of the revocation of `identity`.
pub fn revocation_secret_name(identity: &str) -> String {
    use sha2::Digest;
    let h = hex::encode(sha2::Sha256::digest(identity.as_bytes()));
    format!("{REVOCATION_PREFIX}{}", &h[..16])
}

/// The identity revocation a Secret holds, if it is a revocation Secret.
pub fn revocation_of(secret: &Secret) -> Option<std::result::Result<IdentityRevocation, String>> {
    let bytes = secret.data.as_ref()?.get(REVOCATION_KEY)?;
    Some(
        serde_json::from_slice(&bytes.0)
            .map_err(|e| format!("{REVOCATION_KEY} is not an identity revocation ({e})")),
    )
}

fn revocation_secret(r: &IdentityRevocation) -> Result<Secret> {
    let json = serde_json::to_vec(r)
        .map_err(|e| Error::Kubernetes(format!("encoding identity revocation: {e}")))?;
    Ok(labelled(
        revocation_secret_name(&r.identity),
        REVOCATION_KEY,
        json,
    ))
}

fn labelled(name: String, key: &str, json: Vec<u8>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name),
            labels: Some(
                LABELS
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(key.to_string(), ByteString(json))])),
        ..Secret::default()
    }
}

fn secret_for(record: &TokenRecord) -> Result<Secret> {
    let json = serde_json::to_vec(record)
        .map_err(|e| Error::Kubernetes(format!("encoding token record: {e}")))?;
    Ok(labelled(secret_name(&record.id), RECORD_KEY, json))
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
        for s in list.items.iter().filter(|s| revocation_of(s).is_none()) {
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
        self.update(id, |rec| {
            rec.revoke(now);
            Ok(())
        })
        .await?
        .map_err(|e: std::convert::Infallible| match e {})
    }

    /// Reads token `id`'s record, applies `f`, and writes it back with the read
    /// `resourceVersion` as precondition, redoing it all when another writer got there first.
    /// `f`'s own refusal is handed back as the inner error and nothing is written.
    async fn update<E>(
        &self,
        id: &str,
        mut f: impl FnMut(&mut TokenRecord) -> std::result::Result<(), E>,
    ) -> Result<std::result::Result<TokenRecord, E>> {
        let name = secret_name(id);
        for _ in 0..WRITE_ATTEMPTS {
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
            if let Err(e) = f(&mut rec) {
                return Ok(Err(e));
            }
            // `secret` keeps the resourceVersion it was read at: the replace is conditional.
            secret.data = secret_for(&rec)?.data;
            match self
                .api
                .replace(&name, &PostParams::default(), &secret)
                .await
            {
                Ok(_) => return Ok(Ok(rec)),
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
            "Secret {}/{name} kept changing under the update; try again",
            self.namespace
        )))
    }

    /// Reserves a use of token `id` for key fingerprint `key` (see [`TokenRecord::bind`]).
    pub async fn reserve(&self, id: &str, key: &str) -> std::result::Result<Binding, AuthError> {
        let mut binding = Binding::Unlimited;
        let res = self
            .update(id, |rec| {
                if rec.revoked.is_some() {
                    return Err(AuthError::Revoked { id: rec.id.clone() });
                }
                binding = rec.bind(key)?;
                Ok(())
            })
            .await;
        match res {
            Ok(Ok(_)) => Ok(binding),
            Ok(Err(refused)) => Err(refused),
            Err(Error::NoSuchToken(_)) => Err(AuthError::UnknownToken),
            Err(e) => Err(AuthError::StoreUnavailable(e.to_string())),
        }
    }

    /// Gives back the use `key` took of token `id` ([`KubeTokens::settle`], nothing issued).
    pub async fn release(&self, id: &str, key: &str) -> Result<()> {
        self.settle(id, key, false).await
    }

    /// Ends a held reservation of `key` on token `id`: committed when `issued`, else released
    /// (see [`TokenRecord::settle`]); conditional on the resourceVersion read, like
    /// [`KubeTokens::reserve`].
    pub async fn settle(&self, id: &str, key: &str, issued: bool) -> Result<()> {
        self.update(id, |rec| {
            rec.settle(key, issued);
            Ok::<_, std::convert::Infallible>(())
        })
        .await
        .map(|_| ())
    }

    /// Records an identity revocation (merged with an earlier one of the same identity).
    pub async fn revoke_identity(
        &self,
        identity: &proxy_lib::identity::Identity,
        reason: Option<&str>,
        now: SystemTime,
    ) -> Result<IdentityRevocation> {
        let new = crate::tokens::revocation(identity, reason, now);
        let name = revocation_secret_name(&new.identity);
        let what = format!("Secret {}/{name}", self.namespace);
        for _ in 0..WRITE_ATTEMPTS {
            match self.api.get(&name).await {
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    match self
                        .api
                        .create(&PostParams::default(), &revocation_secret(&new)?)
                        .await
                    {
                        Ok(_) => return Ok(new),
                        Err(kube::Error::Api(s)) if s.code == 409 => continue,
                        Err(e) => return Err(kube_err(&format!("creating {what}"), e)),
                    }
                }
                Err(e) => return Err(kube_err(&format!("reading {what}"), e)),
                Ok(mut secret) => {
                    let mut merged = match revocation_of(&secret) {
                        Some(Ok(r)) if r.identity == new.identity => r,
                        _ => new.clone(),
                    };
                    merged.merge(&new);
                    secret.data = revocation_secret(&merged)?.data;
                    match self
                        .api
                        .replace(&name, &PostParams::default(), &secret)
                        .await
                    {
                        Ok(_) => return Ok(merged),
                        Err(kube::Error::Api(s)) if s.code == 409 => continue,
                        Err(e) => return Err(kube_err(&format!("updating {what}"), e)),
                    }
                }
            }
        }
        Err(Error::Kubernetes(format!(
            "{what} kept changing under the revocation; try again"
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
    let store = Arc::new(TokenStore::fed_writing(
        format!("token Secrets in namespace {namespace}"),
        KubeTokens::new(client.clone(), namespace),
    ));
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let feed = store.clone();
    let ns = namespace.to_string();
    let task = tokio::spawn(super::follow(
        api,
        watcher::Config::default().labels(&selector()),
        format!("token Secrets in {namespace}"),
        move |all| {
            let mut records = Vec::new();
            let mut revocations = Vec::new();
            for s in all.values() {
                let found = match revocation_of(s) {
                    Some(r) => r.map(|r| revocations.push(r)),
                    None => record_of(s).map(|r| records.push(r)),
                };
                if let Err(reason) = found {
                    tracing::warn!(secret = %s.name_any(), namespace = %ns, %reason,
                        "ignoring a token Secret without a valid record");
                }
            }
            tracing::debug!(tokens = records.len(), "token records updated");
            feed.replace_all(records, revocations);
            synced_tx.send_replace(true);
        },
    ));
    WatchedTokens {
        store,
        synced,
        task,
    }
}
