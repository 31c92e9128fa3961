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
