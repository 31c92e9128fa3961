//! `issuer token create|list|revoke`: bootstrap tokens in the file store or in Kubernetes
//! Secrets.

use super::*;

/// The token store a `token` subcommand (or `revoke`, `workload`) works on.
pub(super) enum TokenBackend {
    File(PathBuf),
    Kubernetes(Box<KubeBackend>),
}

/// The token Secrets and a runtime to call the API server from the synchronous CLI.
pub(super) struct KubeBackend {
    rt: tokio::runtime::Runtime,
    tokens: crate::kubernetes::tokens::KubeTokens,
}

impl TokenBackend {
    /// The store `a` names, its trust domain and its control-plane namespace.
    pub(super) fn open(a: &TokenStoreArgs) -> Result<(Self, TrustDomain, String)> {
        let path = match (&a.config, &a.dir) {
            (Some(c), _) => Some(c.clone()),
            (None, Some(d)) => Some(Config::path_in_dir(d)),
            (None, None) => None,
        };
        let cfg = path
            .map(|p| Config::load(&p, &Overrides::default()))
            .transpose()?;
        let trust_domain = cfg
            .as_ref()
            .map(|c| c.policy.trust_domain.clone())
            .unwrap_or_default();
        let control_plane = cfg
            .as_ref()
            .map(|c| c.ca_control_plane_namespace.clone())
            .unwrap_or_else(|| crate::ca::ops::DEFAULT_CONTROL_PLANE_NAMESPACE.to_string());
        let configured = cfg.as_ref().and_then(|c| c.tokens_kubernetes.clone());
        if !a.kubernetes && configured.is_none() {
            let tokens = cfg.map(|c| c.tokens).ok_or_else(|| Error::Config {
                path: "<flags>".into(),
                problems: vec!["give --dir, --config or --kubernetes".into()],
            })?;
            return Ok((Self::File(tokens), trust_domain, control_plane));
        }
        let namespace = a
            .namespace
            .clone()
            .or(configured)
            .unwrap_or_else(|| crate::kubernetes::DEFAULT_NAMESPACE.to_string());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Server(format!("runtime: {e}")))?;
        let client = rt.block_on(crate::kubernetes::client())?;
        let tokens = crate::kubernetes::tokens::KubeTokens::new(client, &namespace);
        Ok((
            Self::Kubernetes(Box::new(KubeBackend { rt, tokens })),
            trust_domain,
            control_plane,
        ))
    }

    pub(super) fn create(
        &self,
        opts: &crate::tokens::CreateOptions,
        now: std::time::SystemTime,
    ) -> Result<crate::tokens::NewToken> {
        match self {
            Self::File(p) => crate::tokens::create(p, opts, now),
            Self::Kubernetes(k) => k.rt.block_on(k.tokens.create(opts, now)),
        }
    }

    pub(super) fn list(&self) -> Result<Vec<crate::tokens::TokenRecord>> {
        match self {
            Self::File(p) => crate::tokens::list(p),
            Self::Kubernetes(k) => k.rt.block_on(k.tokens.list()),
        }
    }

    /// Revokes `identity` in this store (see [`crate::tokens::revoke_identity`]).
    pub(super) fn revoke_identity(
        &self,
        identity: &proxy_lib::identity::Identity,
        reason: Option<&str>,
        now: std::time::SystemTime,
    ) -> Result<crate::tokens::IdentityRevocation> {
        match self {
            Self::File(p) => crate::tokens::revoke_identity_in_file(p, identity, reason, now),
            Self::Kubernetes(k) => {
                k.rt.block_on(k.tokens.revoke_identity(identity, reason, now))
            }
        }
    }

    pub(super) fn revoke(
        &self,
        id: &str,
        now: std::time::SystemTime,
    ) -> Result<crate::tokens::TokenRecord> {
        match self {
            Self::File(p) => crate::tokens::revoke(p, id, now),
            Self::Kubernetes(k) => k.rt.block_on(k.tokens.revoke(id, now)),
        }
    }
}

