//! Verified connections: [`Acceptor`] and [`Connector`] run the handshake and, for a resumed
//! session, verify the peer chain of the original handshake again at the clock's now.

use std::fmt;
use std::io;
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{ClientConfig, DistinguishedName, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{
    AllowList, TlsError, client_config_from, client_verifier, mesh_client_config,
    mesh_server_config, now_of, provider, server_config_from, server_verifier,
};
use crate::bundle::CertBundle;
use crate::clock::SharedClock;
use crate::pem::PrivateKey;
use crate::verify::{TrustAnchors, Usage, VerifyError};

/// Why a connection was not handed out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The handshake itself failed (I/O, or rustls refused the peer; the rustls error, if any,
    /// is the I/O error's inner error).
    #[error(transparent)]
    Handshake(io::Error),
    /// A resumed session's peer chain no longer verifies (expired, anchors rotated, identity
    /// not allowed).
    #[error(transparent)]
    Resumed(rustls::Error),
}

impl From<HandshakeError> for io::Error {
    fn from(e: HandshakeError) -> Self {
        match e {
            HandshakeError::Handshake(e) => e,
            HandshakeError::Resumed(e) => io::Error::new(io::ErrorKind::InvalidData, e),
        }
    }
}

/// How an [`Acceptor`] checks client chains after the handshake.
#[derive(Clone, Debug)]
enum ClientCheck {
    /// Verified in the handshake; a resumed session is verified again.
    Required(Arc<dyn ClientCertVerifier>),
    /// Never verified in the handshake; every connection's chain is verified afterwards and
    /// one that does not verify is not handed out (the connection still is).
    Deferred(TrustAnchors),
}

/// Server side of the policy: accepts TLS connections whose client chain is verified.
#[derive(Clone, Debug)]
pub struct Acceptor {
    config: Arc<ServerConfig>,
    check: ClientCheck,
    clock: SharedClock,
}

/// An accepted connection.
#[derive(Debug)]
pub struct Accepted<IO> {
    /// The TLS stream.
    pub stream: tokio_rustls::server::TlsStream<IO>,
    /// The client chain (leaf first), verified at the clock's now of this accept. `None`: no
    /// client certificate, or (only with [`Acceptor::deferred`]) one that does not verify.
    pub client_chain: Option<Arc<Vec<CertificateDer<'static>>>>,
    /// Why a presented chain was not accepted ([`Acceptor::deferred`] only).
    pub ignored_chain: Option<VerifyError>,
}

/// A server handshake whose ClientHello has been read and not yet answered: the caller looks
/// at the SNI and the ALPN offer, then completes it with the [`Acceptor`] of its choice, or
/// drops it (the client sees the connection close).
pub struct ClientHello<IO> {
    start: tokio_rustls::StartHandshake<IO>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> fmt::Debug for ClientHello<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientHello")
            .field("server_name", &self.start.client_hello().server_name())
            .finish_non_exhaustive()
    }
}

impl<IO> ClientHello<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    /// Reads a ClientHello from `io` (a record that is not one fails as a handshake error).
    pub async fn read(io: IO) -> Result<Self, HandshakeError> {
        let start = tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io)
            .await
            .map_err(HandshakeError::Handshake)?;
        Ok(Self { start })
    }

    /// The SNI the client sent, normalised ([`crate::identity::normalize_name`]): lower case,
    /// no trailing dot. `None`: no SNI (e.g. the client dialled an IP address).
    pub fn server_name(&self) -> Option<String> {
        self.start
            .client_hello()
            .server_name()
            .map(crate::identity::normalize_name)
    }

    /// Whether the client offers ALPN `protocol`.
    pub fn offers_alpn(&self, protocol: &[u8]) -> bool {
        self.start
            .client_hello()
            .alpn()
            .is_some_and(|mut offered| offered.any(|p| p == protocol))
    }

    /// Answers the ClientHello with `acceptor`'s config and verifies the client as
    /// [`Acceptor::accept`] does (a resumed session's chain again at the clock's now).
    pub async fn accept(self, acceptor: &Acceptor) -> Result<Accepted<IO>, HandshakeError> {
        let stream = self
            .start
            .into_stream(acceptor.config.clone())
            .await
            .map_err(HandshakeError::Handshake)?;
        acceptor.verified(stream)
    }
}

