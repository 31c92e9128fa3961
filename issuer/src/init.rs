//! `issuer init`: a fresh trust anchor and issuer CA, or the cluster's own trust (its anchors
//! with Linkerd's issuer pair, or with a new issuer signed by an anchor's key), written with
//! the right modes (and, with `--owner`, handed to the service's user), plus an `issuer.toml`
//! naming them. Refuses (changing nothing) if any target file exists, and never writes
//! material the server would refuse.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use proxy_lib::clock::{Clock, SystemClock};
use proxy_lib::fs::{PUBLIC_MODE, SECRET_MODE};
use proxy_lib::identity::TrustDomain;
use proxy_lib::pem::{PrivateKey, der_to_pem};
use proxy_lib::validity::Window;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyUsagePurpose};
use zeroize::Zeroizing;

use crate::ca::ops::{
    BACKDATE, DEFAULT_CONTROL_PLANE_NAMESPACE, find_signer, issuer_common_name, mint_issuer,
    mint_under, read_signing_key,
};
use crate::ca::{
    ANCHORS_FILE, Ca, CaFiles, ISSUER_CERT_FILE, ISSUER_KEY_FILE, IssuerKey, certs_in,
    read_material,
};
use crate::config::{CONFIG_FILE, DEFAULT_TOKENS_FILE};
use crate::error::{Error, Result};

/// The anchor's private key file (keep it offline).
pub const ANCHOR_KEY_FILE: &str = "anchor.key";
/// Default anchor validity.
pub const DEFAULT_ANCHOR_VALIDITY: Duration = Duration::from_secs(3650 * 86_400);
/// Default issuer validity.
pub const DEFAULT_ISSUER_VALIDITY: Duration = Duration::from_secs(365 * 86_400);

/// What `init` creates.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// Target directory (created if missing).
    pub dir: PathBuf,
    /// Trust domain recorded in `issuer.toml` and in the CA names.
    pub trust_domain: TrustDomain,
    /// The control-plane namespace in Linkerd names (`identity.<ns>.<trust-domain>`).
    pub control_plane_namespace: String,
    /// Anchor validity (a fresh anchor only).
    pub anchor_validity: Duration,
    /// Issuer certificate validity (a minted issuer only; capped at its signer's notAfter).
    pub issuer_validity: Duration,
    /// Who gets the files the running issuer reads (all but `anchor.key`, which stays with
    /// the caller: it belongs offline). `None`: whoever runs `init`.
    pub owner: Option<Owner>,
    /// Existing trust to use instead of minting a new anchor.
    pub trust: Option<Trust>,
}

/// Existing trust (the cluster's) for `init`: the anchors, and either an issuer pair made
/// elsewhere or the key of an anchor to sign a new issuer with.
#[derive(Debug, Clone)]
pub struct Trust {
    /// The trust-anchor bundle (one or more roots), copied to `ca.crt`.
    pub anchors: PathBuf,
    /// Where the issuer comes from.
    pub issuer: TrustIssuer,
}

/// Where the issuer of a [`Trust`] comes from.
#[derive(Debug, Clone)]
pub enum TrustIssuer {
    /// An issuer pair made elsewhere (Linkerd's `linkerd-identity-issuer` Secret,
    /// cert-manager, step): the certificate file (issuer first, then any intermediates) and
    /// its key (PKCS#8 or SEC1).
    Pair {
        /// Issuer certificate (and intermediates).
        cert: PathBuf,
        /// Issuer key.
        key: PathBuf,
    },
    /// The key of one of the anchors: `init` signs itself a new issuer under it. The key is
    /// read, never copied.
    AnchorKey(PathBuf),
}

/// The owner `init` gives its files: `--owner USER[:GROUP]`, names or numeric ids, resolved
/// when parsed. Without a group the files keep the caller's group, as with chown(1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// The user.
    pub uid: u32,
    /// The group, if one was given.
    pub gid: Option<u32>,
}

impl std::str::FromStr for Owner {
    type Err = String;

    /// Parses `USER[:GROUP]`; an unknown user or group is an error naming it. Blocks (reads
    /// `/etc/passwd` and `/etc/group`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        if user.is_empty() || group.is_some_and(str::is_empty) {
            return Err(format!("{s:?} is not USER or USER:GROUP"));
        }
        let uid = proxy_lib::account::user_id(user).map_err(|e| e.to_string())?;
        let gid = group
            .map(proxy_lib::account::group_id)
            .transpose()
            .map_err(|e| e.to_string())?;
        Ok(Self { uid, gid })
    }
}

impl InitOptions {
    /// Defaults for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            trust_domain: TrustDomain::default(),
            control_plane_namespace: DEFAULT_CONTROL_PLANE_NAMESPACE.to_string(),
            anchor_validity: DEFAULT_ANCHOR_VALIDITY,
            issuer_validity: DEFAULT_ISSUER_VALIDITY,
            owner: None,
            trust: None,
        }
    }
}

