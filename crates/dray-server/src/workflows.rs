//! `/api/v1/workflows`: start by name (with a stable `workflow_id`), describe with steps,
//! signal, query, result, cancel, restart from a step, list.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use dray_core::workflow::{RunCancel, RunFilter, RunInfo};
use dray_core::{RunStatus, StartOptions};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::extract::{Body, P, Q};
use crate::jobs::location;
use crate::openapi::{ReadErrors, WriteErrors};
use crate::{App, ServerStore};

/// `POST /api/v1/workflows`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The workflow's name (one the server knows).
    pub name: String,
    /// Its input (checked against the workflow's input type).
    #[serde(default)]
    pub input: Value,
    /// A stable id: a second start with it answers the first run (Forze's `workflow_id`).
    pub workflow_id: Option<String>,
    /// Answer 409 instead of the existing run when the id is taken (Forze's
    /// `raise_on_already_started`).
    #[serde(default)]
    pub raise_on_already_started: bool,
}

/// A started (or found) run.
#[derive(Debug, Serialize, ToSchema)]
pub struct Started {
    /// The run's id.
    pub run_id: Uuid,
    /// True when the workflow id was taken and this is that run.
    pub existing: bool,
}

/// `POST …/signals`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// The signal's name (what `wait_for_signal` waits for).
    pub name: String,
    /// Its payload.
    #[serde(default)]
    pub payload: Value,
}

/// A delivered signal.
#[derive(Debug, Serialize, ToSchema)]
pub struct Signalled {
    /// The signal's id.
    pub signal_id: Uuid,
}

/// `POST …/restart`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartRequest {
    /// The step to run again (with every step after it).
    pub step: String,
}

/// The run a restart made.
#[derive(Debug, Serialize, ToSchema)]
pub struct Restarted {
    /// The new run's id.
    pub run_id: Uuid,
}

/// A run's outcome so far.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunResult {
    /// The run.
    pub run_id: Uuid,
    /// Its status.
    pub status: RunStatus,
    /// Whether it has ended.
    pub finished: bool,
    /// The output, once completed.
    pub output: Option<Value>,
    /// Its error, when it ended without an output.
    pub error: Option<String>,
}

/// A query's value.
#[derive(Debug, Serialize, ToSchema)]
pub struct QueryValue {
    /// The value the workflow set with `set_state`, null when it set none.
    pub value: Option<Value>,
}

/// A page of runs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunPage {
    /// The runs.
    pub runs: Vec<RunInfo>,
    /// Pass as `before` for the next page; absent on the last one.
    pub next_before: Option<Uuid>,
}

/// Filters of `GET /api/v1/workflows`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this workflow.
    #[param(min_length = 1)]
    pub name: Option<String>,
    /// Only this status (queued, running, sleeping, waiting, completed, failed, cancelled,
    /// timed_out, compensating, compensated).
    #[param(
        pattern = "^(queued|running|sleeping|waiting|completed|failed|cancelled|timed_out|compensating|compensated)$"
    )]
    pub status: Option<String>,
    /// At most this many (1 to 1000, default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
    /// Only runs older than this id.
    pub before: Option<Uuid>,
}

/// Start a run of a workflow the server knows.
#[utoipa::path(post, path = "/api/v1/workflows", tag = "workflows", request_body = StartRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retried POST safe", pattern = "^[!-~]{1,255}$")),
    responses(
        (status = 201, description = "Started", body = Started),
        (status = 200, description = "The workflow id was taken: that run", body = Started),
        WriteErrors))]
pub async fn start<S: ServerStore>(
    State(app): State<App<S>>,
    Body(req): Body<StartRequest>,
) -> ApiResult<Response> {
    let Some(starter) = app.catalog().starter(&req.name) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_workflow",
            format!(
                "this server knows no workflow named {:?} (it knows: {}); a workflow starts by name only on a server built with its type",
                dray_core::error::excerpt(&req.name),
                app.catalog().workflow_names().join(", ")
            ),
        ));
    };
    let options = StartOptions {
        workflow_id: req.workflow_id,
        raise_on_already_started: req.raise_on_already_started,
    };
    let started = starter(app.client().clone(), req.input, options).map_err(|why| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_input",
            format!(
                "the input does not fit workflow {:?}: {}",
                req.name,
                dray_core::error::excerpt(&why)
            ),
        )
    })?;
    let (run_id, existing) = started.await?;
    let status = if existing {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    let mut r = (status, Json(Started { run_id, existing })).into_response();
    r.headers_mut().insert(
        header::LOCATION,
        location(format!("/api/v1/workflows/{run_id}")),
    );
    Ok(r)
}

/// A run with its status and steps.
#[utoipa::path(get, path = "/api/v1/workflows/{run}", tag = "workflows",
    params(("run" = Uuid, Path, description = "Run id")),
    responses((status = 200, description = "The run", body = RunInfo), ReadErrors))]