impl Acceptor {
    /// The mesh server: our `bundle`, TLS 1.3, client certificates required and verified
    /// against `anchors` at the clock's time, then checked against `allow`. Sessions resume;
    /// a resumed one is verified again in [`Acceptor::accept`].
    pub fn mesh(
        bundle: &CertBundle,
        anchors: &TrustAnchors,
        allow: &AllowList,
        clock: &SharedClock,
    ) -> Result<Self, TlsError> {
        let verifier = client_verifier(anchors, allow)?;
        let config = mesh_server_config(bundle, verifier.clone(), clock)?;
        Ok(Self {
            config: Arc::new(config),
            check: ClientCheck::Required(verifier),
            clock: clock.clone(),
        })
    }

    /// The issuer's server: `chain` and `key`, TLS 1.3, `alpn` offered (a client offering none
    /// is accepted). Client certificates are requested, never required, and the handshake
    /// only checks the signature made with one (so the peer holds its key): a running
    /// linkerd2-proxy keeps presenting its last leaf on every renewal, also once it expired or
    /// its anchor was rotated out, and refusing the handshake would stop it from ever renewing
    /// with its token. The chain is verified against `anchors` for client use at the clock's
    /// now after every handshake, resumed or not; [`Accepted::client_chain`] holds it only if
    /// it verifies.
    pub fn deferred(
        chain: &[CertificateDer<'static>],
        key: &PrivateKey,
        anchors: &TrustAnchors,
        alpn: &[&[u8]],
        clock: &SharedClock,
    ) -> Result<Self, TlsError> {
        let inner =
            WebPkiClientVerifier::builder_with_provider(Arc::new(anchors.root_store()), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let verifier = Arc::new(SignatureOnlyClientVerifier { inner });
        let mut config = server_config_from(chain, key, verifier, clock)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            config: Arc::new(config),
            check: ClientCheck::Deferred(anchors.clone()),
            clock: clock.clone(),
        })
    }

    /// This acceptor also answering ALPN `protocols` (in preference order) to a client that
    /// offers one of them. Only for a [`ClientHello::accept`] that picks it when the client
    /// offers one: rustls refuses a client that offers ALPN but none of the server's protocols.
    /// Resumption state is shared with `self`.
    pub fn with_alpn(&self, protocols: &[&[u8]]) -> Self {
        let mut config = (*self.config).clone();
        config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        Self {
            config: Arc::new(config),
            check: self.check.clone(),
            clock: self.clock.clone(),
        }
    }

    /// Runs the server handshake on `io` and verifies the client chain as the profile says.
    pub async fn accept<IO>(&self, io: IO) -> Result<Accepted<IO>, HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = tokio_rustls::TlsAcceptor::from(self.config.clone())
            .accept(io)
            .await
            .map_err(HandshakeError::Handshake)?;
        self.verified(stream)
    }

    /// The client chain of a finished handshake, checked as the profile says.
    fn verified<IO>(
        &self,
        stream: tokio_rustls::server::TlsStream<IO>,
    ) -> Result<Accepted<IO>, HandshakeError> {
        let conn = stream.get_ref().1;
        let owned = |c: &[CertificateDer<'_>]| {
            Arc::new(c.iter().map(|c| c.clone().into_owned()).collect::<Vec<_>>())
        };
        let certs = conn.peer_certificates().unwrap_or_default();
        let (client_chain, ignored_chain) = match &self.check {
            ClientCheck::Required(verifier) => {
                if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    let Some((leaf, intermediates)) = certs.split_first() else {
                        return Err(HandshakeError::Resumed(
                            rustls::Error::NoCertificatesPresented,
                        ));
                    };
                    let now = now_of(&self.clock).map_err(HandshakeError::Resumed)?;
                    verifier
                        .verify_client_cert(leaf, intermediates, now)
                        .map_err(HandshakeError::Resumed)?;
                }
                ((!certs.is_empty()).then(|| owned(certs)), None)
            }
            ClientCheck::Deferred(anchors) => match certs.split_first() {
                None => (None, None),
                Some((leaf, intermediates)) => {
                    match anchors.verify_leaf(leaf, intermediates, self.clock.now(), Usage::Client)
                    {
                        Ok(()) => (Some(owned(certs)), None),
                        Err(e) => (None, Some(e)),
                    }
                }
            },
        };
        Ok(Accepted {
            stream,
            client_chain,
            ignored_chain,
        })
    }
}

/// Client side of the policy: connects and verifies the server, also a resumed session's.
#[derive(Clone, Debug)]
pub struct Connector {
    config: Arc<ClientConfig>,
    verifier: Arc<dyn ServerCertVerifier>,
    clock: SharedClock,
}

