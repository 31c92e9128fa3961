//! Mesh identity names (Linkerd form) and the SPIFFE IDs derived from them.
//!
//! An identity is `<sa>.<ns>.serviceaccount.identity.<cp>.<trust-domain>`, where `<cp>` is
//! Linkerd's control-plane namespace (`linkerd` unless Linkerd was installed elsewhere); it is
//! carried as the single DNS SAN of a workload certificate, and the SPIFFE ID
//! `spiffe://<trust-domain>/ns/<ns>/sa/<sa>` is added as a URI SAN.
//!
//! The one rule for "does this certificate name carry that identity" is [`matches_san`], and
//! the one normalisation of a name an operator typed is [`normalize_name`]: every part of the
//! workspace uses these two instead of comparing names by hand.

use std::fmt;
use std::str::FromStr;

/// The trust domain used when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The control-plane namespace used when none is configured.
pub const DEFAULT_CONTROL_PLANE_NAMESPACE: &str = "linkerd";

const MARKER: &str = ".serviceaccount.identity.";

/// Whether the DNS SAN `san` names `identity`.
///
/// The comparison is that of DNS names: ASCII case-insensitive, with one trailing dot (the
/// absolute form) ignored on either side. A wildcard SAN (any `*`) never matches: an identity
/// is one exact name, and a wildcard certificate does not stand for it. An empty name matches
/// nothing. There is no other normalisation (no trimming, no IDNA mapping).
pub fn matches_san(san: &str, identity: &str) -> bool {
    let san = san.strip_suffix('.').unwrap_or(san);
    let identity = identity.strip_suffix('.').unwrap_or(identity);
    !san.is_empty() && !san.contains('*') && san.eq_ignore_ascii_case(identity)
}

/// The normal form of a DNS name an operator wrote (config key, flag, token file): surrounding
/// whitespace and one trailing dot removed, ASCII folded to lowercase. Validation is the
/// caller's ([`Identity::parse`], [`TrustDomain::new`], a `ServerName`).
pub fn normalize_name(s: &str) -> String {
    let s = s.trim();
    s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase()
}

/// Why a name is not a valid identity or trust domain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The name does not have the `<sa>.<ns>.serviceaccount.identity.<cp>.<td>` shape.
    #[error(
        "identity {0:?} is not of the form <serviceaccount>.<namespace>.serviceaccount.identity.linkerd.<trust-domain> \
         (with Linkerd's control-plane namespace in place of linkerd if it is installed elsewhere)"
    )]
    Shape(String),
    /// A label is empty, too long or has characters a DNS name cannot hold.
    #[error("{what} {value:?} is not a valid DNS label or name")]
    InvalidDns {
        /// Which part of the name was wrong.
        what: &'static str,
        /// The offending text.
        value: String,
    },
    /// The identity names another control-plane namespace.
    #[error(
        "identity {identity:?} names control-plane namespace {found:?}, this mesh's is {expected:?}"
    )]
    OutsideControlPlane {
        /// The identity that was asked for.
        identity: String,
        /// The control-plane namespace it names.
        found: String,
        /// The one that is served.
        expected: String,
    },
    /// The identity belongs to another trust domain.
    #[error("identity {identity:?} is outside the trust domain {expected:?}")]
    OutsideTrustDomain {
        /// The identity that was asked for.
        identity: String,
        /// The trust domain that is served.
        expected: String,
    },
}

/// A validated trust domain, e.g. `cluster.local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Validates a trust domain (a DNS name, normalised by [`normalize_name`]).
    pub fn new(s: &str) -> Result<Self, IdentityError> {
        let s = normalize_name(s);
        if !is_dns_name(&s) {
            return Err(IdentityError::InvalidDns {
                what: "trust domain",
                value: s,
            });
        }
        Ok(Self(s))
    }

    /// The trust domain as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The default server name of the identity service in this trust domain
    /// (`linkerd-identity.linkerd.serviceaccount.identity.linkerd.<td>`).
    pub fn identity_service_name(&self) -> Identity {
        Identity::new("linkerd-identity", "linkerd", self).expect("fixed labels are valid")
    }

    /// The server name of the identity service of a Linkerd installed in namespace `cp`
    /// (`linkerd-identity.<cp>.serviceaccount.identity.<cp>.<td>`).
    pub fn identity_service_name_in(&self, cp: &str) -> Result<Identity, IdentityError> {
        Identity::new_in("linkerd-identity", cp, cp, self)
    }
}

impl Default for TrustDomain {
    fn default() -> Self {
        Self(DEFAULT_TRUST_DOMAIN.to_string())
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated mesh identity name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    name: String,
    sa_end: usize,
    ns_end: usize,
    cp_start: usize,
    td_start: usize,
}

impl Identity {
    /// Builds the identity of service account `sa` in namespace `ns`.
    pub fn new(sa: &str, ns: &str, td: &TrustDomain) -> Result<Self, IdentityError> {
        Self::new_in(sa, ns, DEFAULT_CONTROL_PLANE_NAMESPACE, td)
    }

