//! # Dray: durable background work for Rust
//!
//! A request hands work off and returns at once; Dray runs it reliably elsewhere: queues of
//! JSON messages with leases and at-least-once delivery, typed jobs with retries, progress and
//! results, durable workflows (memoized steps, durable sleep, signals, compensation), cron
//! schedules, and a transactional outbox and inbox.
//!
//! Two stores, one behaviour: [`SqliteStore`] (an embedded file, zero setup; the default
//! feature) and [`PgStore`] (feature `postgres`; many processes on many machines share one
//! database).
//!
//! ```no_run
//! use dray::{EnqueueOptions, Queue, SqliteStore};
//! use std::time::Duration;
//!
//! # async fn run() -> dray::Result<()> {
//! let queue = Queue::new(SqliteStore::open("sqlite://dray.db").await?);
//! queue.enqueue("emails", &serde_json::json!({"to": "a@b.c"}), &EnqueueOptions::new()).await?;
//! for msg in queue.receive("emails", 10, Duration::from_secs(5)).await? {
//!     println!("sending to {}", msg.payload["to"]);
//!     queue.ack_lease(&msg).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! Guides: [`guide::queue`], [`guide::jobs`], [`guide::workflows`], [`guide::crons`],
//! [`guide::outbox`], [`guide::http`], [`guide::guarantees`], [`guide::coming_from`].

#![forbid(unsafe_code)]

pub use dray_core::*;

/// `#[dray::job(...)]` and `#[dray::workflow(...)]`: declare a job or a workflow from an async
/// function (feature `macros`, default).
#[cfg(feature = "macros")]
pub use dray_macros::{cron, job, workflow};

/// Outbox relays to external brokers (features `redis`, `rabbitmq`, `nats`).
#[cfg(any(feature = "redis", feature = "rabbitmq", feature = "nats"))]
pub use dray_brokers as brokers;

/// The HTTP API (`dray serve`): a `Router` to mount in an axum application (feature `server`).
#[cfg(feature = "server")]
pub use dray_server as server;

#[cfg(feature = "postgres")]
pub use dray_postgres::{self as postgres, PgStore, PgStoreBuilder};
#[cfg(feature = "sqlite")]
pub use dray_sqlite::{self as sqlite, SqliteStore, SqliteStoreBuilder};

/// The guides, rendered from `docs/` in the repository.
pub mod guide {
    #[doc = include_str!("../../../README.md")]
    pub mod readme {}
    #[doc = include_str!("../../../docs/queue.md")]
    pub mod queue {}
    #[doc = include_str!("../../../docs/jobs.md")]
    pub mod jobs {}
    #[doc = include_str!("../../../docs/workflows.md")]
    pub mod workflows {}
    #[doc = include_str!("../../../docs/crons.md")]
    pub mod crons {}
    #[doc = include_str!("../../../docs/outbox.md")]
    pub mod outbox {}
    #[doc = include_str!("../../../docs/http.md")]
    pub mod http {}
    #[doc = include_str!("../../../docs/observability.md")]
    pub mod observability {}
    #[doc = include_str!("../../../docs/guarantees.md")]
    pub mod guarantees {}
    #[doc = include_str!("../../../docs/coming-from.md")]
    pub mod coming_from {}
}
