//! The issuer's Prometheus metrics (names are public interface: dashboards and alerts use them).

use std::sync::atomic::AtomicI64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The `result` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `issued`, a refusal class, or for reloads `loaded`/`refused`.
    pub result: &'static str,
}

/// All issuer metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// `issuer_certify_total{result}`.
    pub certify: Family<ResultLabel, Counter>,
    /// `issuer_certify_duration_seconds`.
    pub duration: Histogram,
    /// `issuer_ca_expiration_timestamp_seconds`.
    pub ca_expiration: Gauge<i64, AtomicI64>,
    /// `issuer_ca_reloads_total{result}`.
    pub ca_reloads: Family<ResultLabel, Counter>,
    /// `issuer_connections_refused_total{reason}`: connections closed before any request.
    pub connections_refused: Family<ReasonLabel, Counter>,
    /// `issuer_connections_shed_total`: quiet connections closed to make room for new ones.
    pub connections_shed: Counter,
    /// `issuer_audit_failures_total{reason}`: records not written (an issuance then fails).
    pub audit_failures: Family<ReasonLabel, Counter>,
    /// `issuer_certify_by_anchor_total{anchor}`: certificates issued, by the trust anchor the
    /// issuer in use chains to (its SHA-256, first 16 hex digits).
    pub issued_by_anchor: Family<AnchorLabel, Counter>,
    /// `issuer_last_issued_patches_total{result}`: `meshcerts.io/last-issued` patches of
    /// ExternalWorkloads, by result (`patched`, `failed`, `gone`: the object was deleted).
    pub last_issued_patches: Family<ResultLabel, Counter>,
    /// `issuer_last_issued_dropped_total`: issuances not queued for recording because the
    /// queue of workloads to patch was full.
    pub last_issued_dropped: Counter,
}

/// The `anchor` label: a trust anchor's SHA-256, first 16 hex digits.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnchorLabel {
    /// The short fingerprint.
    pub anchor: String,
}

/// The `reason` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Connections: `source_pending`, `source_connections`, `handshake_timeout`; audit:
    /// `queue_full`, `timeout`, `write_failed`.
    pub reason: &'static str,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self {
            certify: Family::default(),
            duration: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            ca_expiration: Gauge::default(),
            ca_reloads: Family::default(),
            connections_refused: Family::default(),
            connections_shed: Counter::default(),
            audit_failures: Family::default(),
            issued_by_anchor: Family::default(),
            last_issued_patches: Family::default(),
            last_issued_dropped: Counter::default(),
        };
        proxy_lib::register_metrics!(registry,
            m.certify => "issuer_certify", "Certify decisions by result";
            m.duration => "issuer_certify_duration_seconds", "Time to answer a Certify request";
            m.ca_expiration => "issuer_ca_expiration_timestamp_seconds", "notAfter of the issuer certificate in use, Unix seconds";
            m.ca_reloads => "issuer_ca_reloads", "Issuer CA reload attempts by result";
            m.connections_refused => "issuer_connections_refused", "Connections closed before a request, by reason";
            m.connections_shed => "issuer_connections_shed", "Quiet connections closed to make room for new ones";
            m.audit_failures => "issuer_audit_failures", "Audit records not written, by reason (an issuance then fails)";
            m.issued_by_anchor => "issuer_certify_by_anchor", "Certificates issued, by the trust anchor (SHA-256 short form) the issuer in use chains to";
            m.last_issued_patches => "issuer_last_issued_patches", "Patches recording the last issuance on ExternalWorkloads, by result";
            m.last_issued_dropped => "issuer_last_issued_dropped", "Issuances not recorded on their ExternalWorkload because the queue was full";
        );
        m
    }

    /// Counts one connection closed before any request.
    pub fn connection_refused(&self, reason: &'static str) {
        self.connections_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts one audit record not written.
    pub fn audit_failure(&self, reason: &'static str) {
        self.audit_failures
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Counts one certificate issued under the anchor with short fingerprint `anchor`.
    pub fn issued_under(&self, anchor: &str) {
        self.issued_by_anchor
            .get_or_create(&AnchorLabel {
                anchor: anchor.to_string(),
            })
            .inc();
    }

    /// Counts one `meshcerts.io/last-issued` patch (`patched`, `failed`, `gone`).
    pub fn last_issued_patch(&self, result: &'static str) {
        self.last_issued_patches
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts one Certify decision.
    pub fn certify(&self, result: &'static str, seconds: f64) {
        self.certify.get_or_create(&ResultLabel { result }).inc();
        self.duration.observe(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_spec() {
        let mut reg = Registry::default();
        let m = Metrics::new(&mut reg);
        m.certify("issued", 0.001);
        m.certify("unauthenticated", 0.001);
        m.ca_expiration.set(42);
        m.issued_under("0123456789abcdef");
        m.last_issued_patch("failed");
        m.last_issued_dropped.inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains("issuer_certify_total{result=\"issued\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("issuer_certify_duration_seconds_count 2"),
            "{text}"
        );
        assert!(
            text.contains("issuer_certify_by_anchor_total{anchor=\"0123456789abcdef\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("issuer_ca_expiration_timestamp_seconds 42"),
            "{text}"
        );
        assert!(
            text.contains("issuer_last_issued_patches_total{result=\"failed\"} 1")
                && text.contains("issuer_last_issued_dropped_total 1"),
            "{text}"
        );
    }
}
