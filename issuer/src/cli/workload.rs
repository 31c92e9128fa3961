//! `issuer workload register|list|remove`: a host as a Linkerd `ExternalWorkload` (and the
//! headless Service selecting it), with a bootstrap token bound to its identity and address.
//! No certificate and no CA key leave the cluster: the host's rotator gets its certificates
//! with the token.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Service, ServiceAccount, ServicePort, ServiceSpec};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, Resource};
use proxy_lib::identity::Identity;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::token::{TokenBackend, check_out, deliver};
use super::*;
use crate::kubernetes::last_issued::{LAST_ISSUED, LAST_ISSUED_SERIAL, LastIssued};
use crate::kubernetes::workloads::{
    AsRegistered, MANAGED_BY, MeshTls, PortSpec, Registered, WorkloadIp, v1alpha1, v1beta1,
};

/// The annotation on an ExternalWorkload naming the Service `register --service` created
/// for it (`remove` deletes that Service too).
pub const SERVICE_ANNOTATION: &str = "issuer.mesh-certs.io/service";

/// `--port PORT[:NAME]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortArg {
    /// The port.
    pub port: u16,
    /// Its name.
    pub name: Option<String>,
}

impl std::str::FromStr for PortArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (p, name) = match s.split_once(':') {
            Some((p, n)) => (p, Some(n.trim().to_string())),
            None => (s, None),
        };
        let port = p
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{s:?}: the port must be a number from 1 to 65535"))?;
        if let Some(n) = &name
            && (n.len() > 15 || !proxy_lib::identity::is_dns_label(n))
        {
            return Err(format!(
                "{s:?}: the port name must be a DNS label of at most 15 characters"
            ));
        }
        Ok(Self { port, name })
    }
}

/// `--labels K=V`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelArg(pub String, pub String);

impl std::str::FromStr for LabelArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
        let (k, v) = (k.trim(), v.trim());
        let name = k.rsplit('/').next().unwrap_or_default();
        let label_ok = |x: &str| {
            x.len() <= 63
                && x.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && x.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
                && x.chars().last().is_none_or(|c| c.is_ascii_alphanumeric())
        };
        if name.is_empty() || !label_ok(name) || !label_ok(v) {
            return Err(format!("{s:?} is not a valid Kubernetes label"));
        }
        Ok(Self(k.to_string(), v.to_string()))
    }
}

fn check_name(flag: &str, v: &str) -> Result<()> {
    if proxy_lib::identity::is_dns_label(v) {
        Ok(())
    } else {
        Err(Error::Config {
            path: "<flags>".into(),
            problems: vec![format!(
                "{flag} {v:?} is not a Kubernetes name (a DNS label)"
            )],
        })
    }
}

fn kube_err(what: String) -> impl FnOnce(kube::Error) -> Error {
    move |e| Error::Kubernetes(format!("{what}: {e}"))
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// The token store and a runtime and client for the workload objects.
struct Cluster {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
}

impl Cluster {
    fn connect() -> Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Server(format!("runtime: {e}")))?;
        let client = rt.block_on(crate::kubernetes::client())?;
        Ok(Self { rt, client })
    }

    fn api<K>(&self, ns: &str) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), ns)
    }
}

/// Creates `obj`, or replaces the object of that name (keeping its resourceVersion, so a
/// concurrent change is a conflict, not lost, and the issuer's last-issued annotations).
/// `check` may refuse to replace what is there.
async fn upsert<K>(
    api: &Api<K>,
    mut obj: K,
    check: impl Fn(&K) -> Result<()>,
) -> Result<&'static str>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let what = format!("{} {name}", K::kind(&()));
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => return Ok("created"),
        Err(e) if is_status(&e, 409) => {}
        Err(e) => return Err(kube_err(format!("creating {what}"))(e)),
    }
    let current = api
        .get(&name)
        .await
        .map_err(kube_err(format!("reading {what}")))?;
    check(&current)?;
    obj.meta_mut().resource_version = current.meta().resource_version.clone();
    // The issuer's record of the last issuance survives a re-registration.
    for key in [LAST_ISSUED, LAST_ISSUED_SERIAL] {
        if let Some(v) = current.meta().annotations.as_ref().and_then(|a| a.get(key)) {
            obj.meta_mut()
                .annotations
                .get_or_insert_default()
                .insert(key.to_string(), v.clone());
        }
    }
    api.replace(&name, &PostParams::default(), &obj)
        .await
        .map_err(kube_err(format!("updating {what}")))?;
    Ok("updated")
}

