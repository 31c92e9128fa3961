//! The crate's errors, one enum per concern: [`RequestError`] for a refused Certify request
//! (the one place where an error becomes a gRPC `Status`), [`Error`] for an operator command
//! or `serve` failing to start (the one place where an error becomes an exit code).
//!
//! Messages say what was wrong and never include a token, a key or a CSR body.

use std::net::IpAddr;
use std::path::PathBuf;

use proxy_lib::identity::IdentityError;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    /// The bytes are not a DER or PEM PKCS#10 request.
    #[error("certificate signing request is malformed: {0}")]
    Malformed(String),
    /// The request's signature does not verify with the key it carries.
    #[error("certificate signing request signature does not verify with its public key")]
    BadSignature,
    /// The key is not ECDSA P-256.
    #[error("key type not allowed: {0} (only ECDSA P-256 keys are accepted)")]
    KeyType(String),
    /// The DNS SANs are not exactly the requested identity.
    #[error(
        "certificate signing request must carry exactly one DNS SAN equal to the requested identity {identity:?}, found {found:?}"
    )]
    DnsNames {
        /// The identity that was asked for.
        identity: String,
        /// The DNS SANs the CSR carries.
        found: Vec<String>,
    },
    /// A SAN of a kind we never issue (IP, URI, email, ...).
    #[error("certificate signing request carries a {0} SAN; only one DNS SAN is allowed")]
    ForbiddenSan(&'static str),
    /// The common name is neither empty nor the identity.
    #[error(
        "certificate signing request common name {cn:?} is neither empty nor the requested identity"
    )]
    CommonName {
        /// The CN found.
        cn: String,
    },
    /// The request asks for a CA certificate.
    #[error("certificate signing request asks for a CA certificate ({0})")]
    CaRequested(&'static str),
    /// The request asks for an extension we do not understand.
    #[error("certificate signing request asks for an unsupported extension {0}")]
    UnknownExtension(String),
}

/// Why a caller was not authenticated or not authorised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No credential was presented.
    #[error("no token presented")]
    NoToken,
    /// The token matches no record.
    #[error("token is not recognised")]
    UnknownToken,
    /// The token was revoked.
    #[error("token {id} has been revoked")]
    Revoked {
        /// Public id of the token record.
        id: String,
    },
    /// The token expired.
    #[error("token {id} expired at {at}")]
    Expired {
        /// Public id of the token record.
        id: String,
        /// RFC 3339.
        at: String,
    },
    /// The token is valid but for another identity.
    #[error("token {id} is not valid for identity {requested:?}")]
    WrongIdentity {
        /// Public id of the token record.
        id: String,
        /// The identity asked for.
        requested: String,
    },
    /// The source address is not allowed for this token.
    #[error("token {id} may not be used from {peer}")]
    SourceNotAllowed {
        /// Public id of the token record.
        id: String,
        /// The peer address.
        peer: IpAddr,
    },
    /// The token is bound to source addresses and the peer address is unknown.
    #[error("token {id} is bound to source addresses and the peer address is unknown")]
    PeerUnknown {
        /// Public id of the token record.
        id: String,
    },
    /// A Kubernetes TokenReview did not authenticate the token (the reason as the API server
    /// gave it, or what was missing: our audience, a service account).
    #[error("Kubernetes token review refused the token: {0}")]
    ReviewRefused(String),
    /// The token authenticates a service account whose identity is not the one asked for.
    #[error("{service_account} may not have identity {requested:?}")]
    ServiceAccountMismatch {
        /// `system:serviceaccount:<ns>:<sa>`.
        service_account: String,
        /// The identity asked for.
        requested: String,
    },
    /// This source asked for too many token reviews: refused before one is made.
    #[error("too many Kubernetes token reviews from this address; retry later")]
    ReviewsThrottled,
    /// The Kubernetes API server could not be asked (unreachable, timed out, or it refused
    /// the review itself): nothing is decided, nothing issued.
    #[error("Kubernetes API server unavailable for token review: {0}")]
    ReviewUnavailable(String),
    /// The token limits how many keys it certifies, and this key is not one of them: its
    /// uses are spent (a copied token on another host).
    #[error(
        "token {id} is bound to the key(s) it was first used with; a new key needs a new token"
    )]
    KeyNotBound {
        /// Public id of the token record.
        id: String,
    },
    /// The identity was revoked after this credential was made: a certificate issued, or a
    /// token created, before the revocation no longer authenticates it.
    #[error("identity {identity} was revoked at {at}; bootstrap again with a token created since")]
    IdentityRevoked {
        /// The identity.
        identity: String,
        /// When it was revoked (RFC 3339).
        at: String,
    },
    /// The client certificate's renewal chain began longer ago than `max_renewal_age`.
    #[error(
        "the renewal chain of this certificate began at {started}, longer ago than max_renewal_age ({max}); bootstrap again with a token"
    )]
    RenewalTooOld {
        /// When the chain's first certificate was issued with a token (RFC 3339).
        started: String,
        /// The configured maximum.
        max: String,
    },
    /// Renewal by certificate from an address none of the identity's token records allows
    /// (the union of their `allowed_ips`, when any of them restricts addresses).
    #[error(
        "renewal by certificate for {identity} is not allowed from {peer}: its tokens allow only {allowed}"
    )]
    RenewalSourceNotAllowed {
        /// The identity asked for.
        identity: String,
        /// The peer's address (`an unknown address` when the transport did not give one).
        peer: String,
        /// The networks allowed, comma-separated.
        allowed: String,
    },
    /// No certificate is issued for the issuer's own serving name, whoever asks.
    #[error("identity {0:?} is the issuer's own serving name and is never issued")]
    ServingName(String),
    /// The token store could not record a use of a token: nothing is issued.
    #[error("token store unavailable: {0}")]
    StoreUnavailable(String),
    /// `[auth] external_workloads`: no watched ExternalWorkload names the identity.
    #[error(
        "no ExternalWorkload in the watched namespaces has meshTLS.identity {spiffe_id:?} (or {identity:?})"
    )]
    NotRegistered {
        /// The identity asked for.
        identity: String,
        /// Its SPIFFE ID.
        spiffe_id: String,
    },
    /// `[auth] external_workloads`: ExternalWorkloads name the identity, none at the peer's
    /// address.
    #[error(
        "no ExternalWorkload for {identity:?} lists {peer} in workloadIPs (registered: {registered})"
    )]
    NotRegisteredFrom {
        /// The identity asked for.
        identity: String,
        /// The peer's address.
        peer: String,
        /// The ExternalWorkloads that name the identity, `ns/name [ips]`.
        registered: String,
    },
}