    /// Builds the identity of service account `sa` in namespace `ns` for a Linkerd whose
    /// control plane runs in namespace `cp`.
    pub fn new_in(sa: &str, ns: &str, cp: &str, td: &TrustDomain) -> Result<Self, IdentityError> {
        Self::parse(&format!("{sa}.{ns}{MARKER}{cp}.{td}"))
    }

    /// Parses and validates an identity name, normalised by [`normalize_name`] first.
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let name = normalize_name(s);
        let Some(m) = name.find(MARKER) else {
            return Err(IdentityError::Shape(s.to_string()));
        };
        let head = &name[..m];
        let cp_start = m + MARKER.len();
        let Some((cp, td)) = name[cp_start..].split_once('.') else {
            return Err(IdentityError::Shape(s.to_string()));
        };
        let Some((sa, ns)) = head.split_once('.') else {
            return Err(IdentityError::Shape(s.to_string()));
        };
        if ns.contains('.') {
            return Err(IdentityError::Shape(s.to_string()));
        }
        for (what, v) in [
            ("service account", sa),
            ("namespace", ns),
            ("control-plane namespace", cp),
        ] {
            if !is_dns_label(v) {
                return Err(IdentityError::InvalidDns {
                    what,
                    value: v.to_string(),
                });
            }
        }
        if !is_dns_name(td) {
            return Err(IdentityError::InvalidDns {
                what: "trust domain",
                value: td.to_string(),
            });
        }
        if name.len() > 253 {
            return Err(IdentityError::InvalidDns {
                what: "identity",
                value: name,
            });
        }
        Ok(Self {
            sa_end: sa.len(),
            ns_end: sa.len() + 1 + ns.len(),
            td_start: cp_start + cp.len() + 1,
            cp_start,
            name,
        })
    }

    /// Parses an identity and checks that it belongs to `td` (and to a control plane in the
    /// default namespace, `linkerd`).
    pub fn parse_in(s: &str, td: &TrustDomain) -> Result<Self, IdentityError> {
        Self::parse_in_mesh(s, td, DEFAULT_CONTROL_PLANE_NAMESPACE)
    }

    /// Parses an identity and checks that it belongs to `td` and names the control-plane
    /// namespace `cp`.
    pub fn parse_in_mesh(s: &str, td: &TrustDomain, cp: &str) -> Result<Self, IdentityError> {
        let id = Self::parse(s)?;
        if id.trust_domain() != td.as_str() {
            return Err(IdentityError::OutsideTrustDomain {
                identity: id.name,
                expected: td.to_string(),
            });
        }
        if id.control_plane_namespace() != cp {
            return Err(IdentityError::OutsideControlPlane {
                found: id.control_plane_namespace().to_string(),
                identity: id.name,
                expected: cp.to_string(),
            });
        }
        Ok(id)
    }

    /// The full DNS name.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The service account label.
    pub fn service_account(&self) -> &str {
        &self.name[..self.sa_end]
    }

    /// The namespace label.
    pub fn namespace(&self) -> &str {
        &self.name[self.sa_end + 1..self.ns_end]
    }

    /// The control-plane namespace label (`linkerd` by default).
    pub fn control_plane_namespace(&self) -> &str {
        &self.name[self.cp_start..self.td_start - 1]
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> &str {
        &self.name[self.td_start..]
    }

    /// The SPIFFE ID, `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn spiffe_id(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain(),
            self.namespace(),
            self.service_account()
        )
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A DNS-1123 label: 1-63 lowercase letters, digits and `-`, not starting or ending with
/// `-` (also what Kubernetes requires of a namespace name).
pub fn is_dns_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// A DNS-1123 subdomain: dot-separated labels, 253 characters at most (also what Kubernetes
/// requires of most object names).
pub fn is_dns_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_linkerd_identity_and_derives_spiffe_id() {
        let id = Identity::parse(
            "legacy-database.external-services.serviceaccount.identity.linkerd.cluster.local",
        )
        .unwrap();
        assert_eq!(id.service_account(), "legacy-database");
        assert_eq!(id.namespace(), "external-services");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(
            id.spiffe_id(),
            "spiffe://cluster.local/ns/external-services/sa/legacy-database"
        );
        assert!(id.as_str().len() > 64);
    }

