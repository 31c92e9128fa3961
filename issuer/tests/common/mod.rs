//! Helpers shared by the issuer's integration tests: a Certify client over TLS (verified
//! against ca.crt, no ALPN, like linkerd2-proxy) or plaintext, CSR makers, openssl interop,
//! and a tiny admin HTTP getter.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use linkerd2_proxy_api::identity::identity_client::IdentityClient;
use linkerd2_proxy_api::identity::{CertifyRequest, CertifyResponse};
use proxy_lib::verify::TrustAnchors;
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

pub const ID: &str =
    "legacy-database.external-services.serviceaccount.identity.linkerd.cluster.local";

pub type Client = IdentityClient<Channel>;

/// rustls time from an injected clock, so certificates minted on a fake clock verify.
#[derive(Debug)]
struct ClockTime(proxy_lib::clock::SharedClock);

impl rustls::time_provider::TimeProvider for ClockTime {
    fn current_time(&self) -> Option<rustls_pki_types::UnixTime> {
        Some(rustls_pki_types::UnixTime::since_unix_epoch(
            self.0.now().duration_since(std::time::UNIX_EPOCH).ok()?,
        ))
    }
}

fn tls_client_config(anchors_pem: &[u8]) -> rustls::ClientConfig {
    tls_client_config_at(anchors_pem, Arc::new(proxy_lib::clock::SystemClock))
}

fn tls_client_config_at(
    anchors_pem: &[u8],
    clock: proxy_lib::clock::SharedClock,
) -> rustls::ClientConfig {
    let anchors = TrustAnchors::from_bytes(anchors_pem, "ca.crt").expect("anchors");
    // No ALPN protocols: a real linkerd2-proxy sends none.
    rustls::ClientConfig::builder_with_details(
        proxy_lib::crypto_provider(),
        Arc::new(ClockTime(clock)),
    )
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(anchors.root_store())
    .with_no_client_auth()
}

/// A Certify client over TLS, verifying the issuer as `server_name` against `anchors_pem`.
pub async fn tls_client(addr: SocketAddr, anchors_pem: &[u8], server_name: &str) -> Client {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_client_config(anchors_pem)));
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            let name = name.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .expect("connect to issuer");
    IdentityClient::new(channel)
}

/// A Certify client over TLS that presents `chain` (leaf first) with `key` as its client
/// certificate.
pub async fn tls_client_with_cert(
    addr: SocketAddr,
    anchors_pem: &[u8],
    server_name: &str,
    chain: Vec<Vec<u8>>,
    key_pkcs8: Vec<u8>,
) -> Client {
    tls_client_with_cert_from(None, addr, anchors_pem, server_name, chain, key_pkcs8).await
}

/// [`tls_client_with_cert`] connecting from `source` (a loopback address such as 127.0.0.2,
/// to play another host), or from whatever the system picks.
pub async fn tls_client_with_cert_from(
    source: Option<std::net::IpAddr>,
    addr: SocketAddr,
    anchors_pem: &[u8],
    server_name: &str,
    chain: Vec<Vec<u8>>,
    key_pkcs8: Vec<u8>,
) -> Client {
    let anchors = TrustAnchors::from_bytes(anchors_pem, "ca.crt").expect("anchors");
    let cfg = rustls::ClientConfig::builder_with_provider(proxy_lib::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(anchors.root_store())
        .with_client_auth_cert(
            chain.into_iter().map(Into::into).collect(),
            rustls_pki_types::PrivateKeyDer::Pkcs8(key_pkcs8.into()),
        )
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = ServerName::try_from(server_name.to_string()).expect("server name");
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            let name = name.clone();
            async move {
                let tcp = match source {
                    Some(ip) => {
                        let socket = if ip.is_ipv4() {
                            tokio::net::TcpSocket::new_v4()?
                        } else {
                            tokio::net::TcpSocket::new_v6()?
                        };
                        socket.bind(SocketAddr::new(ip, 0))?;
                        socket.connect(addr).await?
                    }
                    None => TcpStream::connect(addr).await?,
                };
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .expect("connect to issuer");
    IdentityClient::new(channel)
}

/// A plaintext Certify client.
pub async fn plain_client(addr: SocketAddr) -> Client {
    IdentityClient::connect(format!("http://{addr}"))
        .await
        .expect("connect")
}

/// The serving certificate chain the issuer presents (TLS handshake only), verified at the
/// time `clock` reads.
pub async fn serving_chain(
    addr: SocketAddr,
    anchors_pem: &[u8],
    server_name: &str,
    clock: proxy_lib::clock::SharedClock,
) -> Vec<Vec<u8>> {
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(tls_client_config_at(anchors_pem, clock)));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from(server_name.to_string()).unwrap(), tcp)
        .await
        .expect("tls handshake with the issuer");
    let (_, conn) = tls.get_ref();
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(conn.alpn_protocol(), None);
    conn.peer_certificates()
        .unwrap()
        .iter()
        .map(|c| c.to_vec())
        .collect()
}

