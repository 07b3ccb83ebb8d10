//! `/api/v1/jobs`: enqueue by kind, get, result, blocking wait, cancel, retry, list.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use dray_core::{
    AttemptError, CancelOutcome, EnqueueOptions, Enqueued, Error, JobFilter, Message, MessageState,
    Priority, QueueName,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::extract::{Body, P, Q, secs};
use crate::openapi::{ReadErrors, WriteErrors};
use crate::{App, ServerStore};

/// `POST /api/v1/jobs`: a job to enqueue. Options are those of the Rust API's
/// `EnqueueOptions`; a kind the server knows as a Rust type takes its defaults from the job.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    /// The job's kind (its name): what a worker's handler is registered under.
    #[schema(min_length = 1, max_length = 255)]
    pub kind: String,
    /// The job's input, any JSON (default null).
    #[serde(default)]
    pub input: Value,
    /// Queue (default: the known job's queue, else `default`).
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,128}$")]
    pub queue: Option<String>,
    /// Dedup key: while a job of this queue with the key is unfinished, enqueueing another
    /// answers that one's id with `duplicate: true`.
    #[schema(min_length = 1, max_length = 1024)]
    pub key: Option<String>,
    /// Priority, higher first (default: the known job's, else 0).
    pub priority: Option<i16>,
    /// Run no sooner than this many seconds from now (database clock).
    #[schema(minimum = 0, maximum = 3153600000_u64)]
    pub delay_secs: Option<f64>,
    /// Run no sooner than this time (exclusive with `delay_secs`).
    pub not_before: Option<DateTime<Utc>>,
    /// Headers handed to the handler.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Attempts before it is dead (default: the known job's retry policy, else 25).
    #[schema(minimum = 1)]
    pub max_attempts: Option<i32>,
    /// URL that receives a signed POST of the outcome when the job finishes.
    pub callback_url: Option<String>,
}

/// A job's outcome so far.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobResult {
    /// The job.
    pub id: Uuid,
    /// Its state.
    pub state: MessageState,
    /// Whether it has finished (completed, dead or cancelled).
    pub finished: bool,
    /// The output, once completed.
    pub result: Option<Value>,
    /// Every failed attempt, oldest first.
    pub errors: Vec<AttemptError>,
    /// Attempts made.
    pub attempts: i32,
}

impl From<Message> for JobResult {
    fn from(m: Message) -> Self {
        JobResult {
            id: m.id,
            state: m.state,
            finished: m.state.is_terminal(),
            result: m.result,
            errors: m.errors,
            attempts: m.attempt,
        }
    }
}

/// A page of jobs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobPage {
    /// The jobs.
    pub jobs: Vec<Message>,
    /// Pass as `before` for the next page; absent on the last one.
    pub next_before: Option<Uuid>,
}

/// Filters of `GET /api/v1/jobs`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this queue.
    #[param(pattern = "^[A-Za-z0-9_.:-]{1,128}$")]
    pub queue: Option<String>,
    /// Only this kind.
    #[param(min_length = 1, max_length = 255)]
    pub kind: Option<String>,
    /// Only this state: scheduled, available, running, retryable, completed, dead, cancelled.
    #[param(pattern = "^(scheduled|available|running|retryable|completed|dead|cancelled)$")]
    pub state: Option<String>,
    /// At most this many (1 to 1000, default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only jobs older than this id (the previous page's `next_before`).
    pub before: Option<Uuid>,
}

/// The timeout of `GET /api/v1/jobs/{id}/wait`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Longest wait in seconds (default and most: the server's max wait, 30 s unless set).
    #[param(minimum = 0, maximum = 3153600000_u64)]
    pub timeout_secs: Option<f64>,
}

fn not_found(id: Uuid) -> ApiError {
    Error::NotFound { id }.into()
}

pub(crate) fn location(path: String) -> HeaderValue {
    HeaderValue::from_str(&path).unwrap_or_else(|_| HeaderValue::from_static("/api/v1"))
}

/// Enqueue a job.
#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs", request_body = EnqueueRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retried POST safe: the same key answers the first request's answer", pattern = "^[!-~]{1,255}$")),
    responses(
        (status = 201, description = "Enqueued", body = Enqueued),
        (status = 200, description = "A job with this key is unfinished: its id, duplicate = true", body = Enqueued),
        WriteErrors))]