/// The files written, in order.
#[derive(Debug, Clone)]
pub struct InitOutput {
    /// `ca.crt`, `anchor.key`, `issuer.crt`, `issuer.key`, `issuer.toml`.
    pub files: Vec<PathBuf>,
}

/// Runs `init` at the system clock's now. Blocks.
pub fn run(opts: &InitOptions) -> Result<InitOutput> {
    run_at(opts, SystemClock.now())
}

/// Runs `init` with certificates valid from `now`. Blocks.
pub fn run_at(opts: &InitOptions, now: SystemTime) -> Result<InitOutput> {
    if let Err(e) = crate::ca::ops::check_namespace(&opts.control_plane_namespace) {
        return Err(Error::Config {
            path: "<flags>".into(),
            problems: vec![format!("--control-plane-namespace: {e}")],
        });
    }
    if opts.trust.is_none() && opts.issuer_validity > opts.anchor_validity {
        return Err(Error::Config {
            path: "<flags>".into(),
            problems: vec!["--issuer-validity must not exceed --anchor-validity".into()],
        });
    }
    if opts.issuer_validity < Duration::from_secs(60) {
        return Err(Error::Config {
            path: "<flags>".into(),
            problems: vec!["--issuer-validity must be at least 1m".into()],
        });
    }
    let names = [
        ANCHORS_FILE,
        ANCHOR_KEY_FILE,
        ISSUER_CERT_FILE,
        ISSUER_KEY_FILE,
        CONFIG_FILE,
    ];
    let existing: Vec<PathBuf> = names
        .iter()
        .map(|n| opts.dir.join(n))
        .filter(|p| std::fs::symlink_metadata(p).is_ok())
        .collect();
    if !existing.is_empty() {
        return Err(Error::WouldOverwrite(existing));
    }
    let td = &opts.trust_domain;
    let material = match &opts.trust {
        None => fresh_trust(opts, now)?,
        Some(trust) => existing_trust(opts, trust, now)?,
    };
    // Exactly 0755 whatever the umask: the keys in it are 0600 on their own.
    proxy_lib::fs::ensure_dir(&opts.dir, 0o755)?;
    let dir = std::fs::canonicalize(&opts.dir).map_err(|source| Error::Io {
        path: opts.dir.clone(),
        source,
    })?;
    let toml = config_text(&dir, td, &opts.control_plane_namespace);
    let mut files: Vec<(&str, &[u8], u32)> =
        vec![(ANCHORS_FILE, material.anchors.as_bytes(), PUBLIC_MODE)];
    if let Some(anchor_key) = &material.anchor_key {
        files.push((ANCHOR_KEY_FILE, anchor_key.as_bytes(), SECRET_MODE));
    }
    files.extend([
        (ISSUER_CERT_FILE, material.chain.as_bytes(), PUBLIC_MODE),
        (ISSUER_KEY_FILE, material.key.as_bytes(), SECRET_MODE),
        (CONFIG_FILE, toml.as_bytes(), PUBLIC_MODE),
    ]);
    let mut written = Vec::new();
    // Leave the directory as it was on failure: remove what this run created.
    let undo = |written: &[PathBuf]| {
        for p in written {
            let _ = std::fs::remove_file(p);
        }
    };
    for (name, data, mode) in files {
        let path = dir.join(name);
        if let Err(e) = proxy_lib::fs::create_new(&path, data, mode, None) {
            undo(&written);
            return Err(e.into());
        }
        written.push(path.clone());
        if let Some(owner) = opts.owner.filter(|_| name != ANCHOR_KEY_FILE)
            && let Err(e) = std::os::unix::fs::lchown(&path, Some(owner.uid), owner.gid)
        {
            undo(&written);
            return Err(proxy_lib::fs::FsError::new("chown (--owner)", &path, e).into());
        }
    }
    proxy_lib::fs::fsync_dir(&dir)?;
    Ok(InitOutput { files: written })
}

/// The PEM text `init` writes.
struct Material {
    anchors: String,
    /// Only when `init` made the anchor.
    anchor_key: Option<Zeroizing<String>>,
    chain: String,
    key: Zeroizing<String>,
}

