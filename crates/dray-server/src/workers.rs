//! Workers over HTTP, so handlers in any language run Dray jobs: claim (long-poll) a batch of
//! a queue's jobs under a lease, heartbeat (extending the lease, with progress), complete
//! with a result, or fail (transient: retried with backoff; permanent: dead). Every write
//! names the attempt it is about and is fenced exactly as an in-process worker's: once the
//! lease was taken back (it expired and the job was claimed again, or it finished), the write
//! answers 409 `lease_lost` and changes nothing.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use dray_core::{
    Completion, Error, FailTo, FailureKind, LeaseRef, Message, MessageState, QueueName,
    ReceiveOptions, RetryPolicy,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::extract::{Body, P, secs};
use crate::openapi::WorkerErrors;
use crate::{App, ServerStore};

/// `POST /api/v1/queues/{queue}/claim`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// Most jobs to lease (1 to 1000, default 1).
    #[schema(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Lease length in seconds (default 30): heartbeat before it ends, or the job is taken
    /// back and run again.
    #[schema(minimum = 1, maximum = 3153600000_u64)]
    pub lease_secs: Option<f64>,
    /// Long-poll: wait up to this many seconds for a first job (default 0; at most the
    /// server's max wait).
    #[schema(minimum = 0, maximum = 3153600000_u64)]
    pub wait_secs: Option<f64>,
}

/// Jobs leased to the caller.
#[derive(Debug, Serialize, ToSchema)]
pub struct Claimed {
    /// The jobs: run each `kind` with its `payload`, then complete or fail it naming its
    /// `attempt`.
    pub jobs: Vec<Message>,
}

/// `POST …/heartbeat`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// The attempt the lease is for (the claimed job's `attempt`).
    #[schema(minimum = 1)]
    pub attempt: i32,
    /// New lease length from now, in seconds (default 30).
    #[schema(minimum = 1, maximum = 3153600000_u64)]
    pub lease_secs: Option<f64>,
    /// Progress, 0 to 100.
    #[schema(minimum = 0, maximum = 100)]
    pub progress: Option<u8>,
    /// A message to show with the progress.
    pub message: Option<String>,
}

/// What a heartbeat found.
#[derive(Debug, Serialize, ToSchema)]
pub struct Heartbeat {
    /// True when a cancel was requested: stop the work and fail the attempt.
    pub cancel_requested: bool,
}

/// `POST …/complete`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    /// The attempt that finished.
    #[schema(minimum = 1)]
    pub attempt: i32,
    /// The job's output, any JSON (default null).
    #[serde(default)]
    pub result: Value,
}

/// `POST …/fail`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailRequest {
    /// The attempt that failed.
    #[schema(minimum = 1)]
    pub attempt: i32,
    /// What went wrong (recorded in the job's errors).
    pub error: String,
    /// True: do not retry, the job is dead at once.
    #[serde(default)]
    pub permanent: bool,
    /// Retry after this many seconds (default: exponential backoff from 1 s, jittered).
    #[schema(minimum = 0, maximum = 3153600000_u64)]
    pub retry_in_secs: Option<f64>,
}

/// Where a failed attempt sent the job.
#[derive(Debug, Serialize, ToSchema)]
pub struct Failed {
    /// True when the job is dead (permanent, or out of attempts); false when it will run
    /// again.
    pub dead: bool,
}

/// An applied write.
#[derive(Debug, Serialize, ToSchema)]
pub struct Applied {
    /// Always true (a write that was not applied answers 409).
    pub applied: bool,
}

/// Longest error message recorded from an HTTP worker, in bytes.
const MAX_ERROR_LEN: usize = 8192;

/// `s` cut to at most `max` bytes, at a character boundary.
fn cap(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn lost(id: Uuid, attempt: i32) -> ApiError {
    Error::LeaseLost { id, attempt }.into()
}

fn lease_of(id: Uuid, attempt: i32) -> ApiResult<LeaseRef> {
    if attempt < 1 {
        return Err(ApiError::field(
            "attempt",
            format!("attempt must be at least 1 (the claimed job's attempt), got {attempt}"),
        ));
    }
    Ok(LeaseRef {
        id,
        attempt: Some(attempt),
    })
}

/// Lease a batch of the queue's due jobs, waiting up to `wait_secs` for a first one.
#[utoipa::path(post, path = "/api/v1/queues/{queue}/claim", tag = "workers",
    params(("queue" = String, Path, description = "Queue", pattern = "^[A-Za-z0-9_.:-]{1,128}$")),
    request_body = ClaimRequest,
    responses((status = 200, description = "The leased jobs (none when the wait ran out)", body = Claimed), WorkerErrors))]
