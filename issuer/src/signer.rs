//! Builds and signs leaf certificates from policy alone (never from what a CSR asks for):
//! the identity's DNS SAN and SPIFFE URI SAN, EKUs, `CA:FALSE`, a random serial, SKI, and an
//! AKI equal to the issuer certificate's own SKI. Pure given the grant's times.

use std::time::SystemTime;

use proxy_lib::identity::Identity;
use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;

use crate::ca::Ca;
use crate::error::SignError;
use crate::policy::Grant;

/// Bytes of a leaf serial: 16 bytes, 126 of them random.
const SERIAL_LEN: usize = 16;

/// What a leaf is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafKind {
    /// A workload identity: serverAuth + clientAuth.
    Workload,
    /// A workload identity whose serial carries where its renewal chain began
    /// ([`crate::renewal::chain_serial`]): the bootstrap's time, carried over renewals by
    /// client certificate.
    Renewable(SystemTime),
    /// The issuer's own serving certificate: serverAuth only.
    Server,
}

/// A signed leaf and the facts the audit log and response need.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The certificate.
    pub der: CertificateDer<'static>,
    /// Serial, lowercase hex.
    pub serial: String,
    /// SHA-256 of the DER, lowercase hex.
    pub sha256: String,
    /// End of validity.
    pub not_after: SystemTime,
}

/// A random positive serial with at least 64 random bits (126 here); the top bits are fixed
/// so the DER length is constant.
pub fn random_serial() -> [u8; SERIAL_LEN] {
    let mut s: [u8; SERIAL_LEN] = rand::random();
    s[0] = (s[0] & 0x3f) | 0x40;
    s
}

/// Signs a leaf for `identity` (DNS SAN + SPIFFE URI SAN) with `public_key` over `grant`.
pub fn sign_leaf(
    ca: &Ca,
    identity: &Identity,
    public_key: &impl PublicKeyData,
    grant: &Grant,
    kind: LeafKind,
) -> Result<Leaf, SignError> {
    let sans = vec![dns_san(identity.as_str())?, uri_san(&identity.spiffe_id())?];
    let serial = match kind {
        LeafKind::Renewable(chain_start) => crate::renewal::chain_serial(chain_start),
        LeafKind::Workload | LeafKind::Server => random_serial(),
    };
    sign(ca, sans, public_key, grant, kind, serial)
}

/// Signs the issuer's own serving certificate for `server_name` (a DNS name; when it has the
/// identity form its SPIFFE ID is added as a URI SAN, as for any workload).
pub fn sign_server_leaf(
    ca: &Ca,
    server_name: &str,
    public_key: &impl PublicKeyData,
    grant: &Grant,
) -> Result<Leaf, SignError> {
    let mut sans = vec![dns_san(server_name)?];
    if let Ok(id) = Identity::parse(server_name) {
        sans.push(uri_san(&id.spiffe_id())?);
    }
    sign(
        ca,
        sans,
        public_key,
        grant,
        LeafKind::Server,
        random_serial(),
    )
}

fn dns_san(name: &str) -> Result<SanType, SignError> {
    Ok(SanType::DnsName(
        name.try_into()
            .map_err(|e: rcgen::Error| SignError::from(e))?,
    ))
}

fn uri_san(uri: &str) -> Result<SanType, SignError> {
    Ok(SanType::URI(
        uri.try_into()
            .map_err(|e: rcgen::Error| SignError::from(e))?,
    ))
}

