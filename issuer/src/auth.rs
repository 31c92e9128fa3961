//! Authenticators: who is asking, and may they have this identity. A chain of them is tried
//! in order; the first that recognises the credential decides.
//!
//! Each sees the request, the peer address and (when the client presented one) the peer's
//! certificate chain, so Kubernetes tokens and renewal by client certificate can be added
//! without touching the service.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use proxy_lib::clock::SharedClock;
use proxy_lib::identity::Identity;
use rustls_pki_types::CertificateDer;

use crate::error::AuthError;
use crate::tokens::TokenStore;

/// What an authenticator sees of one request.
#[derive(Debug, Clone, Copy)]
pub struct AuthRequest<'a> {
    /// The identity asked for (already in the trust domain).
    pub identity: &'a Identity,
    /// The token bytes as sent.
    pub token: &'a [u8],
    /// The peer's address, when known.
    pub peer: Option<SocketAddr>,
    /// The peer's client certificate chain, when it presented one that verifies against the
    /// anchors in use for client use at the current time (a chain that does not verify is
    /// not passed on: the request is then judged on its token alone).
    pub client_certs: Option<&'a [CertificateDer<'static>]>,
}

/// Who was authenticated, for audit, logs and rate limiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The authenticator's name (`tokens`, ...).
    pub authenticator: &'static str,
    /// A public name for the credential (e.g. `token:<id>`), never the secret.
    pub credential: String,
}

impl Principal {
    /// The bootstrap token's id, when the token store authenticated the request.
    pub fn token_id(&self) -> Option<&str> {
        if self.authenticator == "tokens" {
            self.credential.strip_prefix("token:")
        } else {
            None
        }
    }
}

/// Decides whether a request is authentic and authorised.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + std::fmt::Debug {
    /// The authenticator's name.
    fn name(&self) -> &'static str;

    /// `Ok(Some)`: authenticated and authorised. `Ok(None)`: not a credential this
    /// authenticator knows (the next one is tried). `Err`: a definite refusal.
    async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Option<Principal>, AuthError>;

    /// Whether the chain's [`Binding`] applies to the principals this authenticator accepts
    /// (default yes; no for Kubernetes service-account tokens, whose pods need no
    /// ExternalWorkload).
    fn bound(&self) -> bool {
        true
    }
}

/// An authorisation step after authentication: may `identity` be issued to a caller at
/// `peer` (e.g. only while an ExternalWorkload registers that identity at that address)?
pub trait Binding: Send + Sync + std::fmt::Debug {
    /// `Err` (PERMISSION_DENIED) names what is missing.
    fn check(&self, identity: &Identity, peer: Option<IpAddr>) -> Result<(), AuthError>;
}

/// Bootstrap tokens from the token store.
#[derive(Debug)]
pub struct TokenAuthenticator {
    store: Arc<TokenStore>,
    clock: SharedClock,
}

impl TokenAuthenticator {
    /// Tokens from `store` (a file or Kubernetes store, shared with whatever refreshes it),
    /// with expiry judged by `clock`.
    pub fn new(store: impl Into<Arc<TokenStore>>, clock: SharedClock) -> Self {
        Self {
            store: store.into(),
            clock,
        }
    }

    /// The store consulted.
    pub fn store(&self) -> &Arc<TokenStore> {
        &self.store
    }
}

#[tonic::async_trait]
impl Authenticator for TokenAuthenticator {
    fn name(&self) -> &'static str {
        "tokens"
    }

    async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Option<Principal>, AuthError> {
        let rec = self.store.check(
            req.token,
            req.identity,
            req.peer.map(|p| p.ip()),
            self.clock.now(),
        )?;
        Ok(rec.map(|r| Principal {
            authenticator: self.name(),
            credential: format!("token:{}", r.id),
        }))
    }
}

/// Authenticators tried in order.
#[derive(Debug, Clone, Default)]
pub struct AuthChain {
    authenticators: Vec<Arc<dyn Authenticator>>,
    binding: Option<Arc<dyn Binding>>,
}

impl AuthChain {
    /// A chain of `authenticators`, tried in the given order.
    pub fn new(authenticators: Vec<Arc<dyn Authenticator>>) -> Self {
        Self {
            authenticators,
            binding: None,
        }
    }

    /// Applies `binding` to every principal of an authenticator that is [`Authenticator::bound`].
    pub fn with_binding(mut self, binding: Option<Arc<dyn Binding>>) -> Self {
        self.binding = binding;
        self
    }

    /// Runs the chain: the first authenticator that recognises the credential decides.
    pub async fn authenticate(&self, req: &AuthRequest<'_>) -> Result<Principal, AuthError> {
        for a in &self.authenticators {
            if let Some(p) = a.authenticate(req).await? {
                if let Some(b) = self.binding.as_ref().filter(|_| a.bound()) {
                    b.check(req.identity, req.peer.map(|p| p.ip()))?;
                }
                return Ok(p);
            }
        }
        if crate::tokens::trim_token(req.token).is_empty() {
            Err(AuthError::NoToken)
        } else {
            Err(AuthError::UnknownToken)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_lib::clock::{Clock, FakeClock};

    #[derive(Debug)]
    struct ByCert;

    #[tonic::async_trait]
    impl Authenticator for ByCert {
        fn name(&self) -> &'static str {
            "cert"
        }
        async fn authenticate(
            &self,
            req: &AuthRequest<'_>,
        ) -> Result<Option<Principal>, AuthError> {
            Ok(req.client_certs.map(|_| Principal {
                authenticator: "cert",
                credential: "cert".into(),
            }))
        }
    }

    #[tokio::test]
    async fn chain_tries_in_order_and_names_the_failure() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("tokens");
        let clock = FakeClock::at_unix(2_000_000_000);
        let id = Identity::parse("a.b.serviceaccount.identity.linkerd.cluster.local").unwrap();
        let t = crate::tokens::create(
            &p,
            &crate::tokens::CreateOptions::new(id.clone()),
            clock.now(),
        )
        .unwrap();
        let chain = AuthChain::new(vec![
            Arc::new(TokenAuthenticator::new(
                TokenStore::open(&p).unwrap(),
                Arc::new(clock.clone()),
            )),
            Arc::new(ByCert),
        ]);
        let req = |token: &'static [u8], certs| AuthRequest {
            identity: Box::leak(Box::new(id.clone())),
            token,
            peer: None,
            client_certs: certs,
        };
        let secret: &'static [u8] = Box::leak(t.secret.as_bytes().to_vec().into_boxed_slice());
        assert_eq!(
            chain
                .authenticate(&req(secret, None))
                .await
                .unwrap()
                .credential,
            format!("token:{}", t.record.id)
        );
        assert_eq!(
            chain.authenticate(&req(b"", None)).await,
            Err(AuthError::NoToken)
        );
        assert_eq!(
            chain.authenticate(&req(b"zz", None)).await,
            Err(AuthError::UnknownToken)
        );
        let certs: &'static [CertificateDer<'static>] = &[];
        assert_eq!(
            chain
                .authenticate(&req(b"", Some(certs)))
                .await
                .unwrap()
                .authenticator,
            "cert"
        );
    }
}