pub async fn describe<S: ServerStore>(
    State(app): State<App<S>>,
    P(run): P<Uuid>,
) -> ApiResult<Json<RunInfo>> {
    Ok(Json(app.client().describe(run).await?))
}

/// A run's outcome so far.
#[utoipa::path(get, path = "/api/v1/workflows/{run}/result", tag = "workflows",
    params(("run" = Uuid, Path, description = "Run id")),
    responses((status = 200, description = "The outcome (`finished` tells whether it is final)", body = RunResult), ReadErrors))]
pub async fn result<S: ServerStore>(
    State(app): State<App<S>>,
    P(run): P<Uuid>,
) -> ApiResult<Json<RunResult>> {
    let info = app.client().describe(run).await?;
    Ok(Json(RunResult {
        run_id: run,
        status: info.status,
        finished: info.status.is_terminal(),
        output: info.run.output,
        error: info.run.error,
    }))
}

/// Reads a value the run published with `set_state`.
#[utoipa::path(get, path = "/api/v1/workflows/{run}/query/{key}", tag = "workflows",
    params(("run" = Uuid, Path, description = "Run id"), ("key" = String, Path, description = "State key")),
    responses((status = 200, description = "The value (null when unset)", body = QueryValue), ReadErrors))]
pub async fn query<S: ServerStore>(
    State(app): State<App<S>>,
    P((run, key)): P<(Uuid, String)>,
) -> ApiResult<Json<QueryValue>> {
    let value = app.client().query::<Value>(run, &key).await?;
    Ok(Json(QueryValue { value }))
}

/// Sends a signal to a run.
#[utoipa::path(post, path = "/api/v1/workflows/{run}/signals", tag = "workflows",
    params(("run" = Uuid, Path, description = "Run id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retried POST safe", pattern = "^[!-~]{1,255}$")),
    request_body = SignalRequest,
    responses((status = 201, description = "Delivered", body = Signalled), WriteErrors))]
pub async fn signal<S: ServerStore>(
    State(app): State<App<S>>,
    P(run): P<Uuid>,
    Body(req): Body<SignalRequest>,
) -> ApiResult<(StatusCode, Json<Signalled>)> {
    let signal_id = app.client().signal(run, &req.name, &req.payload).await?;
    Ok((StatusCode::CREATED, Json(Signalled { signal_id })))
}

/// Asks a run to stop at its next step boundary (then compensate).
#[utoipa::path(post, path = "/api/v1/workflows/{run}/cancel", tag = "workflows",
    params(("run" = Uuid, Path, description = "Run id")),
    responses((status = 200, description = "What the cancel did", body = RunCancel), WriteErrors))]
pub async fn cancel<S: ServerStore>(
    State(app): State<App<S>>,
    P(run): P<Uuid>,
) -> ApiResult<Json<RunCancel>> {
    Ok(Json(app.client().cancel_workflow(run).await?))
}

/// Runs a run again from a step (a new run, the steps before it memoized).
#[utoipa::path(post, path = "/api/v1/workflows/{run}/restart", tag = "workflows",
    params(("run" = Uuid, Path, description = "Run id")),
    request_body = RestartRequest,
    responses((status = 201, description = "The new run", body = Restarted), WriteErrors))]
pub async fn restart<S: ServerStore>(
    State(app): State<App<S>>,
    P(run): P<Uuid>,
    Body(req): Body<RestartRequest>,
) -> ApiResult<(StatusCode, Json<Restarted>)> {
    let run_id = app.client().restart_from(run, &req.step).await?;
    Ok((StatusCode::CREATED, Json(Restarted { run_id })))
}

/// Lists runs, newest first, a page at a time.
#[utoipa::path(get, path = "/api/v1/workflows", tag = "workflows", params(ListQuery),
    responses((status = 200, description = "A page of runs", body = RunPage), ReadErrors))]
pub async fn list<S: ServerStore>(
    State(app): State<App<S>>,
    Q(q): Q<ListQuery>,
) -> ApiResult<Json<RunPage>> {
    let limit = crate::extract::limit(q.limit, 50)?;
    if q.name.as_deref().is_some_and(str::is_empty) {
        return Err(ApiError::field("name", "name must not be empty"));
    }
    let filter = RunFilter {
        name: q.name,
        status: q
            .status
            .as_deref()
            .map(RunStatus::parse)
            .transpose()
            .map_err(|e| ApiError::field("status", e.to_string()))?,
        parent_id: None,
        before: q.before,
        limit,
    };
    let runs = app.client().list_workflows(&filter).await?;
    let next_before = (runs.len() == limit as usize)
        .then(|| runs.last().map(|r| r.run.id))
        .flatten();
    Ok(Json(RunPage { runs, next_before }))
}
