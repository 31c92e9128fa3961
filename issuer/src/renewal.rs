//! Renewal by client certificate: a workload that holds a certificate this issuer signed
//! renews with it instead of its bootstrap token.
//!
//! The TLS layer requests (never requires) a client certificate and passes on a chain that
//! verifies against the anchors for client use at the issuer's clock. Under a shared Linkerd
//! trust the anchors also vouch for every meshed pod, so that is not enough here: the leaf
//! must be signed by one of this issuer's own issuer certificates, the current one or one a
//! CA reload replaced within the longest leaf lifetime ([`KnownIssuers`]). Every replaced
//! issuer is also recorded, so it survives a restart: in `retired-issuers.json` beside
//! `issuer.crt` ([`record_retired`]; by `issuer ca new-issuer` and by the CA reload that
//! picks up a pair replaced by hand), or, with the CA from Kubernetes, in the ConfigMap
//! [`crate::kubernetes::retired`] names. It must also be
//! valid now, name exactly the requested identity, have been issued after the identity's
//! last revocation (issuance = notBefore + the backdating the issuer applies), come from an
//! address the identity's token records allow (when any non-revoked record for it, used-up
//! counted tokens included, restricts addresses, the peer must be inside the union of those
//! restrictions; [`TokenStore::check_renewal_source`]), and, with
//! `max_renewal_age`, belong to a renewal chain that began (at a bootstrap by token) no
//! longer ago than that.
//!
//! A certificate that is not ours, or not for this identity, is not a credential here: the
//! token (if any) decides. One that is ours but revoked or too old refuses the request, unless
//! a token was sent too: then the token decides (so a host with a fresh token bootstraps
//! again while still presenting its old certificate).
//!
//! Where a renewal chain began is carried in the leaf's serial number: a workload leaf's
//! 16-byte serial is the marker byte [`CHAIN_SERIAL_MARKER`], the chain's start in Unix seconds
//! (4 bytes, big endian) and 11 random bytes (88 random bits).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proxy_lib::clock::SharedClock;
use rustls_pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::auth::{AuthRequest, Authenticator, Principal};
use crate::error::AuthError;
use crate::tokens::TokenStore;

/// The name of this authenticator in audit lines (`authenticator`), with credential
/// `cert:<serial>`.
pub const AUTHENTICATOR: &str = "certificate";

/// The first byte of a workload leaf serial that carries its renewal chain's start.
pub const CHAIN_SERIAL_MARKER: u8 = 0x41;

/// A 16-byte serial carrying `chain_start` (whole seconds), with 88 random bits.
pub fn chain_serial(chain_start: SystemTime) -> [u8; 16] {
    let secs = u32::try_from(proxy_lib::clock::unix_secs(chain_start)).unwrap_or(u32::MAX);
    let mut s: [u8; 16] = rand::random();
    s[0] = CHAIN_SERIAL_MARKER;
    s[1..5].copy_from_slice(&secs.to_be_bytes());
    s
}

/// The renewal chain start a serial carries (`None` for a serial of another layout).
pub fn chain_start_of_serial(serial: &[u8]) -> Option<SystemTime> {
    if serial.len() != 16 || serial[0] != CHAIN_SERIAL_MARKER {
        return None;
    }
    let secs = u32::from_be_bytes(serial[1..5].try_into().ok()?);
    Some(UNIX_EPOCH + Duration::from_secs(secs.into()))
}

/// The issuer certificates whose leaves count as ours: the one in use and those a reload
/// replaced less than `keep` ago (at least the longest leaf lifetime, so every leaf they
/// signed has expired when they are forgotten). Kept in memory; at start the server adds
/// those recorded by [`record_retired`] ([`KnownIssuers::remember`]).
#[derive(Debug)]
pub struct KnownIssuers {
    keep: Duration,
    inner: Mutex<Vec<(CertificateDer<'static>, Option<SystemTime>)>>,
}

impl KnownIssuers {
    /// Starts with `current`; replaced issuers are remembered for `keep`.
    pub fn new(current: &CertificateDer<'static>, keep: Duration) -> Self {
        Self {
            keep,
            inner: Mutex::new(vec![(current.clone(), None)]),
        }
    }