/// A new anchor and an issuer under it.
fn fresh_trust(opts: &InitOptions, now: SystemTime) -> Result<Material> {
    let td = &opts.trust_domain;
    let sign = |e: rcgen::Error| Error::Sign(e.to_string());
    let anchor_key = IssuerKey::generate().map_err(sign)?;
    let mut ap = CertificateParams::new(Vec::new()).map_err(sign)?;
    ap.distinguished_name.push(
        DnType::CommonName,
        format!("root.{}.{td}", opts.control_plane_namespace),
    );
    ap.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    ap.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ap.serial_number = Some(rcgen::SerialNumber::from_slice(
        &crate::signer::random_serial(),
    ));
    let window = Window::new(now - BACKDATE, now + opts.anchor_validity);
    ap.not_before = window.not_before.into();
    ap.not_after = window.not_after.into();
    let anchor = ap.self_signed(&anchor_key).map_err(sign)?;
    let anchor_issuer = Issuer::new(ap, &anchor_key);
    let cn = issuer_common_name(&opts.control_plane_namespace, td.as_str());
    let issuer = mint_issuer(&anchor_issuer, window, &cn, opts.issuer_validity, now)?;
    Ok(Material {
        anchors: der_to_pem("CERTIFICATE", anchor.der()),
        anchor_key: Some(PrivateKey::from_pkcs8_der(anchor_key.pkcs8_der().to_vec()).to_pem()),
        chain: der_to_pem("CERTIFICATE", &issuer.cert),
        key: PrivateKey::from_pkcs8_der(issuer.key.pkcs8_der().to_vec()).to_pem(),
    })
}

/// The cluster's anchors with an issuer pair made elsewhere, or a new issuer signed with an
/// anchor's key; validated exactly as the server will load them before anything is written.
fn existing_trust(opts: &InitOptions, trust: &Trust, now: SystemTime) -> Result<Material> {
    let anchors = certs_in(&read_material(&trust.anchors)?, &trust.anchors)?;
    let anchors_pem = proxy_lib::pem::certs_to_pem(&anchors);
    let (chain_pem, key_pem, names) = match &trust.issuer {
        TrustIssuer::Pair { cert, key } => {
            let chain = certs_in(&read_material(cert)?, cert)?;
            let key_bytes = Zeroizing::new(read_material(key)?);
            let parsed =
                crate::ca::read_key(&key_bytes, &key.display().to_string()).map_err(|reason| {
                    Error::CaMaterial {
                        path: key.clone(),
                        reason,
                    }
                })?;
            let names = CaFiles {
                anchors: trust.anchors.clone(),
                cert: cert.clone(),
                key: key.clone(),
            };
            (
                proxy_lib::pem::certs_to_pem(&crate::ca::chain::without_anchors(chain, &anchors)),
                parsed.to_pem(),
                names,
            )
        }
        TrustIssuer::AnchorKey(path) => {
            let key = read_signing_key(path)?;
            let Some(i) = find_signer(&anchors, &key) else {
                return Err(Error::CaMaterial {
                    path: path.clone(),
                    reason: format!(
                        "this key belongs to none of the {} certificate(s) in {}",
                        anchors.len(),
                        trust.anchors.display()
                    ),
                });
            };
            let cn = issuer_common_name(&opts.control_plane_namespace, opts.trust_domain.as_str());
            let minted = mint_under(&anchors[i], key, &cn, opts.issuer_validity, now)?;
            let names = CaFiles {
                anchors: trust.anchors.clone(),
                cert: opts.dir.join(ISSUER_CERT_FILE),
                key: opts.dir.join(ISSUER_KEY_FILE),
            };
            (
                der_to_pem("CERTIFICATE", &minted.cert),
                PrivateKey::from_pkcs8_der(minted.key.pkcs8_der().to_vec()).to_pem(),
                names,
            )
        }
    };
    Ca::from_pem(
        anchors_pem.as_bytes(),
        chain_pem.as_bytes(),
        key_pem.as_bytes(),
        now,
        &names,
    )?;
    Ok(Material {
        anchors: anchors_pem,
        anchor_key: None,
        chain: chain_pem,
        key: key_pem,
    })
}

