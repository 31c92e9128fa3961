//! Bootstrap tokens: creation, the on-disk store (SHA-256 at rest, atomic rewrite under a
//! lock), lookup in constant time, expiry, allowed source addresses and revocation.
//!
//! A token is 256 random bits, shown once as 64 hex characters. The store keeps revoked
//! records, so "revoked" stays distinguishable from "unknown".
//!
//! A token created with a use count (`issuer token create --uses N`) is bound to the public
//! keys it certifies: each successful issuance for a key not seen before spends one use and
//! records the key's fingerprint (SHA-256 of the CSR's SubjectPublicKeyInfo DER); a request
//! with a recorded key stays valid (a restarted linkerd2-proxy reuses its key, a lost answer is
//! retried with the same key), any other key is refused once the uses are spent. A use is
//! reserved before signing ([`TokenStore::reserve`]: the file under its lock, the Kubernetes
//! Secret with a resourceVersion precondition) and released when nothing was issued. Requests
//! with the same key may overlap (a retry while the first attempt is still running): each
//! holds the key ([`TokenRecord::in_flight`] counts them), and the key is unbound only when
//! the last of them is released with none having issued ([`TokenRecord::settle`]).
//!
//! Identity revocations ([`revoke_identity`]) live in the same store (the file's
//! `revocations` list, or one Secret per identity next to the token Secrets): every
//! certificate of the identity issued before the revocation, and every token for it created
//! before then, stops authenticating it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use proxy_lib::fs::FileStamp;
use proxy_lib::identity::Identity;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::error::{AuthError, Error, Result};

/// Version of the store file format.
const STORE_VERSION: u32 = 1;

/// An address or network a token may be used from: `10.1.2.3` or `10.1.0.0/16` (a bare
/// address is a host network; IPv4-mapped IPv6 addresses count as IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet(ipnet::IpNet);

impl IpNet {
    /// Whether `ip` lies inside this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

impl std::str::FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim();
        if let Ok(addr) = t.parse::<IpAddr>() {
            return Ok(Self(ipnet::IpNet::from(addr.to_canonical())));
        }
        let net: ipnet::IpNet = t.parse().map_err(|_| match t.split_once('/') {
            Some((a, _)) if a.trim().parse::<IpAddr>().is_ok() => {
                format!("{s:?} has an invalid prefix length")
            }
            _ => format!("{s:?} is not an IP address or CIDR network"),
        })?;
        Ok(Self(match net {
            ipnet::IpNet::V6(v6) => match v6.addr().to_ipv4_mapped() {
                Some(v4) => ipnet::IpNet::new(IpAddr::V4(v4), v6.prefix_len().saturating_sub(96))
                    .map_err(|_| format!("{s:?} has an invalid prefix length"))?,
                None => net,
            },
            v4 => v4,
        }))
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.prefix_len() == self.0.max_prefix_len() {
            write!(f, "{}", self.0.addr())
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One token record as stored (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id, for `list`, `revoke`, logs and audit.
    pub id: String,
    /// SHA-256 of the token, hex.
    pub sha256: String,
    /// The identity the token may request.
    pub identity: String,
    /// Creation time, Unix seconds.
    pub created: u64,
    /// Expiry, Unix seconds; `None` = until revoked.
    #[serde(default)]
    pub expires: Option<u64>,
    /// Source addresses allowed; empty = any.
    #[serde(default)]
    pub allowed_ips: Vec<IpNet>,
    /// Revocation time, Unix seconds.
    #[serde(default)]
    pub revoked: Option<u64>,
    /// How many distinct keys the token may certify; `None` = no limit and no key binding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uses: Option<u32>,
    /// Fingerprints (SHA-256 of the SubjectPublicKeyInfo DER, hex) of the keys certified
    /// with it, first first; only for a token with `uses`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bound_keys: Vec<String>,
    /// Bound keys nothing has been issued for yet, with how many requests hold a reservation
    /// on each: such a key is unbound (its use given back) only when the last of them is
    /// released with none having issued. A bound key not listed here has been certified and
    /// stays bound. A reservation whose server died (or whose request was dropped) before it
    /// committed or released leaves its count behind: the use then stays spent (never
    /// over-issued).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub in_flight: BTreeMap<String, u32>,
}

/// The outcome of [`TokenRecord::bind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// The token limits no keys.
    Unlimited,
    /// The key was already bound.
    Known,
    /// The key was just bound, spending a use (released if nothing is issued).
    Fresh,
    /// The key was bound by a request still in flight, nothing issued for it yet: this one
    /// holds it too (released or committed like [`Binding::Fresh`]).
    Joined,
}

impl Binding {
    /// Whether the reservation holds an in-flight count on its key: it must be committed
    /// after an issuance, released otherwise.
    pub fn held(self) -> bool {
        matches!(self, Self::Fresh | Self::Joined)
    }
}

impl TokenRecord {
    /// Marks the record revoked at `now` (a second revoke keeps the first time).
    pub fn revoke(&mut self, now: SystemTime) {
        if self.revoked.is_none() {
            self.revoked = Some(proxy_lib::clock::unix_secs(now));
        }
    }

    /// Uses left (`None`: unlimited).
    pub fn uses_left(&self) -> Option<u32> {
        self.uses
            .map(|u| u.saturating_sub(u32::try_from(self.bound_keys.len()).unwrap_or(u32::MAX)))
    }

    /// Binds `key` (a fingerprint) when a use is left; a key already bound is fine. A
    /// [`Binding::held`] outcome counts one request in flight on the key: end it with
    /// [`TokenRecord::commit`] or [`TokenRecord::release`].
    pub fn bind(&mut self, key: &str) -> std::result::Result<Binding, AuthError> {
        if self.uses.is_none() {
            return Ok(Binding::Unlimited);
        }
        if self.bound_keys.iter().any(|k| k == key) {
            return Ok(match self.in_flight.get_mut(key) {
                Some(n) => {
                    *n = n.saturating_add(1);
                    Binding::Joined
                }
                None => Binding::Known,
            });
        }
        if self.uses_left() == Some(0) {
            return Err(AuthError::KeyNotBound {
                id: self.id.clone(),
            });
        }
        self.bound_keys.push(key.to_string());
        self.in_flight.insert(key.to_string(), 1);
        Ok(Binding::Fresh)
    }

