//! The issuer certificates a `kubernetes` CA source replaced, kept across restarts: a
//! ConfigMap the operator creates (`[ca] retired_issuers`, default
//! [`super::DEFAULT_RETIRED_ISSUERS`], in the CA namespace) holds them under [`RETIRED_KEY`],
//! in the same bounded format as `retired-issuers.json` beside a file CA
//! ([`crate::renewal::with_retired`]: certificates only, never a key; an entry goes once every
//! leaf its issuer signed has expired). The server reads it at start and, when the watch
//! brings a new issuer pair, records the one it replaces with a replace conditional on the
//! `resourceVersion` it read (two replicas recording at once both land). It needs only `get`
//! and `update` on that one ConfigMap; without the ConfigMap, replaced issuers are remembered
//! in memory only (a warning says so).

use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::PostParams;
use rustls_pki_types::CertificateDer;

use crate::renewal::Retired;

/// The ConfigMap key holding the record (JSON).
pub const RETIRED_KEY: &str = "retired-issuers.json";
/// How often a write that keeps losing to concurrent changes (409) is retried.
const WRITE_ATTEMPTS: usize = 8;

/// The retired-issuers ConfigMap.
#[derive(Clone)]
pub struct RetiredIssuers {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
}

impl std::fmt::Debug for RetiredIssuers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what())
    }
}

impl RetiredIssuers {
    /// The ConfigMap `namespace/name`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    fn what(&self) -> String {
        format!("ConfigMap {}/{}", self.namespace, self.name)
    }

    /// Reads the ConfigMap: `Ok(None)` when it does not exist.
    async fn get(&self) -> Result<Option<(ConfigMap, Retired)>, String> {
        let cm = match self.api.get(&self.name).await {
            Ok(cm) => cm,
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
            Err(e) => return Err(format!("reading {}: {e}", self.what())),
        };
        let list = match cm.data.as_ref().and_then(|d| d.get(RETIRED_KEY)) {
            Some(text) => crate::renewal::parse_retired(
                text.as_bytes(),
                &format!("{} key {RETIRED_KEY}", self.what()),
            )?,
            None => Vec::new(),
        };
        Ok(Some((cm, list)))
    }

    /// The replaced issuers recorded, with when each was replaced (none when the ConfigMap
    /// does not exist: that is logged, once, as a warning).
    pub async fn read(&self) -> Result<Retired, String> {
        match self.get().await? {
            Some((_, list)) => Ok(list),
            None => {
                tracing::warn!(
                    configmap = %self.what(),
                    "the retired-issuers ConfigMap does not exist: issuers replaced from now on \
                     are remembered in memory only (create it to keep them across restarts)"
                );
                Ok(Vec::new())
            }
        }
    }

    /// Records that `replaced` stopped being the issuer at `now` (entries retired longer than
    /// `keep` ago dropped), retried when another writer got there first.
    pub async fn record(
        &self,
        replaced: &CertificateDer<'static>,
        now: SystemTime,
        keep: Duration,
    ) -> Result<(), String> {
        for _ in 0..WRITE_ATTEMPTS {
            let Some((mut cm, list)) = self.get().await? else {
                return Err(format!(
                    "{} does not exist: create it (see examples/kubernetes/issuer.yaml) so \
                     replaced issuers survive a restart",
                    self.what()
                ));
            };
            let json = crate::renewal::with_retired(list, replaced, now, Some(keep))?;
            let text = String::from_utf8(json).map_err(|e| e.to_string())?;
            cm.data
                .get_or_insert_default()
                .insert(RETIRED_KEY.to_string(), text);
            // `cm` keeps the resourceVersion it was read at: the replace is conditional.
            match self
                .api
                .replace(&self.name, &PostParams::default(), &cm)
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(format!("updating {}: {e}", self.what())),
            }
        }
        Err(format!(
            "{} kept changing under the update; the replaced issuer is remembered in memory only",
            self.what()
        ))
    }
}