fn managed(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY.0))
        .is_some_and(|v| v == MANAGED_BY.1)
}

/// The identity of service account `sa` in `ns`, in the trust domain of the store's config.
fn identity_of(sa: &str, ns: &str, td: &TrustDomain, cp: &str) -> Result<Identity> {
    Ok(Identity::new_in(sa, ns, cp, td)?)
}

/// The ExternalWorkload `register` writes (`v1beta1`; the same spec serves `v1alpha1`).
fn external_workload(
    a: &WorkloadRegisterArgs,
    identity: &Identity,
    labels: &BTreeMap<String, String>,
) -> v1beta1::ExternalWorkload {
    let mut all = labels.clone();
    all.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    let mut ew = v1beta1::ExternalWorkload::new(
        &a.name,
        v1beta1::ExternalWorkloadSpec {
            mesh_tls: MeshTls {
                identity: identity.spiffe_id(),
                server_name: identity.to_string(),
            },
            ports: a
                .ports
                .iter()
                .map(|p| PortSpec {
                    name: p.name.clone(),
                    port: p.port,
                    protocol: None,
                })
                .collect(),
            workload_ips: vec![WorkloadIp {
                ip: a.ip.to_canonical().to_string(),
            }],
        },
    );
    ew.metadata.namespace = Some(a.namespace.clone());
    ew.metadata.labels = Some(all);
    if let Some(s) = &a.service {
        ew.metadata.annotations = Some(BTreeMap::from([(SERVICE_ANNOTATION.into(), s.clone())]));
    }
    ew
}

