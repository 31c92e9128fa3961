//! The admin HTTP endpoints every binary serves: `/metrics` (Prometheus text), `/live` and
//! `/ready`. Crates add their own routes (e.g. the proxy's `POST /reload`) by merging routers.

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;

/// Registers metrics in a `prometheus_client` registry under their public names, one line
/// each: `metric => "name", "help"`. Counters get their `_total` suffix from the registry.
///
/// ```
/// use prometheus_client::metrics::counter::Counter;
/// let mut registry = prometheus_client::registry::Registry::default();
/// let requests = Counter::<u64>::default();
/// proxy_lib::register_metrics!(registry,
///     requests => "app_requests", "Requests served";
/// );
/// requests.inc();
/// let mut text = String::new();
/// prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
/// assert!(text.contains("app_requests_total 1"));
/// ```
#[macro_export]
macro_rules! register_metrics {
    ($registry:expr, $($metric:expr => $name:literal, $help:literal);+ $(;)?) => {
        $( $registry.register($name, $help, $metric.clone()); )+
    };
}

/// A readiness probe: true when the process can do its job.
pub type ReadyFn = Arc<dyn Fn() -> bool + Send + Sync>;

/// Content type of the metrics text (OpenMetrics, which Prometheus scrapes natively).
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `/metrics`, `/live` and `/ready` routes.
pub fn router(registry: Arc<Registry>, ready: ReadyFn) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move { metrics_response(&registry) }
            }),
        )
        .route("/live", get(|| async { (StatusCode::OK, "live\n") }))
        .route(
            "/ready",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready() {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        )
}

/// Encodes a registry as an HTTP response.
pub fn metrics_response(registry: &Registry) -> axum::response::Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, registry) {
        Ok(()) => ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use prometheus_client::metrics::counter::Counter;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tower::ServiceExt;

    #[tokio::test]
    async fn serves_metrics_liveness_and_readiness() {
        let mut reg = Registry::default();
        let c = Counter::<u64>::default();
        reg.register("demo_events", "events", c.clone());
        c.inc_by(3);
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        let app = router(Arc::new(reg), Arc::new(move || f2.load(Ordering::SeqCst)));

        let get = |uri: &str| Request::builder().uri(uri).body(Body::empty()).unwrap();
        let resp = app.clone().oneshot(get("/metrics")).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert!(String::from_utf8_lossy(&body).contains("demo_events_total 3"));

        assert_eq!(
            app.clone().oneshot(get("/live")).await.unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(
            app.clone().oneshot(get("/ready")).await.unwrap().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        flag.store(true, Ordering::SeqCst);
        assert_eq!(
            app.oneshot(get("/ready")).await.unwrap().status(),
            StatusCode::OK
        );
    }
}
