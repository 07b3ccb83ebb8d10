//! `/api/v1/queues`: every queue with its counts by state, and one queue's.

use axum::Json;
use axum::extract::State;
use dray_core::QueueName;
use dray_core::api::QueueCounts;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiResult;
use crate::extract::P;
use crate::openapi::ReadErrors;
use crate::{App, ServerStore};

/// Every queue that has jobs.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueueList {
    /// The queues, by name.
    pub queues: Vec<QueueCounts>,
}

/// Every queue with its jobs counted by state.
#[utoipa::path(get, path = "/api/v1/queues", tag = "queues",
    responses((status = 200, description = "The queues", body = QueueList), ReadErrors))]
pub async fn list<S: ServerStore>(State(app): State<App<S>>) -> ApiResult<Json<QueueList>> {
    Ok(Json(QueueList {
        queues: app.store().queue_list().await?,
    }))
}

/// One queue's jobs counted by state (all zero for a queue that has none).
#[utoipa::path(get, path = "/api/v1/queues/{queue}", tag = "queues",
    params(("queue" = String, Path, description = "Queue", pattern = "^[A-Za-z0-9_.:-]{1,128}$")),
    responses((status = 200, description = "The queue's counts", body = QueueCounts), ReadErrors))]
pub async fn stats<S: ServerStore>(
    State(app): State<App<S>>,
    P(queue): P<String>,
) -> ApiResult<Json<QueueCounts>> {
    let name = QueueName::new(queue.as_str())?;
    let stats = app.client().queue().stats(name.as_str()).await?;
    Ok(Json(QueueCounts { queue, stats }))
}
