//! The proxy's Prometheus metrics (public names): handshakes, open connections, bytes,
//! certificate expiry and reloads.
//!
//! Handles that the data path touches per connection or per read are resolved once, so the
//! hot path is a single atomic add.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which listener a connection came through.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// TLS terminated here, forwarded to the local app.
    Inbound,
    /// Plaintext accepted locally, TLS originated to a target.
    Outbound,
}

impl Direction {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// How a TLS handshake ended (the `result` label of `proxy_tls_handshakes_total`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum HandshakeResult {
    /// Completed; the peer was authenticated.
    Ok,
    /// The client sent no certificate (inbound).
    NoClientCert,
    /// The peer's chain did not validate: unknown issuer (foreign anchor), expired, bad usage.
    Untrusted,
    /// The client's identity is not on the allow-list (inbound).
    NotAllowed,
    /// The server's certificate does not carry the expected identity (outbound).
    WrongIdentity,
    /// The handshake did not finish within the handshake timeout.
    Timeout,
    /// No valid certificate is loaded yet, so no handshake was attempted.
    NoCredentials,
    /// Linkerd inbound mode: the ClientHello's SNI (or its absence) names none of the served
    /// leaf's identities, so the connection was not terminated.
    ForeignSni,
    /// The client's source address already had `max_pending_per_source` handshakes in
    /// progress, so the connection was closed before any handshake (inbound).
    SourcePending,
    /// Anything else (protocol error, peer closed, TCP error).
    Error,
}

impl HandshakeResult {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeResult::Ok => "ok",
            HandshakeResult::NoClientCert => "no_client_cert",
            HandshakeResult::Untrusted => "untrusted",
            HandshakeResult::NotAllowed => "not_allowed",
            HandshakeResult::WrongIdentity => "wrong_identity",
            HandshakeResult::Timeout => "timeout",
            HandshakeResult::NoCredentials => "no_credentials",
            HandshakeResult::ForeignSni => "foreign_sni",
            HandshakeResult::SourcePending => "source_pending",
            HandshakeResult::Error => "error",
        }
    }
}

macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(
                &self,
                encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
            ) -> Result<(), std::fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    )*};
}

label_value!(
    Direction,
    HandshakeResult,
    ReloadResult,
    LinkerdProtocol,
    LinkerdRefusal
);

/// How a Linkerd-mode connection or request was served (the `protocol` label).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum LinkerdProtocol {
    /// A request that came as HTTP/2 with `l5d-orig-proto` and went to the app as HTTP/1.
    Http1Downgraded,
    /// HTTP/2 served and forwarded as HTTP/2 (a connection or a request).
    Http2,
    /// A connection that came with a transport header (ALPN `transport.l5d.io/v1`).
    Opaque,
    /// A connection without a header that is not HTTP/2: its bytes are forwarded as they are.
    Tcp,
}

impl LinkerdProtocol {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkerdProtocol::Http1Downgraded => "http1_downgraded",
            LinkerdProtocol::Http2 => "http2",
            LinkerdProtocol::Opaque => "opaque",
            LinkerdProtocol::Tcp => "tcp",
        }
    }
}

/// Why a Linkerd-mode connection was closed after its handshake (the `reason` label).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum LinkerdRefusal {
    /// The transport header names a port no app is configured for; or no header came on a
    /// listener whose own port has no app.
    UnknownPort,
    /// The transport header is malformed, truncated, oversized or late.
    BadHeader,
}

impl LinkerdRefusal {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkerdRefusal::UnknownPort => "unknown_port",
            LinkerdRefusal::BadHeader => "bad_header",
        }
    }
}

/// Labels of the Linkerd-mode connection and request counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LinkerdLabels {
    /// How it was served.
    pub protocol: LinkerdProtocol,
    /// The client's identity (its leaf's first DNS SAN), as Linkerd's `client_id`; see
    /// [`ClientIds`] for the bound on distinct values.
    pub client_id: String,
}

/// Labels of `proxy_linkerd_inbound_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// Why.
    pub reason: LinkerdRefusal,
}

/// The `client_id` label values in use, bounded: the first [`ClientIds::MAX`] distinct
/// identities keep their own series, later ones are counted as [`ClientIds::OTHER`], so a
/// mesh with many clients cannot grow the metrics without bound.
#[derive(Clone, Debug, Default)]
pub struct ClientIds(std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

impl ClientIds {
    /// Distinct identities that get a series of their own.
    pub const MAX: usize = 100;
    /// The label of identities beyond [`ClientIds::MAX`].
    pub const OTHER: &'static str = "other";
    /// The label of a client whose leaf carries no DNS SAN.
    pub const UNKNOWN: &'static str = "unknown";

    /// The label value for `identity`.
    pub fn label(&self, identity: Option<&str>) -> String {
        let Some(id) = identity else {
            return Self::UNKNOWN.to_string();
        };
        let mut seen = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains(id) {
            return id.to_string();
        }
        if seen.len() < Self::MAX {
            seen.insert(id.to_string());
            return id.to_string();
        }
        Self::OTHER.to_string()
    }
}

/// Labels of `proxy_tls_handshakes_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// Listener.
    pub direction: Direction,
    /// Outcome.
    pub result: HandshakeResult,
}

/// Labels carrying only the direction.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    /// Listener.
    pub direction: Direction,
}

/// Outcome of a reload (`ok` or `error`).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ReloadResult {
    /// A new snapshot is served.
    Ok,
    /// The snapshot was refused; the previous one (if any) is kept.
    Error,
}

impl ReloadResult {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Ok => "ok",
            ReloadResult::Error => "error",
        }
    }
}