impl Connector {
    /// The mesh client: `bundle` as client certificate, TLS 1.3, the server verified against
    /// `anchors` at the clock's time and required to carry the connect's name as an exact
    /// DNS SAN. Sessions resume; a resumed one is verified again in [`Connector::connect`].
    pub fn mesh(
        bundle: &CertBundle,
        anchors: &TrustAnchors,
        clock: &SharedClock,
    ) -> Result<Self, TlsError> {
        Self::tls13(Some(bundle), anchors, clock)
    }

    /// A mesh client without a client certificate (the rotator calling the issuer): TLS 1.3,
    /// the server verified as for [`Connector::mesh`].
    pub fn without_client_cert(
        anchors: &TrustAnchors,
        clock: &SharedClock,
    ) -> Result<Self, TlsError> {
        Self::tls13(None, anchors, clock)
    }

    fn tls13(
        bundle: Option<&CertBundle>,
        anchors: &TrustAnchors,
        clock: &SharedClock,
    ) -> Result<Self, TlsError> {
        let verifier = server_verifier(anchors)?;
        let config = mesh_client_config(bundle, verifier.clone(), clock)?;
        Ok(Self {
            config: Arc::new(config),
            verifier,
            clock: clock.clone(),
        })
    }

    /// The consumer-verify profile: presents `bundle` as client certificate to a service that
    /// serves it (nginx, postgres, ...) and verifies the server against the bundle's anchors
    /// with the exact-identity rule. TLS 1.2 is allowed besides 1.3, with ring's default
    /// suites, because such consumers may not speak 1.3.
    pub fn consumer(bundle: &CertBundle, clock: &SharedClock) -> Result<Self, TlsError> {
        let verifier = server_verifier(&bundle.anchors)?;
        let config = client_config_from(
            crate::crypto_provider(),
            rustls::DEFAULT_VERSIONS,
            Some(bundle),
            verifier.clone(),
            clock,
        )?;
        Ok(Self {
            config: Arc::new(config),
            verifier,
            clock: clock.clone(),
        })
    }

    /// Runs the client handshake on `io` for the identity `name`; a resumed session's server
    /// chain is verified again against the anchors and `name` at the clock's now.
    pub async fn connect<IO>(
        &self,
        name: ServerName<'static>,
        io: IO,
    ) -> Result<tokio_rustls::client::TlsStream<IO>, HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let stream = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name.clone(), io)
            .await
            .map_err(HandshakeError::Handshake)?;
        let conn = stream.get_ref().1;
        if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            let Some((leaf, intermediates)) =
                conn.peer_certificates().and_then(|c| c.split_first())
            else {
                return Err(HandshakeError::Resumed(
                    rustls::Error::NoCertificatesPresented,
                ));
            };
            let now = now_of(&self.clock).map_err(HandshakeError::Resumed)?;
            self.verifier
                .verify_server_cert(leaf, intermediates, &name, &[], now)
                .map_err(HandshakeError::Resumed)?;
        }
        Ok(stream)
    }
}

