//! `dray serve`: Dray's HTTP API.
//!
//! The same [`Client`] a Rust application uses, put on the network: jobs (enqueue by kind,
//! get, result, wait, cancel, retry, list), queues (counts, stats), workflows (start by name,
//! describe, signal, query, result, cancel, restart, list), crons (list, pause, resume,
//! trigger, history), the outbox (stats, list, requeue), live events over server-sent events,
//! workers over HTTP (claim, heartbeat, complete, fail; fenced like in-process workers), bearer
//! tokens with scopes, RFC 9457 problem bodies, and an OpenAPI document generated from the code
//! (`/api/v1/openapi.json`).
//!
//! Mount it in your own axum application with [`router`], or run it with [`serve`]:
//!
//! ```no_run
//! use dray_server::{App, Catalog, ServerConfig, ServerStore};
//!
//! async fn run<S: ServerStore>(store: S) -> std::io::Result<()> {
//!     let app = App::new(store, ServerConfig::default(), Catalog::new());
//!     // Either mount `dray_server::router(app.clone())` in your own axum app, or:
//!     dray_server::serve(app, async { let _ = tokio::signal::ctrl_c().await; }).await
//! }
//! ```
//!
//! The HTTP guide (`docs/http.md`) has a curl example for every route.

#![forbid(unsafe_code)]

mod auth;
mod catalog;
mod crons;
mod error;
mod events;
mod extract;
mod idempotency;
mod jobs;
pub mod metrics;
mod openapi;
mod outbox;
mod queues;
mod tokens;
mod workers;
mod workflows;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{delete, get, post};
use dray_core::api::{ApiStore, Scope};
use dray_core::{Client, CronStore, OutboxStore};
use tokio::sync::watch;

pub use catalog::Catalog;
pub use error::{ApiError, Problem};
pub use openapi::ApiDoc;

/// What the server needs of a store: the engine, workflows, crons, the outbox and the API's
/// own tables. Both of Dray's stores have all of it.
pub trait ServerStore: ApiStore + CronStore + OutboxStore {}
impl<T: ApiStore + CronStore + OutboxStore> ServerStore for T {}

/// How requests are authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Auth {
    /// Every `/api/v1` route but the OpenAPI document needs `Authorization: Bearer <token>`
    /// with a scope that allows it (made with `dray tokens create`).
    Tokens,
    /// No authentication at all: for local use only. [`serve`] refuses to bind anything but a
    /// loopback address in this mode.
    InsecureNoAuth,
}

/// Settings of the HTTP server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Where to listen (default `127.0.0.1:8080`).
    pub addr: SocketAddr,
    /// How callers prove who they are (default: bearer tokens).
    pub auth: Auth,
    /// Largest request body accepted, in bytes (default 2 MiB); a larger one is refused with
    /// 413 before it is read.
    pub body_limit: usize,
    /// Longest a request may take (default 60 s); a slower one is answered 503 with a problem
    /// body. Live-event streams are exempt. Blocking waits and long-poll claims are capped
    /// below it ([`ServerConfig::max_wait`]).
    pub request_timeout: Duration,
    /// Longest wait a `wait` or a worker's long-poll `claim` may ask for (default 30 s).
    pub max_wait: Duration,
    /// Origins a browser frontend may call from (CORS): empty for none (the default), `*`
    /// for any.
    pub cors_origins: Vec<String>,
    /// The shortest time between two refreshes of the live-event streams (default 100 ms):
    /// the job change feed wakes the refresh, one batched read serves every subscriber, and
    /// without changes everything is read again every ten ticks.
    pub event_tick: Duration,
    /// How long a checked token is trusted before it is looked up again (default 5 s): a
    /// token revoked by `dray tokens revoke` stops working within this; one revoked through
    /// the API stops at once.
    pub token_cache: Duration,
    /// How long `Idempotency-Key` answers are kept (default 24 h).
    pub idempotency_retention: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            auth: Auth::Tokens,
            body_limit: 2 * 1024 * 1024,
            request_timeout: Duration::from_secs(60),
            max_wait: Duration::from_secs(30),
            cors_origins: Vec::new(),
            event_tick: Duration::from_millis(100),
            token_cache: Duration::from_secs(5),
            idempotency_retention: Duration::from_secs(24 * 3600),
        }
    }
}

/// The server's shared state: the client, the catalog of known jobs and workflows, the
/// live-event hub and the token cache. Cheap to clone.
pub struct App<S: ServerStore> {
    inner: Arc<Inner<S>>,
}