    /// Records that `current` is the issuer in use from `now` (the one it replaces, if
    /// different, is kept for `keep`).
    pub fn observe(&self, current: &CertificateDer<'static>, now: SystemTime) {
        let mut v = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (cert, retired) in v.iter_mut() {
            if cert != current && retired.is_none() {
                *retired = Some(now);
            }
        }
        v.retain(|(cert, retired)| cert == current || retired.is_some_and(|t| now < t + self.keep));
        if let Some(pos) = v.iter().position(|(c, _)| c == current) {
            v[pos].1 = None;
        } else {
            v.push((current.clone(), None));
        }
    }

    /// Remembers `cert` as an issuer replaced at `retired` (from [`read_retired`] at start;
    /// the one in use, or one already known, is left as it is).
    pub fn remember(&self, cert: CertificateDer<'static>, retired: SystemTime) {
        let mut v = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if !v.iter().any(|(c, _)| *c == cert) {
            v.push((cert, Some(retired)));
        }
    }

    /// How long a replaced issuer is remembered.
    pub fn keep(&self) -> Duration {
        self.keep
    }

    /// The issuers that count at `now`.
    pub fn at(&self, now: SystemTime) -> Vec<CertificateDer<'static>> {
        let v = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        v.iter()
            .filter(|(_, retired)| retired.is_none_or(|t| now < t + self.keep))
            .map(|(c, _)| c.clone())
            .collect()
    }
}

/// What [`CertAuthenticator`] needs from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct RenewalPolicy {
    /// The backdating of every leaf's notBefore (issuance = notBefore + this).
    pub backdate: Duration,
    /// The longest a renewal chain may run before a fresh bootstrap (`None`: no limit).
    pub max_renewal_age: Option<Duration>,
}

/// A client certificate of ours, as far as the checks go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnLeaf {
    /// Serial, hex.
    pub serial: String,
    /// When it was issued (notBefore + backdate).
    pub issued: SystemTime,
    /// When its renewal chain began.
    pub chain_start: SystemTime,
}