impl AuthError {
    /// The gRPC code: UNAUTHENTICATED when the credential itself is refused,
    /// PERMISSION_DENIED when it is valid but not for this identity or peer,
    /// RESOURCE_EXHAUSTED when reviews for this source are rate limited, UNAVAILABLE when the
    /// Kubernetes API server cannot decide.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::NoToken
            | Self::UnknownToken
            | Self::Revoked { .. }
            | Self::Expired { .. }
            | Self::ReviewRefused(_)
            | Self::KeyNotBound { .. }
            | Self::RenewalTooOld { .. } => Code::Unauthenticated,
            Self::WrongIdentity { .. }
            | Self::SourceNotAllowed { .. }
            | Self::RenewalSourceNotAllowed { .. }
            | Self::PeerUnknown { .. }
            | Self::ServiceAccountMismatch { .. }
            | Self::IdentityRevoked { .. }
            | Self::ServingName(_)
            | Self::NotRegistered { .. }
            | Self::NotRegisteredFrom { .. } => Code::PermissionDenied,
            Self::ReviewsThrottled => Code::ResourceExhausted,
            Self::ReviewUnavailable(_) | Self::StoreUnavailable(_) => Code::Unavailable,
        }
    }
}

/// Certificate generation failed: rcgen refused the parameters or the CA key. Never the
/// caller's fault (the identity and key were checked before).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("certificate generation failed: {0}")]
pub struct SignError(pub String);

impl From<rcgen::Error> for SignError {
    fn from(e: rcgen::Error) -> Self {
        Self(e.to_string())
    }
}

