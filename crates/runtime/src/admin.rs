//! The admin listener: `/healthz`, `/readyz` and `/metrics`, on a port of its own.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::health::Health;

/// `/healthz` and `/readyz` with every check's name and error (the admin port: check errors
/// name hosts, users and causes, for the operator and the probes only).
pub fn health_routes(health: Health) -> Router {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(readyz)).with_state(health)
}

/// `/healthz` and `/readyz` for a public port: the same status and status code, and nothing
/// else (`{"status":"ready"}`, `degraded` or `unready`).
pub fn public_health_routes(health: Health) -> Router {
    Router::new().route("/healthz", get(healthz)).route("/readyz", get(public_readyz)).with_state(health)
}

pub fn router(health: Health, metrics: PrometheusHandle) -> Router {
    Router::new().route("/metrics", get(render_metrics)).with_state(metrics).merge(health_routes(health))
}

/// Routes a process adds to its admin listener once it has built them (the API's on-call
/// console, when it is served there): every path the admin routes do not answer goes to them.
pub type Extension = std::sync::Arc<std::sync::OnceLock<Router>>;

async fn extension_fallback(extension: Extension, request: axum::extract::Request) -> Response {
    use tower::ServiceExt as _;
    match extension.get() {
        Some(routes) => match routes.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Binds `addr` and serves the admin routes until `shutdown` is cancelled. Binding happens
/// before this returns, so a port clash is reported at start-up.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    metrics: PrometheusHandle,
    extension: Extension,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the admin listener on {addr}: {e}"))?;
    let local = listener.local_addr()?;
    let app = router(health, metrics).fallback(move |request| extension_fallback(extension.clone(), request));
    let task = tokio::spawn(async move {
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin listener failed");
        }
    });
    Ok((local, task))
}

/// Writes the addresses a process listens on (`(listener name, address)`) to `path` as a JSON
/// object, when a path is given (`CommonArgs::addr_file`): through a temporary file renamed
/// into place, so a reader sees the whole file or none.
pub fn write_addr_file(path: Option<&std::path::Path>, listeners: &[(&str, SocketAddr)]) -> anyhow::Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    let addrs: serde_json::Map<String, serde_json::Value> =
        listeners.iter().map(|(name, addr)| ((*name).to_owned(), addr.to_string().into())).collect();
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".partial");
    std::fs::write(&temporary, serde_json::Value::Object(addrs).to_string())
        .map_err(|e| anyhow::anyhow!("cannot write the address file {}: {e}", path.display()))?;
    std::fs::rename(&temporary, path)
        .map_err(|e| anyhow::anyhow!("cannot move the address file into place at {}: {e}", path.display()))?;
    Ok(())
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(health): State<Health>) -> Response {
    let report = health.report(Duration::from_secs(2)).await;
    let status = if report.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(report)).into_response()
}

async fn public_readyz(State(health): State<Health>) -> Response {
    let report = health.report(Duration::from_secs(2)).await;
    let status = if report.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(serde_json::json!({ "status": report.status }))).into_response()
}

async fn render_metrics(State(metrics): State<PrometheusHandle>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], metrics.render()).into_response()
}