/// Checks `leaf` was signed by one of `issuers`, is valid at `now` and names exactly
/// `identity`. `None` when it is not such a certificate.
pub fn own_leaf(
    leaf: &[u8],
    issuers: &[CertificateDer<'static>],
    identity: &str,
    now: SystemTime,
    backdate: Duration,
) -> Option<OwnLeaf> {
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let signed_by_us = issuers.iter().any(|i| {
        X509Certificate::from_der(i).is_ok_and(|(_, issuer)| {
            cert.issuer() == issuer.subject()
                && cert.verify_signature(Some(issuer.public_key())).is_ok()
        })
    });
    if !signed_by_us {
        return None;
    }
    let info = proxy_lib::cert::CertInfo::from_der(leaf).ok()?;
    if !info.is_valid_at(now) || info.is_ca || info.dns_sans != [identity] {
        return None;
    }
    let issued = info.not_before + backdate;
    let chain_start = chain_start_of_serial(cert.raw_serial()).unwrap_or(issued);
    Some(OwnLeaf {
        serial: info.serial,
        issued,
        chain_start,
    })
}

/// Authenticates a renewal by the client certificate (see the module docs).
#[derive(Debug)]
pub struct CertAuthenticator {
    issuers: Arc<KnownIssuers>,
    store: Arc<TokenStore>,
    policy: RenewalPolicy,
    clock: SharedClock,
}

impl CertAuthenticator {
    /// Leaves of `issuers`; revocations from `store`.
    pub fn new(
        issuers: Arc<KnownIssuers>,
        store: Arc<TokenStore>,
        policy: RenewalPolicy,
        clock: SharedClock,
    ) -> Self {
        Self {
            issuers,
            store,
            policy,
            clock,
        }
    }
}

#[tonic::async_trait]
impl Authenticator for CertAuthenticator {
    fn name(&self) -> &'static str {
        AUTHENTICATOR
    }

    async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Option<Principal>, AuthError> {
        let Some(leaf) = req.client_certs.and_then(|c| c.first()) else {
            return Ok(None);
        };
        let now = self.clock.now();
        let identity = req.identity.as_str();
        let issuers = self.issuers.at(now);
        let Some(own) = own_leaf(leaf, &issuers, identity, now, self.policy.backdate) else {
            tracing::debug!(
                identity,
                "client certificate is not one of this issuer's for this identity; not a renewal credential"
            );
            return Ok(None);
        };
        let has_token = !crate::tokens::trim_token(req.token).is_empty();
        let refuse = |e: AuthError| {
            if has_token {
                tracing::debug!(error = %e, identity, "client certificate refused; the token decides");
                Ok(None)
            } else {
                Err(e)
            }
        };
        if let Some(revoked) = self.store.identity_revoked(identity)
            && proxy_lib::clock::unix_secs(own.issued) < revoked
        {
            return refuse(AuthError::IdentityRevoked {
                identity: identity.to_string(),
                at: proxy_lib::clock::rfc3339(UNIX_EPOCH + Duration::from_secs(revoked)),
            });
        }
        if let Err(e) = self
            .store
            .check_renewal_source(identity, req.peer.map(|p| p.ip()))
        {
            return refuse(e);
        }
        if let Some(max) = self.policy.max_renewal_age
            && now.duration_since(own.chain_start).unwrap_or_default() > max
        {
            return refuse(AuthError::RenewalTooOld {
                started: proxy_lib::clock::rfc3339(own.chain_start),
                max: proxy_lib::human::duration(max),
            });
        }
        Ok(Some(Principal {
            authenticator: AUTHENTICATOR,
            credential: format!("cert:{}", own.serial),
        }))
    }
}