/// The headless Service selecting the workload by its labels.
fn service(a: &WorkloadRegisterArgs, name: &str, labels: &BTreeMap<String, String>) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(a.namespace.clone()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY.0.to_string(),
                MANAGED_BY.1.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(labels.clone()),
            ports: Some(
                a.ports
                    .iter()
                    .map(|p| ServicePort {
                        name: p.name.clone(),
                        port: i32::from(p.port),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

pub(super) fn register(a: WorkloadRegisterArgs, clock: SharedClock) -> Result<()> {
    check_name("--name", &a.name)?;
    check_name("--namespace", &a.namespace)?;
    let sa = a.service_account.clone().unwrap_or_else(|| a.name.clone());
    check_name("--service-account", &sa)?;
    if let Some(s) = &a.service {
        check_name("--service", s)?;
    }
    check_out(a.out.as_deref(), a.force)?;
    let (store, td, cp) = TokenBackend::open(&a.store.token_store())?;
    let identity = identity_of(&sa, &a.namespace, &td, &cp)?;
    let labels: BTreeMap<String, String> = if a.labels.is_empty() {
        BTreeMap::from([("app".to_string(), a.name.clone())])
    } else {
        a.labels
            .iter()
            .map(|l| (l.0.clone(), l.1.clone()))
            .collect()
    };
    let cluster = Cluster::connect()?;
    let ns = a.namespace.as_str();
    cluster.rt.block_on(async {
        if !a.allow_existing_service_account {
            let sas: Api<ServiceAccount> = cluster.api(ns);
            let found = sas
                .get_opt(&sa)
                .await
                .map_err(kube_err(format!("reading ServiceAccount {ns}/{sa}")))?;
            if found.is_some() {
                return Err(Error::Workload(format!(
                    "ServiceAccount {ns}/{sa} exists: the host would get the identity (and the \
                     Linkerd policies) of the pods that use it; choose another --name or \
                     --service-account, or pass --allow-existing-service-account"
                )));
            }
        }
        let ew = external_workload(&a, &identity, &labels);
        let beta: Api<v1beta1::ExternalWorkload> = cluster.api(ns);
        let done = match upsert(&beta, ew.clone(), |_| Ok(())).await {
            Err(Error::Kubernetes(m)) if m.contains("404") => {
                // An API server that serves only v1alpha1.
                let alpha: Api<v1alpha1::ExternalWorkload> = cluster.api(ns);
                let mut old = v1alpha1::ExternalWorkload::new(
                    &a.name,
                    v1alpha1::ExternalWorkloadSpec {
                        mesh_tls: ew.spec.mesh_tls.clone(),
                        ports: ew.spec.ports.clone(),
                        workload_ips: ew.spec.workload_ips.clone(),
                    },
                );
                old.metadata = ew.metadata.clone();
                upsert(&alpha, old, |_| Ok(())).await?
            }
            other => other?,
        };
        say(format_args!(
            "ExternalWorkload {ns}/{} {done}: meshTLS.identity {}, serverName {identity}, \
             workloadIPs [{}]",
            a.name,
            identity.spiffe_id(),
            a.ip.to_canonical()
        ));
        if let Some(name) = &a.service {
            let api: Api<Service> = cluster.api(ns);
            let done = upsert(&api, service(&a, name, &labels), |current| {
                if managed(current.meta()) {
                    Ok(())
                } else {
                    Err(Error::Workload(format!(
                        "Service {ns}/{name} exists and was not created by `issuer workload \
                         register`: not replacing it"
                    )))
                }
            })
            .await?;
            say(format_args!("Service {ns}/{name} {done} (headless)"));
        }
        Ok(())
    })?;
    let opts = crate::tokens::CreateOptions {
        identity: identity.clone(),
        ttl: None,
        allowed_ips: vec![a.ip.to_canonical().to_string().parse().map_err(|reason| {
            Error::Config {
                path: "<flags>".into(),
                problems: vec![format!("--ip: {reason}")],
            }
        })?],
        uses: Some(a.uses),
    };
    let t = store.create(&opts, clock.now())?;
    deliver(&store, &t, a.out.as_deref(), a.force, &clock)?;
    say(format_args!(
        "created token {} for {identity}, for {} key(s), from {}",
        t.record.id,
        a.uses,
        a.ip.to_canonical()
    ));
    Ok(())
}

/// Every ExternalWorkload of both versions in `ns` (all when `None`), a version the API
/// server does not serve counting as none; one entry per namespace/name, with what its
/// annotations say of its last issuance.
async fn all_workloads(
    client: &kube::Client,
    ns: Option<&str>,
) -> Result<Vec<(Registered, LastIssued)>> {
    async fn one<K>(api: Api<K>) -> Result<Vec<(Registered, LastIssued)>>
    where
        K: Resource + AsRegistered + Clone + DeserializeOwned + std::fmt::Debug,
    {
        match api.list(&ListParams::default()).await {
            Ok(l) => Ok(l
                .items
                .iter()
                .map(|o| (o.registered(), LastIssued::of(o.meta())))
                .collect()),
            Err(e) if is_status(&e, 404) => Ok(Vec::new()),
            Err(e) => Err(kube_err("listing ExternalWorkloads".into())(e)),
        }
    }
    let (beta, alpha) = match ns {
        Some(ns) => (
            Api::<v1beta1::ExternalWorkload>::namespaced(client.clone(), ns),
            Api::<v1alpha1::ExternalWorkload>::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let mut out = one(beta).await?;
    out.extend(one(alpha).await?);
    out.sort_by(|(a, _), (b, _)| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    out.dedup_by(|(a, _), (b, _)| a.namespace == b.namespace && a.name == b.name);
    Ok(out)
}

pub(super) fn list(a: WorkloadListArgs, clock: SharedClock) -> Result<()> {
    if let Some(ns) = &a.namespace {
        check_name("--namespace", ns)?;
    }
    let (store, _, _) = TokenBackend::open(&a.store.token_store())?;
    let records = store.list()?;
    let cluster = Cluster::connect()?;
    let workloads = cluster
        .rt
        .block_on(all_workloads(&cluster.client, a.namespace.as_deref()))?;
    let now = clock.now();
    let tokens_of = |w: &Registered| -> Vec<String> {
        records
            .iter()
            .filter(|r| r.status(now) == "active")
            .filter(|r| Identity::parse(&r.identity).is_ok_and(|id| w.names(&id)))
            .map(|r| r.id.clone())
            .collect()
    };
    let mut out = std::io::stdout().lock();
    let res = if a.json {
        let rows: Vec<_> = workloads
            .iter()
            .map(|(w, last)| {
                serde_json::json!({
                    "namespace": w.namespace,
                    "name": w.name,
                    "identity": w.identity,
                    "server_name": w.server_name,
                    "ips": w.ips,
                    "tokens": tokens_of(w),
                    "last_issued": last.at,
                    "last_issued_serial": last.serial,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::Value::Array(rows))
    } else {
        (|| {
            writeln!(out, "NAMESPACE/NAME  IP  TOKENS  IDENTITY  LAST ISSUED")?;
            for (w, last) in &workloads {
                let tokens = tokens_of(w);
                writeln!(
                    out,
                    "{}/{}  {}  {}  {}  {}",
                    w.namespace,
                    w.name,
                    if w.ips.is_empty() {
                        "-".into()
                    } else {
                        w.ips.join(",")
                    },
                    if tokens.is_empty() {
                        "-".into()
                    } else {
                        tokens.join(",")
                    },
                    w.identity,
                    last.at.as_deref().unwrap_or("never"),
                )?;
            }
            Ok(())
        })()
    };
    res.map_err(|source| Error::Io {
        path: "<stdout>".into(),
        source,
    })
}

/// Deletes `name` through `api`; `Ok(None)` when it does not exist (or the version is not
/// served), else the object as it was.
async fn delete_if_there<K>(api: &Api<K>, name: &str, what: &str) -> Result<Option<K>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let current = match api.get_opt(name).await {
        Ok(c) => c,
        Err(e) if is_status(&e, 404) => None,
        Err(e) => return Err(kube_err(format!("reading {what}"))(e)),
    };
    let Some(current) = current else {
        return Ok(None);
    };
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(Some(current)),
        Err(e) if is_status(&e, 404) => Ok(None),
        Err(e) => Err(kube_err(format!("deleting {what}"))(e)),
    }
}

pub(super) fn remove(a: WorkloadRemoveArgs, clock: SharedClock) -> Result<()> {
    check_name("--name", &a.name)?;
    check_name("--namespace", &a.namespace)?;
    let sa = a.service_account.clone().unwrap_or_else(|| a.name.clone());
    check_name("--service-account", &sa)?;
    let (store, td, cp) = TokenBackend::open(&a.store.token_store())?;
    let identity = identity_of(&sa, &a.namespace, &td, &cp)?;
    let cluster = Cluster::connect()?;
    let ns = a.namespace.as_str();
    let what = format!("ExternalWorkload {ns}/{}", a.name);
    let removed = cluster.rt.block_on(async {
        let beta: Api<v1beta1::ExternalWorkload> = cluster.api(ns);
        let alpha: Api<v1alpha1::ExternalWorkload> = cluster.api(ns);
        let meta = match delete_if_there(&beta, &a.name, &what).await? {
            Some(o) => Some(o.metadata),
            None => delete_if_there(&alpha, &a.name, &what)
                .await?
                .map(|o| o.metadata),
        };
        let Some(meta) = meta else {
            return Ok(false);
        };
        say(format_args!("{what} deleted"));
        if let Some(svc) = meta
            .annotations
            .as_ref()
            .and_then(|m| m.get(SERVICE_ANNOTATION))
        {
            let api: Api<Service> = cluster.api(ns);
            let svc_what = format!("Service {ns}/{svc}");
            match api.get_opt(svc).await {
                Ok(Some(s)) if managed(&s.metadata) => {
                    if delete_if_there(&api, svc, &svc_what).await?.is_some() {
                        say(format_args!("{svc_what} deleted"));
                    }
                }
                Ok(Some(_)) => say(format_args!(
                    "{svc_what} was not created by `issuer workload register`: kept"
                )),
                Ok(None) => {}
                Err(e) => return Err(kube_err(format!("reading {svc_what}"))(e)),
            }
        }
        Ok::<_, Error>(true)
    })?;
    let now = clock.now();
    let mut revoked = 0;
    for r in store.list()? {
        if r.status(now) == "active"
            && proxy_lib::identity::matches_san(&r.identity, identity.as_str())
        {
            store.revoke(&r.id, now)?;
            say(format_args!("revoked token {} for {}", r.id, r.identity));
            revoked += 1;
        }
    }
    if !removed && revoked == 0 {
        return Err(Error::Workload(format!(
            "no {what} and no active token for {identity}: nothing to remove"
        )));
    }
    // Certificates already issued renew by themselves: revoke the identity so they stop too.
    let rev = store.revoke_identity(&identity, Some("issuer workload remove"), now)?;
    say(format_args!(
        "revoked identity {identity}: its certificates issued before {} no longer renew",
        proxy_lib::clock::rfc3339(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(rev.revoked)
        )
    ));
    if !removed {
        say(format_args!("no {what} found (its tokens are revoked)"));
    }
    Ok(())
}
