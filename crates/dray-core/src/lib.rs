//! Dray's engine: the types, the [`Store`] contract and the queue port.
//!
//! Applications depend on the `dray` facade crate, which re-exports this crate and the stores.
//! This crate holds no SQL: the stores (`dray-postgres`, `dray-sqlite`) implement [`Store`].

#![forbid(unsafe_code)]

pub mod api;
pub mod batch;
pub mod callback;
pub mod changes;
pub mod claim;
pub mod client;
pub mod cron;
pub mod duration;
mod duration_grammar;
pub mod error;
pub mod job;
pub mod metrics;
pub mod migrate;
pub mod outbox;
pub mod queue;
pub mod store;
pub mod trace;
pub mod types;
pub mod wake;
pub mod worker;
pub mod workflow;

pub use client::{Client, JobOutcome, JobStatus};
pub use cron::{Cron, CronContext, CronOptions, CronStore, Overlap};
pub use duration::{format_duration, parse_duration};
pub use error::{Error, Result};
pub use job::{Backoff, CancelToken, Job, JobContext, JobError, JobOptions, RetryPolicy};
pub use migrate::{Migration, SchemaMode};
pub use outbox::{Outbox, OutboxEvent, OutboxStore, QueueSink, Relay, Sink};
pub use queue::{EnqueueOptions, Queue, QueueConfig, ReceiveOptions};
pub use store::{Store, StoreConnection};
pub use types::{
    AttemptError, CallbackSettle, CallbackStatus, CancelOutcome, ClaimParams, Completion, Enqueued,
    FailTo, FailureKind, JobFilter, LeaseRef, LeaseWrite, Message, MessageState, MigrationReport,
    NackAction, NewMessage, Priority, QueueGauge, QueueName, QueueStats, RebuiltIndex,
    RescueReport, RunAt,
};
pub use wake::WakeHub;
pub use worker::{Secret, Worker, WorkerConfig, WorkerEvent, WorkerHandle};
pub use workflow::{
    RunStatus, StartOptions, StepOptions, Workflow, WorkflowContext, WorkflowError, WorkflowHandle,
    WorkflowOptions, WorkflowStore,
};

/// Re-exported so callers name the same versions Dray uses.
pub use {chrono, serde_json, sqlx, uuid};