/// Where the renewal chain of a request's new leaf begins: the presented leaf's chain when
/// this authenticator accepted it, else now (a bootstrap).
pub fn chain_start_for(
    principal: &Principal,
    client_certs: Option<&[CertificateDer<'static>]>,
    now: SystemTime,
    backdate: Duration,
) -> SystemTime {
    if principal.authenticator != AUTHENTICATOR {
        return now;
    }
    client_certs
        .and_then(|c| c.first())
        .and_then(|leaf| X509Certificate::from_der(leaf).ok())
        .map(|(_, cert)| {
            chain_start_of_serial(cert.raw_serial()).unwrap_or_else(|| {
                let nb = UNIX_EPOCH
                    + Duration::from_secs(cert.validity().not_before.timestamp().max(0) as u64);
                nb + backdate
            })
        })
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, not_after_unix: u64) -> CertificateDer<'static> {
        let mut p = rcgen::CertificateParams::new(vec![format!("{cn}.example")]).unwrap();
        p.not_before = (UNIX_EPOCH + Duration::from_secs(1_000_000_000)).into();
        p.not_after = (UNIX_EPOCH + Duration::from_secs(not_after_unix)).into();
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn retired_issuers_are_recorded_bounded_and_expired_ones_dropped() {
        let d = tempfile::tempdir().unwrap();
        let path = retired_path(&d.path().join("issuer.crt"));
        assert!(read_retired(&path).unwrap().is_empty(), "no file: none");
        let now = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let soon = cert("soon", 2_000_000_100);
        record_retired(&path, &soon, now, None).unwrap();
        let mut later = Vec::new();
        for i in 0..MAX_RETIRED + 3 {
            let c = cert(&format!("i{i}"), 2_100_000_000);
            record_retired(&path, &c, now + Duration::from_secs(i as u64), None).unwrap();
            later.push(c);
        }
        let got = read_retired(&path).unwrap();
        assert_eq!(got.len(), MAX_RETIRED, "bounded");
        assert_eq!(
            got.last().unwrap().0,
            *later.last().unwrap(),
            "most recent kept"
        );
        assert!(!got.iter().any(|(c, _)| *c == soon), "oldest dropped");
        // An expired one goes at the next record.
        let d2 = tempfile::tempdir().unwrap();
        let p2 = retired_path(&d2.path().join("issuer.crt"));
        record_retired(&p2, &soon, now, None).unwrap();
        record_retired(&p2, &later[0], now + Duration::from_secs(200), None).unwrap();
        let got = read_retired(&p2).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, later[0]);
        assert_eq!(got[0].1, now + Duration::from_secs(200));
        // One retired longer than `keep` ago (every leaf it signed has expired) goes too.
        let p3 = retired_path(&d2.path().join("x").join("issuer.crt"));
        std::fs::create_dir(p3.parent().unwrap()).unwrap();
        let keep = Some(Duration::from_secs(100));
        record_retired(&p3, &later[1], now, keep).unwrap();
        record_retired(&p3, &later[2], now + Duration::from_secs(99), keep).unwrap();
        assert_eq!(read_retired(&p3).unwrap().len(), 2, "within keep");
        record_retired(&p3, &later[3], now + Duration::from_secs(100), keep).unwrap();
        let got: Vec<_> = read_retired(&p3)
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(got, [later[2].clone(), later[3].clone()]);
        // A malformed file is reported, naming it.
        std::fs::write(&p2, b"{not json").unwrap();
        assert!(
            read_retired(&p2)
                .unwrap_err()
                .contains("retired-issuers.json")
        );
    }

    #[test]
    fn serial_carries_the_chain_start() {
        let t = UNIX_EPOCH + Duration::from_secs(2_000_000_000);
        let a = chain_serial(t);
        let b = chain_serial(t);
        assert_ne!(a, b, "random part");
        assert_eq!(a[0], CHAIN_SERIAL_MARKER);
        assert_eq!(chain_start_of_serial(&a), Some(t));
        assert_eq!(chain_start_of_serial(&a[..15]), None);
        let mut other = a;
        other[0] = 0x40;
        assert_eq!(chain_start_of_serial(&other), None);
    }

    #[test]
    fn replaced_issuers_are_kept_for_a_while() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_000);
        let a = CertificateDer::from(vec![1u8]);
        let b = CertificateDer::from(vec![2u8]);
        let k = KnownIssuers::new(&a, Duration::from_secs(100));
        assert_eq!(k.at(t0), vec![a.clone()]);
        k.observe(&a, t0);
        assert_eq!(k.at(t0), vec![a.clone()]);
        k.observe(&b, t0 + Duration::from_secs(10));
        assert_eq!(
            k.at(t0 + Duration::from_secs(109)),
            vec![a.clone(), b.clone()]
        );
        assert_eq!(k.at(t0 + Duration::from_secs(110)), vec![b.clone()]);
        // back to a before it was forgotten: current again, never retired
        k.observe(&a, t0 + Duration::from_secs(20));
        assert_eq!(k.at(t0 + Duration::from_secs(500)), vec![a.clone()]);
        k.observe(&b, t0 + Duration::from_secs(600));
        k.observe(&b, t0 + Duration::from_secs(800));
        assert_eq!(k.at(t0 + Duration::from_secs(800)), vec![b]);
    }
}

/// The file beside `issuer.crt` where the issuer certificates replaced in that directory
/// (by `issuer ca new-issuer`, or by hand and picked up by a CA reload) are recorded with
/// when, so that an issuer started after a rotation still recognises the leaves they signed.
pub fn retired_path(issuer_cert: &Path) -> PathBuf {
    issuer_cert.with_file_name("retired-issuers.json")
}

