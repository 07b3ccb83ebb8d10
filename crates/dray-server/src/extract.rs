//! Extractors whose rejections are problem bodies: a JSON body, a query string, path segments.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A JSON body; a bad one is 400 (not JSON), 415 (no JSON content type), 413 (too large)
/// or 422 (JSON of the wrong shape, naming the field).
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Body(v)),
            Err(e) => Err(json_rejection(e)),
        }
    }
}

fn json_rejection(e: JsonRejection) -> ApiError {
    let status = e.status();
    let (code, detail) = match &e {
        JsonRejection::JsonDataError(_) => (
            "invalid_body",
            format!(
                "the body does not match this route's schema: {}; see /api/v1/openapi.json",
                source_text(&e)
            ),
        ),
        JsonRejection::JsonSyntaxError(_) => (
            "invalid_json",
            format!("the body is not valid JSON: {}", source_text(&e)),
        ),
        JsonRejection::MissingJsonContentType(_) => (
            "unsupported_media_type",
            "send the body as JSON, with Content-Type: application/json".to_owned(),
        ),
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => (
            "body_too_large",
            "the body is larger than the server accepts (ServerConfig::body_limit, `dray serve --body-limit`); store large data elsewhere and send a reference".to_owned(),
        ),
        _ => ("invalid_body", e.body_text()),
    };
    ApiError::new(status, code, detail)
}

/// The innermost error message of a rejection (serde's, naming the field and position).
fn source_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut inner: &dyn std::error::Error = e;
    while let Some(next) = inner.source() {
        inner = next;
    }
    let text = inner.to_string();
    if text.len() <= 400 {
        return text;
    }
    let mut end = 400;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A query string; a bad one is 400 naming the parameter.
pub struct Q<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Q(v)),
            Err(e) => Err(query_rejection(e)),
        }
    }
}

fn query_rejection(e: QueryRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_query",
        format!("bad query string: {}", source_text(&e)),
    )
}

/// Path segments; a bad one (an id that is not a UUID) is 400.
pub struct P<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for P<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(P(v)),
            Err(e) => Err(path_rejection(e)),
        }
    }
}

fn path_rejection(e: PathRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_path",
        format!("bad path parameter: {}", source_text(&e)),
    )
}

/// Seconds as a [`std::time::Duration`]: refused (400 naming `field`) when negative, not a
/// number, or beyond Dray's longest span.
pub fn secs(field: &str, v: f64) -> Result<std::time::Duration, ApiError> {
    let d = std::time::Duration::try_from_secs_f64(v).map_err(|_| {
        ApiError::field(
            field,
            format!("{field} must be a number of seconds from 0, got {v}"),
        )
    })?;
    if d > dray_core::duration::MAX_SPAN {
        return Err(ApiError::field(
            field,
            format!(
                "{field} must be at most {} seconds, got {v}",
                dray_core::duration::MAX_SPAN.as_secs()
            ),
        ));
    }
    Ok(d)
}

/// A listing's `limit`: `default` when absent, else 1 to 1000 (400 naming `limit` otherwise).
pub fn limit(given: Option<u32>, default: u32) -> Result<u32, ApiError> {
    let limit = given.unwrap_or(default);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::field(
            "limit",
            format!("limit must be 1 to 1000, got {limit}"),
        ));
    }
    Ok(limit)
}

/// A lease length in seconds: `DEFAULT_LEASE` when absent, else at least one second (400
/// naming `lease_secs` otherwise).
pub fn lease(given: Option<f64>) -> Result<std::time::Duration, ApiError> {
    let lease = match given {
        Some(s) => secs("lease_secs", s)?,
        None => dray_core::queue::DEFAULT_LEASE,
    };
    if lease < std::time::Duration::from_secs(1) {
        return Err(ApiError::field(
            "lease_secs",
            "lease_secs must be at least 1 second",
        ));
    }
    Ok(lease)
}
