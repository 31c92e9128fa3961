//! The one TLS policy of the workspace: every rustls config the issuer, the rotator and
//! mtls-proxy use is built here.
//!
//! - Provider: ring, TLS 1.3 suites ordered AES-128-GCM first ([`provider`]); the server's
//!   order wins.
//! - Versions: TLS 1.3 only for mesh traffic (proxy ↔ proxy, rotator ↔ issuer); the
//!   consumer-verify profile ([`Connector::consumer`]) also allows TLS 1.2, because the rotator's
//!   verify step talks to whatever serves the new certificate (nginx, postgres, ...).
//! - Verifiers: webpki path validation to the trust anchors at the injected clock's time, then a
//!   server must carry the expected identity as an exact DNS SAN (no wildcard), and a client
//!   must be on the [`AllowList`] (empty: any client that chains).
//! - Connections: [`Acceptor`] and [`Connector`] hand out only verified connections. A resumed
//!   TLS 1.3 session carries the peer chain of its original handshake, which rustls does not
//!   verify again; they verify it again at the clock's now, so resumption never outlives a peer
//!   certificate and no caller has to remember to check. The bare configs
//!   ([`server_config`], [`client_config`]) have resumption turned off for the same reason.
//! - The issuer's profile ([`Acceptor::deferred`]): client certificates requested, never
//!   required; the handshake signature proves the key, and the chain is verified after the
//!   handshake, so a linkerd2-proxy whose leaf has expired can still renew with its token.
//!
//! Peer-certificate validity is judged by the injected [`Clock`](crate::clock::Clock).

use std::fmt;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::time_provider::TimeProvider;
use rustls::{ClientConfig, DistinguishedName, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::bundle::CertBundle;
use crate::cert::CertInfo;
use crate::clock::SharedClock;
use crate::identity;
use crate::verify::TrustAnchors;

/// The handshake-signature checks of a verifier that wraps another (`self.inner`): the wrapper
/// only adds checks on the chain, the signature rules stay the inner verifier's.
macro_rules! delegate_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls_pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    };
}

mod session;

pub use session::{Accepted, Acceptor, ClientHello, Connector, HandshakeError};

/// Why a rustls config could not be built from a snapshot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The verifier could not be built from the anchors.
    #[error("cannot build a certificate verifier from the trust anchors: {0}")]
    Verifier(String),
    /// rustls refused the certificate chain or key.
    #[error("rustls refused the certificate or key: {0}")]
    Config(#[from] rustls::Error),
}

/// Identities a client certificate may carry (its DNS SAN). Empty = any client that chains to
/// the anchors.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList(Arc<[String]>);

impl AllowList {
    /// An allow-list of identity names (normalised by [`identity::normalize_name`], matched
    /// by [`identity::matches_san`]).
    pub fn new(names: impl IntoIterator<Item = String>) -> Self {
        Self(
            names
                .into_iter()
                .map(|n| identity::normalize_name(&n))
                .collect(),
        )
    }