fn config_text(dir: &Path, td: &TrustDomain, control_plane_namespace: &str) -> String {
    let q = |s: &str| toml::Value::String(s.to_string()).to_string();
    let dir_s = dir.display().to_string();
    let tokens = dir.join(DEFAULT_TOKENS_FILE).display().to_string();
    format!(
        "# Written by `issuer init`. Flags given to `issuer serve` override these values.\n\
         trust_domain = {td}\n\
         listen = \"127.0.0.1:8080\"\n\
         admin = \"127.0.0.1:9990\"\n\
         plaintext = false\n\
         lifetime = \"24h\"\n\
         min_lifetime = \"1h\"\n\
         clock_skew = \"20s\"\n\
         server_name = {name}\n\
         \n\
         [ca]\n\
         source = \"files\"\n\
         dir = {dir}\n\
         control_plane_namespace = {cpns}\n\
         \n\
         [auth]\n\
         tokens = {tokens}\n\
         \n\
         [audit]\n\
         path = \"-\"\n\
         \n\
         [limits]\n\
         max_request_bytes = 65536\n\
         max_concurrent_signing = 64\n\
         per_credential_per_minute = 600\n",
        td = q(td.as_str()),
        name = q(td
            .identity_service_name_in(control_plane_namespace)
            .unwrap_or_else(|_| td.identity_service_name())
            .as_str()),
        dir = q(&dir_s),
        cpns = q(control_plane_namespace),
        tokens = q(&tokens),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Ca, CaFiles};
    use crate::config::{Config, Overrides};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn writes_a_valid_ca_with_secret_modes_and_refuses_a_second_run() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("issuer");
        let now: SystemTime = rcgen::date_time_ymd(2030, 6, 1).into();
        let mut opts = InitOptions::new(&dir);
        opts.trust_domain = TrustDomain::new("example.org").unwrap();
        let out = run_at(&opts, now).unwrap();
        assert_eq!(out.files.len(), 5);
        for (name, mode) in [
            (ANCHOR_KEY_FILE, 0o600),
            (ISSUER_KEY_FILE, 0o600),
            (ANCHORS_FILE, 0o644),
            (ISSUER_CERT_FILE, 0o644),
        ] {
            assert_eq!(
                std::fs::metadata(dir.join(name)).unwrap().mode() & 0o777,
                mode,
                "{name}"
            );
        }
        let ca = Ca::load(&CaFiles::in_dir(&dir), now).unwrap();
        assert!(ca.info().subject.contains("identity.linkerd.example.org"));
        let cfg = Config::load(&dir.join(CONFIG_FILE), &Overrides::default()).unwrap();
        assert_eq!(cfg.policy.trust_domain.as_str(), "example.org");
        assert_eq!(
            cfg.ca_files,
            CaFiles::in_dir(&std::fs::canonicalize(&dir).unwrap())
        );

        let before: Vec<_> = out
            .files
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        let err = run_at(&opts, now).unwrap_err();
        assert!(
            matches!(err, Error::WouldOverwrite(ref v) if v.len() == 5),
            "{err}"
        );
        let after: Vec<_> = out
            .files
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect();
        assert_eq!(before, after);
    }

    #[test]
    fn owner_gets_every_file_but_the_anchor_key() {
        let me = rustix::process::geteuid().as_raw();
        let my_group = rustix::process::getegid().as_raw();
        // As root, hand the files to someone else; otherwise to ourselves (all a non-root
        // caller may do), which still runs the same code.
        let (uid, gid) = if me == 0 {
            (4242, 4343)
        } else {
            (me, my_group)
        };
        let d = tempfile::tempdir().unwrap();
        let mut opts = InitOptions::new(d.path());
        opts.owner = Some(format!("{uid}:{gid}").parse().unwrap());
        run_at(
            &opts,
            SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000),
        )
        .unwrap();
        for name in [ANCHORS_FILE, ISSUER_CERT_FILE, ISSUER_KEY_FILE, CONFIG_FILE] {
            let m = std::fs::metadata(d.path().join(name)).unwrap();
            assert_eq!((m.uid(), m.gid()), (uid, gid), "{name}");
        }
        let m = std::fs::metadata(d.path().join(ANCHOR_KEY_FILE)).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (me, my_group),
            "anchor.key stays the caller's"
        );
        assert_eq!(
            std::fs::metadata(d.path().join(ISSUER_KEY_FILE))
                .unwrap()
                .mode()
                & 0o777,
            0o600
        );
    }

    #[test]
    fn owner_parses_names_and_ids_and_names_what_is_unknown() {
        assert_eq!(
            "root".parse::<Owner>().unwrap(),
            Owner { uid: 0, gid: None }
        );
        assert_eq!(
            "12:root".parse::<Owner>().unwrap(),
            Owner {
                uid: 12,
                gid: Some(0)
            }
        );
        for (spec, needle) in [
            ("no-such-user-here", "no user named \"no-such-user-here\""),
            ("root:no-such-group", "no group named \"no-such-group\""),
            ("root:", "not USER or USER:GROUP"),
            (":root", "not USER or USER:GROUP"),
        ] {
            let e = spec.parse::<Owner>().unwrap_err();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    #[test]
    fn refuses_when_only_one_target_exists_and_writes_nothing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(ISSUER_KEY_FILE), "keep").unwrap();
        let err = run_at(
            &InitOptions::new(d.path()),
            SystemTime::UNIX_EPOCH + Duration::from_secs(2_000_000_000),
        )
        .unwrap_err();
        assert!(err.to_string().contains("issuer.key"), "{err}");
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
        assert_eq!(
            std::fs::read(d.path().join(ISSUER_KEY_FILE)).unwrap(),
            b"keep"
        );
    }
}
