//! Prometheus metrics: a recorder for the [`metrics`] facade that Dray records through, and
//! the `/metrics` text exposition, on the API's router (scope `read`) or on an address of its
//! own for a worker process ([`serve`]).
//!
//! [`install`] once, at start, before the first job is enqueued or run in the process (Dray
//! caches its metric handles; handles made before a recorder exists record nothing). An
//! application that installs a recorder of its own (another exporter, or a fan-out) keeps it:
//! Dray's metrics go there, and `/metrics` answers 404 with a problem body saying so.
//!
//! Every metric is listed, with its type, labels and meaning, in the observability guide
//! (`dray::guide::observability`).

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::ApiError;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Why a Prometheus recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot install the Prometheus recorder: {0} (a process has one global metrics recorder; \
     if the application installs its own, Dray's metrics go to it and /metrics stays off)"
)]
pub struct InstallError(String);

/// Installs a Prometheus recorder as the process's global `metrics` recorder (every `_seconds`
/// histogram with [`dray_core::metrics::SECONDS_BUCKETS`]) and describes Dray's metrics;
/// returns its handle. Installing twice returns the first handle. Called inside a Tokio
/// runtime, it also starts the recorder's upkeep (every 5 s); `/metrics` runs it on each
/// scrape besides.
pub fn install() -> Result<PrometheusHandle, InstallError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Suffix("_seconds".to_owned()),
            dray_core::metrics::SECONDS_BUCKETS,
        )
        .map_err(|e| InstallError(e.to_string()))?
        .install_recorder()
        .map_err(|e| InstallError(e.to_string()))?;
    dray_core::metrics::describe();
    let handle = HANDLE.get_or_init(|| handle).clone();
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        let h = handle.clone();
        rt.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                h.run_upkeep();
            }
        });
    }
    Ok(handle)
}

/// The installed handle, if [`install`] ran.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE.get()
}

/// The current exposition text, or a problem when no Prometheus recorder is installed.
pub(crate) fn render() -> Response {
    match HANDLE.get() {
        Some(h) => {
            h.run_upkeep();
            ([(header::CONTENT_TYPE, CONTENT_TYPE)], h.render()).into_response()
        }
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics_off",
            "metrics are off in this process: it has no Prometheus recorder (dray serve installs \
             one; an embedding application calls dray_server::metrics::install() at start)",
        )
        .into_response(),
    }
}

/// `GET /metrics`: Prometheus text exposition of Dray's metrics (and any other the process
/// records through the `metrics` facade).
#[utoipa::path(get, path = "/metrics", tag = "health", responses(
    (status = 200, description = "Prometheus text exposition format 0.0.4", body = String, content_type = "text/plain"),
    (status = 401, description = "No or bad token", body = crate::error::Problem, content_type = "application/problem+json"),
    (status = 403, description = "The token lacks the read scope", body = crate::error::Problem, content_type = "application/problem+json"),
    (status = 404, description = "Metrics are off in this process", body = crate::error::Problem, content_type = "application/problem+json")))]
pub(crate) async fn scrape() -> Response {
    render()
}

/// A router with `GET /metrics` alone, without authentication: for a worker process's own
/// address (bind it to a private interface; `dray serve` serves `/metrics` behind the `read`
/// scope instead).
pub fn router() -> Router {
    Router::new().route("/metrics", get(scrape))
}

/// Installs the recorder (see [`install`]) and serves [`router`] on `listener` until `stop`
/// resolves: the metrics endpoint of a worker that runs no API.
pub async fn serve(
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    install().map_err(std::io::Error::other)?;
    axum::serve(listener, router())
        .with_graceful_shutdown(stop)
        .await
}