    /// Whether every authenticated client is allowed.
    pub fn is_open(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a client whose leaf carries these DNS SANs is allowed.
    pub fn allows(&self, dns_sans: &[String]) -> bool {
        self.is_open()
            || dns_sans
                .iter()
                .any(|d| self.0.iter().any(|a| identity::matches_san(d, a)))
    }
}

/// A rustls time provider reading the injected clock.
#[derive(Debug, Clone)]
pub struct ClockTime(pub SharedClock);

impl rustls::time_provider::TimeProvider for ClockTime {
    fn current_time(&self) -> Option<UnixTime> {
        let d = self.0.now().duration_since(std::time::UNIX_EPOCH).ok()?;
        Some(UnixTime::since_unix_epoch(d))
    }
}

/// The workspace's crypto provider with the TLS 1.3 suites ordered AES-128-GCM first, as
/// linkerd2-proxy and Go's crypto/tls do on AES-NI hardware: 128-bit security at a lower cost
/// per byte than AES-256-GCM.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut p = (*crate::crypto_provider()).clone();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// The verifier of inbound clients: webpki path validation to `anchors` for client use (at
/// the time the config's time provider gives), then the allow-list on the leaf's DNS SANs.
pub fn client_verifier(
    anchors: &TrustAnchors,
    allow: &AllowList,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let inner =
        WebPkiClientVerifier::builder_with_provider(Arc::new(anchors.root_store()), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    Ok(if allow.is_open() {
        inner
    } else {
        Arc::new(AllowListVerifier {
            inner,
            allow: allow.clone(),
        })
    })
}

/// The verifier of outbound servers: webpki path validation to `anchors` for server use, then
/// the expected identity (the `ServerName` of each connect) must be one of the leaf's DNS SANs
/// exactly (ASCII case aside): a wildcard SAN, which webpki's name matching would accept, does
/// not stand for an identity.
pub fn server_verifier(anchors: &TrustAnchors) -> Result<Arc<dyn ServerCertVerifier>, TlsError> {
    let inner =
        WebPkiServerVerifier::builder_with_provider(Arc::new(anchors.root_store()), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    Ok(Arc::new(ExactIdentityVerifier { inner }))
}

/// Whether `dns_sans` holds `identity` itself, by [`identity::matches_san`].
fn carries_identity(dns_sans: &[String], identity: &str) -> bool {
    dns_sans
        .iter()
        .any(|d| crate::identity::matches_san(d, identity))
}

/// Webpki server verification followed by the exact identity check on the leaf's DNS SANs.
#[derive(Debug)]
struct ExactIdentityVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ExactIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let not_valid =
            || rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName);
        let ServerName::DnsName(want) = server_name else {
            return Err(not_valid());
        };
        let info = CertInfo::from_der(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        if carries_identity(&info.dns_sans, want.as_ref()) {
            Ok(verified)
        } else {
            tracing::debug!(identities = ?info.dns_sans, want = want.as_ref(), "server identity is not an exact DNS SAN");
            Err(not_valid())
        }
    }

    delegate_signature_checks!();
}

/// The inbound (server) config: our chain and key, TLS 1.3, client certs required and
/// verified against `anchors`, then checked against `allow`.
///
/// Session resumption is off: a resumed session would skip the client check. Serve through an
/// [`Acceptor`] to keep resumption and have resumed sessions verified again.
pub fn server_config(
    bundle: &CertBundle,
    anchors: &TrustAnchors,
    allow: &AllowList,
    clock: &SharedClock,
) -> Result<ServerConfig, TlsError> {
    let mut config = mesh_server_config(bundle, client_verifier(anchors, allow)?, clock)?;
    without_server_resumption(&mut config);
    Ok(config)
}

/// The outbound (client) config: our chain and key as the client certificate, TLS 1.3, the
/// server verified against `anchors`; the expected identity is the `ServerName` given to
/// each connect (it must be a DNS SAN of the server's leaf).
///
/// Session resumption is off, as for [`server_config`]: connect through a [`Connector`] to
/// keep it.
pub fn client_config(
    bundle: &CertBundle,
    anchors: &TrustAnchors,
    clock: &SharedClock,
) -> Result<ClientConfig, TlsError> {
    let mut config = mesh_client_config(Some(bundle), server_verifier(anchors)?, clock)?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Turns TLS 1.3 resumption off on a server config (no tickets, no session cache).
fn without_server_resumption(config: &mut ServerConfig) {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
}

/// A TLS 1.3 server config with the policy's provider and suite order, the clock as time.
fn mesh_server_config(
    bundle: &CertBundle,
    verifier: Arc<dyn ClientCertVerifier>,
    clock: &SharedClock,
) -> Result<ServerConfig, TlsError> {
    server_config_from(&bundle.chain, &bundle.key, verifier, clock)
}

fn server_config_from(
    chain: &[CertificateDer<'static>],
    key: &crate::pem::PrivateKey,
    verifier: Arc<dyn ClientCertVerifier>,
    clock: &SharedClock,
) -> Result<ServerConfig, TlsError> {
    let mut config =
        ServerConfig::builder_with_details(provider(), Arc::new(ClockTime(clock.clone())))
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.to_vec(), key.to_rustls())?;
    // Our suite order wins over the client's (see `provider`).
    config.ignore_client_order = true;
    Ok(config)
}

/// A TLS 1.3 client config with the policy's provider, the clock as time, `verifier` for the
/// server and `bundle` (if any) as the client certificate.
fn mesh_client_config(
    bundle: Option<&CertBundle>,
    verifier: Arc<dyn ServerCertVerifier>,
    clock: &SharedClock,
) -> Result<ClientConfig, TlsError> {
    client_config_from(
        provider(),
        &[&rustls::version::TLS13],
        bundle,
        verifier,
        clock,
    )
}

fn client_config_from(
    provider: Arc<rustls::crypto::CryptoProvider>,
    versions: &[&'static rustls::SupportedProtocolVersion],
    bundle: Option<&CertBundle>,
    verifier: Arc<dyn ServerCertVerifier>,
    clock: &SharedClock,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_details(provider, Arc::new(ClockTime(clock.clone())))
        .with_protocol_versions(versions)?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    Ok(match bundle {
        Some(b) => builder.with_client_auth_cert(b.chain.clone(), b.key.to_rustls())?,
        None => builder.with_no_client_auth(),
    })
}

fn now_of(clock: &SharedClock) -> Result<UnixTime, rustls::Error> {
    ClockTime(clock.clone())
        .current_time()
        .ok_or(rustls::Error::FailedToGetCurrentTime)
}

/// Marker error for a client identity that is not on the allow-list.
#[derive(Debug)]
pub struct NotAllowed;

impl fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("client identity is not on the allow-list")
    }
}

impl std::error::Error for NotAllowed {}

/// Webpki client verification followed by the allow-list check on the leaf's DNS SANs.
#[derive(Debug)]
struct AllowListVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    allow: AllowList,
}