/// Why one Certify request was refused. Every variant has its gRPC code in
/// [`RequestError::code`]; the mapping is exhaustive, so a new variant must choose one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// Authentication or authorisation failed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// The CSR was refused.
    #[error(transparent)]
    Csr(#[from] CsrError),
    /// The requested identity is malformed or outside the trust domain.
    #[error("requested identity refused: {0}")]
    Identity(#[from] IdentityError),
    /// The request is bigger than `max_request_bytes`.
    #[error("request of {size} bytes exceeds max_request_bytes = {max}")]
    RequestTooLarge {
        /// Encoded size of the request.
        size: usize,
        /// The configured limit.
        max: usize,
    },
    /// The gRPC message is over the decoder's limit: refused undecoded.
    #[error("request exceeds the largest message accepted ({max} bytes)")]
    MessageTooLarge {
        /// The decoder's limit.
        max: usize,
    },
    /// The gRPC message is not a CertifyRequest.
    #[error("malformed request: {0}")]
    MalformedRequest(String),
    /// The caller's rate limit was hit.
    #[error("rate limit exceeded for this credential and peer; retry later")]
    RateLimited,
    /// The source address has failed too often (no or a wrong token, malformed requests):
    /// refused before anything else is done for it.
    #[error("too many failed requests from this address; retry later")]
    Throttled,
    /// Too many signings in flight.
    #[error("too many signing requests in flight; retry later")]
    Overloaded,
    /// The issuer CA cannot issue now (expired, not yet valid, or too little life left).
    #[error("issuer CA unavailable: {0}")]
    CaUnavailable(String),
    /// Signing failed (an internal error: the cause is logged, not sent).
    #[error(transparent)]
    Sign(#[from] SignError),
}

impl RequestError {
    /// The gRPC status for this refusal. The message names the problem; internal causes are
    /// not echoed (they are logged by the caller).
    pub fn to_status(&self) -> tonic::Status {
        use tonic::{Code, Status};
        match self.code() {
            Code::Internal => Status::new(Code::Internal, "internal error"),
            code => Status::new(code, self.to_string()),
        }
    }

    /// The gRPC code this refusal maps to.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::Auth(a) => a.code(),
            Self::Csr(_)
            | Self::Identity(_)
            | Self::RequestTooLarge { .. }
            | Self::MalformedRequest(_) => Code::InvalidArgument,
            Self::RateLimited
            | Self::Throttled
            | Self::Overloaded
            | Self::MessageTooLarge { .. } => Code::ResourceExhausted,
            Self::CaUnavailable(_) => Code::Unavailable,
            Self::Sign(_) => Code::Internal,
        }
    }

    /// The `result` label of `issuer_certify_total` for this refusal.
    pub fn result_label(&self) -> &'static str {
        match self {
            Self::Auth(a) => match a.code() {
                tonic::Code::PermissionDenied => "permission_denied",
                tonic::Code::ResourceExhausted => "resource_exhausted",
                tonic::Code::Unavailable => "unavailable",
                _ => "unauthenticated",
            },
            Self::Csr(_)
            | Self::Identity(_)
            | Self::RequestTooLarge { .. }
            | Self::MalformedRequest(_) => "invalid_argument",
            Self::RateLimited
            | Self::Throttled
            | Self::Overloaded
            | Self::MessageTooLarge { .. } => "resource_exhausted",
            Self::CaUnavailable(_) => "unavailable",
            Self::Sign(_) => "internal",
        }
    }
}

