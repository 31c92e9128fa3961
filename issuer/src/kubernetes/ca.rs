//! CA source `kubernetes`: the issuer pair from a Secret and the anchors from a ConfigMap,
//! both watched. Every new pair or bundle goes through the same validating constructor as a
//! file reload ([`Ca::from_pem`]); one that fails is refused (logged, counted, old one kept).
//!
//! The Secret may use either layout Linkerd uses: `crt.pem` + `key.pem` (its default
//! `linkerd.io/tls` scheme) or `tls.crt` + `tls.key` (+ `ca.crt`, as cert-manager writes a
//! `kubernetes.io/tls` Secret; `ca.crt` is not used: the anchors are the ConfigMap's
//! `ca-bundle.crt`).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::runtime::watcher;
use tokio::sync::watch;

use crate::ca::{Ca, CaFiles};
use crate::error::{Error, Result};

/// The ConfigMap key holding the trust anchors.
pub const TRUST_ROOTS_KEY: &str = "ca-bundle.crt";
/// The ConfigMap key holding the anchors' detached signature: the exact bytes `issuer ca
/// sign-bundle` writes as `ca.crt.sig`. Served with the anchors only when it verifies over
/// the anchors in use.
pub const TRUST_ROOTS_SIG_KEY: &str = "ca-bundle.crt.sig";
/// The two Secret layouts: (certificate key, private key key).
pub const SECRET_LAYOUTS: [(&str, &str); 2] = [("tls.crt", "tls.key"), ("crt.pem", "key.pem")];

/// Where the CA lives in the cluster (`[ca] namespace`, `secret`, `trust_roots`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeCaNames {
    /// Namespace of both objects.
    pub namespace: String,
    /// The issuer Secret.
    pub secret: String,
    /// The trust-roots ConfigMap.
    pub trust_roots: String,
    /// The ConfigMap where replaced issuer certificates are recorded
    /// ([`super::retired`]).
    pub retired: String,
}

impl Default for KubeCaNames {
    fn default() -> Self {
        Self {
            namespace: super::DEFAULT_NAMESPACE.into(),
            secret: super::DEFAULT_SECRET.into(),
            trust_roots: super::DEFAULT_TRUST_ROOTS.into(),
            retired: super::DEFAULT_RETIRED_ISSUERS.into(),
        }
    }
}

impl KubeCaNames {
    fn secret_key(&self, key: &str) -> PathBuf {
        PathBuf::from(format!(
            "Secret {}/{} key {key}",
            self.namespace, self.secret
        ))
    }

    fn roots_key(&self) -> PathBuf {
        PathBuf::from(format!(
            "ConfigMap {}/{} key {TRUST_ROOTS_KEY}",
            self.namespace, self.trust_roots
        ))
    }
}

/// What the watches have seen. `None`: not listed yet; `Some(None)`: absent. `Debug` shows
/// only resourceVersions: the Secret holds the issuer key.
#[derive(Clone, Default)]
pub struct Seen {
    secret: Option<Option<Secret>>,
    roots: Option<Option<ConfigMap>>,
}

impl std::fmt::Debug for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (secret, roots) = self.versions();
        f.debug_struct("Seen")
            .field("secret_version", &secret)
            .field("roots_version", &roots)
            .field("synced", &self.synced())
            .finish()
    }
}

impl Seen {
    /// The trust-roots ConfigMap's [`TRUST_ROOTS_SIG_KEY`], if it has one.
    pub fn roots_signature(&self) -> Option<Vec<u8>> {
        let roots = self.roots.as_ref()?.as_ref()?;
        roots
            .data
            .as_ref()
            .and_then(|d| d.get(TRUST_ROOTS_SIG_KEY))
            .map(|t| t.as_bytes().to_vec())
            .or_else(|| {
                roots
                    .binary_data
                    .as_ref()
                    .and_then(|d| d.get(TRUST_ROOTS_SIG_KEY))
                    .map(|b| b.0.clone())
            })
    }

    /// Both objects have been listed at least once.
    pub fn synced(&self) -> bool {
        self.secret.is_some() && self.roots.is_some()
    }