impl ClientCertVerifier for AllowListVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let info = CertInfo::from_der(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        if self.allow.allows(&info.dns_sans) {
            Ok(verified)
        } else {
            tracing::debug!(identities = ?info.dns_sans, "client identity not allowed");
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Other(rustls::OtherError(Arc::new(NotAllowed))),
            ))
        }
    }

    delegate_signature_checks!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_matches_dns_sans_case_insensitively_and_empty_allows_all() {
        let id = "web.apps.serviceaccount.identity.linkerd.cluster.local";
        let allow = AllowList::new([format!("{}.", id.to_uppercase())]);
        assert!(!allow.is_open());
        assert!(allow.allows(&[id.to_string()]));
        assert!(allow.allows(&["other.example".into(), id.to_string()]));
        assert!(!allow.allows(&["db.data.serviceaccount.identity.linkerd.cluster.local".into()]));
        assert!(!allow.allows(&[]));
        assert!(AllowList::default().allows(&[]));
    }

    #[test]
    fn server_identity_must_be_an_exact_dns_san_not_a_wildcard_match() {
        let id = "db.data.serviceaccount.identity.linkerd.cluster.local";
        assert!(carries_identity(&[id.to_uppercase()], id));
        assert!(carries_identity(&[format!("{id}.")], id));
        assert!(carries_identity(
            &["other.example".into(), id.into()],
            &format!("{id}.")
        ));
        assert!(!carries_identity(
            &["*.data.serviceaccount.identity.linkerd.cluster.local".into()],
            id
        ));
        assert!(!carries_identity(&[], id));
    }

    #[test]
    fn provider_prefers_aes_128_gcm_and_offers_only_tls13_suites() {
        let p = provider();
        assert_eq!(
            p.cipher_suites[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
        assert!(p.cipher_suites.iter().all(|s| s.tls13().is_some()));
    }
}