/// What can stop an operator command (`init`, `token ...`) or `serve` at start. Every
/// variant has its exit code in [`Error::exit_code`]; the mapping is exhaustive.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The identity given on the command line is malformed or outside the trust domain.
    #[error("requested identity refused: {0}")]
    Identity(#[from] IdentityError),
    /// A CA file could not be read (missing or unreadable).
    #[error("issuer CA material {path}: {source}")]
    CaUnreadable {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Loading or validating CA material failed.
    #[error("issuer CA material {path}: {reason}")]
    CaMaterial {
        /// The file (or directory) at fault.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The CA material parses but is refused (a link of the chain, the key, the anchors).
    #[error("issuer CA material {path}: {source}")]
    CaInvalid {
        /// The file (or other source) at fault.
        path: PathBuf,
        /// What was wrong, naming the link.
        #[source]
        source: Box<crate::ca::CaError>,
    },
    /// `issuer ca show` found a link that is invalid or expires soon.
    #[error("{0}")]
    CaCheck(String),
    /// The config file is unreadable, not TOML (the error names the file and the line).
    #[error(transparent)]
    ConfigFile(#[from] proxy_lib::config_file::ConfigFileError),
    /// The configuration is invalid: unknown keys, values of the wrong type or out of range
    /// (every problem listed, each naming its key).
    #[error("invalid configuration {path}: {}", problems.join("; "))]
    Config {
        /// The config file (or `<flags>`).
        path: PathBuf,
        /// One entry per bad field.
        problems: Vec<String>,
    },
    /// A file operation failed.
    #[error(transparent)]
    Fs(#[from] proxy_lib::fs::FsError),
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `init` found files it would overwrite.
    #[error("refusing to overwrite existing file(s): {}", .0.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    WouldOverwrite(Vec<PathBuf>),
    /// `token create --out FILE` found FILE already there.
    #[error("refusing to overwrite {} (add --force to replace it atomically)", .0.display())]
    TokenOutExists(PathBuf),
    /// The token store is unreadable or inconsistent.
    #[error("token store {path}: {reason}")]
    TokenStore {
        /// The store file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// A token id given to `revoke` does not exist.
    #[error("no token with id {0:?}")]
    NoSuchToken(String),
    /// A Kubernetes API call failed or the cluster configuration is unusable.
    #[error("Kubernetes: {0}")]
    Kubernetes(String),
    /// `issuer workload` refused (a colliding ServiceAccount or Service, nothing to remove).
    #[error("{0}")]
    Workload(String),
    /// The listener or server failed.
    #[error("server: {0}")]
    Server(String),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Sign(String),
}

impl From<SignError> for Error {
    fn from(e: SignError) -> Self {
        Self::Sign(e.0)
    }
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The exit code of the `issuer` binary for this error: 66 when a named input file (the
    /// config file, a CA file at start) cannot be read, 78 for an invalid configuration, 1
    /// for anything else.
    pub fn exit_code(&self) -> u8 {
        use proxy_lib::cli::exit;
        match self {
            Self::ConfigFile(e) => e.exit_code(),
            Self::CaUnreadable { .. } => exit::NO_INPUT,
            Self::Config { .. } => exit::CONFIG,
            Self::Identity(_)
            | Self::CaMaterial { .. }
            | Self::CaInvalid { .. }
            | Self::CaCheck(_)
            | Self::Fs(_)
            | Self::Io { .. }
            | Self::WouldOverwrite(_)
            | Self::TokenOutExists(_)
            | Self::TokenStore { .. }
            | Self::NoSuchToken(_)
            | Self::Server(_)
            | Self::Kubernetes(_)
            | Self::Workload(_)
            | Self::Sign(_) => exit::FAILURE,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn errors_map_to_spec_status_codes() {
        let cases: Vec<(RequestError, Code)> = vec![
            (AuthError::NoToken.into(), Code::Unauthenticated),
            (AuthError::UnknownToken.into(), Code::Unauthenticated),
            (
                AuthError::Revoked { id: "x".into() }.into(),
                Code::Unauthenticated,
            ),
            (
                AuthError::WrongIdentity {
                    id: "x".into(),
                    requested: "y".into(),
                }
                .into(),
                Code::PermissionDenied,
            ),
            (
                AuthError::PeerUnknown { id: "x".into() }.into(),
                Code::PermissionDenied,
            ),
            (
                AuthError::ReviewRefused("x".into()).into(),
                Code::Unauthenticated,
            ),
            (
                AuthError::ServiceAccountMismatch {
                    service_account: "system:serviceaccount:a:b".into(),
                    requested: "y".into(),
                }
                .into(),
                Code::PermissionDenied,
            ),
            (AuthError::ReviewsThrottled.into(), Code::ResourceExhausted),
            (
                AuthError::KeyNotBound { id: "x".into() }.into(),
                Code::Unauthenticated,
            ),
            (
                AuthError::NotRegistered {
                    identity: "x".into(),
                    spiffe_id: "spiffe://y".into(),
                }
                .into(),
                Code::PermissionDenied,
            ),
            (
                AuthError::IdentityRevoked {
                    identity: "y".into(),
                    at: "t".into(),
                }
                .into(),
                Code::PermissionDenied,
            ),
            (
                AuthError::ServingName("y".into()).into(),
                Code::PermissionDenied,
            ),
            (
                AuthError::StoreUnavailable("down".into()).into(),
                Code::Unavailable,
            ),
            (
                AuthError::NotRegisteredFrom {
                    identity: "x".into(),
                    peer: "192.0.2.1".into(),
                    registered: "ns/x [192.0.2.2]".into(),
                }
                .into(),
                Code::PermissionDenied,
            ),
            (
                AuthError::ReviewUnavailable("down".into()).into(),
                Code::Unavailable,
            ),
            (CsrError::BadSignature.into(), Code::InvalidArgument),
            (
                RequestError::RequestTooLarge { size: 2, max: 1 },
                Code::InvalidArgument,
            ),
            (RequestError::RateLimited, Code::ResourceExhausted),
            (RequestError::Overloaded, Code::ResourceExhausted),
            (RequestError::CaUnavailable("x".into()), Code::Unavailable),
            (SignError("boom".into()).into(), Code::Internal),
        ];
        for (e, code) in cases {
            assert_eq!(e.to_status().code(), code, "{e}");
        }
        assert_eq!(
            RequestError::from(SignError("secret cause".into()))
                .to_status()
                .message(),
            "internal error"
        );
    }
}
