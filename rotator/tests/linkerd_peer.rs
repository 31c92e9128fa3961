//! The rotator's Certify client against a server stack built like the real peers': a
//! linkerd2-proxy inbound in front of Linkerd's identity service (TLS 1.3 only, the aws-lc
//! backend's two cipher suites, no ALPN configured, client certificates requested but not
//! required, serving the identity service's own mesh certificate). The client must pick a
//! suite the server has, verify the server as `issuer_name`, speak gRPC over HTTP/2 without
//! ALPN, and send what Linkerd expects: the identity, the token, the CSR as DER.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use linkerd2_proxy_api::identity as api;
use proxy_lib::clock::{Clock, SystemClock};
use proxy_lib::identity::Identity;
use proxy_lib::test_util::TestPki;
use rotator::client::{CertifyRequest, GrpcIssuer, Issue};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use zeroize::Zeroizing;

const ID: &str = "db.ext.serviceaccount.identity.linkerd.cluster.local";
const SVC_NAME: &str = "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local";

/// One accepted TLS connection handed to tonic.
struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) {}
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Records each request and what the handshake settled on; answers with a fixed response.
#[derive(Clone)]
struct Identityd {
    seen: Arc<Mutex<Vec<api::CertifyRequest>>>,
    answer: api::CertifyResponse,
}

#[tonic::async_trait]
impl api::identity_server::Identity for Identityd {
    async fn certify(
        &self,
        req: tonic::Request<api::CertifyRequest>,
    ) -> Result<tonic::Response<api::CertifyResponse>, tonic::Status> {
        self.seen.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(self.answer.clone()))
    }
}

#[derive(Debug, Clone, Default)]
struct Handshake {
    suite: Option<rustls::CipherSuite>,
    version: Option<rustls::ProtocolVersion>,
    alpn: Option<Vec<u8>>,
    sni: Option<String>,
    client_cert: bool,
}

#[tokio::test]
async fn the_client_talks_to_a_linkerd_proxy_style_identity_endpoint() {
    proxy_lib::install_crypto_provider();
    let now = SystemClock.now();
    let pki = TestPki::new(now);
    let hour = Duration::from_secs(3600);
    let serving = pki.leaf(&Identity::parse(SVC_NAME).unwrap(), now - hour, now + hour);
    let issued = pki.leaf(&Identity::parse(ID).unwrap(), now - hour, now + hour);
    let valid_until = issued.leaf.not_after;

    // linkerd2-proxy's server side (meshtls creds/store.rs server_config with the aws-lc
    // backend): TLS 1.3, ChaCha20 + AES-256 only, optional client certs verified against
    // the roots, no ALPN protocols configured.
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
    ];
    let provider = Arc::new(provider);
    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(pki.anchors().root_store()),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .unwrap();
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(serving.chain.clone(), serving.key.to_rustls())
        .unwrap();
    assert!(server_cfg.alpn_protocols.is_empty());
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(Mutex::new(Vec::<Handshake>::new()));
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<TlsConn>>(4);
    let seen_hs = handshakes.clone();
    let accept = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let c = tls.get_ref().1;
            seen_hs.lock().unwrap().push(Handshake {
                suite: c.negotiated_cipher_suite().map(|s| s.suite()),
                version: c.protocol_version(),
                alpn: c.alpn_protocol().map(|a| a.to_vec()),
                sni: c.server_name().map(str::to_string),
                client_cert: c.peer_certificates().is_some(),
            });
            if tx.send(Ok(TlsConn(tls))).await.is_err() {
                return;
            }
        }
    });
    let seen = Arc::new(Mutex::new(Vec::new()));
    let svc = Identityd {
        seen: seen.clone(),
        answer: api::CertifyResponse {
            leaf_certificate: issued.chain[0].to_vec(),
            intermediate_certificates: vec![issued.chain[1].to_vec()],
            valid_until: Some(valid_until.into()),
        },
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(api::identity_server::IdentityServer::new(svc))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                async move {
                    let _ = stop_rx.await;
                },
            ),
    );

    let client = GrpcIssuer::tls(
        rotator::config::parse_host_port(&addr.to_string()).unwrap(),
        SVC_NAME.to_string(),
        pki.anchors(),
        Duration::from_secs(10),
    );
    let k = rotator::keygen::generate(&Identity::parse(ID).unwrap(), true).unwrap();
    let resp = client
        .certify(CertifyRequest {
            identity: ID.to_string(),
            token: Zeroizing::new(b"the-token".to_vec()),
            csr_der: k.csr_der.clone(),
        })
        .await
        .expect("certified through a linkerd2-proxy-style TLS server");

    assert_eq!(resp.leaf, issued.chain[0].to_vec());
    assert_eq!(resp.intermediates, vec![issued.chain[1].to_vec()]);
    let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    assert_eq!(resp.valid_until.map(secs), Some(secs(valid_until)));

    let reqs = seen.lock().unwrap().clone();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].identity, ID);
    assert_eq!(reqs[0].token, b"the-token");
    assert_eq!(
        reqs[0].certificate_signing_request, k.csr_der,
        "the CSR as DER"
    );
    let hs = handshakes.lock().unwrap().clone();
    assert_eq!(hs.len(), 1);
    let h = &hs[0];
    assert_eq!(h.version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert!(
        matches!(
            h.suite,
            Some(
                rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
                    | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
            )
        ),
        "{h:?}"
    );
    assert_eq!(h.alpn, None);
    assert_eq!(h.sni.as_deref(), Some(SVC_NAME), "SNI = issuer_name");
    assert!(!h.client_cert);

    // A server presenting a certificate for another name is refused (issuer_name is checked).
    let wrong = GrpcIssuer::tls(
        rotator::config::parse_host_port(&addr.to_string()).unwrap(),
        "linkerd-destination.linkerd.serviceaccount.identity.linkerd.cluster.local".into(),
        pki.anchors(),
        Duration::from_secs(10),
    );
    let e = wrong
        .certify(CertifyRequest {
            identity: ID.to_string(),
            token: Zeroizing::new(b"the-token".to_vec()),
            csr_der: k.csr_der.clone(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e, rotator::client::IssueError::WrongIssuerName { .. }),
        "{e}"
    );
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "nothing sent to the wrong server"
    );

    let _ = stop_tx.send(());
    accept.abort();
    let _ = accept.await;
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server stops")
        .unwrap()
        .unwrap();
}
