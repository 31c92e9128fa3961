//! The verify step: a TLS handshake with the listener that should now serve the new cert,
//! presenting that cert as the client cert, comparing the served leaf's SHA-256. The listener
//! may be any consumer of the cert dir (nginx, postgres, ...), so the floor's consumer-verify
//! profile allows TLS 1.2 besides 1.3.

use std::sync::Arc;
use std::time::Duration;

use proxy_lib::bundle::CertBundle;
use proxy_lib::cert::sha256_hex;

use crate::config::HostPort;

/// Why the verify handshake failed or served the wrong cert.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// No TLS session could be set up.
    #[error("handshake with {addr} failed: {reason}")]
    Handshake {
        /// The listener.
        addr: String,
        /// What failed.
        reason: String,
    },
    /// The listener serves another certificate.
    #[error("{addr} serves certificate sha256 {served}, not the new {expected}")]
    Mismatch {
        /// The listener.
        addr: String,
        /// What it served.
        served: String,
        /// What it should serve.
        expected: String,
    },
}

/// Connects to `addr`, verifies the server's chain against the bundle's anchors for
/// `server_name` (an exact DNS SAN of the served leaf), presents the bundle as client cert, and checks that the served leaf is the
/// bundle's leaf. Returns the served leaf's SHA-256.
pub async fn served_leaf_matches(
    addr: &HostPort,
    server_name: &str,
    bundle: &CertBundle,
    timeout: Duration,
) -> Result<String, VerifyError> {
    let hs = |reason: String| VerifyError::Handshake {
        addr: addr.to_string(),
        reason,
    };
    let clock: proxy_lib::clock::SharedClock = Arc::new(proxy_lib::clock::SystemClock);
    let connector = proxy_lib::tls::Connector::consumer(bundle, &clock)
        .map_err(|e| hs(format!("the new cert cannot be used as client cert: {e}")))?;
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|e| hs(format!("server name {server_name:?}: {e}")))?;
    let fut = async {
        let tcp = tokio::net::TcpStream::connect((addr.host.as_str(), addr.port))
            .await
            .map_err(|e| hs(e.to_string()))?;
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| hs(e.to_string()))?;
        let (_, conn) = tls.get_ref();
        let served = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| sha256_hex(c))
            .ok_or_else(|| hs("the server presented no certificate".into()))?;
        Ok::<_, VerifyError>(served)
    };
    let served = tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| {
            Err(hs(format!(
                "no handshake within {}",
                proxy_lib::human::duration(timeout)
            )))
        })?;
    if served != bundle.leaf.sha256 {
        return Err(VerifyError::Mismatch {
            addr: addr.to_string(),
            served,
            expected: bundle.leaf.sha256.clone(),
        });
    }
    Ok(served)
}