pub async fn claim<S: ServerStore>(
    State(app): State<App<S>>,
    P(queue): P<String>,
    Body(req): Body<ClaimRequest>,
) -> ApiResult<Json<Claimed>> {
    QueueName::new(queue.as_str())?;
    let limit = crate::extract::limit(req.limit, 1)?;
    let lease = crate::extract::lease(req.lease_secs)?;
    let wait = match req.wait_secs {
        Some(s) => secs("wait_secs", s)?.min(app.config().max_wait),
        None => Duration::ZERO,
    };
    let options = ReceiveOptions {
        limit,
        wait,
        lease: Some(lease),
    };
    let mut stop = app.shutdown_signal();
    let jobs = app
        .client()
        .queue()
        .receive_until(&queue, &options, async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await?;
    Ok(Json(Claimed { jobs }))
}

/// Extend a running job's lease, and record its progress.
#[utoipa::path(post, path = "/api/v1/queues/{queue}/jobs/{id}/heartbeat", tag = "workers",
    params(("queue" = String, Path, description = "Queue", pattern = "^[A-Za-z0-9_.:-]{1,128}$"), ("id" = Uuid, Path, description = "Job id")),
    request_body = HeartbeatRequest,
    responses((status = 200, description = "The lease is extended", body = Heartbeat), WorkerErrors))]
pub async fn heartbeat<S: ServerStore>(
    State(app): State<App<S>>,
    P((queue, id)): P<(String, Uuid)>,
    Body(req): Body<HeartbeatRequest>,
) -> ApiResult<Json<Heartbeat>> {
    let queue = QueueName::new(queue)?;
    let lease_ref = lease_of(id, req.attempt)?;
    let lease = crate::extract::lease(req.lease_secs)?;
    if let Some(p) = req.progress
        && p > 100
    {
        return Err(ApiError::field(
            "progress",
            format!("progress must be 0 to 100, got {p}"),
        ));
    }
    let store = app.store();
    let w = store
        .message_extend_many(&queue, &[lease_ref], lease)
        .await?;
    if !w.applied.contains(&id) {
        return Err(lost(id, req.attempt));
    }
    if let Some(p) = req.progress {
        let w = store
            .job_progress(
                lease_ref,
                p,
                req.message
                    .as_deref()
                    .map(dray_core::Error::storable)
                    .as_deref(),
            )
            .await?;
        if !w.applied.contains(&id) {
            return Err(lost(id, req.attempt));
        }
        dray_core::changes::record_progress(store.wake().changes(), &queue, lease_ref, &w, p);
    }
    Ok(Json(Heartbeat {
        cancel_requested: w.cancel_requested.contains(&id),
    }))
}

/// Complete a running job with its result.
#[utoipa::path(post, path = "/api/v1/queues/{queue}/jobs/{id}/complete", tag = "workers",
    params(("queue" = String, Path, description = "Queue", pattern = "^[A-Za-z0-9_.:-]{1,128}$"), ("id" = Uuid, Path, description = "Job id")),
    request_body = CompleteRequest,
    responses((status = 200, description = "Recorded as completed", body = Applied), WorkerErrors))]
pub async fn complete<S: ServerStore>(
    State(app): State<App<S>>,
    P((queue, id)): P<(String, Uuid)>,
    Body(req): Body<CompleteRequest>,
) -> ApiResult<Json<Applied>> {
    let queue = QueueName::new(queue)?;
    let lease = lease_of(id, req.attempt)?;
    let result = (!req.result.is_null())
        .then(|| serde_json::to_string(&req.result))
        .transpose()
        .map_err(Error::from)?;
    let w = app
        .store()
        .job_complete_many(&[Completion { lease, result }])
        .await?;
    if !w.applied.contains(&id) {
        return Err(lost(id, req.attempt));
    }
    app.store().wake().changes().record_write(
        queue.as_str(),
        &[lease],
        &w,
        MessageState::Completed,
    );
    Ok(Json(Applied { applied: true }))
}

/// Fail a running job's attempt: retried later, or dead when permanent or out of attempts.
#[utoipa::path(post, path = "/api/v1/queues/{queue}/jobs/{id}/fail", tag = "workers",
    params(("queue" = String, Path, description = "Queue", pattern = "^[A-Za-z0-9_.:-]{1,128}$"), ("id" = Uuid, Path, description = "Job id")),
    request_body = FailRequest,
    responses((status = 200, description = "Recorded", body = Failed), WorkerErrors))]
pub async fn fail<S: ServerStore>(
    State(app): State<App<S>>,
    P((queue, id)): P<(String, Uuid)>,
    Body(req): Body<FailRequest>,
) -> ApiResult<Json<Failed>> {
    let queue = QueueName::new(queue)?;
    let lease = lease_of(id, req.attempt)?;
    let (kind, to) = if req.permanent {
        (FailureKind::Permanent, FailTo::Dead)
    } else {
        let delay = match req.retry_in_secs {
            Some(s) => secs("retry_in_secs", s)?,
            None => RetryPolicy::default().delay(req.attempt, id.as_u128() as u64),
        };
        (FailureKind::Error, FailTo::Retry(delay))
    };
    let message = dray_core::Error::storable(cap(&req.error, MAX_ERROR_LEN));
    let w = app.store().job_fail(lease, kind, &message, to).await?;
    if !w.applied.contains(&id) {
        return Err(lost(id, req.attempt));
    }
    app.store()
        .wake()
        .changes()
        .record_write(queue.as_str(), &[lease], &w, to.next_state());
    Ok(Json(Failed {
        dead: to == FailTo::Dead || w.dead.contains(&id),
    }))
}
