//! Talking to the issuer: the [`Issue`] trait the renewal cycle uses, and its gRPC
//! implementation (Linkerd's `Identity/Certify` over TLS verified against `ca.crt`).

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use linkerd2_proxy_api::identity as api;
use proxy_lib::bundle::CertBundle;
use proxy_lib::verify::TrustAnchors;
use zeroize::Zeroizing;

use crate::config::{AnchorSource, HostPort};

/// One Certify request.
pub struct CertifyRequest {
    /// The identity asked for.
    pub identity: String,
    /// The token (zeroized on drop, never logged).
    pub token: Zeroizing<Vec<u8>>,
    /// The CSR, DER.
    pub csr_der: Vec<u8>,
}

impl std::fmt::Debug for CertifyRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifyRequest")
            .field("identity", &self.identity)
            .field("token", &"[redacted]")
            .field("csr_len", &self.csr_der.len())
            .finish()
    }
}

/// The issuer's answer, not yet validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertifyResponse {
    /// Leaf certificate (DER, though PEM is tolerated).
    pub leaf: Vec<u8>,
    /// Intermediates (DER).
    pub intermediates: Vec<Vec<u8>>,
    /// The issuer's `valid_until`.
    pub valid_until: Option<SystemTime>,
}

/// Why a Certify call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The token file could not be read or is empty.
    #[error("token file {path}: {reason}")]
    Token {
        /// The file.
        path: String,
        /// What was wrong.
        reason: String,
    },
    /// The anchors could not be loaded.
    #[error("trust anchors: {0}")]
    Anchors(String),
    /// No connection to the issuer.
    #[error("cannot reach the issuer at {addr}: {reason}")]
    Connect {
        /// The issuer address.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The issuer's certificate does not carry `issuer_name`: usually a wrong trust domain
    /// (in `identity` or `issuer_name`), or an `issuer_addr` pointing at another service.
    #[error(
        "the issuer at {addr} presents a certificate that does not carry issuer_name {expected}{}: likely a wrong trust domain or issuer_name",
        presented_names(.presented)
    )]
    WrongIssuerName {
        /// The issuer address.
        addr: String,
        /// The configured `issuer_name`.
        expected: String,
        /// The DNS names the certificate carries (when the TLS library says).
        presented: Vec<String>,
    },
    /// The issuer's certificate does not validate against the trust anchors (another CA,
    /// expired, wrong usage).
    #[error(
        "the issuer at {addr} presents a certificate the trust anchors do not accept: {reason}"
    )]
    UntrustedIssuer {
        /// The issuer address.
        addr: String,
        /// What the TLS library said.
        reason: String,
    },
    /// The issuer answered with an error status.
    #[error("the issuer refused: {code:?}: {message}")]
    Status {
        /// The gRPC code.
        code: tonic::Code,
        /// Its message.
        message: String,
    },
    /// The call took too long.
    #[error("the issuer did not answer within {}", proxy_lib::human::duration(*.0))]
    Timeout(Duration),
}

