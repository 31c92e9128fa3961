//! The issuer chain, link by link: issuer certificate → intermediate(s) → trust anchor, as
//! Linkerd, cert-manager and step allow. Every link must be a CA with keyCertSign, be valid
//! now and be signed by the next one; each CA's pathlen must allow the CAs below it (the
//! issuer's own may be 0 or absent); the top link must be signed by an anchor in `ca.crt`.
//! Errors are typed and name the link at fault. Pure.

use std::time::SystemTime;

use proxy_lib::validity::Window;
use rustls_pki_types::CertificateDer;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Which part of the CA material an error is about (and so which file to name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The trust anchors (`ca.crt`).
    Anchors,
    /// The issuer chain (`issuer.crt`).
    Chain,
    /// The issuer key (`issuer.key`).
    Key,
}

/// One certificate of the path, as errors name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// The issuer certificate (the first one in `issuer.crt`).
    Issuer {
        /// Its subject.
        subject: String,
    },
    /// An intermediate between the issuer and the anchor (`index` 1 is the second
    /// certificate in `issuer.crt`, the one that signed the issuer).
    Intermediate {
        /// Position in `issuer.crt`, from 0.
        index: usize,
        /// Its subject.
        subject: String,
    },
    /// A trust anchor in `ca.crt`.
    Anchor {
        /// Position in `ca.crt`, from 0.
        index: usize,
        /// Its subject.
        subject: String,
    },
}

impl Link {
    fn in_chain(index: usize, subject: String) -> Self {
        if index == 0 {
            Self::Issuer { subject }
        } else {
            Self::Intermediate { index, subject }
        }
    }

    /// The part of the material this link comes from.
    pub fn part(&self) -> Part {
        match self {
            Self::Anchor { .. } => Part::Anchors,
            _ => Part::Chain,
        }
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Issuer { subject } => write!(f, "issuer certificate ({subject})"),
            Self::Intermediate { index, subject } => {
                write!(f, "intermediate #{index} of the issuer chain ({subject})")
            }
            Self::Anchor { index, subject } => write!(f, "trust anchor #{index} ({subject})"),
        }
    }
}

/// Why CA material (anchors, issuer chain, issuer key) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The anchors could not be parsed or are unusable.
    #[error("trust anchors: {0}")]
    Anchors(String),
    /// The issuer chain holds no certificate (or only anchors).
    #[error(
        "the issuer chain holds no issuer certificate (only trust anchors, or nothing); \
         list the issuer certificate first, then any intermediates"
    )]
    EmptyChain,
    /// A certificate of the chain is not parseable X.509.
    #[error("certificate #{index} of the issuer chain is not valid X.509: {reason}")]
    Malformed {
        /// Position in the chain, from 0.
        index: usize,
        /// What the parser said.
        reason: String,
    },
    /// The issuer key could not be read or used.
    #[error("issuer key: {0}")]
    Key(String),
    /// The key does not belong to the issuer certificate.
    #[error("issuer key does not match the issuer certificate (serial {serial})")]
    KeyMismatch {
        /// Serial of the issuer certificate.
        serial: String,
    },
    /// A link is not a CA.
    #[error("{link} is not a CA (basicConstraints CA:TRUE missing)")]
    NotCa {
        /// The link.
        link: Link,
    },
    /// A link lacks keyCertSign.
    #[error("{link} lacks the keyCertSign key usage")]
    NoKeyCertSign {
        /// The link.
        link: Link,
    },
    /// The issuer certificate allows sub-CAs below it.
    #[error("{link} must have pathlen 0 or none, has {pathlen}")]
    IssuerPathLen {
        /// The issuer link.
        link: Link,
        /// Its pathlen.
        pathlen: u32,
    },
    /// A CA's pathlen forbids the CAs below it.
    #[error(
        "{link} has pathlen {pathlen}, which forbids the {below} CA certificate(s) below it \
         (the issuer and the intermediates under it)"
    )]
    PathLen {
        /// The link.
        link: Link,
        /// Its pathlen.
        pathlen: u32,
        /// CA certificates between it and the leaf.
        below: usize,
    },
    /// A link is outside its validity window.
    #[error("{link} (serial {serial}) is not valid now: valid {not_before} .. {not_after}")]
    NotValidNow {
        /// The link.
        link: Link,
        /// Its serial.
        serial: String,
        /// RFC 3339.
        not_before: String,
        /// RFC 3339.
        not_after: String,
    },
    /// A link was not issued by the next certificate of the chain.
    #[error(
        "{child} was not issued by the next certificate, {parent}: list the issuer \
         certificate first, then each intermediate in order up to the anchor ({reason})"
    )]
    NotIssuedBy {
        /// The certificate whose issuer is wrong.
        child: Link,
        /// The next certificate in the file.
        parent: Link,
        /// Name mismatch or bad signature.
        reason: String,
    },
    /// The top of the chain is not signed by any anchor.
    #[error(
        "{link} does not chain to any trust anchor in the bundle: none named {issuer} signed \
         it (add the intermediates that lead to an anchor, or the right anchor)"
    )]
    NoAnchor {
        /// The top link.
        link: Link,
        /// The issuer name it carries.
        issuer: String,
    },
    /// A test leaf minted with the pair does not verify.
    #[error("the issuer chain does not verify up to an anchor: {0}")]
    Untrusted(String),
    /// Leaves would not verify for server use (an extendedKeyUsage without serverAuth).
    #[error(
        "leaves signed by this issuer chain do not verify for server use \
         (an extendedKeyUsage without serverAuth?): {0}"
    )]
    NotForServers(String),
    /// rcgen cannot sign with the issuer (unsupported name encoding, key type...).
    #[error("issuer certificate cannot be used for signing: {0}")]
    Unusable(String),
}

