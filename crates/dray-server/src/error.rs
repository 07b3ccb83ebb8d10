//! Errors as RFC 9457 problem details (`application/problem+json`), with a stable `type` per
//! kind: the same codes as [`dray_core::Error::code`], plus the HTTP layer's own.

use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::{App, ServerStore};

/// Prefix of every problem `type`: `urn:dray:problem:<code>`.
pub const PROBLEM_TYPE_PREFIX: &str = "urn:dray:problem:";

/// An RFC 9457 problem body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Problem {
    /// `urn:dray:problem:<code>`: stable, one per kind of error.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What was wrong with this request, and what to do.
    pub detail: String,
    /// The stable code alone (`not_found`, `lease_lost`, …), as the Rust `Error::code`.
    pub code: String,
    /// The input field at fault, when one is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error answer: status, code and detail, rendered as a [`Problem`].
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    detail: String,
    field: Option<String>,
}

impl ApiError {
    /// An error with this status, code and detail.
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            detail: detail.into(),
            field: None,
        }
    }

    /// A 400 about input field `field`.
    pub fn field(field: &str, detail: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_argument",
            detail: detail.into(),
            field: Some(field.to_owned()),
        }
    }

    /// The status it answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// Its stable code.
    pub fn code(&self) -> &'static str {
        self.code
    }
}

fn title(status: StatusCode) -> String {
    status.canonical_reason().unwrap_or("Error").to_owned()
}

impl From<dray_core::Error> for ApiError {
    fn from(e: dray_core::Error) -> Self {
        use dray_core::Error as E;
        let status = match &e {
            E::InvalidQueueName { .. }
            | E::InvalidArgument { .. }
            | E::DelayConflict
            | E::Payload(_)
            | E::InvalidUrl { .. } => StatusCode::BAD_REQUEST,
            E::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            E::NotFound { .. } | E::RunNotFound { .. } => StatusCode::NOT_FOUND,
            E::LeaseLost { .. } | E::AlreadyStarted { .. } | E::RunFinished { .. } => {
                StatusCode::CONFLICT
            }
            E::JobFailed { .. } | E::WorkflowFailed { .. } => StatusCode::CONFLICT,
            E::Connect { .. }
            | E::PoolExhausted { .. }
            | E::ReadOnly { .. }
            | E::StorageFull { .. }
            | E::SchemaTooNew { .. }
            | E::SchemaOutdated { .. } => StatusCode::SERVICE_UNAVAILABLE,
            E::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let field = match &e {
            E::InvalidArgument { what, .. } => Some((*what).to_owned()),
            E::InvalidQueueName { .. } => Some("queue".to_owned()),
            E::DelayConflict => Some("delay_secs".to_owned()),
            E::PayloadTooLarge { .. } => Some("input".to_owned()),
            _ => None,
        };
        if status.is_server_error() {
            tracing::warn!(target: "dray::http", code = e.code(), error = %e, "dray: request failed");
        }
        ApiError {
            status,
            code: e.code(),
            detail: e.to_string(),
            field,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            kind: format!("{PROBLEM_TYPE_PREFIX}{}", self.code),
            title: title(self.status),
            status: self.status.as_u16(),
            detail: self.detail,
            code: self.code.to_owned(),
            field: self.field,
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"dray\""),
            );
        }
        response
    }
}

/// Shorthand for handler results.
pub type ApiResult<T> = Result<T, ApiError>;

/// Any path that is not a route.
pub async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no_route",
        format!(
            "no route {} {}; the routes are listed in /api/v1/openapi.json",
            req.method(),
            dray_core::error::excerpt(req.uri().path())
        ),
    )
}

/// A handler that panicked: 500 with a problem body; the server goes on serving.
pub fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned());
    tracing::error!(target: "dray::http", panic = %what, "dray: a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the server failed while answering this request (a bug: it is logged); the request may not have been applied, check before retrying",
    )
    .into_response()
}

/// Ends a request that runs past [`crate::ServerConfig::request_timeout`] with 503.
pub async fn timeout<S: ServerStore>(
    State(app): State<App<S>>,
    req: Request,
    next: Next,
) -> Response {
    let limit = app.config().request_timeout;
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "request_timeout",
            format!(
                "the request took longer than the server's limit of {}; the database may be slow or unreachable. It may or may not have been applied: retry with the same Idempotency-Key",
                dray_core::format_duration(limit)
            ),
        )
        .into_response(),
    }
}

/// Logs each request at `debug` (target `dray::http`): method, path, status and duration; a
/// 5xx at `warn`. Never headers or query strings, so a token never reaches a log line.
pub async fn log_request(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let start = std::time::Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16();
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    if status >= 500 {
        tracing::warn!(target: "dray::http", %method, path = %dray_core::error::excerpt(&path), status, duration_ms = ms, "dray: request failed");
    } else {
        tracing::debug!(target: "dray::http", %method, path = %dray_core::error::excerpt(&path), status, duration_ms = ms, "dray: request");
    }
    response
}

/// The CORS layer for `origins` (none when empty).
pub fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, Any, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new()
        .allow_methods([
            axum::http::Method::GET,
            axum::http::Method::POST,
            axum::http::Method::DELETE,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("idempotency-key"),
            header::HeaderName::from_static("last-event-id"),
        ])
        .max_age(Duration::from_secs(600));
    Some(if origins.iter().any(|o| o == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        layer.allow_origin(AllowOrigin::list(list))
    })
}