/// A TCP connection to `addr` (each address it resolves to, in turn), from `source` when
/// given.
async fn connect(
    addr: &HostPort,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<tokio::net::TcpStream> {
    let tcp = match source {
        None => tokio::net::TcpStream::connect((addr.host.as_str(), addr.port)).await?,
        Some(ip) => {
            let mut last = None;
            let mut found = None;
            for to in tokio::net::lookup_host((addr.host.as_str(), addr.port)).await? {
                if to.is_ipv4() != ip.is_ipv4() {
                    continue;
                }
                let socket = if ip.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                socket.bind(std::net::SocketAddr::new(ip, 0))?;
                match socket.connect(to).await {
                    Ok(s) => {
                        found = Some(s);
                        break;
                    }
                    Err(e) => last = Some(e),
                }
            }
            found.ok_or_else(|| {
                last.unwrap_or_else(|| {
                    std::io::Error::other(format!(
                        "{} has no address of the family of source_addr {ip}",
                        addr.host
                    ))
                })
            })?
        }
    };
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Something that can certify a CSR.
pub trait Issue: Send + Sync {
    /// Sends one Certify request.
    fn certify(
        &self,
        req: CertifyRequest,
    ) -> impl Future<Output = Result<CertifyResponse, IssueError>> + Send;

    /// Sends one Certify request presenting `client_cert` (the installed cert set, valid now)
    /// as the TLS client certificate, so the issuer can renew by certificate; with `None`,
    /// or without TLS, the same as [`Issue::certify`].
    fn certify_presenting(
        &self,
        req: CertifyRequest,
        client_cert: Option<CertBundle>,
    ) -> impl Future<Output = Result<CertifyResponse, IssueError>> + Send {
        let _ = client_cert;
        self.certify(req)
    }

    /// Fetches the issuer's trust bundle (`meshcerts.trust.v1.TrustBundle/Get`); `None` when
    /// the issuer serves none (an issuer without the service answers UNIMPLEMENTED).
    fn trust_bundle(
        &self,
    ) -> impl Future<Output = Result<Option<proxy_lib::trust_bundle::api::Bundle>, IssueError>> + Send
    {
        async { Ok(None) }
    }
}

/// Reads the token file fresh, trimming leading and trailing whitespace. Blocks.
pub fn read_token(path: &Path) -> Result<Zeroizing<Vec<u8>>, IssueError> {
    let err = |reason: String| IssueError::Token {
        path: path.display().to_string(),
        reason,
    };
    let raw = Zeroizing::new(std::fs::read(path).map_err(|e| err(e.to_string()))?);
    let start = raw.iter().position(|b| !b.is_ascii_whitespace());
    let Some(start) = start else {
        return Err(err("the file is empty".into()));
    };
    let end = raw
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .expect("non-empty");
    Ok(Zeroizing::new(raw[start..=end].to_vec()))
}

/// The gRPC client for a real issuer.
#[derive(Debug, Clone)]
pub struct GrpcIssuer {
    addr: HostPort,
    server_name: String,
    anchors: Option<Anchors>,
    timeout: Duration,
    source: Option<std::net::IpAddr>,
}

/// The anchors the issuer's serving cert is verified against.
#[derive(Debug, Clone)]
enum Anchors {
    /// Loaded once.
    Fixed(TrustAnchors),
    /// Re-read on every call, so an anchor rotation in `ca.crt` needs no restart.
    Source(AnchorSource),
    /// What the host trusts, on every call: the signed bundle installed in the cert dir, else
    /// the bootstrap anchors ([`crate::trust::current`]).
    Trusted {
        /// The cert dir.
        dir: std::path::PathBuf,
        /// The bootstrap anchors.
        bootstrap: AnchorSource,
    },
}

impl GrpcIssuer {
    /// A TLS client: the issuer's cert must chain to `anchors` and carry `server_name`.
    pub fn tls(
        addr: HostPort,
        server_name: String,
        anchors: TrustAnchors,
        timeout: Duration,
    ) -> Self {
        Self {
            addr,
            server_name,
            anchors: Some(Anchors::Fixed(anchors)),
            timeout,
            source: None,
        }
    }

    /// A TLS client that re-reads its anchors from `source` on every call.
    pub fn tls_reloading(
        addr: HostPort,
        server_name: String,
        source: AnchorSource,
        timeout: Duration,
    ) -> Self {
        Self {
            addr,
            server_name,
            anchors: Some(Anchors::Source(source)),
            timeout,
            source: None,
        }
    }

    /// A TLS client that trusts, on every call, what the host trusts: the signed bundle
    /// installed in `dir` once there is one, `bootstrap` before.
    pub fn tls_trusting(
        addr: HostPort,
        server_name: String,
        dir: std::path::PathBuf,
        bootstrap: AnchorSource,
        timeout: Duration,
    ) -> Self {
        Self {
            addr,
            server_name,
            anchors: Some(Anchors::Trusted { dir, bootstrap }),
            timeout,
            source: None,
        }
    }

    /// A plaintext client (the config allows it only for a loopback issuer).
    pub fn plaintext(addr: HostPort, timeout: Duration) -> Self {
        Self {
            addr,
            server_name: String::new(),
            anchors: None,
            timeout,
            source: None,
        }
    }

    /// Connects from `source` (a host with several addresses must use the one the issuer
    /// knows it by), or from the address the OS picks when `None`.
    pub fn with_source(mut self, source: Option<std::net::IpAddr>) -> Self {
        self.source = source;
        self
    }

    /// A channel to the issuer (TLS verified against the anchors, or loopback plaintext),
    /// presenting `client_cert` as the TLS client certificate when given.
    async fn channel(
        &self,
        client_cert: Option<&CertBundle>,
    ) -> Result<tonic::transport::Channel, IssueError> {
        let connect_err = |reason: String| IssueError::Connect {
            addr: self.addr.to_string(),
            reason,
        };
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|e| connect_err(e.to_string()))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout);
        let addr = self.addr.clone();
        let source = self.source;
        match &self.anchors {
            None => {
                let connector = tower::service_fn(move |_: http::Uri| {
                    let addr = addr.clone();
                    async move {
                        let tcp = connect(&addr, source).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tcp))
                    }
                });
                endpoint.connect_with_connector(connector).await
            }
            Some(anchors) => {
                let anchors = match anchors {
                    Anchors::Fixed(a) => a.clone(),
                    Anchors::Source(src) => {
                        src.load().map_err(|e| IssueError::Anchors(e.to_string()))?
                    }
                    Anchors::Trusted { dir, bootstrap } => {
                        let (dir, bootstrap) = (dir.clone(), bootstrap.clone());
                        crate::renew::blocking(move || crate::trust::current(&dir, &bootstrap))
                            .await
                            .map_err(IssueError::Anchors)?
                            .anchors
                    }
                };
                let clock: proxy_lib::clock::SharedClock = Arc::new(proxy_lib::clock::SystemClock);
                let tls = match client_cert {
                    Some(bundle) => proxy_lib::tls::Connector::mesh(bundle, &anchors, &clock),
                    None => proxy_lib::tls::Connector::without_client_cert(&anchors, &clock),
                }
                .map_err(|e| connect_err(e.to_string()))?;
                let name = rustls_pki_types::ServerName::try_from(self.server_name.clone())
                    .map_err(|e| connect_err(format!("server name {:?}: {e}", self.server_name)))?;
                let connector = tower::service_fn(move |_: http::Uri| {
                    let addr = addr.clone();
                    let tls = tls.clone();
                    let name = name.clone();
                    async move {
                        let tcp = connect(&addr, source).await?;
                        let stream = tls.connect(name, tcp).await.map_err(std::io::Error::from)?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
                    }
                });
                endpoint.connect_with_connector(connector).await
            }
        }
        .map_err(|e| match tls_refusal(&e) {
            Some(rustls::Error::InvalidCertificate(c)) => self.certificate_error(c),
            _ => connect_err(error_chain(&e)),
        })
    }

    async fn call(
        &self,
        req: CertifyRequest,
        client_cert: Option<&CertBundle>,
    ) -> Result<CertifyResponse, IssueError> {
        let connect_err = |reason: String| IssueError::Connect {
            addr: self.addr.to_string(),
            reason,
        };
        let channel = self.channel(client_cert).await?;
        let mut client = api::identity_client::IdentityClient::new(channel);
        let request = api::CertifyRequest {
            identity: req.identity.clone(),
            token: req.token.to_vec(),
            certificate_signing_request: req.csr_der.clone(),
        };
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.timeout);
        let result = client.certify(request).await;
        let resp = match result {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && s.message().contains("transport") => {
                return Err(connect_err(s.message().to_string()));
            }
            Err(s)
                if s.code() == tonic::Code::Cancelled
                    || s.code() == tonic::Code::DeadlineExceeded =>
            {
                return Err(IssueError::Timeout(self.timeout));
            }
            Err(s) => {
                return Err(IssueError::Status {
                    code: s.code(),
                    message: s.message().to_string(),
                });
            }
        };
        let valid_until = resp.valid_until.and_then(|t| {
            (t.seconds >= 0).then(|| UNIX_EPOCH + Duration::from_secs(t.seconds as u64))
        });
        Ok(CertifyResponse {
            leaf: resp.leaf_certificate,
            intermediates: resp.intermediate_certificates,
            valid_until,
        })
    }
}

