//! The OpenAPI document, generated from the routes' own annotations: `GET /api/v1/openapi.json`.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoResponses, Modify, OpenApi};

use crate::error::Problem;

/// Error answers of routes that read.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum ReadErrors {
    /// Bad input: a query or path parameter (the problem's `field` names it).
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// No valid token.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// The token lacks the route's scope.
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// No such job, run, schedule or route.
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    /// A bug (logged); the server goes on serving.
    #[response(status = 500, content_type = "application/problem+json")]
    Internal(Problem),
    /// The database is unreachable, read-only, full, or its schema is not current; or the
    /// request ran past the server's time limit.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

/// Error answers of routes that write.
#[derive(IntoResponses)]
#[allow(dead_code)]
pub enum WriteErrors {
    /// Bad input (the problem's `field` names it).
    #[response(status = 400, content_type = "application/problem+json")]
    BadRequest(Problem),
    /// No valid token.
    #[response(status = 401, content_type = "application/problem+json")]
    Unauthorized(Problem),
    /// The token lacks the route's scope.
    #[response(status = 403, content_type = "application/problem+json")]
    Forbidden(Problem),
    /// No such job, run, schedule or token.
    #[response(status = 404, content_type = "application/problem+json")]
    NotFound(Problem),
    /// Conflict: already started, already finished, lease lost, or the same
    /// `Idempotency-Key` still running.
    #[response(status = 409, content_type = "application/problem+json")]
    Conflict(Problem),
    /// The body is larger than the server accepts, or the payload than the queue's limit.
    #[response(status = 413, content_type = "application/problem+json")]
    TooLarge(Problem),
    /// The body is not sent as JSON.
    #[response(status = 415, content_type = "application/problem+json")]
    UnsupportedMediaType(Problem),
    /// JSON of the wrong shape, an input that does not fit the job or workflow, or an
    /// `Idempotency-Key` reused for another request.
    #[response(status = 422, content_type = "application/problem+json")]
    Unprocessable(Problem),
    /// A bug (logged); the server goes on serving.
    #[response(status = 500, content_type = "application/problem+json")]
    Internal(Problem),
    /// The database is unreachable, read-only, full, or its schema is not current; or the
    /// request ran past the server's time limit.
    #[response(status = 503, content_type = "application/problem+json")]
    Unavailable(Problem),
}

/// Error answers of the worker protocol.
pub type WorkerErrors = WriteErrors;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A token made with `dray tokens create` (scopes: read, write, worker, admin)",
                    ))
                    .build(),
            ),
        );
    }
}

/// Dray's HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Dray HTTP API", description = "Durable background work: jobs, queues, workflows, crons, the outbox; live events; workers over HTTP. Errors are RFC 9457 problem+json bodies whose `type` is `urn:dray:problem:<code>`."),
    paths(
        crate::health, crate::ready, crate::metrics::scrape,
        crate::jobs::enqueue, crate::jobs::list, crate::jobs::get_job, crate::jobs::result,
        crate::jobs::wait, crate::jobs::cancel, crate::jobs::retry,
        crate::queues::list, crate::queues::stats,
        crate::workers::claim, crate::workers::heartbeat, crate::workers::complete,
        crate::workers::fail,
        crate::workflows::start, crate::workflows::list, crate::workflows::describe,
        crate::workflows::result, crate::workflows::query, crate::workflows::signal,
        crate::workflows::cancel, crate::workflows::restart,
        crate::crons::list, crate::crons::pause, crate::crons::resume, crate::crons::trigger,
        crate::crons::history,
        crate::outbox::stats, crate::outbox::list, crate::outbox::requeue_failed,
        crate::tokens::list, crate::tokens::create, crate::tokens::revoke,
        crate::events::job_events, crate::events::run_events, crate::events::all_events,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "jobs", description = "Enqueue and follow jobs"),
        (name = "queues", description = "Queue counts"),
        (name = "workers", description = "Run jobs over HTTP: claim, heartbeat, complete, fail (fenced by attempt)"),
        (name = "workflows", description = "Durable workflows"),
        (name = "crons", description = "Cron schedules"),
        (name = "outbox", description = "The transactional outbox"),
        (name = "tokens", description = "Bearer tokens (admin)"),
        (name = "events", description = "Live events (server-sent events)"),
        (name = "health", description = "Liveness, readiness and Prometheus metrics"),
    )
)]
pub struct ApiDoc;

/// `GET /api/v1/openapi.json`.
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