/// Labels of `proxy_reloads_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    /// Outcome.
    pub result: ReloadResult,
}

/// All proxy metrics. Clones share the same underlying values.
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// `proxy_tls_handshakes_total{direction,result}`.
    pub handshakes: Family<HandshakeLabels, Counter>,
    /// `proxy_open_connections{direction}`.
    pub open_connections: Family<DirectionLabels, Gauge>,
    /// `proxy_bytes_total{direction}`: payload bytes forwarded, both ways.
    pub bytes: Family<DirectionLabels, Counter>,
    /// `proxy_cert_expiration_timestamp_seconds`: notAfter of the served leaf.
    pub cert_expiration: Gauge,
    /// `proxy_reloads_total{result}`.
    pub reloads: Family<ReloadLabels, Counter>,
    /// `proxy_linkerd_inbound_connections_total{protocol,client_id}`: Linkerd-mode connections
    /// by how they were served (`http2`, `opaque`, `tcp`).
    pub linkerd_connections: Family<LinkerdLabels, Counter>,
    /// `proxy_linkerd_inbound_requests_total{protocol,client_id}`: HTTP requests served in
    /// Linkerd mode (`http1_downgraded`, `http2`).
    pub linkerd_requests: Family<LinkerdLabels, Counter>,
    /// `proxy_linkerd_inbound_refused_total{reason}`: Linkerd-mode connections closed after
    /// the handshake.
    pub linkerd_refused: Family<RefusalLabels, Counter>,
    /// The bounded `client_id` values.
    pub client_ids: ClientIds,
}

impl Metrics {
    /// Fresh metrics registered in `registry` under their public names.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        // prometheus-client appends `_total` to counters itself.
        crate::register_metrics!(registry,
            m.handshakes => "proxy_tls_handshakes", "TLS handshakes by listener direction and result";
            m.open_connections => "proxy_open_connections", "Connections currently open, by listener direction";
            m.bytes => "proxy_bytes", "Payload bytes forwarded (both ways), by listener direction";
            m.cert_expiration => "proxy_cert_expiration_timestamp_seconds", "notAfter of the certificate being served, in Unix seconds";
            m.reloads => "proxy_reloads", "Certificate reloads by result";
            m.linkerd_connections => "proxy_linkerd_inbound_connections", "Linkerd inbound connections by protocol (http2, opaque, tcp) and client identity";
            m.linkerd_requests => "proxy_linkerd_inbound_requests", "Linkerd inbound HTTP requests by protocol (http1_downgraded, http2) and client identity";
            m.linkerd_refused => "proxy_linkerd_inbound_refused", "Linkerd inbound connections closed after the handshake, by reason";
        );
        m
    }

    /// Counts one handshake outcome.
    pub fn handshake(&self, direction: Direction, result: HandshakeResult) {
        self.handshakes
            .get_or_create(&HandshakeLabels { direction, result })
            .inc();
    }

    /// Counts one Linkerd-mode refusal.
    pub fn linkerd_refusal(&self, reason: LinkerdRefusal) {
        self.linkerd_refused
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

    /// Counts one reload outcome.
    pub fn reload(&self, result: ReloadResult) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    /// The resolved per-direction handles used on the data path.
    pub fn direction(&self, direction: Direction) -> DirectionMetrics {
        let labels = DirectionLabels { direction };
        DirectionMetrics {
            direction,
            open: self.open_connections.get_or_create_owned(&labels),
            bytes: self.bytes.get_or_create_owned(&labels),
        }
    }
}

/// Per-direction handles (no label lookups on the data path).
#[derive(Clone, Debug)]
pub struct DirectionMetrics {
    /// The direction they count.
    pub direction: Direction,
    /// Open-connection gauge.
    pub open: Gauge,
    /// Byte counter.
    pub bytes: Counter,
}

impl DirectionMetrics {
    /// Marks a connection open until the returned guard drops.
    pub fn open_connection(&self) -> OpenGuard {
        self.open.inc();
        OpenGuard(self.open.clone())
    }
}

/// Decrements the open-connection gauge when dropped.
#[derive(Debug)]
pub struct OpenGuard(Gauge);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_spec_names_and_labels() {
        let mut reg = Registry::default();
        let m = Metrics::register(&mut reg);
        m.handshake(Direction::Inbound, HandshakeResult::NoClientCert);
        m.reload(ReloadResult::Error);
        let d = m.direction(Direction::Outbound);
        d.bytes.inc_by(7);
        let guard = d.open_connection();
        m.cert_expiration.set(42);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        for want in [
            r#"proxy_tls_handshakes_total{direction="inbound",result="no_client_cert"} 1"#,
            r#"proxy_reloads_total{result="error"} 1"#,
            r#"proxy_bytes_total{direction="outbound"} 7"#,
            r#"proxy_open_connections{direction="outbound"} 1"#,
            "proxy_cert_expiration_timestamp_seconds 42",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        drop(guard);
        assert_eq!(d.open.get(), 0);
    }

    #[test]
    fn client_id_labels_are_bounded() {
        let ids = ClientIds::default();
        let name = |i: usize| format!("sa{i}.ns.serviceaccount.identity.linkerd.cluster.local");
        for i in 0..ClientIds::MAX {
            assert_eq!(ids.label(Some(&name(i))), name(i));
        }
        assert_eq!(ids.label(Some(&name(ClientIds::MAX))), ClientIds::OTHER);
        // Identities seen before the bound keep their own series.
        assert_eq!(ids.label(Some(&name(7))), name(7));
        assert_eq!(ids.label(None), ClientIds::UNKNOWN);
    }
}