impl GrpcIssuer {
    /// Names what is wrong with the issuer's certificate, rather than "cannot reach".
    fn certificate_error(&self, error: &rustls::CertificateError) -> IssueError {
        use rustls::CertificateError as C;
        match error {
            C::NotValidForName => IssueError::WrongIssuerName {
                addr: self.addr.to_string(),
                expected: self.server_name.clone(),
                presented: Vec::new(),
            },
            C::NotValidForNameContext { presented, .. } => IssueError::WrongIssuerName {
                addr: self.addr.to_string(),
                expected: self.server_name.clone(),
                // webpki lists every SAN, DNS names as `DnsName("name")`.
                presented: presented
                    .iter()
                    .filter_map(|p| p.strip_prefix("DnsName(\"")?.strip_suffix("\")"))
                    .map(str::to_string)
                    .collect(),
            },
            other => IssueError::UntrustedIssuer {
                addr: self.addr.to_string(),
                reason: rustls::Error::InvalidCertificate(other.clone()).to_string(),
            },
        }
    }
}

fn presented_names(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" (it names {})", names.join(", "))
    }
}

/// The rustls error behind a failed connection, if TLS refused it. Each `io::Error` in the
/// chain is looked into, since its `source()` skips the error it wraps.
fn tls_refusal<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(t) = c.downcast_ref::<rustls::Error>() {
            return Some(t);
        }
        if let Some(t) = c
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(t);
        }
        cur = c.source();
    }
    None
}

impl Issue for GrpcIssuer {
    async fn certify(&self, req: CertifyRequest) -> Result<CertifyResponse, IssueError> {
        self.certify_presenting(req, None).await
    }

    async fn certify_presenting(
        &self,
        req: CertifyRequest,
        client_cert: Option<CertBundle>,
    ) -> Result<CertifyResponse, IssueError> {
        match tokio::time::timeout(self.timeout, self.call(req, client_cert.as_ref())).await {
            Ok(r) => r,
            Err(_) => Err(IssueError::Timeout(self.timeout)),
        }
    }