impl<S: ServerStore> Clone for App<S> {
    fn clone(&self) -> Self {
        App {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<S: ServerStore> {
    client: Client<S>,
    config: ServerConfig,
    catalog: Catalog<S>,
    hub: events::Hub<S>,
    tokens: auth::TokenCache,
    shutdown: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
}

impl<S: ServerStore> App<S> {
    /// State for a server on `store`, knowing the jobs and workflows in `catalog`. Starts the
    /// live-event hub's task (it stops with [`App::shutdown`] or when the last clone is dropped).
    pub fn new(store: S, config: ServerConfig, catalog: Catalog<S>) -> Self {
        let (stop, shutdown) = watch::channel(false);
        let hub = events::Hub::new(store.clone(), config.event_tick, shutdown.clone());
        App {
            inner: Arc::new(Inner {
                client: Client::new(store),
                tokens: auth::TokenCache::new(config.token_cache),
                config,
                catalog,
                hub,
                shutdown,
                stop,
            }),
        }
    }

    /// The client the routes call.
    pub fn client(&self) -> &Client<S> {
        &self.inner.client
    }

    /// The settings.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// Ends live-event streams and the hub's task, so a graceful shutdown is not held up by
    /// subscribers that never disconnect.
    pub fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
    }

    /// Database reads the live-event hub has made so far, for every subscriber together (one
    /// per tick for all followed jobs): what live events cost the database.
    pub fn live_event_reads(&self) -> u64 {
        self.inner.hub.reads()
    }

    /// Live-event streams following a job right now.
    pub fn live_job_followers(&self) -> usize {
        self.inner.hub.job_followers()
    }

    pub(crate) fn store(&self) -> &S {
        self.inner.client.store()
    }

    pub(crate) fn catalog(&self) -> &Catalog<S> {
        &self.inner.catalog
    }

    pub(crate) fn hub(&self) -> &events::Hub<S> {
        &self.inner.hub
    }

    pub(crate) fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.inner.shutdown.clone()
    }
}

/// The whole API as an axum [`Router`]: `/healthz`, `/readyz` and everything under `/api/v1`.
/// Mount it in your own application (`app.merge(dray_server::router(state))`) or run it with
/// [`serve`].
pub fn router<S: ServerStore>(app: App<S>) -> Router {
    let read = Router::new()
        .route("/jobs", get(jobs::list::<S>))
        .route("/jobs/{id}", get(jobs::get_job::<S>))
        .route("/jobs/{id}/result", get(jobs::result::<S>))
        .route("/jobs/{id}/wait", get(jobs::wait::<S>))
        .route("/queues", get(queues::list::<S>))
        .route("/queues/{queue}", get(queues::stats::<S>))
        .route("/workflows", get(workflows::list::<S>))
        .route("/workflows/{run}", get(workflows::describe::<S>))
        .route("/workflows/{run}/result", get(workflows::result::<S>))
        .route("/workflows/{run}/query/{key}", get(workflows::query::<S>))
        .route("/crons", get(crons::list::<S>))
        .route("/crons/{name}/history", get(crons::history::<S>))
        .route("/outbox/{outbox}/stats", get(outbox::stats::<S>))
        .route("/outbox/{outbox}/events", get(outbox::list::<S>))
        .layer(axum::middleware::from_fn_with_state(
            (app.clone(), Scope::Read),
            auth::require::<S>,
        ));
    let live = Router::new()
        .route("/jobs/{id}/events", get(events::job_events::<S>))
        .route("/workflows/{run}/events", get(events::run_events::<S>))
        .route("/events", get(events::all_events::<S>))
        .layer(axum::middleware::from_fn_with_state(
            (app.clone(), Scope::Read),
            auth::require::<S>,
        ));
    let write = Router::new()
        .route("/jobs", post(jobs::enqueue::<S>))
        .route("/jobs/{id}/cancel", post(jobs::cancel::<S>))
        .route("/jobs/{id}/retry", post(jobs::retry::<S>))
        .route("/workflows", post(workflows::start::<S>))
        .route("/workflows/{run}/signals", post(workflows::signal::<S>))
        .route("/workflows/{run}/cancel", post(workflows::cancel::<S>))
        .route("/workflows/{run}/restart", post(workflows::restart::<S>))
        .route("/crons/{name}/pause", post(crons::pause::<S>))
        .route("/crons/{name}/resume", post(crons::resume::<S>))
        .route("/crons/{name}/trigger", post(crons::trigger::<S>))
        .route(
            "/outbox/{outbox}/requeue-failed",
            post(outbox::requeue_failed::<S>),
        )
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            idempotency::layer::<S>,
        ))
        .layer(axum::middleware::from_fn_with_state(
            (app.clone(), Scope::Write),
            auth::require::<S>,
        ));
    let worker = Router::new()
        .route("/queues/{queue}/claim", post(workers::claim::<S>))
        .route(
            "/queues/{queue}/jobs/{id}/heartbeat",
            post(workers::heartbeat::<S>),
        )
        .route(
            "/queues/{queue}/jobs/{id}/complete",
            post(workers::complete::<S>),
        )
        .route("/queues/{queue}/jobs/{id}/fail", post(workers::fail::<S>))
        .layer(axum::middleware::from_fn_with_state(
            (app.clone(), Scope::Worker),
            auth::require::<S>,
        ));
    let admin = Router::new()
        .route("/tokens", get(tokens::list::<S>).post(tokens::create::<S>))
        .route("/tokens/{token}", delete(tokens::revoke::<S>))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            idempotency::layer::<S>,
        ))
        .layer(axum::middleware::from_fn_with_state(
            (app.clone(), Scope::Admin),
            auth::require::<S>,
        ));
    let timed = Router::new()
        .merge(read)
        .merge(write)
        .merge(worker)
        .merge(admin)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            error::timeout::<S>,
        ));
    let api = Router::new()
        .merge(timed)
        .merge(live)
        .route("/openapi.json", get(openapi::document))
        .fallback(error::not_found);
    let scrape = Router::new().route("/metrics", get(metrics::scrape)).layer(
        axum::middleware::from_fn_with_state((app.clone(), Scope::Read), auth::require::<S>),
    );
    let mut router = Router::new()
        .merge(scrape)
        .route("/healthz", get(health))
        .route("/readyz", get(ready::<S>))
        .nest("/api/v1", api)
        .fallback(error::not_found)
        .layer(DefaultBodyLimit::max(app.config().body_limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            error::panicked,
        ))
        .layer(axum::middleware::from_fn(error::log_request));
    if let Some(cors) = error::cors(&app.config().cors_origins) {
        router = router.layer(cors);
    }
    router.with_state(app)
}

