//! Operations on CA material that `issuer init` and `issuer ca` share: minting an issuer
//! certificate under a signing CA (an anchor, or an intermediate of the current chain), and
//! `issuer ca new-issuer` / `issuer ca show` over a CA directory.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use proxy_lib::cert::CertInfo;
use proxy_lib::fs::{PUBLIC_MODE, SECRET_MODE};
use proxy_lib::pem::{self, PrivateKey};
use proxy_lib::validity::Window;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyUsagePurpose};
use rustls_pki_types::CertificateDer;

use super::{Ca, CaFiles, IssuerKey, certs_in, read_material};
use crate::error::{Error, Result};

/// How far notBefore of a new CA certificate is backdated.
pub const BACKDATE: Duration = Duration::from_secs(300);
pub use proxy_lib::identity::DEFAULT_CONTROL_PLANE_NAMESPACE;

/// Checks a control-plane namespace: a Kubernetes namespace name (a DNS label: 1 to 63
/// lowercase letters, digits and `-`, starting and ending with a letter or digit).
pub fn check_namespace(ns: &str) -> std::result::Result<(), String> {
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !ns.starts_with('-')
        && !ns.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{ns:?} is not a namespace name (1-63 lowercase letters, digits or '-', \
             starting and ending with a letter or digit)"
        ))
    }
}

/// The common name Linkerd gives its issuer: `identity.<control-plane-ns>.<trust-domain>`.
pub fn issuer_common_name(control_plane_namespace: &str, trust_domain: &str) -> String {
    format!("identity.{control_plane_namespace}.{trust_domain}")
}

/// A new issuer certificate and its fresh P-256 key.
pub struct MintedIssuer {
    /// The certificate.
    pub cert: CertificateDer<'static>,
    /// Its key.
    pub key: IssuerKey,
    /// Its validity (capped at the signer's notAfter).
    pub window: Window,
}

impl std::fmt::Debug for MintedIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedIssuer")
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// Mints an issuer CA certificate (CA:TRUE, pathlen 0, keyCertSign + cRLSign, SKI, AKI) named
/// `cn` with a fresh P-256 key, signed by `signer` whose validity is `signer_window`: valid
/// from `now` − [`BACKDATE`] for `validity`, but never past the signer's notAfter.
pub fn mint_issuer<K: rcgen::SigningKey>(
    signer: &Issuer<'_, K>,
    signer_window: Window,
    cn: &str,
    validity: Duration,
    now: SystemTime,
) -> Result<MintedIssuer> {
    let sign = |e: rcgen::Error| Error::Sign(e.to_string());
    let key = IssuerKey::generate().map_err(sign)?;
    let window = Window::new(
        (now - BACKDATE).max(signer_window.not_before),
        (now + validity).min(signer_window.not_after),
    );
    let mut p = CertificateParams::new(Vec::new()).map_err(sign)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(rcgen::SerialNumber::from_slice(
        &crate::signer::random_serial(),
    ));
    p.not_before = window.not_before.into();
    p.not_after = window.not_after.into();
    let cert = p.signed_by(&key, signer).map_err(sign)?;
    Ok(MintedIssuer {
        cert: cert.der().clone(),
        key,
        window,
    })
}

