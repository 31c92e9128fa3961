//! The rotator's Prometheus metrics (public names), served on `[metrics] listen`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The `result` label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `success` or `failure`.
    pub result: String,
}

/// The labels of `rotator_trust_bundle_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BundleLabel {
    /// The anchors' fingerprint (SHA-256 over their DER, first 16 hex digits).
    pub fingerprint: String,
    /// The sequence of the signed bundle installed, `bootstrap` on `trust_anchors`.
    pub sequence: String,
}

/// The rotator's metrics and readiness flag. Clones share the same values.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// `rotator_cert_expiration_timestamp_seconds`.
    pub cert_expiration: Gauge,
    /// `rotator_rotations_total{result}`.
    pub rotations: Family<ResultLabel, Counter>,
    /// `rotator_last_success_timestamp_seconds`.
    pub last_success: Gauge,
    /// `rotator_reloads_total{result}`.
    pub reloads: Family<ResultLabel, Counter>,
    /// `rotator_trust_bundle_info{fingerprint,sequence}`: 1 for the anchors the host trusts.
    pub trust_bundle: Family<BundleLabel, Gauge>,
    /// `rotator_trust_bundle_refusals_total`: bundle changes offered by the issuer and refused.
    pub bundle_refusals: Counter,
    ready: Arc<AtomicBool>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let mut reg = Registry::default();
        let cert_expiration = Gauge::default();
        let rotations = Family::<ResultLabel, Counter>::default();
        let last_success = Gauge::default();
        let reloads = Family::<ResultLabel, Counter>::default();
        let trust_bundle = Family::<BundleLabel, Gauge>::default();
        let bundle_refusals = Counter::default();
        proxy_lib::register_metrics!(reg,
            cert_expiration => "rotator_cert_expiration_timestamp_seconds", "notAfter of the installed certificate (Unix seconds)";
            rotations => "rotator_rotations", "Renewal cycles that installed a certificate (success) or failed (failure)";
            last_success => "rotator_last_success_timestamp_seconds", "When the last rotation succeeded (Unix seconds)";
            reloads => "rotator_reloads", "Reload hook runs and verify checks, by result";
            trust_bundle => "rotator_trust_bundle_info", "The trust anchors the host trusts: fingerprint (SHA-256 short form) and signed sequence";
            bundle_refusals => "rotator_trust_bundle_refusals", "Trust bundle changes offered by the issuer and refused";
        );
        Self {
            registry: Arc::new(reg),
            cert_expiration,
            rotations,
            last_success,
            reloads,
            trust_bundle,
            bundle_refusals,
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Counts a rotation result.
    pub fn rotation(&self, ok: bool) {
        self.rotations.get_or_create(&label(ok)).inc();
    }

    /// Shows `trust` as the anchors the host trusts (the only series of the info metric).
    pub fn set_trust(&self, trust: &crate::trust::Trust) {
        self.trust_bundle.clear();
        let label = BundleLabel {
            fingerprint: proxy_lib::trust_bundle::short(&trust.fingerprint()).to_string(),
            sequence: trust
                .sequence()
                .map_or_else(|| "bootstrap".to_string(), |s| s.to_string()),
        };
        self.trust_bundle.get_or_create(&label).set(1);
    }

    /// Counts a reload (or verify) result.
    pub fn reload(&self, ok: bool) {
        self.reloads.get_or_create(&label(ok)).inc();
    }

    /// The count of rotations with this result.
    pub fn rotations_with(&self, ok: bool) -> u64 {
        self.rotations.get_or_create(&label(ok)).get()
    }

    /// The count of reloads with this result.
    pub fn reloads_with(&self, ok: bool) -> u64 {
        self.reloads.get_or_create(&label(ok)).get()
    }

    /// Marks whether a valid cert is installed (the `/ready` answer).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Whether `/ready` answers OK.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// The metrics text.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("encode");
        s
    }

    /// The admin router: `/metrics`, `/live`, `/ready`.
    pub fn router(&self) -> axum::Router {
        let ready = self.ready.clone();
        proxy_lib::admin::router(
            self.registry.clone(),
            Arc::new(move || ready.load(Ordering::SeqCst)),
        )
    }
}

fn label(ok: bool) -> ResultLabel {
    ResultLabel {
        result: if ok { "success" } else { "failure" }.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_match_the_spec() {
        let m = Metrics::new();
        m.rotation(true);
        m.rotation(false);
        m.reload(true);
        m.cert_expiration.set(123);
        m.last_success.set(100);
        let text = m.encode();
        for want in [
            "rotator_cert_expiration_timestamp_seconds 123",
            "rotator_rotations_total{result=\"success\"} 1",
            "rotator_rotations_total{result=\"failure\"} 1",
            "rotator_last_success_timestamp_seconds 100",
            "rotator_reloads_total{result=\"success\"} 1",
        ] {
            assert!(text.contains(want), "{want} missing from\n{text}");
        }
    }
}