/// `GET /healthz`: the process is up (no database access).
#[utoipa::path(get, path = "/healthz", tag = "health", security(()),
    responses((status = 200, description = "The process is serving", body = Health)))]
async fn health() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".to_owned(),
        schema_version: None,
    })
}

/// Health or readiness.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// The database's schema version (readiness only).
    pub schema_version: Option<i64>,
}

/// `GET /readyz`: the database answers and its schema is the one this build needs.
#[utoipa::path(get, path = "/readyz", tag = "health", security(()), responses(
    (status = 200, description = "Ready: the database answers and the schema is current", body = Health),
    (status = 503, description = "Not ready", body = Problem, content_type = "application/problem+json")))]
async fn ready<S: ServerStore>(
    axum::extract::State(app): axum::extract::State<App<S>>,
) -> Result<axum::Json<Health>, ApiError> {
    let found = app.store().schema_version().await?;
    let required = app.store().schema_target();
    if found < required {
        return Err(dray_core::Error::SchemaOutdated { found, required }.into());
    }
    Ok(axum::Json(Health {
        status: "ok".to_owned(),
        schema_version: Some(found),
    }))
}

/// Runs the API on `config.addr` until `stop` resolves, then shuts down gracefully: it stops
/// accepting, ends live-event streams, and lets requests in flight finish.
pub async fn serve<S: ServerStore>(
    app: App<S>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = bind(app.config()).await?;
    serve_on(listener, app, stop).await
}

/// Binds `config.addr`, refusing a non-loopback address when authentication is off.
pub async fn bind(config: &ServerConfig) -> std::io::Result<tokio::net::TcpListener> {
    if config.auth == Auth::InsecureNoAuth && !config.addr.ip().is_loopback() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "refusing to listen on {} without authentication: --insecure-no-auth binds to a loopback address only (127.0.0.1 or ::1); make a token with `dray tokens create` to serve other hosts",
                config.addr
            ),
        ));
    }
    tokio::net::TcpListener::bind(config.addr).await
}

/// [`serve`] on a listener already bound (tests bind port 0 and read the address).
pub async fn serve_on<S: ServerStore>(
    listener: tokio::net::TcpListener,
    app: App<S>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(app.clone());
    let pruner = tokio::spawn(idempotency::prune_loop(app.clone()));
    let on_stop = app.clone();
    let result = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            stop.await;
            on_stop.shutdown();
        })
        .await;
    pruner.abort();
    result
}
