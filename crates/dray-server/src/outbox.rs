//! `/api/v1/outbox/{outbox}`: counts by status, the events, and a requeue of failed ones.

use axum::Json;
use axum::extract::State;
use dray_core::outbox::{OutboxRow, OutboxStats, OutboxStatus};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ApiResult};
use crate::extract::{P, Q};
use crate::openapi::{ReadErrors, WriteErrors};
use crate::{App, ServerStore};

/// An outbox's events, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventList {
    /// The events.
    pub events: Vec<OutboxRow>,
}

/// How many failed events went back to pending.
#[derive(Debug, Serialize, ToSchema)]
pub struct Requeued {
    /// Events requeued.
    pub requeued: u64,
}

/// `GET …/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this status: pending, processing, published, failed.
    #[param(pattern = "^(pending|processing|published|failed)$")]
    pub status: Option<String>,
    /// At most this many (1 to 1000, default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// An outbox's events counted by status.
#[utoipa::path(get, path = "/api/v1/outbox/{outbox}/stats", tag = "outbox",
    params(("outbox" = String, Path, description = "Outbox", pattern = "^[A-Za-z0-9_.:-]{1,128}$")),
    responses((status = 200, description = "The counts", body = OutboxStats), ReadErrors))]
pub async fn stats<S: ServerStore>(
    State(app): State<App<S>>,
    P(outbox): P<String>,
) -> ApiResult<Json<OutboxStats>> {
    Ok(Json(app.client().outbox_stats(&outbox).await?))
}

/// An outbox's events, newest first.
#[utoipa::path(get, path = "/api/v1/outbox/{outbox}/events", tag = "outbox",
    params(("outbox" = String, Path, description = "Outbox", pattern = "^[A-Za-z0-9_.:-]{1,128}$"), ListQuery),
    responses((status = 200, description = "The events", body = EventList), ReadErrors))]
pub async fn list<S: ServerStore>(
    State(app): State<App<S>>,
    P(outbox): P<String>,
    Q(q): Q<ListQuery>,
) -> ApiResult<Json<EventList>> {
    let limit = crate::extract::limit(q.limit, 50)?;
    let status = q
        .status
        .as_deref()
        .map(OutboxStatus::parse)
        .transpose()
        .map_err(|e| ApiError::field("status", e.to_string()))?;
    let events = app.client().outbox_list(&outbox, status, limit).await?;
    Ok(Json(EventList { events }))
}

/// Puts an outbox's failed events back to pending, with fresh attempts.
#[utoipa::path(post, path = "/api/v1/outbox/{outbox}/requeue-failed", tag = "outbox",
    params(("outbox" = String, Path, description = "Outbox", pattern = "^[A-Za-z0-9_.:-]{1,128}$")),
    responses((status = 200, description = "Requeued", body = Requeued), WriteErrors))]
pub async fn requeue_failed<S: ServerStore>(
    State(app): State<App<S>>,
    P(outbox): P<String>,
) -> ApiResult<Json<Requeued>> {
    let requeued = app.client().outbox_requeue_failed(&outbox, None).await?;
    Ok(Json(Requeued { requeued }))
}