pub async fn enqueue<S: ServerStore>(
    State(app): State<App<S>>,
    Body(req): Body<EnqueueRequest>,
) -> ApiResult<Response> {
    if req.kind.is_empty() || req.kind.len() > 255 {
        return Err(ApiError::field("kind", "kind must be 1 to 255 bytes"));
    }
    let delay = req.delay_secs.map(|d| secs("delay_secs", d)).transpose()?;
    let adjust = move |mut options: EnqueueOptions| {
        if let Some(q) = req.queue {
            options = options.queue(q);
        }
        if let Some(k) = req.key {
            options = options.key(k);
        }
        if let Some(p) = req.priority {
            options = options.priority(Priority(p));
        }
        if let Some(d) = delay {
            options = options.delay(d);
        }
        if let Some(t) = req.not_before {
            options = options.not_before(t);
        }
        for (k, v) in req.headers {
            options = options.header(k, v);
        }
        if let Some(n) = req.max_attempts {
            options = options.max_attempts(n);
        }
        if let Some(url) = req.callback_url {
            options = options.callback_url(url);
        }
        options
    };
    let message = app
        .catalog()
        .message(app.client(), &req.kind, &req.input, Box::new(adjust))
        .map_err(|why| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_input",
                format!(
                    "the input does not fit job {:?}: {}",
                    req.kind,
                    dray_core::error::excerpt(&why)
                ),
            )
        })??;
    let queue_handle = app.client().queue();
    let e = queue_handle
        .enqueue_messages(std::slice::from_ref(&message))
        .await?
        .remove(0);
    let status = if e.duplicate {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let mut r = (status, Json(e)).into_response();
    r.headers_mut()
        .insert(header::LOCATION, location(format!("/api/v1/jobs/{}", e.id)));
    Ok(r)
}

/// One job, in any state.
#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses((status = 200, description = "The job", body = Message), ReadErrors))]
pub async fn get_job<S: ServerStore>(
    State(app): State<App<S>>,
    P(id): P<Uuid>,
) -> ApiResult<Json<Message>> {
    app.client()
        .get(id)
        .await?
        .map(Json)
        .ok_or_else(|| not_found(id))
}

/// A job's outcome: its result once completed, its errors.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/result", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses((status = 200, description = "The outcome so far (`finished` tells whether it is final)", body = JobResult), ReadErrors))]
pub async fn result<S: ServerStore>(
    State(app): State<App<S>>,
    P(id): P<Uuid>,
) -> ApiResult<Json<JobResult>> {
    let m = app.client().get(id).await?.ok_or_else(|| not_found(id))?;
    Ok(Json(m.into()))
}

/// Waits (blocking) for a job to finish, at most `timeout_secs`; answers its outcome then, or
/// the outcome so far (`finished: false`) when the time runs out.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/wait", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id"), WaitQuery),
    responses((status = 200, description = "The outcome, or the state so far when the wait ran out", body = JobResult), ReadErrors))]
pub async fn wait<S: ServerStore>(
    State(app): State<App<S>>,
    P(id): P<Uuid>,
    Q(q): Q<WaitQuery>,
) -> ApiResult<Json<JobResult>> {
    let max = app.config().max_wait;
    let timeout = match q.timeout_secs {
        Some(t) => secs("timeout_secs", t)?.min(max),
        None => max,
    };
    match app.client().wait(id, timeout).await {
        Ok(_) | Err(Error::Timeout(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let m = app.client().get(id).await?.ok_or_else(|| not_found(id))?;
    Ok(Json(m.into()))
}

/// Cancels a job: a queued one never runs, a running one is asked to stop.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses((status = 200, description = "What the cancel did", body = CancelOutcome), WriteErrors))]
pub async fn cancel<S: ServerStore>(
    State(app): State<App<S>>,
    P(id): P<Uuid>,
) -> ApiResult<Json<CancelOutcome>> {
    Ok(Json(app.client().cancel(id).await?))
}

/// Re-drives a dead or cancelled job with fresh attempts.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/retry", tag = "jobs",
    params(("id" = Uuid, Path, description = "Job id")),
    responses((status = 200, description = "The job, available again", body = Message), WriteErrors))]
pub async fn retry<S: ServerStore>(
    State(app): State<App<S>>,
    P(id): P<Uuid>,
) -> ApiResult<Json<Message>> {
    Ok(Json(app.client().retry(id).await?))
}

/// Lists jobs, newest first, a page at a time.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", params(ListQuery),
    responses((status = 200, description = "A page of jobs", body = JobPage), ReadErrors))]
pub async fn list<S: ServerStore>(
    State(app): State<App<S>>,
    Q(q): Q<ListQuery>,
) -> ApiResult<Json<JobPage>> {
    let limit = crate::extract::limit(q.limit, 50)?;
    if q.kind
        .as_deref()
        .is_some_and(|k| k.is_empty() || k.len() > 255)
    {
        return Err(ApiError::field("kind", "kind must be 1 to 255 bytes"));
    }
    let filter = JobFilter {
        queue: q.queue.map(QueueName::new).transpose()?,
        kind: q.kind,
        state: q
            .state
            .as_deref()
            .map(MessageState::parse)
            .transpose()
            .map_err(|e| ApiError::field("state", e.to_string()))?,
        before: q.before,
        limit,
    };
    let jobs = app.client().list(&filter).await?;
    let next_before = (jobs.len() == limit as usize)
        .then(|| jobs.last().map(|m| m.id))
        .flatten();
    Ok(Json(JobPage { jobs, next_before }))
}