    /// Ends one held reservation on `key` that issued nothing: the key is unbound (its use
    /// given back) when no other request holds it and none issued for it.
    pub fn release(&mut self, key: &str) {
        let Some(n) = self.in_flight.get_mut(key) else {
            // Certified meanwhile (or never held): the key stays bound.
            return;
        };
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.in_flight.remove(key);
            self.bound_keys.retain(|k| k != key);
        }
    }

    /// Ends a held reservation on `key` that issued a certificate: the key stays bound for
    /// good, whatever the other requests holding it do.
    pub fn commit(&mut self, key: &str) {
        self.in_flight.remove(key);
    }

    /// [`TokenRecord::commit`] when `issued`, else [`TokenRecord::release`].
    pub fn settle(&mut self, key: &str, issued: bool) {
        if issued {
            self.commit(key);
        } else {
            self.release(key);
        }
    }

    /// `active`, `expired` or `revoked` at `now`.
    pub fn status(&self, now: SystemTime) -> &'static str {
        if self.revoked.is_some() {
            "revoked"
        } else if self
            .expires
            .is_some_and(|e| proxy_lib::clock::unix_secs(now) >= e)
        {
            "expired"
        } else {
            "active"
        }
    }
}

/// An identity revocation: certificates of `identity` issued before `revoked`, and tokens
/// for it created before then, no longer authenticate it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRevocation {
    /// The identity.
    pub identity: String,
    /// When, Unix seconds (a later revocation of the same identity moves it forward).
    pub revoked: u64,
    /// Why, as the operator gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl IdentityRevocation {
    /// Merges a newer revocation of the same identity in (the later time and its reason).
    pub fn merge(&mut self, newer: &IdentityRevocation) {
        if newer.revoked >= self.revoked {
            self.revoked = newer.revoked;
            if newer.reason.is_some() {
                self.reason = newer.reason.clone();
            }
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StoreFile {
    version: u32,
    #[serde(default)]
    tokens: Vec<TokenRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    revocations: Vec<IdentityRevocation>,
}

/// A freshly created token: the secret (shown once) and its record.
pub struct NewToken {
    /// The token text (64 hex characters), zeroized on drop.
    pub secret: Zeroizing<String>,
    /// What was stored.
    pub record: TokenRecord,
}

impl std::fmt::Debug for NewToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewToken")
            .field("secret", &"[elided]")
            .field("record", &self.record)
            .finish()
    }
}

/// Options for [`create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// The identity (already checked against the trust domain).
    pub identity: Identity,
    /// Time to live; `None` = until revoked.
    pub ttl: Option<Duration>,
    /// Allowed source addresses; empty = any.
    pub allowed_ips: Vec<IpNet>,
    /// How many distinct keys it may certify; `None` = no limit (and no key binding).
    pub uses: Option<u32>,
}

impl CreateOptions {
    /// A token for `identity`: no expiry, any source address, no use count.
    pub fn new(identity: Identity) -> Self {
        Self {
            identity,
            ttl: None,
            allowed_ips: Vec::new(),
            uses: None,
        }
    }
}

/// The fingerprint a token binds: SHA-256 of a public key's SubjectPublicKeyInfo DER, hex.
pub fn key_fingerprint(spki_der: &[u8]) -> String {
    hex::encode(Sha256::digest(spki_der))
}