/// How long a replaced issuer's leaves may still be valid after it was replaced: the longest
/// leaf lifetime (`max(lifetime, [limits] max_lifetime)`) plus the clock skew allowed; past
/// that a retired issuer is forgotten.
pub fn retirement_keep(
    lifetime: Duration,
    max_lifetime: Duration,
    clock_skew: Duration,
) -> Duration {
    max_lifetime.max(lifetime) + clock_skew
}

/// At most this many replaced issuers are recorded (the most recent).
const MAX_RETIRED: usize = 16;

/// One replaced issuer certificate in a retired-issuers record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RetiredIssuer {
    /// When it was replaced, Unix seconds.
    retired: u64,
    /// Its DER, hex.
    cert: String,
}

/// A list of replaced issuers with when each was replaced.
pub type Retired = Vec<(CertificateDer<'static>, SystemTime)>;

/// Parses a retired-issuers record (the JSON [`record_retired`] writes) read from `what`.
pub fn parse_retired(text: &[u8], what: &str) -> Result<Retired, String> {
    let list: Vec<RetiredIssuer> =
        serde_json::from_slice(text).map_err(|e| format!("{what}: {e}"))?;
    list.into_iter()
        .map(|r| {
            let der = hex::decode(&r.cert)
                .map_err(|e| format!("{what}: a certificate is not hex: {e}"))?;
            Ok((
                CertificateDer::from(der),
                UNIX_EPOCH + Duration::from_secs(r.retired),
            ))
        })
        .collect()
}

/// `list` with `replaced` recorded as replaced at `now`, as JSON, bounded: issuer
/// certificates already expired, those retired longer than `keep` ago (every leaf they signed
/// has expired; `None`: not known here), and all but the most recent [`MAX_RETIRED`] dropped.
pub fn with_retired(
    mut list: Retired,
    replaced: &CertificateDer<'static>,
    now: SystemTime,
    keep: Option<Duration>,
) -> Result<Vec<u8>, String> {
    list.retain(|(c, at)| c != replaced && !expired(c, now) && keep.is_none_or(|k| now < *at + k));
    list.push((replaced.clone(), now));
    let skip = list.len().saturating_sub(MAX_RETIRED);
    let out: Vec<RetiredIssuer> = list
        .iter()
        .skip(skip)
        .map(|(c, t)| RetiredIssuer {
            retired: proxy_lib::clock::unix_secs(*t),
            cert: hex::encode(c.as_ref()),
        })
        .collect();
    let mut json = serde_json::to_vec_pretty(&out).map_err(|e| e.to_string())?;
    json.push(b'\n');
    Ok(json)
}

/// The replaced issuers recorded at `path`, with when each was replaced. A missing file is
/// none; an unreadable or malformed one is reported (the caller decides whether that is fatal).
pub fn read_retired(path: &Path) -> Result<Retired, String> {
    match std::fs::read(path) {
        Ok(t) => parse_retired(&t, &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Records in the file at `path` that `replaced` stopped being the issuer at `now` (see
/// [`with_retired`]; never a key). Written atomically. Blocks.
pub fn record_retired(
    path: &Path,
    replaced: &CertificateDer<'static>,
    now: SystemTime,
    keep: Option<Duration>,
) -> Result<(), String> {
    let json = with_retired(read_retired(path)?, replaced, now, keep)?;
    proxy_lib::fs::write_atomic_keeping_owner(path, &json, proxy_lib::fs::PUBLIC_MODE)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Whether `cert` is past its notAfter at `now` (an unparsable one counts as expired).
fn expired(cert: &CertificateDer<'_>, now: SystemTime) -> bool {
    X509Certificate::from_der(cert.as_ref()).map_or(true, |(_, c)| {
        c.validity().not_after.timestamp() < proxy_lib::clock::unix_secs(now) as i64
    })
}