/// Requests a client certificate and checks the handshake signature made with it, but never
/// fails the handshake over the chain itself (see [`Acceptor::deferred`]).
#[derive(Debug)]
struct SignatureOnlyClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for SignatureOnlyClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    delegate_signature_checks!();
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::clock::FakeClock;
    use crate::identity::Identity;
    use crate::test_util::TestPki;

    const HOUR: Duration = Duration::from_secs(3600);
    const SERVER: &str = "db.data.serviceaccount.identity.linkerd.cluster.local";
    const CLIENT: &str = "web.apps.serviceaccount.identity.linkerd.cluster.local";

    /// A PKI, a server leaf for [`SERVER`] and a client leaf for [`CLIENT`] valid from an hour
    /// ago for the given lifetimes, a fake clock starting now and the real clock.
    struct Fixture {
        pki: TestPki,
        server: CertBundle,
        client: CertBundle,
        fake: Arc<FakeClock>,
        clock: SharedClock,
        real: SharedClock,
    }

    fn fixture(server_life: Duration, client_life: Duration) -> Fixture {
        let real: SharedClock = Arc::new(crate::clock::SystemClock);
        let now = real.now();
        let pki = TestPki::new(now);
        let leaf =
            |name: &str, life| pki.leaf(&Identity::parse(name).unwrap(), now - HOUR, now + life);
        let (server, client) = (leaf(SERVER, server_life), leaf(CLIENT, client_life));
        let fake = Arc::new(FakeClock::new(now));
        Fixture {
            pki,
            server,
            client,
            clock: fake.clone(),
            fake,
            real,
        }
    }

    /// One connection over an in-memory pipe: the server sends a byte once accepted (so the
    /// client takes in the session tickets sent before it). Returns both sides' results and
    /// how the client's handshake went.
    async fn one_conn(
        acceptor: &Acceptor,
        connector: &Connector,
    ) -> (
        Result<Accepted<tokio::io::DuplexStream>, HandshakeError>,
        Result<Option<rustls::HandshakeKind>, HandshakeError>,
    ) {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let server = async {
            let mut accepted = acceptor.accept(s).await?;
            accepted.stream.write_all(b"x").await.ok();
            accepted.stream.flush().await.ok();
            Ok(accepted)
        };
        let client = async {
            let mut tls = connector
                .connect(ServerName::try_from(SERVER).unwrap(), c)
                .await?;
            let kind = tls.get_ref().1.handshake_kind();
            let mut b = [0u8; 1];
            // A refused resumption on the server side closes the pipe instead.
            let _ = tls.read_exact(&mut b).await;
            Ok(kind)
        };
        tokio::join!(server, client)
    }

    fn assert_resumption_refused_as_expired<T: std::fmt::Debug>(r: Result<T, HandshakeError>) {
        match r {
            Err(HandshakeError::Resumed(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. },
            ))) => {}
            other => panic!("expected a resumption refused as expired, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn mesh_acceptor_verifies_a_resumed_client_again_at_the_clock_now() {
        let Fixture {
            pki,
            server,
            client,
            fake: server_clock,
            clock,
            real,
        } = fixture(24 * HOUR, HOUR);
        let acceptor =
            Acceptor::mesh(&server, &pki.anchors(), &AllowList::default(), &clock).unwrap();
        let connector = Connector::mesh(&client, &pki.anchors(), &real).unwrap();

        let (s, c) = one_conn(&acceptor, &connector).await;
        assert_eq!(c.unwrap(), Some(rustls::HandshakeKind::Full));
        let chain = s.unwrap().client_chain.expect("verified client chain");
        assert_eq!(chain[0], client.chain[0]);

        let (s, c) = one_conn(&acceptor, &connector).await;
        assert_eq!(c.unwrap(), Some(rustls::HandshakeKind::Resumed));
        assert!(s.unwrap().client_chain.is_some());

        // The client's leaf has expired by the server's clock: the session would still
        // resume, but the acceptor refuses it.
        server_clock.advance(2 * HOUR);
        let (s, _) = one_conn(&acceptor, &connector).await;
        assert_resumption_refused_as_expired(s);
    }

    #[tokio::test]
    async fn mesh_connector_verifies_a_resumed_server_again_at_the_clock_now() {
        let Fixture {
            pki,
            server,
            client,
            fake: client_clock,
            clock,
            real,
        } = fixture(HOUR, 24 * HOUR);
        let acceptor =
            Acceptor::mesh(&server, &pki.anchors(), &AllowList::default(), &real).unwrap();
        let connector = Connector::mesh(&client, &pki.anchors(), &clock).unwrap();

        let (s, c) = one_conn(&acceptor, &connector).await;
        assert!(s.is_ok());
        assert_eq!(c.unwrap(), Some(rustls::HandshakeKind::Full));
        client_clock.advance(2 * HOUR);
        let (_, c) = one_conn(&acceptor, &connector).await;
        assert_resumption_refused_as_expired(c);
    }

    #[tokio::test]
    async fn deferred_acceptor_hands_out_only_a_chain_that_verifies_now() {
        let Fixture {
            pki,
            server,
            client,
            fake: server_clock,
            clock,
            real,
        } = fixture(24 * HOUR, HOUR);
        let acceptor =
            Acceptor::deferred(&server.chain, &server.key, &pki.anchors(), &[b"h2"], &clock)
                .unwrap();
        let with_cert = Connector::mesh(&client, &pki.anchors(), &real).unwrap();
        let without = Connector::without_client_cert(&pki.anchors(), &real).unwrap();

        let (s, c) = one_conn(&acceptor, &with_cert).await;
        assert_eq!(c.unwrap(), Some(rustls::HandshakeKind::Full));
        let s = s.unwrap();
        assert!(s.client_chain.is_some() && s.ignored_chain.is_none());
        // No ALPN offered by the client: accepted all the same.
        assert_eq!(s.stream.get_ref().1.alpn_protocol(), None);

        let (s, c) = one_conn(&acceptor, &without).await;
        assert!(c.is_ok());
        let s = s.unwrap();
        assert!(s.client_chain.is_none() && s.ignored_chain.is_none());

        // Expired by the issuer's clock: the handshake (here a resumed one) still succeeds,
        // the chain is not handed out.
        server_clock.advance(2 * HOUR);
        let (s, c) = one_conn(&acceptor, &with_cert).await;
        assert_eq!(c.unwrap(), Some(rustls::HandshakeKind::Resumed));
        let s = s.unwrap();
        assert!(s.client_chain.is_none());
        assert!(s.ignored_chain.is_some());
    }

    #[tokio::test]
    async fn client_hello_shows_sni_and_alpn_and_the_chosen_acceptor_answers_it() {
        let Fixture {
            pki,
            server,
            client,
            real,
            ..
        } = fixture(HOUR, HOUR);
        let plain = Acceptor::mesh(&server, &pki.anchors(), &AllowList::default(), &real).unwrap();
        let transport = plain.with_alpn(&[b"transport.l5d.io/v1"]);
        for (offer, want) in [
            (
                vec![b"transport.l5d.io/v1".to_vec()],
                Some(&b"transport.l5d.io/v1"[..]),
            ),
            // Offering only something else: served without ALPN, not refused.
            (vec![b"h2".to_vec()], None),
            (Vec::new(), None),
        ] {
            let mut connector = Connector::mesh(&client, &pki.anchors(), &real).unwrap();
            let mut config = (*connector.config).clone();
            config.alpn_protocols = offer.clone();
            connector.config = Arc::new(config);
            let (c, s) = tokio::io::duplex(64 * 1024);
            let server_side = async {
                let hello = ClientHello::read(s).await.unwrap();
                assert_eq!(hello.server_name().as_deref(), Some(SERVER));
                let offers = hello.offers_alpn(b"transport.l5d.io/v1");
                assert_eq!(offers, want.is_some());
                let acceptor = if offers { &transport } else { &plain };
                let mut accepted = hello.accept(acceptor).await.unwrap();
                assert!(accepted.client_chain.is_some());
                accepted.stream.write_all(b"x").await.unwrap();
                accepted.stream.flush().await.unwrap();
                accepted
                    .stream
                    .get_ref()
                    .1
                    .alpn_protocol()
                    .map(<[u8]>::to_vec)
            };
            let client_side = async {
                let name = ServerName::try_from(SERVER.to_uppercase()).unwrap();
                let mut tls = connector.connect(name, c).await.unwrap();
                let mut b = [0u8; 1];
                tls.read_exact(&mut b).await.unwrap();
            };
            let (alpn, ()) = tokio::join!(server_side, client_side);
            assert_eq!(alpn.as_deref(), want, "offer {offer:?}");
        }
    }

    #[tokio::test]
    async fn bare_configs_never_resume() {
        let Fixture {
            pki,
            server,
            client,
            real,
            ..
        } = fixture(HOUR, HOUR);
        let sc = super::super::server_config(&server, &pki.anchors(), &AllowList::default(), &real)
            .unwrap();
        let cc = super::super::client_config(&client, &pki.anchors(), &real).unwrap();
        assert_eq!(sc.send_tls13_tickets, 0);
        assert!(!sc.session_storage.can_cache());
        // Even a client that caches sessions gets a full handshake every time.
        let mut resuming = cc.clone();
        resuming.resumption = rustls::client::Resumption::default();
        let resuming = tokio_rustls::TlsConnector::from(Arc::new(resuming));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
        for _ in 0..2 {
            let (c, s) = tokio::io::duplex(64 * 1024);
            let server = async {
                let mut tls = acceptor.accept(s).await.unwrap();
                tls.write_all(b"x").await.unwrap();
                tls.flush().await.unwrap();
                tls
            };
            let client = async {
                let name = ServerName::try_from(SERVER).unwrap();
                let mut tls = resuming.connect(name, c).await.unwrap();
                let mut b = [0u8; 1];
                tls.read_exact(&mut b).await.unwrap();
                tls.get_ref().1.handshake_kind()
            };
            let (_server, kind) = tokio::join!(server, client);
            assert_eq!(kind, Some(rustls::HandshakeKind::Full));
        }
    }
}