impl CaError {
    /// The part of the material at fault.
    pub fn part(&self) -> Part {
        match self {
            Self::Anchors(_) => Part::Anchors,
            Self::Key(_) | Self::KeyMismatch { .. } => Part::Key,
            Self::NotCa { link }
            | Self::NoKeyCertSign { link }
            | Self::PathLen { link, .. }
            | Self::NotValidNow { link, .. } => link.part(),
            _ => Part::Chain,
        }
    }
}

/// Facts about one CA certificate of the path.
#[derive(Debug, Clone)]
pub struct LinkInfo {
    /// Which link.
    pub link: Link,
    /// Serial (hex).
    pub serial: String,
    /// SHA-256 of the DER (hex).
    pub sha256: String,
    /// Validity window.
    pub window: Window,
    /// basicConstraints CA.
    pub is_ca: bool,
    /// basicConstraints pathLenConstraint.
    pub pathlen: Option<u32>,
    /// Whether keyUsage has keyCertSign.
    pub key_cert_sign: bool,
}

impl LinkInfo {
    fn of(x: &X509Certificate<'_>, der: &[u8], link: Link) -> Self {
        let mut is_ca = false;
        let mut pathlen = None;
        let mut key_cert_sign = false;
        for ext in x.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) => {
                    is_ca = bc.ca;
                    pathlen = bc.path_len_constraint;
                }
                ParsedExtension::KeyUsage(ku) => key_cert_sign = ku.key_cert_sign(),
                _ => {}
            }
        }
        let time = |t: x509_parser::time::ASN1Time| {
            std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(t.timestamp().try_into().unwrap_or(0))
        };
        Self {
            link,
            serial: x.tbs_certificate.raw_serial_as_string().replace(':', ""),
            sha256: proxy_lib::cert::sha256_hex(der),
            window: Window::new(time(x.validity().not_before), time(x.validity().not_after)),
            is_ca,
            pathlen,
            key_cert_sign,
        }
    }

    fn check_valid_at(&self, now: SystemTime) -> Result<(), CaError> {
        if self.window.contains(now) {
            return Ok(());
        }
        Err(CaError::NotValidNow {
            link: self.link.clone(),
            serial: self.serial.clone(),
            not_before: proxy_lib::clock::rfc3339(self.window.not_before),
            not_after: proxy_lib::clock::rfc3339(self.window.not_after),
        })
    }

    fn check_ca(&self) -> Result<(), CaError> {
        if !self.is_ca {
            return Err(CaError::NotCa {
                link: self.link.clone(),
            });
        }
        if !self.key_cert_sign {
            return Err(CaError::NoKeyCertSign {
                link: self.link.clone(),
            });
        }
        Ok(())
    }

    /// `below`: CA certificates between this one and a leaf.
    fn check_pathlen(&self, below: usize) -> Result<(), CaError> {
        match self.pathlen {
            Some(p) if (p as usize) < below => Err(CaError::PathLen {
                link: self.link.clone(),
                pathlen: p,
                below,
            }),
            _ => Ok(()),
        }
    }
}

