//! The crate's error type, and the one place where an error becomes a gRPC `Status`.
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
}

impl AuthError {
    fn is_permission(&self) -> bool {
        matches!(
            self,
            Self::WrongIdentity { .. } | Self::SourceNotAllowed { .. } | Self::PeerUnknown { .. }
        )
    }
}

/// Everything that can go wrong in the issuer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
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
    /// The caller's rate limit was hit.
    #[error("rate limit exceeded for this credential and peer; retry later")]
    RateLimited,
    /// Too many signings in flight.
    #[error("too many signing requests in flight; retry later")]
    Overloaded,
    /// The issuer CA cannot issue now (expired, not yet valid, or too little life left).
    #[error("issuer CA unavailable: {0}")]
    CaUnavailable(String),
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
    /// The config file is unreadable, not TOML, or has an unknown key or a value of the
    /// wrong type (the error names the file, the line and the key).
    #[error(transparent)]
    ConfigFile(#[from] proxy_lib::config_file::ConfigFileError),
    /// The configuration is invalid (every problem listed).
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
    /// The listener or server failed.
    #[error("server: {0}")]
    Server(String),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Sign(String),
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
            Error::ConfigFile(e) => e.exit_code(),
            Error::CaUnreadable { .. } => exit::NO_INPUT,
            Error::Config { .. } => exit::CONFIG,
            _ => exit::FAILURE,
        }
    }

    /// The gRPC status for this error. The message names the problem; internal causes are
    /// not echoed (they are logged by the caller).
    pub fn to_status(&self) -> tonic::Status {
        use tonic::{Code, Status};
        let code = self.code();
        match code {
            Code::Internal => Status::new(code, "internal error"),
            _ => Status::new(code, self.to_string()),
        }
    }

    /// The gRPC code this error maps to.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Error::Auth(a) if a.is_permission() => Code::PermissionDenied,
            Error::Auth(_) => Code::Unauthenticated,
            Error::Csr(_) | Error::Identity(_) | Error::RequestTooLarge { .. } => {
                Code::InvalidArgument
            }
            Error::RateLimited | Error::Overloaded => Code::ResourceExhausted,
            Error::CaUnavailable(_) => Code::Unavailable,
            _ => Code::Internal,
        }
    }

    /// The `result` label of `issuer_certify_total` for this refusal.
    pub fn result_label(&self) -> &'static str {
        use tonic::Code;
        match self.code() {
            Code::PermissionDenied => "permission_denied",
            Code::Unauthenticated => "unauthenticated",
            Code::InvalidArgument => "invalid_argument",
            Code::ResourceExhausted => "resource_exhausted",
            Code::Unavailable => "unavailable",
            _ => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn errors_map_to_spec_status_codes() {
        let cases: Vec<(Error, Code)> = vec![
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
            (CsrError::BadSignature.into(), Code::InvalidArgument),
            (
                Error::RequestTooLarge { size: 2, max: 1 },
                Code::InvalidArgument,
            ),
            (Error::RateLimited, Code::ResourceExhausted),
            (Error::Overloaded, Code::ResourceExhausted),
            (Error::CaUnavailable("x".into()), Code::Unavailable),
            (Error::Sign("boom".into()), Code::Internal),
        ];
        for (e, code) in cases {
            assert_eq!(e.to_status().code(), code, "{e}");
        }
        assert_eq!(
            Error::Sign("secret cause".into()).to_status().message(),
            "internal error"
        );
    }
}