/// The CA certificate among `candidates` that `key` belongs to: its index.
pub fn find_signer(candidates: &[CertificateDer<'static>], key: &rcgen::KeyPair) -> Option<usize> {
    candidates.iter().position(|c| {
        CertInfo::from_der(c).is_ok_and(|info| info.is_ca && info.is_certified_key(key))
    })
}

/// Mints a new issuer named `cn` under the CA certificate `signer_cert` whose key is
/// `signer_key` (see [`mint_issuer`]); refuses an expired signer.
pub fn mint_under(
    signer_cert: &CertificateDer<'static>,
    signer_key: rcgen::KeyPair,
    cn: &str,
    validity: Duration,
    now: SystemTime,
) -> Result<MintedIssuer> {
    let info = CertInfo::from_der(signer_cert).map_err(|e| Error::Sign(e.to_string()))?;
    let signer = Issuer::from_ca_cert_der(signer_cert, IssuerKey::new(signer_key))
        .map_err(|e| Error::Sign(format!("the signing CA certificate cannot sign: {e}")))?;
    let minted = mint_issuer(&signer, info.window(), cn, validity, now)?;
    if minted.window.not_after <= now {
        return Err(Error::Sign(format!(
            "the signing CA certificate ({}) has expired",
            info.subject
        )));
    }
    Ok(minted)
}

/// Reads a signing key (an anchor's or an intermediate's) for `issuer init --anchor-key` and
/// `issuer ca new-issuer --anchor-key`: PEM or DER, PKCS#8 or SEC1. Blocks.
pub fn read_signing_key(path: &Path) -> Result<rcgen::KeyPair> {
    let bad = |reason: String| Error::CaMaterial {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = zeroize::Zeroizing::new(read_material(path)?);
    PrivateKey::from_bytes(&bytes, &path.display().to_string())
        .and_then(|key| key.to_rcgen())
        .map_err(|e| bad(e.to_string()))
}

/// What `issuer ca new-issuer` wrote.
#[derive(Debug, Clone)]
pub struct NewIssuer {
    /// `issuer.key`, then `issuer.crt`.
    pub files: Vec<PathBuf>,
    /// Subject of the new issuer certificate.
    pub subject: String,
    /// Its serial (hex).
    pub serial: String,
    /// Its validity.
    pub window: Window,
    /// Certificates in the new `issuer.crt` (issuer + intermediates).
    pub chain_len: usize,
}

/// `issuer ca new-issuer`: signs a new issuer certificate with the key at `signer_key` (the
/// key of an anchor in `ca.crt`, or of an intermediate in the current `issuer.crt`), validates
/// the new pair exactly as the server will, then replaces `issuer.key` and `issuer.crt`, each
/// atomically (temp file, fsync, rename), keeping the owner the old files had. The running
/// server loads the new pair once both files are stable (or on SIGHUP). The signing key is
/// only read. The replaced issuer certificate is recorded in `retired-issuers.json`
/// ([`crate::renewal::record_retired`], dropping entries retired longer than `keep` ago).
/// Blocks.
pub fn new_issuer(
    files: &CaFiles,
    signer_key: &Path,
    cn: &str,
    validity: Duration,
    now: SystemTime,
    keep: Option<Duration>,
) -> Result<NewIssuer> {
    let anchors_pem = read_material(&files.anchors)?;
    let anchors = certs_in(&anchors_pem, &files.anchors)?;
    // The intermediates of the chain in use, if it can be read: the key may be one of theirs.
    let current: Vec<CertificateDer<'static>> = pem::read_certs(&files.cert)
        .map(|c| super::chain::without_anchors(c, &anchors))
        .unwrap_or_default();
    let intermediates = current.get(1..).unwrap_or_default();
    let key = read_signing_key(signer_key)?;
    let (signer, above) = if let Some(i) = find_signer(&anchors, &key) {
        (&anchors[i], &[][..])
    } else if let Some(i) = find_signer(intermediates, &key) {
        (&intermediates[i], &intermediates[i..])
    } else {
        return Err(Error::CaMaterial {
            path: signer_key.to_path_buf(),
            reason: format!(
                "this key belongs to none of the {} trust anchor(s) in {} nor to an \
                 intermediate of {}",
                anchors.len(),
                files.anchors.display(),
                files.cert.display()
            ),
        });
    };
    let minted = mint_under(signer, key, cn, validity, now)?;
    let chain: Vec<CertificateDer<'static>> = std::iter::once(minted.cert.clone())
        .chain(above.iter().cloned())
        .collect();
    let chain_pem = pem::certs_to_pem(&chain);
    let key_pem = PrivateKey::from_pkcs8_der(minted.key.pkcs8_der().to_vec()).to_pem();
    // Exactly the check the server applies: a pair it would refuse is never written.
    let ca = Ca::from_pem(
        &anchors_pem,
        chain_pem.as_bytes(),
        key_pem.as_bytes(),
        now,
        files,
    )?;
    // Key first, then the certificate; should the second write fail, the old key goes back
    // so the directory never keeps a mismatched pair.
    let old_key = std::fs::read(&files.key).ok().map(zeroize::Zeroizing::new);
    proxy_lib::fs::write_atomic_keeping_owner(&files.key, key_pem.as_bytes(), SECRET_MODE)?;
    if let Err(e) =
        proxy_lib::fs::write_atomic_keeping_owner(&files.cert, chain_pem.as_bytes(), PUBLIC_MODE)
    {
        if let Some(old) = &old_key {
            let _ = proxy_lib::fs::write_atomic_keeping_owner(&files.key, old, SECRET_MODE);
        }
        return Err(e.into());
    }
    // A restarted issuer must still recognise the leaves the replaced issuer signed, for
    // renewal by certificate: record it beside the new pair. The new pair is in place either
    // way; failing to record is reported, not undone.
    if let Some(replaced) = current.first() {
        let path = crate::renewal::retired_path(&files.cert);
        crate::renewal::record_retired(&path, replaced, now, keep)
            .map_err(|reason| Error::CaMaterial { path, reason })?;
    }
    Ok(NewIssuer {
        files: vec![files.key.clone(), files.cert.clone()],
        subject: ca.info().subject.clone(),
        serial: ca.info().serial.clone(),
        window: minted.window,
        chain_len: chain.len(),
    })
}

/// What `issuer ca show` found.
#[derive(Debug, Clone)]
pub struct ShowReport {
    /// The text to print (one block per certificate).
    pub text: String,
    /// What is wrong or expires within `warn_before`; empty when all is well.
    pub problems: Vec<String>,
}

/// `issuer ca show`: every certificate of `issuer.crt` and `ca.crt` with subject, SHA-256
/// fingerprint, serial and expiry, then the verdict: the pair must load exactly as the server
/// loads it, and no link of the path (issuer, intermediates, the anchor it ends at) may have
/// less than `warn_before` left. Blocks.
pub fn show(files: &CaFiles, now: SystemTime, warn_before: Duration) -> ShowReport {
    let mut text = String::new();
    let mut problems = Vec::new();
    let ca = Ca::load(files, now);
    let in_path: Vec<String> = match &ca {
        Ok(ca) => ca.links().iter().map(|l| l.sha256.clone()).collect(),
        Err(_) => Vec::new(),
    };
    for (title, path) in [
        ("issuer chain", &files.cert),
        ("trust anchors", &files.anchors),
    ] {
        text.push_str(&format!("{title} ({}):\n", path.display()));
        let certs = match pem::read_certs(path) {
            Ok(c) => c,
            Err(e) => {
                text.push_str(&format!("  unreadable: {e}\n"));
                continue;
            }
        };
        for (i, der) in certs.iter().enumerate() {
            let Ok(info) = CertInfo::from_der(der) else {
                text.push_str(&format!("  #{i}: not a valid certificate\n"));
                continue;
            };
            let left = info.window().remaining(now);
            let status = if !info.is_valid_at(now) {
                "NOT VALID NOW".to_string()
            } else {
                format!("{} left", proxy_lib::human::duration(left))
            };
            let mark = if ca.is_ok() && !in_path.contains(&info.sha256) {
                "  (not in the path in use)"
            } else {
                ""
            };
            text.push_str(&format!(
                "  #{i} {subject}{mark}\n      sha256 {sha}\n      serial {serial}\n      \
                 expires {not_after} ({status})\n",
                subject = info.subject,
                sha = info.sha256,
                serial = info.serial,
                not_after = proxy_lib::clock::rfc3339(info.not_after),
            ));
        }
    }
    match &ca {
        Ok(ca) => {
            for l in ca.links() {
                let left = l.window.remaining(now);
                if left < warn_before {
                    problems.push(format!(
                        "{} expires {} ({} left, under warn_before = {})",
                        l.link,
                        proxy_lib::clock::rfc3339(l.window.not_after),
                        proxy_lib::human::duration(left),
                        proxy_lib::human::duration(warn_before)
                    ));
                }
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
    if problems.is_empty() {
        text.push_str(&format!(
            "ok: the pair loads and every link has at least {} left\n",
            proxy_lib::human::duration(warn_before)
        ));
    }
    ShowReport { text, problems }
}