pub(super) fn create(a: TokenCreateArgs, clock: SharedClock) -> Result<()> {
    let (store, trust_domain, control_plane) = TokenBackend::open(&a.config)?;
    let identity =
        proxy_lib::identity::Identity::parse_in_mesh(&a.identity, &trust_domain, &control_plane)?;
    let opts = crate::tokens::CreateOptions {
        identity,
        ttl: a.ttl,
        allowed_ips: a.allow_ip,
        uses: a.uses,
    };
    check_out(a.out.as_deref(), a.force)?;
    let t = store.create(&opts, clock.now())?;
    deliver(&store, &t, a.out.as_deref(), a.force, &clock)?;
    let validity = match t.record.expires {
        None => "valid until revoked (use --ttl to limit it)".to_string(),
        Some(e) => format!(
            "valid until {}",
            proxy_lib::clock::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(e))
        ),
    };
    let ips = if t.record.allowed_ips.is_empty() {
        "from any address".to_string()
    } else {
        format!(
            "from {}",
            t.record
                .allowed_ips
                .iter()
                .map(|n| n.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let uses = match t.record.uses {
        None => "for any number of keys".to_string(),
        Some(n) => format!("for {n} key(s), bound on first use"),
    };
    say(format_args!(
        "created token {} for {}, {validity}, {ips}, {uses}",
        t.record.id, t.record.identity
    ));
    Ok(())
}

/// Refuses an existing `--out` FILE unless `--force` (checked before anything is created).
pub(super) fn check_out(out: Option<&std::path::Path>, force: bool) -> Result<()> {
    match out {
        Some(out) if !force && std::fs::symlink_metadata(out).is_ok() => {
            Err(Error::TokenOutExists(out.to_path_buf()))
        }
        _ => Ok(()),
    }
}

/// Writes a new token alone on stdout, or to `out` (0600; atomically replaced with `force`).
/// A token that cannot be written is revoked, so no usable token is left that nobody holds.
pub(super) fn deliver(
    store: &TokenBackend,
    t: &crate::tokens::NewToken,
    out: Option<&std::path::Path>,
    force: bool,
    clock: &SharedClock,
) -> Result<()> {
    let mut line = zeroize::Zeroizing::new(t.secret.as_bytes().to_vec());
    line.push(b'\n');
    match out {
        Some(out) => {
            let written = if force {
                proxy_lib::fs::write_atomic(out, &line, proxy_lib::fs::SECRET_MODE, None)
            } else {
                proxy_lib::fs::create_new(out, &line, proxy_lib::fs::SECRET_MODE, None)
            };
            if let Err(e) = written {
                let _ = store.revoke(&t.record.id, clock.now());
                return Err(e.into());
            }
            say(format_args!("token written to {}", out.display()));
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(&line)
                .and_then(|()| stdout.flush())
                .map_err(|source| Error::Io {
                    path: "<stdout>".into(),
                    source,
                })?;
        }
    }
    Ok(())
}

pub(super) fn list(a: TokenListArgs, clock: SharedClock) -> Result<()> {
    let (store, _, _) = TokenBackend::open(&a.config)?;
    let records = store.list()?;
    let now = clock.now();
    let ts = |s: u64| proxy_lib::clock::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(s));
    let mut out = std::io::stdout().lock();
    let res = if a.json {
        let rows: Vec<_> = records
            .iter()
            .map(|r| {
                serde_json::json!({
                    "id": r.id,
                    "identity": r.identity,
                    "status": r.status(now),
                    "created": ts(r.created),
                    "expires": r.expires.map(ts),
                    "revoked": r.revoked.map(ts),
                    "allowed_ips": r.allowed_ips.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                    "uses": r.uses,
                    "uses_left": r.uses_left(),
                    "bound_keys": r.bound_keys,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::Value::Array(rows))
    } else {
        (|| {
            writeln!(
                out,
                "ID            STATUS   EXPIRES               USES-LEFT  BOUND-KEY         ALLOWED-IPS  IDENTITY"
            )?;
            for r in &records {
                let ips = if r.allowed_ips.is_empty() {
                    "any".to_string()
                } else {
                    r.allowed_ips
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                };
                let uses = match (r.uses_left(), r.uses) {
                    (Some(left), Some(n)) => format!("{left}/{n}"),
                    _ => "unlimited".to_string(),
                };
                // The first 16 hex digits of each bound key's SHA-256 (of its SPKI).
                let keys = if r.bound_keys.is_empty() {
                    "-".to_string()
                } else {
                    r.bound_keys
                        .iter()
                        .map(|k| k.get(..16).unwrap_or(k))
                        .collect::<Vec<_>>()
                        .join(",")
                };
                writeln!(
                    out,
                    "{:<13} {:<8} {:<21} {:<10} {:<17} {:<12} {}",
                    r.id,
                    r.status(now),
                    r.expires.map(ts).unwrap_or_else(|| "never".into()),
                    uses,
                    keys,
                    ips,
                    r.identity
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

pub(super) fn revoke(a: TokenRevokeArgs, clock: SharedClock) -> Result<()> {
    let (store, _, _) = TokenBackend::open(&a.config)?;
    for id in &a.ids {
        let r = store.revoke(id, clock.now())?;
        say(format_args!("revoked token {} for {}", r.id, r.identity));
    }
    Ok(())
}

pub(super) fn revoke_identity(a: RevokeArgs, clock: SharedClock) -> Result<()> {
    let (store, trust_domain, control_plane) = TokenBackend::open(&a.config)?;
    let identity =
        proxy_lib::identity::Identity::parse_in_mesh(&a.identity, &trust_domain, &control_plane)?;
    let r = store.revoke_identity(&identity, a.reason.as_deref(), clock.now())?;
    say(format_args!(
        "revoked identity {} at {}: certificates issued and tokens created before then no longer authenticate it",
        r.identity,
        proxy_lib::clock::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(r.revoked))
    ));
    Ok(())
}
