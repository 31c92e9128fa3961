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

label_value!(Direction, HandshakeResult, ReloadResult);

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
        );
        m
    }

    /// Counts one handshake outcome.
    pub fn handshake(&self, direction: Direction, result: HandshakeResult) {
        self.handshakes
            .get_or_create(&HandshakeLabels { direction, result })
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
}