/// A P-256 key and a Linkerd-style DER CSR for `identity` (CN = identity, one DNS SAN).
pub fn p256_csr(identity: &str) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let der = csr_with(&key, identity, |_| {});
    (key, der)
}

/// A DER CSR signed by `key` for `identity`, with `tweak` applied to the params.
pub fn csr_with(
    key: &KeyPair,
    identity: &str,
    tweak: impl FnOnce(&mut CertificateParams),
) -> Vec<u8> {
    let mut p = CertificateParams::new(vec![identity.to_string()]).unwrap();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, identity);
    tweak(&mut p);
    p.serialize_request(key).unwrap().der().to_vec()
}

pub fn request(identity: &str, token: &[u8], csr: Vec<u8>) -> CertifyRequest {
    CertifyRequest {
        identity: identity.to_string(),
        token: token.to_vec(),
        certificate_signing_request: csr,
    }
}

pub async fn certify(
    client: &mut Client,
    req: CertifyRequest,
) -> Result<CertifyResponse, tonic::Status> {
    client.certify(req).await.map(|r| r.into_inner())
}

/// Whether interop tests must run (REQUIRE_INTEROP=1): then a missing openssl is a failure.
pub fn openssl_available() -> bool {
    let ok = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("REQUIRE_INTEROP").is_ok_and(|v| v == "1") {
        panic!("REQUIRE_INTEROP=1 but openssl is not available");
    }
    if !ok {
        eprintln!("openssl not found: skipping the interop part of this test");
    }
    ok
}

/// Runs openssl with `args` in `dir`; returns (success, stdout+stderr).
pub fn openssl(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `openssl verify -CAfile ca -untrusted issuer leaf` with the leaf given as DER.
pub fn openssl_verify_leaf(
    dir: &Path,
    ca: &Path,
    issuer_der: &[u8],
    leaf_der: &[u8],
) -> (bool, String) {
    let leaf = dir.join(format!("leaf-{:x}.pem", rand::random::<u64>()));
    let inter = dir.join(format!("inter-{:x}.pem", rand::random::<u64>()));
    std::fs::write(&leaf, proxy_lib::pem::der_to_pem("CERTIFICATE", leaf_der)).unwrap();
    std::fs::write(
        &inter,
        proxy_lib::pem::der_to_pem("CERTIFICATE", issuer_der),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "verify",
            "-CAfile",
            ca.to_str().unwrap(),
            "-untrusted",
            inter.to_str().unwrap(),
            leaf.to_str().unwrap(),
        ],
    )
}

/// An RSA CSR for `identity` made by openssl (DER).
pub fn openssl_rsa_csr(dir: &Path, identity: &str) -> Vec<u8> {
    let (ok, out) = openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "rsa.key",
            "-subj",
            &format!("/CN={}", &identity[..60]),
            "-addext",
            &format!("subjectAltName=DNS:{identity}"),
            "-outform",
            "DER",
            "-out",
            "rsa.csr",
        ],
    );
    assert!(ok, "openssl req failed: {out}");
    std::fs::read(dir.join("rsa.csr")).unwrap()
}

// Each test file uses some of these.
#[allow(unused_imports)]
pub use proxy_lib::test_util::{free_port, http_get, metric};

/// Writes a new issuer pair signed by the anchor in `dir` (ca.crt + anchor.key from init):
/// returns (cert PEM, key PEM).
pub fn issuer_pair(
    anchor_cert_pem: &str,
    anchor_key_pem: &str,
    cn: &str,
    not_before: std::time::SystemTime,
    not_after: std::time::SystemTime,
    is_ca: bool,
) -> (String, String) {
    let anchor_key = KeyPair::from_pem(anchor_key_pem).unwrap();
    let anchor = rcgen::Issuer::from_ca_cert_pem(anchor_cert_pem, anchor_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = if is_ca {
        rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0))
    } else {
        rcgen::IsCa::ExplicitNoCa
    };
    p.key_usages = if is_ca {
        vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ]
    } else {
        vec![rcgen::KeyUsagePurpose::DigitalSignature]
    };
    p.use_authority_key_identifier_extension = true;
    p.not_before = not_before.into();
    p.not_after = not_after.into();
    let cert = p.signed_by(&key, &anchor).unwrap();
    (cert.pem(), key.serialize_pem())
}