/// The checked path: the chain (issuer first, anchors removed) and the anchor it ends at.
#[derive(Debug, Clone)]
pub struct Path {
    /// Issuer certificate, then intermediates, leaf-first; no anchor.
    pub chain: Vec<CertificateDer<'static>>,
    /// One entry per chain certificate, then the anchor's.
    pub links: Vec<LinkInfo>,
}

impl Path {
    /// Where every link (anchor included) is valid: the window a leaf may have.
    pub fn window(&self) -> Window {
        let mut w = self.links[0].window;
        for l in &self.links[1..] {
            w.not_before = w.not_before.max(l.window.not_before);
            w.not_after = w.not_after.min(l.window.not_after);
        }
        w
    }
}

/// The chain without trailing certificates that are trust anchors themselves (cert-manager
/// puts the root at the end of `tls.crt`).
pub fn without_anchors(
    mut chain: Vec<CertificateDer<'static>>,
    anchors: &[CertificateDer<'static>],
) -> Vec<CertificateDer<'static>> {
    while chain.last().is_some_and(|c| anchors.contains(c)) {
        chain.pop();
    }
    chain
}

fn subject_of(x: &X509Certificate<'_>) -> String {
    let s = x.subject().to_string();
    if s.is_empty() {
        "empty subject".into()
    } else {
        s
    }
}