    #[test]
    fn rejects_malformed_names() {
        for bad in [
            "",
            "foo.bar",
            "a.b.c.serviceaccount.identity.linkerd.cluster.local",
            "a.serviceaccount.identity.linkerd.cluster.local",
            "a_b.ns.serviceaccount.identity.linkerd.cluster.local",
            "-a.ns.serviceaccount.identity.linkerd.cluster.local",
            "a.ns.serviceaccount.identity.linkerd.",
            "a.ns.serviceaccount.identity.linkerd.bad..domain",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_control_plane_namespace_is_parsed_and_enforced() {
        let td = TrustDomain::default();
        let id =
            Identity::parse("web.prod.serviceaccount.identity.linkerd-cp.cluster.local").unwrap();
        assert_eq!(id.control_plane_namespace(), "linkerd-cp");
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "prod");
        assert_eq!(
            id,
            Identity::new_in("web", "prod", "linkerd-cp", &td).unwrap()
        );
        assert_eq!(
            Identity::parse(ID_DEFAULT)
                .unwrap()
                .control_plane_namespace(),
            "linkerd"
        );
        assert!(Identity::parse_in_mesh(id.as_str(), &td, "linkerd-cp").is_ok());
        let err = Identity::parse_in(id.as_str(), &td).unwrap_err();
        assert!(
            matches!(err, IdentityError::OutsideControlPlane { ref found, .. } if found == "linkerd-cp"),
            "{err}"
        );
        assert_eq!(
            td.identity_service_name_in("linkerd-cp").unwrap().as_str(),
            "linkerd-identity.linkerd-cp.serviceaccount.identity.linkerd-cp.cluster.local"
        );
        for bad in [
            "a.b.serviceaccount.identity.cluster",
            "a.b.serviceaccount.identity.Bad_ns.cluster.local",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    const ID_DEFAULT: &str = "a.b.serviceaccount.identity.linkerd.cluster.local";

    #[test]
    fn trust_domain_is_enforced() {
        let td = TrustDomain::new("example.org").unwrap();
        assert!(Identity::parse_in("a.b.serviceaccount.identity.linkerd.example.org", &td).is_ok());
        let err = Identity::parse_in("a.b.serviceaccount.identity.linkerd.cluster.local", &td)
            .unwrap_err();
        assert!(matches!(err, IdentityError::OutsideTrustDomain { .. }));
    }

    #[test]
    fn matches_san_table() {
        const ID: &str = "web.prod.serviceaccount.identity.linkerd.cluster.local";
        let cases: &[(&str, &str, bool, &str)] = &[
            (ID, ID, true, "identical"),
            (
                "WEB.Prod.ServiceAccount.identity.linkerd.CLUSTER.local",
                ID,
                true,
                "SAN case",
            ),
            (
                ID,
                "Web.PROD.serviceaccount.identity.linkerd.cluster.local",
                true,
                "identity case",
            ),
            (
                "web.prod.serviceaccount.identity.linkerd.cluster.local.",
                ID,
                true,
                "SAN dot",
            ),
            (
                ID,
                "web.prod.serviceaccount.identity.linkerd.cluster.local.",
                true,
                "id dot",
            ),
            (
                "web.prod.serviceaccount.identity.linkerd.cluster.local..",
                ID,
                false,
                "two trailing dots",
            ),
            (
                "*.prod.serviceaccount.identity.linkerd.cluster.local",
                ID,
                false,
                "wildcard",
            ),
            (
                "*.prod.serviceaccount.identity.linkerd.cluster.local",
                "*.prod.serviceaccount.identity.linkerd.cluster.local",
                false,
                "wildcard equal to the identity",
            ),
            (
                "w*.prod.serviceaccount.identity.linkerd.cluster.local",
                ID,
                false,
                "partial *",
            ),
            ("", ID, false, "empty SAN"),
            (ID, "", false, "empty identity"),
            ("", "", false, "both empty"),
            (".", "", false, "a lone dot"),
            (
                "web.prod.serviceaccount.identity.linkerd.cluster.loca",
                ID,
                false,
                "prefix",
            ),
            (
                "xweb.prod.serviceaccount.identity.linkerd.cluster.local",
                ID,
                false,
                "suffix",
            ),
            (
                "web.prod.serviceaccount.identity.linkerd.cluster.local.evil",
                ID,
                false,
                "longer",
            ),
            (
                "eb.prod.serviceaccount.identity.linkerd.cluster.local",
                ID,
                false,
                "shorter",
            ),
            (
                " web.prod.serviceaccount.identity.linkerd.cluster.local",
                ID,
                false,
                "space",
            ),
            (
                "web.prod.serviceaccount.identity.linkerd.cluster.local\0",
                ID,
                false,
                "NUL",
            ),
        ];
        for (san, id, want, why) in cases {
            assert_eq!(matches_san(san, id), *want, "{why}: {san:?} vs {id:?}");
        }
    }

    #[test]
    fn names_are_normalised_once() {
        assert_eq!(normalize_name("  Web.Prod.  "), "web.prod");
        assert_eq!(normalize_name("a.b.."), "a.b.");
        let td = TrustDomain::new(" Example.ORG. ").unwrap();
        assert_eq!(td.as_str(), "example.org");
        let id = Identity::parse(" A.B.serviceaccount.identity.linkerd.Example.Org. ").unwrap();
        assert_eq!(
            id.as_str(),
            "a.b.serviceaccount.identity.linkerd.example.org"
        );
        assert!(Identity::parse("a.b.serviceaccount.identity.linkerd.example.org..").is_err());
    }

    #[test]
    fn identity_service_name_matches_linkerd() {
        assert_eq!(
            TrustDomain::default().identity_service_name().as_str(),
            "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local"
        );
    }
}