    /// The resourceVersions in use (changes when either object changes).
    pub fn versions(&self) -> (Option<String>, Option<String>) {
        let rv = |m: &kube::api::ObjectMeta| m.resource_version.clone();
        (
            self.secret
                .as_ref()
                .and_then(|s| s.as_ref().and_then(|s| rv(&s.metadata))),
            self.roots
                .as_ref()
                .and_then(|c| c.as_ref().and_then(|c| rv(&c.metadata))),
        )
    }
}

/// The watched CA objects. Dropping it stops the watches.
pub struct KubeCaSource {
    names: KubeCaNames,
    seen: watch::Receiver<Seen>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for KubeCaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeCaSource")
            .field("names", &self.names)
            .field("seen", &*self.seen.borrow())
            .finish()
    }
}

impl Drop for KubeCaSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn by_name(name: &str) -> watcher::Config {
    watcher::Config::default().fields(&format!("metadata.name={name}"))
}

impl KubeCaSource {
    /// Starts watching the Secret and the ConfigMap named by `names`.
    pub fn start(client: kube::Client, names: KubeCaNames) -> Self {
        let (tx, seen) = watch::channel(Seen::default());
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &names.namespace);
        let maps: Api<ConfigMap> = Api::namespaced(client, &names.namespace);
        let (tx1, tx2) = (tx.clone(), tx);
        let (s, c) = (names.secret.clone(), names.trust_roots.clone());
        let tasks = vec![
            tokio::spawn(super::follow(
                secrets,
                by_name(&names.secret),
                format!("Secret {}/{}", names.namespace, names.secret),
                move |all| {
                    let obj = all.get(&s).cloned();
                    tx1.send_modify(|seen| seen.secret = Some(obj));
                },
            )),
            tokio::spawn(super::follow(
                maps,
                by_name(&names.trust_roots),
                format!("ConfigMap {}/{}", names.namespace, names.trust_roots),
                move |all| {
                    let obj = all.get(&c).cloned();
                    tx2.send_modify(|seen| seen.roots = Some(obj));
                },
            )),
        ];
        Self { names, seen, tasks }
    }

    /// The names watched.
    pub fn names(&self) -> &KubeCaNames {
        &self.names
    }

    /// Waits until both objects have been listed once (up to `timeout`).
    pub async fn synced(&self, timeout: Duration) -> Result<()> {
        let mut rx = self.seen.clone();
        match tokio::time::timeout(timeout, rx.wait_for(Seen::synced)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Error::Kubernetes(format!(
                "could not list Secret {ns}/{} and ConfigMap {ns}/{} within {}s \
                 (is the API server reachable, and does RBAC allow list and watch?)",
                self.names.secret,
                self.names.trust_roots,
                timeout.as_secs(),
                ns = self.names.namespace,
            ))),
        }
    }

    /// A receiver that changes whenever either object does.
    pub fn subscribe(&self) -> watch::Receiver<Seen> {
        self.seen.clone()
    }

    /// The anchors' signature as the ConfigMap holds it now ([`TRUST_ROOTS_SIG_KEY`]).
    pub fn signature(&self) -> Option<Vec<u8>> {
        self.seen.borrow().roots_signature()
    }

    /// Names where [`KubeCaSource::signature`] comes from, for logs.
    pub fn signature_source(&self) -> String {
        format!(
            "ConfigMap {}/{} key {TRUST_ROOTS_SIG_KEY}",
            self.names.namespace, self.names.trust_roots
        )
    }

    /// Validates what was last seen at `now`, exactly like a file reload.
    pub fn load(&self, now: SystemTime) -> Result<Ca> {
        load(&self.names, &self.seen.borrow(), now)
    }
}

/// The trust-roots ConfigMap `namespace/name` holding `anchors_pem` and its signature
/// `sig_text` (what `issuer ca sign-bundle --configmap` prints), as YAML for `kubectl apply
/// -f -`.
pub fn trust_roots_yaml(namespace: &str, name: &str, anchors_pem: &str, sig_text: &str) -> String {
    let block = |text: &str| {
        text.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
         data:\n  {TRUST_ROOTS_KEY}: |\n{}  {TRUST_ROOTS_SIG_KEY}: |\n{}",
        block(anchors_pem),
        block(sig_text)
    )
}