fn sign(
    ca: &Ca,
    sans: Vec<SanType>,
    public_key: &impl PublicKeyData,
    grant: &Grant,
    kind: LeafKind,
    serial: [u8; SERIAL_LEN],
) -> Result<Leaf, SignError> {
    let mut p = CertificateParams::default();
    // Empty subject (the SAN is then critical): identity names are often longer than the
    // 64 characters a CN may hold.
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans;
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = match kind {
        LeafKind::Workload | LeafKind::Renewable(_) => vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
        LeafKind::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
    };
    p.use_authority_key_identifier_extension = true;
    p.serial_number = Some(SerialNumber::from_slice(&serial));
    p.not_before = grant.not_before.into();
    p.not_after = grant.not_after.into();
    let cert = p
        .signed_by(public_key, ca.issuer())
        .map_err(SignError::from)?;
    let der = cert.der().clone();
    Ok(Leaf {
        sha256: proxy_lib::cert::sha256_hex(&der),
        serial: hex::encode(serial),
        not_after: grant.not_after,
        der,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_lib::cert::CertInfo;
    use proxy_lib::pem::PrivateKey;
    use proxy_lib::test_util::TestPki;
    use proxy_lib::verify::Usage;
    use std::time::Duration;
    use x509_parser::prelude::{FromDer, X509Certificate};

    fn now() -> SystemTime {
        rcgen::date_time_ymd(2030, 6, 1).into()
    }

    fn setup() -> (TestPki, Ca) {
        let pki = TestPki::new(now());
        let ca = Ca::from_parts(
            pki.anchors(),
            vec![pki.issuer.clone()],
            PrivateKey::from_pkcs8_der(pki.issuer_key.serialize_der()),
            now(),
        )
        .unwrap();
        (pki, ca)
    }

    #[test]
    fn leaf_follows_policy() {
        proxy_lib::install_crypto_provider();
        let (pki, ca) = setup();
        let id = Identity::parse(
            "legacy-database.external-services.serviceaccount.identity.linkerd.cluster.local",
        )
        .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let grant = Grant {
            not_before: now() - Duration::from_secs(20),
            not_after: now() + Duration::from_secs(86_400),
        };
        let leaf = sign_leaf(&ca, &id, &key, &grant, LeafKind::Workload).unwrap();
        let info = CertInfo::from_der(&leaf.der).unwrap();
        assert_eq!(info.dns_sans, vec![id.to_string()]);
        assert_eq!(info.uri_sans, vec![id.spiffe_id()]);
        assert_eq!(info.other_sans, 0);
        assert!(!info.is_ca);
        assert_eq!(info.aki, CertInfo::from_der(&pki.issuer).unwrap().ski);
        assert!(info.ski.is_some());
        assert_eq!(info.spki_der, key.subject_public_key_info());
        assert_eq!(info.lifetime(), Duration::from_secs(86_400 + 20));
        assert_eq!(info.serial, leaf.serial);
        assert_eq!(info.sha256, leaf.sha256);
        for usage in [Usage::Server, Usage::Client] {
            pki.anchors()
                .verify_leaf(&leaf.der, std::slice::from_ref(&pki.issuer), now(), usage)
                .unwrap();
        }
        let (_, x) = X509Certificate::from_der(&leaf.der).unwrap();
        let bc = x.basic_constraints().unwrap().unwrap();
        assert!(bc.critical && !bc.value.ca);
        let ku = x.key_usage().unwrap().unwrap();
        assert!(ku.value.digital_signature() && !ku.value.key_cert_sign());
        let eku = x.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && eku.value.client_auth);
        let (_, issuer) = X509Certificate::from_der(&pki.issuer).unwrap();
        assert_eq!(x.issuer().as_raw(), issuer.subject().as_raw());
        assert!(x.serial.bits() >= 64);
    }

    #[test]
    fn serials_are_random_and_positive() {
        let (_, ca) = setup();
        let id = Identity::parse("a.b.serviceaccount.identity.linkerd.cluster.local").unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let grant = Grant {
            not_before: now(),
            not_after: now() + Duration::from_secs(60),
        };
        let a = sign_leaf(&ca, &id, &key, &grant, LeafKind::Workload).unwrap();
        let b = sign_leaf(&ca, &id, &key, &grant, LeafKind::Workload).unwrap();
        assert_ne!(a.serial, b.serial);
        for _ in 0..1000 {
            let s = random_serial();
            assert!(s[0] & 0x80 == 0 && s[0] != 0);
        }
    }

    #[test]
    fn server_leaf_has_server_auth_only() {
        let (_, ca) = setup();
        let id = Identity::parse(
            "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local",
        )
        .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let grant = Grant {
            not_before: now(),
            not_after: now() + Duration::from_secs(60),
        };
        let leaf = sign_leaf(&ca, &id, &key, &grant, LeafKind::Server).unwrap();
        let (_, x) = X509Certificate::from_der(&leaf.der).unwrap();
        let eku = x.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && !eku.value.client_auth);
    }
}
