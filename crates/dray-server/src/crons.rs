//! `/api/v1/crons`: schedules with their next fire times, pause, resume, trigger, history.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use dray_core::cron::{ScheduleRow, TickRow};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::extract::{P, Q};
use crate::openapi::{ReadErrors, WriteErrors};
use crate::{App, ServerStore};

/// A schedule and when it fires next.
#[derive(Debug, Serialize, ToSchema)]
pub struct Schedule {
    /// The schedule as stored.
    pub schedule: ScheduleRow,
    /// Its next fire time (none while paused or disabled).
    pub next_fire_at: Option<DateTime<Utc>>,
}

/// Every schedule.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleList {
    /// The schedules, by name.
    pub schedules: Vec<Schedule>,
}

/// A schedule's ticks, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct History {
    /// The ticks.
    pub ticks: Vec<TickRow>,
}

/// What a manual trigger started.
#[derive(Debug, Serialize, ToSchema)]
pub struct Triggered {
    /// The job (or workflow run) it started.
    pub id: Uuid,
}

/// A schedule's new state.
#[derive(Debug, Serialize, ToSchema)]
pub struct Paused {
    /// True when paused.
    pub paused: bool,
}

/// `GET …/history`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// At most this many ticks (1 to 1000, default 50).
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<u32>,
}

/// A schedule named in the path that does not exist is 404, not the core's 400.
fn schedule_error(name: &str) -> impl FnOnce(dray_core::Error) -> ApiError + '_ {
    move |e| match e {
        dray_core::Error::InvalidArgument {
            what: "schedule", ..
        } => ApiError::new(
            StatusCode::NOT_FOUND,
            "schedule_not_found",
            format!(
                "no schedule named {:?}; GET /api/v1/crons lists them",
                dray_core::error::excerpt(name)
            ),
        ),
        e => e.into(),
    }
}

/// Every schedule, with its next fire time.
#[utoipa::path(get, path = "/api/v1/crons", tag = "crons",
    responses((status = 200, description = "The schedules", body = ScheduleList), ReadErrors))]
pub async fn list<S: ServerStore>(State(app): State<App<S>>) -> ApiResult<Json<ScheduleList>> {
    let schedules = app
        .client()
        .schedules()
        .await?
        .into_iter()
        .map(|(schedule, next_fire_at)| Schedule {
            schedule,
            next_fire_at,
        })
        .collect();
    Ok(Json(ScheduleList { schedules }))
}

/// Pauses a schedule: it fires no more until resumed (missed ticks are not caught up).
#[utoipa::path(post, path = "/api/v1/crons/{name}/pause", tag = "crons",
    params(("name" = String, Path, description = "Schedule")),
    responses((status = 200, description = "Paused", body = Paused), WriteErrors))]
pub async fn pause<S: ServerStore>(
    State(app): State<App<S>>,
    P(name): P<String>,
) -> ApiResult<Json<Paused>> {
    app.client()
        .pause_schedule(&name)
        .await
        .map_err(schedule_error(&name))?;
    Ok(Json(Paused { paused: true }))
}

/// Resumes a paused schedule from now.
#[utoipa::path(post, path = "/api/v1/crons/{name}/resume", tag = "crons",
    params(("name" = String, Path, description = "Schedule")),
    responses((status = 200, description = "Resumed", body = Paused), WriteErrors))]
pub async fn resume<S: ServerStore>(
    State(app): State<App<S>>,
    P(name): P<String>,
) -> ApiResult<Json<Paused>> {
    app.client()
        .resume_schedule(&name)
        .await
        .map_err(schedule_error(&name))?;
    Ok(Json(Paused { paused: false }))
}

/// Runs a schedule's target now, outside its schedule.
#[utoipa::path(post, path = "/api/v1/crons/{name}/trigger", tag = "crons",
    params(("name" = String, Path, description = "Schedule"),
        ("Idempotency-Key" = Option<String>, Header, description = "Makes a retried POST safe", pattern = "^[!-~]{1,255}$")),
    responses((status = 201, description = "Started", body = Triggered), WriteErrors))]
pub async fn trigger<S: ServerStore>(
    State(app): State<App<S>>,
    P(name): P<String>,
) -> ApiResult<(StatusCode, Json<Triggered>)> {
    let id = app
        .client()
        .trigger_schedule(&name)
        .await
        .map_err(schedule_error(&name))?;
    Ok((StatusCode::CREATED, Json(Triggered { id })))
}

/// A schedule's ticks, newest first, with how each ended.
#[utoipa::path(get, path = "/api/v1/crons/{name}/history", tag = "crons",
    params(("name" = String, Path, description = "Schedule"), HistoryQuery),
    responses((status = 200, description = "The ticks", body = History), ReadErrors))]
pub async fn history<S: ServerStore>(
    State(app): State<App<S>>,
    P(name): P<String>,
    Q(q): Q<HistoryQuery>,
) -> ApiResult<Json<History>> {
    let limit = crate::extract::limit(q.limit, 50)?;
    let ticks = app
        .client()
        .schedule_history(&name, limit)
        .await
        .map_err(schedule_error(&name))?;
    Ok(Json(History { ticks }))
}
