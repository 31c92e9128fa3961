//! The proxy's admin routes: the shared `/metrics`, `/live`, `/ready` plus `POST /reload`,
//! which reloads the certificate set and answers with the fingerprint now served.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::proxy::reload::Reloader;

/// Body of a `POST /reload` answer.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReloadResponse {
    /// `ok` or `error`.
    pub result: &'static str,
    /// SHA-256 (hex) of the leaf served now (the previous one when the reload was refused;
    /// absent when nothing was ever loaded).
    pub sha256: Option<String>,
    /// Serial (hex) of the leaf served now.
    pub serial: Option<String>,
    /// notAfter of the leaf served now, RFC 3339.
    pub not_after: Option<String>,
    /// Why the reload was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `/metrics`, `/live`, `/ready` (ready = a valid, unexpired certificate is loaded) and
/// `POST /reload` (200 with the new fingerprint; 422 with the reason when the set on disk is
/// refused, the old one staying in use).
pub fn router(reloader: Arc<Reloader>, registry: Arc<Registry>) -> Router {
    let ready = reloader.clone();
    crate::admin::router(registry, Arc::new(move || ready.is_ready())).merge(
        Router::new()
            .route("/reload", post(reload))
            .with_state(reloader),
    )
}

async fn reload(State(reloader): State<Arc<Reloader>>) -> (StatusCode, Json<ReloadResponse>) {
    let r = reloader.clone();
    let outcome = tokio::task::spawn_blocking(move || r.reload())
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let current = reloader.current();
    let mut body = ReloadResponse {
        result: "ok",
        sha256: current.as_ref().map(|c| c.leaf.sha256.clone()),
        serial: current.as_ref().map(|c| c.leaf.serial.clone()),
        not_after: current
            .as_ref()
            .map(|c| crate::clock::rfc3339(c.leaf.not_after)),
        error: None,
    };
    match outcome {
        Ok(_) => (StatusCode::OK, Json(body)),
        Err(reason) => {
            body.result = "error";
            body.error = Some(reason);
            (StatusCode::UNPROCESSABLE_ENTITY, Json(body))
        }
    }
}