/// Checks every link of `chain` (leaf-first, anchors already removed) against `anchors` at
/// `now`. Pure.
pub fn check(
    chain: Vec<CertificateDer<'static>>,
    anchors: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<Path, CaError> {
    if chain.is_empty() {
        return Err(CaError::EmptyChain);
    }
    let parsed = chain
        .iter()
        .enumerate()
        .map(|(index, der)| {
            X509Certificate::from_der(der)
                .map(|(_, x)| x)
                .map_err(|e| CaError::Malformed {
                    index,
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut links: Vec<LinkInfo> = parsed
        .iter()
        .zip(&chain)
        .enumerate()
        .map(|(i, (x, der))| LinkInfo::of(x, der, Link::in_chain(i, subject_of(x))))
        .collect();
    for i in 0..parsed.len() - 1 {
        let (child, parent) = (&parsed[i], &parsed[i + 1]);
        let reason = if child.issuer().as_raw() != parent.subject().as_raw() {
            Some(format!(
                "it names issuer {}, the next certificate is {}",
                child.issuer(),
                subject_of(parent)
            ))
        } else {
            child
                .verify_signature(Some(parent.public_key()))
                .err()
                .map(|e| format!("signature does not verify: {e}"))
        };
        if let Some(reason) = reason {
            return Err(CaError::NotIssuedBy {
                child: links[i].link.clone(),
                parent: links[i + 1].link.clone(),
                reason,
            });
        }
    }
    for (i, l) in links.iter().enumerate() {
        l.check_ca()?;
        if i == 0 {
            if let Some(p) = l.pathlen.filter(|p| *p != 0) {
                return Err(CaError::IssuerPathLen {
                    link: l.link.clone(),
                    pathlen: p,
                });
            }
        } else {
            l.check_pathlen(i)?;
        }
        l.check_valid_at(now)?;
    }
    let top = parsed.last().expect("chain is not empty");
    let top_link = links.last().expect("chain is not empty").link.clone();
    let anchor = anchors.iter().enumerate().find_map(|(index, der)| {
        let (_, a) = X509Certificate::from_der(der).ok()?;
        (top.issuer().as_raw() == a.subject().as_raw()
            && top.verify_signature(Some(a.public_key())).is_ok())
        .then(|| {
            LinkInfo::of(
                &a,
                der,
                Link::Anchor {
                    index,
                    subject: subject_of(&a),
                },
            )
        })
    });
    let Some(anchor) = anchor else {
        return Err(CaError::NoAnchor {
            link: top_link,
            issuer: top.issuer().to_string(),
        });
    };
    anchor.check_pathlen(chain.len())?;
    anchor.check_valid_at(now)?;
    links.push(anchor);
    Ok(Path { chain, links })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proxy_lib::pem::PrivateKey;
    use proxy_lib::verify::{TrustAnchors, Usage};
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };

    use super::*;
    use crate::ca::Ca;

    fn now() -> SystemTime {
        rcgen::date_time_ymd(2030, 6, 1).into()
    }

    const DAY: Duration = Duration::from_secs(86_400);

    /// A CA certificate with its key and params (to sign below it).
    struct Node {
        der: CertificateDer<'static>,
        key: KeyPair,
        params: CertificateParams,
    }

    impl Node {
        fn issuer(&self) -> Issuer<'_, &KeyPair> {
            Issuer::from_params(&self.params, &self.key)
        }
    }

    fn params(cn: &str, bc: IsCa, f: impl FnOnce(&mut CertificateParams)) -> CertificateParams {
        let mut p = CertificateParams::new(Vec::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = bc;
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.use_authority_key_identifier_extension = true;
        p.not_before = (now() - DAY).into();
        p.not_after = (now() + 365 * DAY).into();
        f(&mut p);
        p
    }

    fn new_root(cn: &str, bc: IsCa) -> Node {
        let key = KeyPair::generate().unwrap();
        let params = params(cn, bc, |p| p.not_after = (now() + 3650 * DAY).into());
        let der = params.self_signed(&key).unwrap().der().clone();
        Node { der, key, params }
    }

    fn under(parent: &Node, cn: &str, bc: IsCa, f: impl FnOnce(&mut CertificateParams)) -> Node {
        let key = KeyPair::generate().unwrap();
        let params = params(cn, bc, f);
        let der = params
            .signed_by(&key, &parent.issuer())
            .unwrap()
            .der()
            .clone();
        Node { der, key, params }
    }

    fn constrained(n: u8) -> IsCa {
        IsCa::Ca(BasicConstraints::Constrained(n))
    }

    fn unconstrained() -> IsCa {
        IsCa::Ca(BasicConstraints::Unconstrained)
    }

    fn load(anchors: &[&Node], chain: &[&Node], key: &Node, at: SystemTime) -> Result<Ca, CaError> {
        Ca::from_parts(
            TrustAnchors::from_certs(anchors.iter().map(|n| n.der.clone()).collect()).unwrap(),
            chain.iter().map(|n| n.der.clone()).collect(),
            PrivateKey::from_pkcs8_der(key.key.serialize_der()),
            at,
        )
    }

    /// Linkerd-like: root → intermediate → issuer (no pathlen on the issuer, as cert-manager
    /// writes it).
    fn three_levels() -> (Node, Node, Node) {
        let root = new_root("root.linkerd.cluster.local", unconstrained());
        let inter = under(&root, "intermediate", constrained(1), |p| {
            p.not_after = (now() + 200 * DAY).into()
        });
        let issuer = under(
            &inter,
            "identity.linkerd.cluster.local",
            unconstrained(),
            |_| {},
        );
        (root, inter, issuer)
    }

    #[test]
    fn a_three_level_chain_signs_leaves_that_verify_through_every_link() {
        let (root, inter, issuer) = three_levels();
        let other_root = new_root("old-root", unconstrained());
        // A two-root bundle (anchor rotation), and cert-manager's trailing copy of the root.
        let ca = load(
            &[&other_root, &root],
            &[&issuer, &inter, &root],
            &issuer,
            now(),
        )
        .unwrap();
        assert_eq!(ca.chain(), &[issuer.der.clone(), inter.der.clone()]);
        let links: Vec<_> = ca.links().iter().map(|l| l.link.to_string()).collect();
        assert_eq!(
            links,
            [
                "issuer certificate (CN=identity.linkerd.cluster.local)",
                "intermediate #1 of the issuer chain (CN=intermediate)",
                "trust anchor #1 (CN=root.linkerd.cluster.local)",
            ]
        );
        // Leaves never outlive the shortest link (the intermediate here).
        assert_eq!(
            ca.window().not_after,
            SystemTime::from(rcgen::date_time_ymd(2030, 6, 1)) + 200 * DAY
        );
        let id = proxy_lib::identity::Identity::parse(
            "web.prod.serviceaccount.identity.linkerd.cluster.local",
        )
        .unwrap();
        let key = KeyPair::generate().unwrap();
        let grant = Window::grant(now(), DAY, Duration::from_secs(20), ca.window());
        let leaf =
            crate::signer::sign_leaf(&ca, &id, &key, &grant, crate::signer::LeafKind::Workload)
                .unwrap();
        for usage in [Usage::Client, Usage::Server] {
            ca.anchors()
                .verify_leaf(&leaf.der, ca.chain(), now(), usage)
                .unwrap();
        }
    }

    #[test]
    fn every_link_is_checked_and_the_error_names_it() {
        let (root, inter, issuer) = three_levels();
        let cases: Vec<(&str, Result<Ca, CaError>, &str)> = vec![
            (
                "expired intermediate",
                load(&[&root], &[&issuer, &inter], &issuer, now() + 300 * DAY),
                "intermediate #1 of the issuer chain (CN=intermediate) (serial",
            ),
            (
                "intermediates out of order",
                load(&[&root], &[&inter, &issuer], &issuer, now()),
                "issuer certificate (CN=intermediate) was not issued by the next certificate",
            ),
            (
                "missing intermediate",
                load(&[&root], &[&issuer], &issuer, now()),
                "does not chain to any trust anchor",
            ),
        ];
        for (what, r, needle) in cases {
            let e = r.expect_err(what).to_string();
            assert!(e.contains(needle), "{what}: {e}");
        }
        let e = load(&[&root], &[&issuer, &inter], &issuer, now() + 300 * DAY)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not valid now"), "{e}");

        // An intermediate that is not a CA.
        let not_ca = under(&root, "not-a-ca", IsCa::ExplicitNoCa, |_| {});
        let below = under(
            &not_ca,
            "identity.linkerd.cluster.local",
            constrained(0),
            |_| {},
        );
        let e = load(&[&root], &[&below, &not_ca], &below, now()).unwrap_err();
        assert_eq!(e.part(), Part::Chain);
        assert_eq!(
            e.to_string(),
            "intermediate #1 of the issuer chain (CN=not-a-ca) is not a CA (basicConstraints \
             CA:TRUE missing)"
        );

        // An intermediate whose pathlen forbids the issuer below it.
        let tight = under(&root, "tight", constrained(0), |_| {});
        let below = under(
            &tight,
            "identity.linkerd.cluster.local",
            constrained(0),
            |_| {},
        );
        let e = load(&[&root], &[&below, &tight], &below, now())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("intermediate #1 of the issuer chain (CN=tight) has pathlen 0, which forbids the 1 CA"),
            "{e}"
        );

        // An anchor whose pathlen forbids a three-level chain (as `issuer init` used to make).
        let small_root = new_root("small-root", constrained(1));
        let inter2 = under(&small_root, "intermediate", unconstrained(), |_| {});
        let below = under(
            &inter2,
            "identity.linkerd.cluster.local",
            constrained(0),
            |_| {},
        );
        let e = load(&[&small_root], &[&below, &inter2], &below, now()).unwrap_err();
        assert_eq!(e.part(), Part::Anchors);
        assert!(
            e.to_string()
                .contains("trust anchor #0 (CN=small-root) has pathlen 1, which forbids the 2"),
            "{e}"
        );

        // An intermediate without keyCertSign.
        let no_sign = under(&root, "no-sign", unconstrained(), |p| {
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature]
        });
        let below = under(
            &no_sign,
            "identity.linkerd.cluster.local",
            constrained(0),
            |_| {},
        );
        let e = load(&[&root], &[&below, &no_sign], &below, now())
            .unwrap_err()
            .to_string();
        assert!(e.contains("(CN=no-sign) lacks the keyCertSign"), "{e}");

        // A chain whose second certificate did not sign the first.
        let stranger = under(&root, "intermediate", constrained(1), |_| {});
        let e = load(&[&root], &[&issuer, &stranger], &issuer, now())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("issuer certificate (CN=identity.linkerd.cluster.local) was not issued by the next certificate, intermediate #1")
                && e.contains("signature does not verify"),
            "{e}"
        );
    }

    #[test]
    fn trailing_anchors_are_dropped_and_an_anchor_alone_is_no_chain() {
        let (root, inter, issuer) = three_levels();
        let anchors = [root.der.clone()];
        let chain = without_anchors(
            vec![issuer.der.clone(), inter.der.clone(), root.der.clone()],
            &anchors,
        );
        assert_eq!(chain.len(), 2);
        let e = load(&[&root], &[&root], &root, now()).unwrap_err();
        assert_eq!(e, CaError::EmptyChain);
    }
}