fn sha256_of(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// The token as presented: surrounding ASCII whitespace is ignored.
pub fn trim_token(token: &[u8]) -> &[u8] {
    token.trim_ascii()
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

fn read_file(path: &Path) -> Result<StoreFile> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let file: StoreFile =
                serde_json::from_slice(&bytes).map_err(|e| Error::TokenStore {
                    path: path.to_path_buf(),
                    reason: format!("not a valid token store ({e})"),
                })?;
            if file.version != STORE_VERSION {
                return Err(Error::TokenStore {
                    path: path.to_path_buf(),
                    reason: format!("unsupported version {}", file.version),
                });
            }
            Ok(file)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StoreFile {
            version: STORE_VERSION,
            tokens: Vec::new(),
            revocations: Vec::new(),
        }),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Reads, changes and atomically rewrites the store under its lock file. Blocks.
fn modify<T>(path: &Path, f: impl FnOnce(&mut StoreFile) -> Result<T>) -> Result<T> {
    let lock = lock_path(path);
    let _guard = proxy_lib::fs::lock_exclusive(&lock)?;
    // A store that belongs to the service's user stays its own, lock file included, when an
    // operator runs `issuer token create|revoke` as root.
    if let Some(owner) = proxy_lib::fs::owner_of(path) {
        proxy_lib::fs::chown_to(&lock, owner)?;
    }
    let mut file = read_file(path)?;
    let out = f(&mut file)?;
    let json = serde_json::to_vec_pretty(&file).map_err(|e| Error::TokenStore {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    proxy_lib::fs::write_atomic_keeping_owner(path, &json, proxy_lib::fs::SECRET_MODE)?;
    Ok(out)
}

/// What every bootstrap token made since it was introduced starts with, so it is
/// recognisable (in a leaked file, by a secret scanner) and never mistaken for a Kubernetes
/// token. Older tokens (64 hex digits, no prefix) stay valid.
pub const TOKEN_PREFIX: &str = "l5dh_";

/// A fresh token and its record (nothing stored yet): [`TOKEN_PREFIX`] and 256 random bits
/// in hex, an id, the hash (of the whole token, prefix included).
pub fn mint(opts: &CreateOptions, now: SystemTime) -> NewToken {
    let bytes: Zeroizing<[u8; 32]> = Zeroizing::new(rand::random());
    let secret = Zeroizing::new(format!("{TOKEN_PREFIX}{}", hex::encode(*bytes)));
    let created = proxy_lib::clock::unix_secs(now);
    let record = TokenRecord {
        id: hex::encode(rand::random::<[u8; 6]>()),
        sha256: hex::encode(sha256_of(secret.as_bytes())),
        identity: opts.identity.to_string(),
        created,
        expires: opts.ttl.map(|t| created + t.as_secs().max(1)),
        allowed_ips: opts.allowed_ips.clone(),
        revoked: None,
        uses: opts.uses,
        bound_keys: Vec::new(),
        in_flight: BTreeMap::new(),
    };
    NewToken { secret, record }
}

/// Creates a token and appends its record to the store at `path`. Blocks.
pub fn create(path: &Path, opts: &CreateOptions, now: SystemTime) -> Result<NewToken> {
    let t = mint(opts, now);
    let stored = t.record.clone();
    modify(path, move |f| {
        f.tokens.push(stored);
        Ok(())
    })?;
    Ok(t)
}

/// Marks the token `id` revoked (the record is kept). Blocks.
pub fn revoke(path: &Path, id: &str, now: SystemTime) -> Result<TokenRecord> {
    modify(path, |f| {
        let rec = f
            .tokens
            .iter_mut()
            .find(|r| r.id == id)
            .ok_or_else(|| Error::NoSuchToken(id.to_string()))?;
        rec.revoke(now);
        Ok(rec.clone())
    })
}

/// All records in the store. Blocks.
pub fn list(path: &Path) -> Result<Vec<TokenRecord>> {
    Ok(read_file(path)?.tokens)
}

/// The identity revocations in the store file at `path`. Blocks.
pub fn list_revocations(path: &Path) -> Result<Vec<IdentityRevocation>> {
    Ok(read_file(path)?.revocations)
}

/// A revocation of `identity` at `now` (whole seconds, so a certificate or token made in a
/// later second is never caught).
pub fn revocation(
    identity: &Identity,
    reason: Option<&str>,
    now: SystemTime,
) -> IdentityRevocation {
    IdentityRevocation {
        identity: identity.to_string(),
        revoked: proxy_lib::clock::unix_secs(now),
        reason: reason.map(str::to_string),
    }
}

/// Records an identity revocation in the store file at `path` (merged with an earlier one of
/// the same identity). Blocks.
pub fn revoke_identity_in_file(
    path: &Path,
    identity: &Identity,
    reason: Option<&str>,
    now: SystemTime,
) -> Result<IdentityRevocation> {
    let new = revocation(identity, reason, now);
    modify(path, |f| {
        match f
            .revocations
            .iter_mut()
            .find(|r| r.identity == new.identity)
        {
            Some(r) => {
                r.merge(&new);
                Ok(r.clone())
            }
            None => {
                f.revocations.push(new.clone());
                Ok(new)
            }
        }
    })
}

/// A token store as the operator commands write it: the file, or the Secrets of a namespace.
#[derive(Debug, Clone)]
pub enum Backend {
    /// The store file.
    File(PathBuf),
    /// The token Secrets.
    Kubernetes(Box<crate::kubernetes::tokens::KubeTokens>),
}

/// Revokes `identity` at `now` in `store` (`issuer revoke --identity`, `issuer workload
/// remove`): renewal by certificate is refused for every certificate of the identity issued
/// before `now`, and tokens for it created before `now` stop working. Servers see it within
/// their store's re-read (a second) or watch delay. The file store blocks briefly.
pub async fn revoke_identity(
    store: &Backend,
    identity: &Identity,
    reason: Option<&str>,
    now: SystemTime,
) -> Result<IdentityRevocation> {
    match store {
        Backend::File(p) => revoke_identity_in_file(p, identity, reason, now),
        Backend::Kubernetes(k) => k.revoke_identity(identity, reason, now).await,
    }
}

/// Records one use of token `id` by `key` in the store file (see [`TokenRecord::bind`]);
/// the record is re-read under the lock, so two keys racing for the last use cannot both
/// win. Blocks.
pub fn reserve_in_file(
    path: &Path,
    id: &str,
    key: &str,
) -> Result<std::result::Result<Binding, AuthError>> {
    modify(path, |f| {
        let Some(rec) = f.tokens.iter_mut().find(|r| r.id == id) else {
            return Ok(Err(AuthError::UnknownToken));
        };
        if rec.revoked.is_some() {
            return Ok(Err(AuthError::Revoked { id: rec.id.clone() }));
        }
        Ok(rec.bind(key))
    })
}

/// Ends a held reservation [`reserve_in_file`] made, under the lock: `issued` commits it
/// ([`TokenRecord::commit`]), otherwise it is released ([`TokenRecord::release`]). Blocks.
pub fn settle_in_file(path: &Path, id: &str, key: &str, issued: bool) -> Result<()> {
    modify(path, |f| {
        if let Some(rec) = f.tokens.iter_mut().find(|r| r.id == id) {
            rec.settle(key, issued);
        }
        Ok(())
    })
}

/// A use of a token held for one request: [`TokenStore::commit`] it once a certificate was
/// issued, [`TokenStore::release`] it when nothing was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    id: String,
    key: String,
    binding: Binding,
}

impl Reservation {
    /// Whether this request bound a new key (spent a use).
    pub fn binding(&self) -> Binding {
        self.binding
    }
}

#[derive(Default)]
struct Loaded {
    records: Vec<(TokenRecord, [u8; 32])>,
    /// Index into `records` by token hash and by id: a request looks one record up, not
    /// every one (a fleet's store holds a record per host).
    by_hash: std::collections::HashMap<[u8; 32], usize>,
    by_id: std::collections::HashMap<String, usize>,
    /// The `allowed_ips` of the non-revoked records that restrict addresses, by identity
    /// ([`proxy_lib::identity::normalize_name`]): where renewal by certificate may come from.
    renewal_nets: std::collections::HashMap<String, Vec<IpNet>>,
    revocations: std::collections::HashMap<String, IdentityRevocation>,
}

/// Where a [`TokenStore`]'s records come from.
enum Source {
    /// The store file, re-read by [`TokenStore::refresh`] when its inode, size or mtime
    /// change.
    File {
        path: PathBuf,
        stamp: Mutex<Option<FileStamp>>,
    },
    /// Fed from outside through [`TokenStore::replace`] (the Kubernetes watch); uses of
    /// tokens are written through `writer` when there is one.
    Fed {
        origin: String,
        writer: Option<Box<crate::kubernetes::tokens::KubeTokens>>,
    },
}

/// The server's view of the token records: an in-memory snapshot that requests only read,
/// replaced whole when the source changes. A file store is refreshed by the server's
/// maintenance loop (one `stat` a second, not one per request); a store that fails to parse
/// is logged and the last good contents are kept. A Kubernetes store is fed by its watch.
pub struct TokenStore {
    source: Source,
    loaded: ArcSwap<Loaded>,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let origin = match &self.source {
            Source::File { path, .. } => path.display().to_string(),
            Source::Fed { origin, .. } => origin.clone(),
        };
        f.debug_struct("TokenStore")
            .field("source", &origin)
            .finish()
    }
}

impl TokenStore {
    /// Opens the store file at `path` (a missing file is an empty store). Blocks.
    pub fn open(path: &Path) -> Result<Self> {
        let st = FileStamp::of(path);
        let file = read_file(path)?;
        let s = Self {
            source: Source::File {
                path: path.to_path_buf(),
                stamp: Mutex::new(st),
            },
            loaded: ArcSwap::from_pointee(Loaded::default()),
        };
        s.replace_all(file.tokens, file.revocations);
        Ok(s)
    }

    /// An empty store whose records are supplied by [`TokenStore::replace`]; `origin` names
    /// where they come from in logs. Tokens with a use count cannot be used through it (there
    /// is nowhere to record the use): see [`TokenStore::fed_writing`].
    pub fn fed(origin: impl Into<String>) -> Self {
        Self {
            source: Source::Fed {
                origin: origin.into(),
                writer: None,
            },
            loaded: ArcSwap::from_pointee(Loaded::default()),
        }
    }

    /// Like [`TokenStore::fed`], recording token uses in the token Secrets through `writer`.
    pub fn fed_writing(
        origin: impl Into<String>,
        writer: crate::kubernetes::tokens::KubeTokens,
    ) -> Self {
        Self {
            source: Source::Fed {
                origin: origin.into(),
                writer: Some(Box::new(writer)),
            },
            loaded: ArcSwap::from_pointee(Loaded::default()),
        }
    }

    /// Replaces every record at once (records whose hash is not 64 hex characters are
    /// skipped: they can match no token); the identity revocations stay.
    pub fn replace(&self, records: Vec<TokenRecord>) {
        let revocations = self.loaded.load().revocations.values().cloned().collect();
        self.replace_all(records, revocations);
    }

    /// Replaces every record and every identity revocation at once.
    pub fn replace_all(&self, records: Vec<TokenRecord>, revocations: Vec<IdentityRevocation>) {
        let records: Vec<(TokenRecord, [u8; 32])> = records
            .into_iter()
            .filter_map(|r| {
                let mut h = [0u8; 32];
                hex::decode_to_slice(&r.sha256, &mut h).ok()?;
                Some((r, h))
            })
            .collect();
        // As the scans these replace did: the last record of a hash is the one checked, the
        // first of an id the one a use is recorded in (as `reserve_in_file` finds it).
        let mut by_hash = std::collections::HashMap::with_capacity(records.len());
        let mut by_id = std::collections::HashMap::with_capacity(records.len());
        for (i, (r, h)) in records.iter().enumerate() {
            by_hash.insert(*h, i);
            by_id.entry(r.id.clone()).or_insert(i);
        }
        let mut renewal_nets = std::collections::HashMap::<String, Vec<IpNet>>::new();
        for (r, _) in records
            .iter()
            .filter(|(r, _)| r.revoked.is_none() && !r.allowed_ips.is_empty())
        {
            renewal_nets
                .entry(proxy_lib::identity::normalize_name(&r.identity))
                .or_default()
                .extend(r.allowed_ips.iter().copied());
        }
        let mut by_identity = std::collections::HashMap::<String, IdentityRevocation>::new();
        for r in revocations {
            match by_identity.get_mut(&r.identity) {
                Some(have) => have.merge(&r),
                None => {
                    by_identity.insert(r.identity.clone(), r);
                }
            }
        }
        let old = self.loaded.load();
        for (id, r) in &by_identity {
            if old.revocations.get(id).map(|o| o.revoked) != Some(r.revoked) {
                tracing::info!(
                    identity = %id,
                    revoked = %proxy_lib::clock::rfc3339(UNIX_EPOCH + Duration::from_secs(r.revoked)),
                    reason = r.reason.as_deref().unwrap_or(""),
                    "identity revocation in effect"
                );
            }
        }
        self.loaded.store(Arc::new(Loaded {
            records,
            by_hash,
            by_id,
            renewal_nets,
            revocations: by_identity,
        }));
    }

    /// When `identity` was last revoked (Unix seconds), if it was.
    pub fn identity_revoked(&self, identity: &str) -> Option<u64> {
        self.loaded
            .load()
            .revocations
            .get(identity)
            .map(|r| r.revoked)
    }

    /// Reserves a use of token `id` for the key with fingerprint `key` (see
    /// [`TokenRecord::bind`]), re-reading the record where it is stored so concurrent
    /// requests (on this replica or another) cannot spend the same use twice. A token without
    /// a use count needs no write. Give the use back with [`TokenStore::release`] when
    /// nothing is issued.
    pub async fn reserve(
        &self,
        id: &str,
        key: &str,
    ) -> std::result::Result<Reservation, AuthError> {
        let loaded = self.loaded.load();
        let limited = loaded
            .by_id
            .get(id)
            .is_some_and(|&i| loaded.records[i].0.uses.is_some());
        drop(loaded);
        let binding = if !limited {
            Binding::Unlimited
        } else {
            match &self.source {
                Source::File { path, .. } => {
                    let (path, id, key) = (path.clone(), id.to_string(), key.to_string());
                    tokio::task::spawn_blocking(move || reserve_in_file(&path, &id, &key))
                        .await
                        .map_err(|e| AuthError::StoreUnavailable(e.to_string()))?
                        .map_err(|e| AuthError::StoreUnavailable(e.to_string()))??
                }
                Source::Fed {
                    writer: Some(w), ..
                } => w.reserve(id, key).await?,
                Source::Fed { origin, .. } => {
                    return Err(AuthError::StoreUnavailable(format!(
                        "{origin} cannot record token uses"
                    )));
                }
            }
        };
        Ok(Reservation {
            id: id.to_string(),
            key: key.to_string(),
            binding,
        })
    }

    /// Gives back the use `r` took, unless another request holding the same key issued or
    /// still holds it (nothing was issued for `r`). Failures are logged: the use then stays
    /// spent.
    pub async fn release(&self, r: Reservation) {
        self.settle(r, false).await;
    }

    /// Records that `r` issued a certificate: its key stays bound whatever the other requests
    /// holding it do. Failures are logged: the key then stays bound anyway.
    pub async fn commit(&self, r: Reservation) {
        self.settle(r, true).await;
    }

    async fn settle(&self, r: Reservation, issued: bool) {
        if !r.binding.held() {
            return;
        }
        let res = match &self.source {
            Source::File { path, .. } => {
                let (path, id, key) = (path.clone(), r.id.clone(), r.key.clone());
                tokio::task::spawn_blocking(move || settle_in_file(&path, &id, &key, issued))
                    .await
                    .unwrap_or_else(|e| Err(Error::Server(e.to_string())))
            }
            Source::Fed {
                writer: Some(w), ..
            } => w.settle(&r.id, &r.key, issued).await,
            Source::Fed { .. } => Ok(()),
        };
        if let Err(error) = res {
            let what = if issued {
                "a token use could not be marked issued"
            } else {
                "a token use could not be given back"
            };
            tracing::warn!(%error, token = %r.id, "{what}");
        }
    }

    /// How many records the snapshot holds.
    pub fn len(&self) -> usize {
        self.loaded.load().records.len()
    }

    /// Whether the snapshot holds no record.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A file store: re-reads the file if it changed since the last look. Blocks (one
    /// `stat`). A fed store: nothing to do.
    pub fn refresh(&self) {
        let Source::File { path, stamp } = &self.source else {
            return;
        };
        let now = FileStamp::of(path);
        let mut last = stamp.lock().unwrap_or_else(|e| e.into_inner());
        if *last == now {
            return;
        }
        match read_file(path) {
            Ok(file) => {
                let n = file.tokens.len();
                self.replace_all(file.tokens, file.revocations);
                *last = now;
                tracing::info!(path = %path.display(), tokens = n, "token store reloaded");
            }
            Err(error) => {
                *last = now;
                tracing::warn!(%error, "token store unreadable; keeping the previous contents");
            }
        }
    }

    /// Where renewal by certificate for `identity` may come from: `None` (anywhere) when no
    /// non-revoked record for it restricts addresses, else the union of the `allowed_ips` of
    /// those that do (records of used-up counted tokens included: they are kept).
    pub fn renewal_sources(&self, identity: &str) -> Option<Vec<IpNet>> {
        self.loaded
            .load()
            .renewal_nets
            .get(&proxy_lib::identity::normalize_name(identity))
            .cloned()
    }

    /// Checks a renewal by certificate for `identity` from `peer` against
    /// [`TokenStore::renewal_sources`]: PERMISSION_DENIED naming the address otherwise.
    pub fn check_renewal_source(
        &self,
        identity: &str,
        peer: Option<IpAddr>,
    ) -> std::result::Result<(), AuthError> {
        let Some(nets) = self.renewal_sources(identity) else {
            return Ok(());
        };
        if peer.is_some_and(|ip| nets.iter().any(|n| n.contains(ip))) {
            return Ok(());
        }
        let allowed: Vec<String> = nets.iter().map(ToString::to_string).collect();
        let peer = peer.map_or_else(|| "an unknown address".into(), |ip| ip.to_string());
        Err(AuthError::RenewalSourceNotAllowed {
            identity: identity.to_string(),
            peer,
            allowed: allowed.join(", "),
        })
    }

    /// Looks a presented token up and checks it for `identity`, from `peer`, at `now`.
    /// `Ok(None)`: the token is not one of ours (another authenticator may know it).
    pub fn check(
        &self,
        token: &[u8],
        identity: &Identity,
        peer: Option<IpAddr>,
        now: SystemTime,
    ) -> std::result::Result<Option<TokenRecord>, AuthError> {
        let token = trim_token(token);
        if token.is_empty() {
            return Ok(None);
        }
        let h = sha256_of(token);
        let loaded = self.loaded.load();
        // Looked up by the SHA-256 of the presented token in a randomly keyed hash map: the
        // time taken says nothing about any stored hash an attacker could use (it is the hash
        // of a 256-bit secret), and the candidate is still compared in constant time. (A scan
        // of every record cost a fleet's bootstrap O(records) per request.)
        let found = loaded
            .by_hash
            .get(&h)
            .map(|&i| &loaded.records[i])
            .filter(|(_, hash)| bool::from(hash.ct_eq(&h)))
            .map(|(rec, _)| rec);
        let Some(rec) = found else {
            return Ok(None);
        };
        if rec.revoked.is_some() {
            return Err(AuthError::Revoked { id: rec.id.clone() });
        }
        if let Some(exp) = rec.expires
            && proxy_lib::clock::unix_secs(now) >= exp
        {
            return Err(AuthError::Expired {
                id: rec.id.clone(),
                at: proxy_lib::clock::rfc3339(UNIX_EPOCH + Duration::from_secs(exp)),
            });
        }
        if !proxy_lib::identity::matches_san(&rec.identity, identity.as_str()) {
            return Err(AuthError::WrongIdentity {
                id: rec.id.clone(),
                requested: identity.to_string(),
            });
        }
        if let Some(r) = loaded.revocations.get(identity.as_str())
            && rec.created < r.revoked
        {
            return Err(AuthError::IdentityRevoked {
                identity: identity.to_string(),
                at: proxy_lib::clock::rfc3339(UNIX_EPOCH + Duration::from_secs(r.revoked)),
            });
        }
        if !rec.allowed_ips.is_empty() {
            let Some(ip) = peer else {
                return Err(AuthError::PeerUnknown { id: rec.id.clone() });
            };
            if !rec.allowed_ips.iter().any(|n| n.contains(ip)) {
                return Err(AuthError::SourceNotAllowed {
                    id: rec.id.clone(),
                    peer: ip,
                });
            }
        }
        Ok(Some(rec.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_lib::clock::{Clock, FakeClock};
    use std::os::unix::fs::MetadataExt;

    fn id(sa: &str) -> Identity {
        Identity::parse(&format!(
            "{sa}.ns.serviceaccount.identity.linkerd.cluster.local"
        ))
        .unwrap()
    }

    fn opts(sa: &str) -> CreateOptions {
        CreateOptions::new(id(sa))
    }

    #[test]
    fn tokens_made_before_the_prefix_stay_valid() {
        let clock = FakeClock::at_unix(2_000_000_000);
        let legacy = "0123456789abcdef".repeat(4);
        let mut t = mint(&opts("a"), clock.now());
        t.record.sha256 = hex::encode(sha256_of(legacy.as_bytes()));
        let store = TokenStore::fed("test");
        store.replace(vec![t.record.clone()]);
        let checked = store.check(legacy.as_bytes(), &id("a"), None, clock.now());
        assert_eq!(checked.unwrap().map(|r| r.id), Some(t.record.id));
    }

    #[test]
    fn create_stores_only_the_hash_with_mode_0600() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens");
        let clock = FakeClock::at_unix(2_000_000_000);
        let t = create(&p, &opts("a"), clock.now()).unwrap();
        assert_eq!(t.secret.len(), TOKEN_PREFIX.len() + 64);
        assert!(t.secret.starts_with(TOKEN_PREFIX));
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(!text.contains(t.secret.as_str()));
        assert!(text.contains(&t.record.sha256));
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert!(!format!("{t:?}").contains(t.secret.as_str()));
        assert_eq!(list(&p).unwrap(), vec![t.record.clone()]);
    }

    #[test]
    fn a_store_rewritten_by_root_stays_the_service_users() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipping: only root can hand a file to another user");
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens");
        let clock = FakeClock::at_unix(2_000_000_000);
        create(&p, &opts("a"), clock.now()).unwrap();
        // The service's user owns the store (as after `runuser -u issuer -- issuer token ...`).
        let service = (4242, 4243);
        proxy_lib::fs::chown_to(&p, service).unwrap();
        let t = create(&p, &opts("b"), clock.now()).unwrap();
        revoke(&p, &t.record.id, clock.now()).unwrap();
        assert_eq!(proxy_lib::fs::owner_of(&p), Some(service));
        assert_eq!(proxy_lib::fs::owner_of(&lock_path(&p)), Some(service));
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(list(&p).unwrap().len(), 2);
    }

    #[test]
    fn check_covers_every_outcome() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens");
        let clock = FakeClock::at_unix(2_000_000_000);
        let good = create(&p, &opts("a"), clock.now()).unwrap();
        let expiring = create(
            &p,
            &CreateOptions {
                ttl: Some(Duration::from_secs(60)),
                ..opts("a")
            },
            clock.now(),
        )
        .unwrap();
        let bound = create(
            &p,
            &CreateOptions {
                allowed_ips: vec!["10.1.0.0/16".parse().unwrap(), "::1".parse().unwrap()],
                ..opts("a")
            },
            clock.now(),
        )
        .unwrap();
        let revoked = create(&p, &opts("a"), clock.now()).unwrap();
        revoke(&p, &revoked.record.id, clock.now()).unwrap();
        let store = TokenStore::open(&p).unwrap();
        let any = Some("192.0.2.1".parse().unwrap());

        // whitespace around the token is ignored
        let padded = format!("  {}\n", good.secret.as_str());
        assert!(
            store
                .check(padded.as_bytes(), &id("a"), any, clock.now())
                .unwrap()
                .is_some()
        );
        assert_eq!(store.check(b"", &id("a"), any, clock.now()), Ok(None));
        assert_eq!(store.check(b"  \n", &id("a"), any, clock.now()), Ok(None));
        assert_eq!(store.check(b"nope", &id("a"), any, clock.now()), Ok(None));
        assert!(matches!(
            store.check(revoked.secret.as_bytes(), &id("a"), any, clock.now()),
            Err(AuthError::Revoked { .. })
        ));
        assert!(matches!(
            store.check(good.secret.as_bytes(), &id("b"), any, clock.now()),
            Err(AuthError::WrongIdentity { .. })
        ));
        // expiry on the fake clock
        assert!(
            store
                .check(expiring.secret.as_bytes(), &id("a"), any, clock.now())
                .is_ok()
        );
        clock.advance(Duration::from_secs(59));
        assert!(
            store
                .check(expiring.secret.as_bytes(), &id("a"), any, clock.now())
                .unwrap()
                .is_some()
        );
        clock.advance(Duration::from_secs(1));
        assert!(matches!(
            store.check(expiring.secret.as_bytes(), &id("a"), any, clock.now()),
            Err(AuthError::Expired { .. })
        ));
        // source addresses, failing closed without a peer
        let b = bound.secret.as_bytes();
        assert!(
            store
                .check(b, &id("a"), Some("10.1.2.3".parse().unwrap()), clock.now())
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .check(
                    b,
                    &id("a"),
                    Some("::ffff:10.1.2.3".parse().unwrap()),
                    clock.now()
                )
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .check(b, &id("a"), Some("::1".parse().unwrap()), clock.now())
                .unwrap()
                .is_some()
        );
        assert!(matches!(
            store.check(b, &id("a"), Some("10.2.0.1".parse().unwrap()), clock.now()),
            Err(AuthError::SourceNotAllowed { .. })
        ));
        assert!(matches!(
            store.check(b, &id("a"), None, clock.now()),
            Err(AuthError::PeerUnknown { .. })
        ));
    }

    #[test]
    fn server_view_follows_file_changes() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens");
        let clock = FakeClock::at_unix(2_000_000_000);
        let store = TokenStore::open(&p).unwrap();
        let t = create(&p, &opts("a"), clock.now()).unwrap();
        // requests read the snapshot only; the server's maintenance loop refreshes it
        assert_eq!(
            store.check(t.secret.as_bytes(), &id("a"), None, clock.now()),
            Ok(None)
        );
        store.refresh();
        assert!(
            store
                .check(t.secret.as_bytes(), &id("a"), None, clock.now())
                .unwrap()
                .is_some()
        );
        revoke(&p, &t.record.id, clock.now()).unwrap();
        store.refresh();
        assert!(matches!(
            store.check(t.secret.as_bytes(), &id("a"), None, clock.now()),
            Err(AuthError::Revoked { .. })
        ));
        // a corrupt rewrite keeps the last good contents
        proxy_lib::fs::write_atomic(&p, b"{not json", 0o600, None).unwrap();
        store.refresh();
        assert!(matches!(
            store.check(t.secret.as_bytes(), &id("a"), None, clock.now()),
            Err(AuthError::Revoked { .. })
        ));
    }

    #[test]
    fn concurrent_creates_lose_no_entry() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens");
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for _ in 0..5 {
                        create(&p, &opts("a"), UNIX_EPOCH + Duration::from_secs(10)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(list(&p).unwrap().len(), 40);
    }

    #[test]
    fn keys_racing_for_the_last_use_exactly_one_wins() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens");
        let now = UNIX_EPOCH + Duration::from_secs(10);
        for uses in [1u32, 3] {
            let t = create(
                &p,
                &CreateOptions {
                    uses: Some(uses),
                    ..opts("a")
                },
                now,
            )
            .unwrap();
            let threads: Vec<_> = (0..8)
                .map(|i| {
                    let (p, id) = (p.clone(), t.record.id.clone());
                    std::thread::spawn(move || {
                        reserve_in_file(&p, &id, &format!("key{i}")).unwrap()
                    })
                })
                .collect();
            let outcomes: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let won = outcomes
                .iter()
                .filter(|o| **o == Ok(Binding::Fresh))
                .count();
            assert_eq!(won, uses as usize, "{outcomes:?}");
            assert!(outcomes.iter().all(
                |o| *o == Ok(Binding::Fresh) || matches!(o, Err(AuthError::KeyNotBound { .. }))
            ));
            let rec = list(&p)
                .unwrap()
                .into_iter()
                .find(|r| r.id == t.record.id)
                .unwrap();
            assert_eq!(rec.bound_keys.len(), uses as usize);
            assert_eq!(rec.uses_left(), Some(0));
            // a bound key stays valid (still in flight: the request joins it), and releasing
            // both reservations gives the use back
            let bound = rec.bound_keys[0].clone();
            assert_eq!(
                reserve_in_file(&p, &t.record.id, &bound).unwrap(),
                Ok(Binding::Joined)
            );
            settle_in_file(&p, &t.record.id, &bound, false).unwrap();
            settle_in_file(&p, &t.record.id, &bound, false).unwrap();
            assert_eq!(
                reserve_in_file(&p, &t.record.id, "late").unwrap(),
                Ok(Binding::Fresh)
            );
        }
        // unlimited tokens bind nothing; revoked and unknown tokens are refused
        let free = create(&p, &opts("a"), now).unwrap();
        assert_eq!(
            reserve_in_file(&p, &free.record.id, "k").unwrap(),
            Ok(Binding::Unlimited)
        );
        assert!(
            list(&p)
                .unwrap()
                .iter()
                .all(|r| r.uses.is_some() || r.bound_keys.is_empty())
        );
        revoke(&p, &free.record.id, now).unwrap();
        assert!(matches!(
            reserve_in_file(&p, &free.record.id, "k").unwrap(),
            Err(AuthError::Revoked { .. })
        ));
        assert_eq!(
            reserve_in_file(&p, "nosuch", "k").unwrap(),
            Err(AuthError::UnknownToken)
        );
    }

    /// Two requests with the same key on a counted token overlap: whatever order they end
    /// in, a release never takes away the binding another still relies on or one that issued.
    #[test]
    fn overlapping_reservations_of_one_key_release_only_when_none_issued_or_holds() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens");
        let now = UNIX_EPOCH + Duration::from_secs(10);
        let counted = || {
            let o = CreateOptions {
                uses: Some(1),
                ..opts("a")
            };
            create(&p, &o, now).unwrap()
        };
        let t = counted();
        let id = t.record.id.as_str();
        let rec = || list(&p).unwrap().remove(0);
        let reserve = |key: &str| reserve_in_file(&p, id, key).unwrap();
        let settle = |key: &str, issued| settle_in_file(&p, id, key, issued).unwrap();

        // first fails after the second reserved, then the second issues: the key stays bound
        assert_eq!(reserve("k"), Ok(Binding::Fresh));
        assert_eq!(reserve("k"), Ok(Binding::Joined));
        settle("k", false);
        assert_eq!(rec().bound_keys, ["k"], "the second still relies on it");
        assert!(matches!(
            reserve("other"),
            Err(AuthError::KeyNotBound { .. })
        ));
        settle("k", true);
        assert_eq!(rec().bound_keys, ["k"]);
        assert!(rec().in_flight.is_empty());
        // once issued, a failing request on the same key never unbinds it
        assert_eq!(reserve("k"), Ok(Binding::Known));
        assert!(!Binding::Known.held(), "nothing to settle");
        assert_eq!(rec().bound_keys, ["k"]);

        // second issues first, then the first fails: the key stays bound
        let t2 = counted();
        let id2 = t2.record.id.as_str();
        let rec2 = || list(&p).unwrap().into_iter().find(|r| r.id == id2).unwrap();
        assert_eq!(reserve_in_file(&p, id2, "k").unwrap(), Ok(Binding::Fresh));
        assert_eq!(reserve_in_file(&p, id2, "k").unwrap(), Ok(Binding::Joined));
        settle_in_file(&p, id2, "k", true).unwrap();
        settle_in_file(&p, id2, "k", false).unwrap();
        assert_eq!(rec2().bound_keys, ["k"]);
        assert_eq!(rec2().uses_left(), Some(0));

        // both fail: only the last release gives the use back
        let t3 = counted();
        let id3 = t3.record.id.as_str();
        assert_eq!(reserve_in_file(&p, id3, "k").unwrap(), Ok(Binding::Fresh));
        assert_eq!(reserve_in_file(&p, id3, "k").unwrap(), Ok(Binding::Joined));
        settle_in_file(&p, id3, "k", false).unwrap();
        assert!(matches!(
            reserve_in_file(&p, id3, "other").unwrap(),
            Err(AuthError::KeyNotBound { .. })
        ));
        settle_in_file(&p, id3, "k", false).unwrap();
        assert_eq!(
            reserve_in_file(&p, id3, "other").unwrap(),
            Ok(Binding::Fresh)
        );
    }

    #[tokio::test]
    async fn the_server_reserves_and_releases_through_its_store() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens");
        let now = UNIX_EPOCH + Duration::from_secs(10);
        let t = create(
            &p,
            &CreateOptions {
                uses: Some(1),
                ..opts("a")
            },
            now,
        )
        .unwrap();
        let store = Arc::new(TokenStore::open(&p).unwrap());
        let (a, b) = tokio::join!(
            store.reserve(&t.record.id, "ka"),
            store.reserve(&t.record.id, "kb")
        );
        let (won, lost) = if a.is_ok() { (a, b) } else { (b, a) };
        let won = won.unwrap();
        assert_eq!(won.binding(), Binding::Fresh);
        assert!(matches!(lost, Err(AuthError::KeyNotBound { .. })));
        // nothing issued: the use comes back, and another key may take it
        store.release(won).await;
        assert_eq!(list(&p).unwrap()[0].uses_left(), Some(1));
        let again = store.reserve(&t.record.id, "kb").await.unwrap();
        assert_eq!(again.binding(), Binding::Fresh);
        // a fed store without a writer cannot count uses: it refuses rather than over-issue
        let fed = TokenStore::fed("test");
        fed.replace(list(&p).unwrap());
        assert!(matches!(
            fed.reserve(&t.record.id, "kb").await,
            Err(AuthError::StoreUnavailable(_))
        ));
    }

    #[test]
    fn identity_revocations_catch_only_what_came_before() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens");
        let clock = FakeClock::at_unix(2_000_000_000);
        let before = create(&p, &opts("a"), clock.now()).unwrap();
        let other = create(&p, &opts("b"), clock.now()).unwrap();
        clock.advance(Duration::from_secs(5));
        let r = revoke_identity_in_file(&p, &id("a"), None, clock.now()).unwrap();
        assert_eq!(r.revoked, 2_000_000_005);
        let after = create(&p, &opts("a"), clock.now()).unwrap();
        let store = TokenStore::open(&p).unwrap();
        assert_eq!(
            store.identity_revoked(id("a").as_str()),
            Some(2_000_000_005)
        );
        assert_eq!(store.identity_revoked(id("b").as_str()), None);
        assert!(matches!(
            store.check(before.secret.as_bytes(), &id("a"), None, clock.now()),
            Err(AuthError::IdentityRevoked { .. })
        ));
        assert!(
            store
                .check(after.secret.as_bytes(), &id("a"), None, clock.now())
                .unwrap()
                .is_some()
        );
        assert!(
            store
                .check(other.secret.as_bytes(), &id("b"), None, clock.now())
                .unwrap()
                .is_some()
        );
        // a later revocation moves the moment forward and keeps one entry per identity
        clock.advance(Duration::from_secs(5));
        let r = revoke_identity_in_file(&p, &id("a"), Some("again"), clock.now()).unwrap();
        assert_eq!(
            (r.revoked, r.reason.as_deref()),
            (2_000_000_010, Some("again"))
        );
        assert_eq!(list_revocations(&p).unwrap().len(), 1);
        store.refresh();
        assert!(matches!(
            store.check(after.secret.as_bytes(), &id("a"), None, clock.now()),
            Err(AuthError::IdentityRevoked { .. })
        ));
        // replacing the records (the Kubernetes watch's token part) keeps the revocations
        store.replace(list(&p).unwrap());
        assert_eq!(
            store.identity_revoked(id("a").as_str()),
            Some(2_000_000_010)
        );
    }

    #[test]
    fn ipnet_parsing() {
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("bogus".parse::<IpNet>().is_err());
        let n: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(n.contains("8.8.8.8".parse().unwrap()));
        assert!(!n.contains("::2".parse().unwrap()));
        assert_eq!(
            "10.1.0.0/16".parse::<IpNet>().unwrap().to_string(),
            "10.1.0.0/16"
        );
        assert!(
            "10.1.2.3/x"
                .parse::<IpNet>()
                .unwrap_err()
                .contains("prefix")
        );
        assert_eq!("10.1.2.3".parse::<IpNet>().unwrap().to_string(), "10.1.2.3");
        assert_eq!(
            "::ffff:10.1.0.0/112".parse::<IpNet>().unwrap().to_string(),
            "10.1.0.0/16"
        );
        let mapped: IpNet = "::ffff:10.1.2.3".parse().unwrap();
        assert!(mapped.contains("10.1.2.3".parse().unwrap()));
        assert!(revoke(Path::new("/nonexistent/x/tokens"), "x", UNIX_EPOCH).is_err());
    }
}