/// Builds the CA from the objects `seen`, through [`Ca::from_pem`]. Errors name the Secret
/// or ConfigMap (and key) at fault.
pub fn load(names: &KubeCaNames, seen: &Seen, now: SystemTime) -> Result<Ca> {
    let missing = |what: PathBuf, reason: &str| Error::CaMaterial {
        path: what,
        reason: reason.into(),
    };
    let secret = seen
        .secret
        .clone()
        .flatten()
        .ok_or_else(|| missing(names.secret_key("*"), "the Secret does not exist"))?;
    let roots = seen
        .roots
        .clone()
        .flatten()
        .ok_or_else(|| missing(names.roots_key(), "the ConfigMap does not exist"))?;
    let data = secret.data.unwrap_or_default();
    let Some((cert_key, key_key)) = SECRET_LAYOUTS
        .iter()
        .find(|(c, k)| data.contains_key(*c) && data.contains_key(*k))
    else {
        return Err(missing(
            names.secret_key("*"),
            "has neither crt.pem + key.pem (linkerd.io/tls) nor tls.crt + tls.key \
             (kubernetes.io/tls)",
        ));
    };
    let anchors = roots
        .data
        .and_then(|mut d| d.remove(TRUST_ROOTS_KEY))
        .ok_or_else(|| missing(names.roots_key(), "key missing"))?;
    let cert = &data[*cert_key].0;
    let key = zeroize::Zeroizing::new(data[*key_key].0.clone());
    let sources = CaFiles {
        anchors: names.roots_key(),
        cert: names.secret_key(cert_key),
        key: names.secret_key(key_key),
    };
    Ca::from_pem(anchors.as_bytes(), cert, &key, now, &sources)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use proxy_lib::clock::{Clock, SystemClock};

    fn seen(data: &[(&str, &[u8])], bundle: Option<&str>) -> Seen {
        let secret = Secret {
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        };
        let roots = bundle.map(|b| ConfigMap {
            data: Some([(TRUST_ROOTS_KEY.to_string(), b.to_string())].into()),
            ..ConfigMap::default()
        });
        Seen {
            secret: Some(Some(secret)),
            roots: Some(roots),
        }
    }

    #[test]
    fn either_layout_loads_and_errors_name_the_object_and_key() {
        let d = tempfile::tempdir().unwrap();
        crate::init::run_at(&crate::init::InitOptions::new(d.path()), SystemClock.now()).unwrap();
        let read = |f: &str| std::fs::read(d.path().join(f)).unwrap();
        let anchors = String::from_utf8(read("ca.crt")).unwrap();
        let (cert, key) = (read("issuer.crt"), read("issuer.key"));
        let names = KubeCaNames::default();
        let now = SystemClock.now();
        for layout in SECRET_LAYOUTS {
            let s = seen(&[(layout.0, &cert), (layout.1, &key)], Some(&anchors));
            assert!(load(&names, &s, now).is_ok(), "{layout:?}");
            // the key never shows in Debug
            assert!(!format!("{s:?}").contains("PRIVATE"), "{s:?}");
        }
        let e = load(&names, &seen(&[("tls.crt", &cert)], Some(&anchors)), now).unwrap_err();
        assert!(
            e.to_string()
                .contains("Secret linkerd/linkerd-identity-issuer"),
            "{e}"
        );
        let e = load(
            &names,
            &seen(&[("tls.crt", &cert), ("tls.key", &cert)], Some(&anchors)),
            now,
        )
        .unwrap_err();
        assert!(e.to_string().contains("key tls.key"), "{e}");
        let e = load(
            &names,
            &seen(&[("tls.crt", &cert), ("tls.key", &key)], None),
            now,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("ConfigMap linkerd/linkerd-identity-trust-roots"),
            "{e}"
        );
        let e = load(
            &names,
            &seen(&[("tls.crt", &cert), ("tls.key", &key)], Some("junk")),
            now,
        )
        .unwrap_err();
        assert!(e.to_string().contains("key ca-bundle.crt"), "{e}");
    }
}
