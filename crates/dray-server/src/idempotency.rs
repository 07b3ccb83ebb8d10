//! `Idempotency-Key` on POSTs: the first request with a key runs and its answer is kept (for
//! [`crate::ServerConfig::idempotency_retention`]); a retry with the same key and the same
//! request gets that answer again (with `Idempotent-Replayed: true`) and changes nothing. The
//! same key with another body is 422; a retry while the first is still running is 409.
//! Keys are scoped by token and route. Answers of 5xx are not kept, so such a request can be retried.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use dray_core::api::{IdempotencyBegin, MAX_IDEMPOTENCY_KEY};
use sha2::{Digest, Sha256};

use crate::auth::Caller;
use crate::error::ApiError;
use crate::{App, ServerStore};

/// The request header.
pub const HEADER: &str = "idempotency-key";

fn check_key(value: &HeaderValue) -> Result<String, ApiError> {
    let bad = || {
        ApiError::field(
            "Idempotency-Key",
            format!(
                "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters (a UUID is a good choice)"
            ),
        )
    };
    let key = value.to_str().map_err(|_| bad())?;
    if key.is_empty()
        || key.len() > MAX_IDEMPOTENCY_KEY
        || !key.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad());
    }
    Ok(key.to_owned())
}

/// The middleware (on the routes that write).
pub async fn layer<S: ServerStore>(
    State(app): State<App<S>>,
    req: Request,
    next: Next,
) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let Some(value) = req.headers().get(HEADER).cloned() else {
        return next.run(req).await;
    };
    match run(app, req, next, value).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn run<S: ServerStore>(
    app: App<S>,
    req: Request,
    next: Next,
    value: HeaderValue,
) -> Result<Response, ApiError> {
    let key = check_key(&value)?;
    let scope = req
        .extensions()
        .get::<Caller>()
        .map_or_else(|| "anonymous".to_owned(), Caller::scope);
    let (parts, body) = req.into_parts();
    // Keys are per token and per route: the same key on another route is another request.
    let scope = format!("{scope} {} {}", parts.method, parts.uri.path());
    let bytes = axum::body::to_bytes(body, app.config().body_limit)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the body is larger than the server accepts",
            )
        })?;
    let fingerprint = format!("{:x}", Sha256::digest(&bytes));
    match app
        .store()
        .idempotency_begin(&scope, &key, &fingerprint)
        .await?
    {
        IdempotencyBegin::New => {}
        IdempotencyBegin::InProgress { .. } => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_in_progress",
                "a request with this Idempotency-Key is still being processed; retry it in a moment",
            ));
        }
        IdempotencyBegin::Done {
            fingerprint: earlier,
            status,
            body,
        } => {
            if earlier != fingerprint {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used on this route with another body; use a new key for a new request",
                ));
            }
            return Ok(replay(status, body));
        }
    }
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let (parts, body) = response.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(_) => {
            app.store().idempotency_release(&scope, &key).await?;
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the answer could not be read back; retry with the same key",
            ));
        }
    };
    if parts.status.is_server_error() {
        app.store().idempotency_release(&scope, &key).await?;
    } else {
        let text = String::from_utf8_lossy(&bytes);
        app.store()
            .idempotency_finish(&scope, &key, parts.status.as_u16(), &text)
            .await?;
    }
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

fn replay(status: u16, body: String) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    let content_type = if status.is_success() {
        "application/json"
    } else {
        "application/problem+json"
    };
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut().insert(
        header::HeaderName::from_static("idempotent-replayed"),
        HeaderValue::from_static("true"),
    );
    r
}

/// Deletes kept answers past the retention, hourly.
pub async fn prune_loop<S: ServerStore>(app: App<S>) {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        every.tick().await;
        if let Err(e) = app
            .store()
            .idempotency_prune(app.config().idempotency_retention)
            .await
        {
            tracing::warn!(target: "dray::http", error = %e, "dray: pruning idempotency keys failed; retrying in an hour");
        }
    }
}