    async fn trust_bundle(
        &self,
    ) -> Result<Option<proxy_lib::trust_bundle::api::Bundle>, IssueError> {
        let call = async {
            let channel = self.channel(None).await?;
            match proxy_lib::trust_bundle::api::get(channel, self.timeout).await {
                Ok(b) => Ok(Some(b)),
                Err(s) if s.code() == tonic::Code::Unimplemented => Ok(None),
                Err(s) => Err(IssueError::Status {
                    code: s.code(),
                    message: s.message().to_string(),
                }),
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(IssueError::Timeout(self.timeout)),
        }
    }
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_lib::clock::Clock;

    #[test]
    fn token_is_trimmed_and_empty_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("token");
        std::fs::write(&p, "\n  s3cr3t-token \n\n").unwrap();
        assert_eq!(&read_token(&p).unwrap()[..], b"s3cr3t-token");
        std::fs::write(&p, " \n").unwrap();
        let e = read_token(&p).unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let e = read_token(&d.path().join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_issuer_times_out() {
        proxy_lib::install_crypto_provider();
        // Accepts TCP and then says nothing, for both the TLS and the plaintext client.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = crate::config::parse_host_port(&l.local_addr().unwrap().to_string()).unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                held.push(s);
            }
        });
        let pki = proxy_lib::test_util::TestPki::new(proxy_lib::clock::SystemClock.now());
        let t = Duration::from_millis(300);
        let req = || CertifyRequest {
            identity: "x".into(),
            token: Zeroizing::new(b"t".to_vec()),
            csr_der: vec![],
        };
        let tls = GrpcIssuer::tls(addr.clone(), "issuer.test".into(), pki.anchors(), t);
        let e = tls.certify(req()).await.unwrap_err();
        assert!(
            matches!(e, IssueError::Timeout(_) | IssueError::Connect { .. }),
            "{e}"
        );
        let plain = GrpcIssuer::plaintext(addr, t);
        let e = plain.certify(req()).await.unwrap_err();
        assert!(
            matches!(e, IssueError::Timeout(_) | IssueError::Connect { .. }),
            "{e}"
        );
        hold.abort();
    }

    #[tokio::test(flavor = "current_thread")]
    async fn an_issuer_cert_for_another_name_or_ca_is_named_not_unreachable() {
        use crate::testing::{FakeConsumer, Serve, identity};
        proxy_lib::install_crypto_provider();
        let now = proxy_lib::clock::SystemClock.now();
        let pki = proxy_lib::test_util::TestPki::new(now);
        // A TLS server whose cert names a workload, not the identity service.
        let leaf = pki.leaf(
            &identity(),
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        );
        let server = FakeConsumer::start(Serve::Fixed(Box::new(leaf)), &pki.anchors()).await;
        let addr = crate::config::parse_host_port(&server.addr.to_string()).unwrap();
        let req = || CertifyRequest {
            identity: "x".into(),
            token: Zeroizing::new(b"t".to_vec()),
            csr_der: vec![],
        };
        let wanted = "linkerd-identity.linkerd.serviceaccount.identity.linkerd.other.example";
        let client = GrpcIssuer::tls(
            addr.clone(),
            wanted.into(),
            pki.anchors(),
            Duration::from_secs(10),
        );
        let e = client.certify(req()).await.unwrap_err();
        let IssueError::WrongIssuerName {
            expected,
            presented,
            ..
        } = &e
        else {
            panic!("{e}")
        };
        assert_eq!(expected, wanted);
        assert_eq!(presented, &vec![identity().to_string()]);
        let text = e.to_string();
        assert!(
            text.contains(&format!(
                "does not carry issuer_name {wanted} (it names {})",
                identity()
            )) && text.contains("likely a wrong trust domain or issuer_name")
                && !text.contains("cannot reach"),
            "{text}"
        );
        // Anchors of another CA: untrusted, also not "cannot reach".
        let other = proxy_lib::test_util::TestPki::new(now);
        let client = GrpcIssuer::tls(
            addr,
            wanted.into(),
            other.anchors(),
            Duration::from_secs(10),
        );
        let e = client.certify(req()).await.unwrap_err();
        assert!(matches!(e, IssueError::UntrustedIssuer { .. }), "{e}");
        assert!(e.to_string().contains("invalid peer certificate"), "{e}");
    }

    #[test]
    fn request_debug_redacts_the_token() {
        let r = CertifyRequest {
            identity: "x".into(),
            token: Zeroizing::new(b"s3cr3t".to_vec()),
            csr_der: vec![1, 2],
        };
        assert!(!format!("{r:?}").contains("s3cr3t"));
    }
}
