//! The workflow layer's part of the store contract.
//!
//! A run is a row of its own (`dray_workflow_runs`) with its history (`dray_workflow_steps`),
//! the signals sent to it and its query state, driven by a job whose id is the run's id: the
//! claims, leases, fencing, rescue, retries and wake-ups are the ones jobs have. Every method
//! is one transaction.

use std::future::Future;
use std::time::Duration;

use uuid::Uuid;

use crate::error::Result;
use crate::store::{Store, StoreConnection};
use crate::workflow::types::{
    LoadedRun, NewRun, RunCancel, RunFilter, RunInfo, RunStarted, RunWrite,
};

/// A store that keeps workflow runs (both of Dray's stores do).
pub trait WorkflowStore: Store {
    /// Starts runs: inserts each run and its driving job, in one transaction. A run whose
    /// (name, workflow_id) is taken by a run already started (and not superseded by a restart)
    /// starts nothing and answers that run, `existing = true`. Answers in input order.
    fn workflow_start_many(
        &self,
        runs: &[NewRun],
    ) -> impl Future<Output = Result<Vec<RunStarted>>> + Send;

    /// [`WorkflowStore::workflow_start_many`] inside the caller's transaction.
    fn workflow_start_many_in(
        &self,
        conn: &mut StoreConnection<Self>,
        runs: &[NewRun],
    ) -> impl Future<Output = Result<Vec<RunStarted>>> + Send;

    /// Loads runs with their history, pending signals and ended children, for replay. Unknown
    /// ids are left out.
    fn workflow_load_many(
        &self,
        ids: &[Uuid],
    ) -> impl Future<Output = Result<Vec<LoadedRun>>> + Send;

    /// Applies writes about runs held by workers, in one transaction, in order. Fenced: the
    /// writes of a run whose driving job is no longer running on the named attempt are left
    /// out. Returns the ids of the runs whose writes applied.
    fn workflow_write_many(
        &self,
        writes: &[RunWrite],
    ) -> impl Future<Output = Result<Vec<Uuid>>> + Send;

    /// Sends a signal to a run: kept until a wait of that name consumes it; wakes the run if it
    /// waits for it. Refuses a run that has ended ([`crate::Error::RunFinished`]); `None` when no
    /// run has this id.
    fn workflow_signal(
        &self,
        run: Uuid,
        name: &str,
        payload: &str,
    ) -> impl Future<Output = Result<Option<Uuid>>> + Send;

    /// Reads a run with its history.
    fn workflow_get(&self, run: Uuid) -> impl Future<Output = Result<Option<RunInfo>>> + Send;

    /// The current run of (name, workflow_id): the one not superseded by a restart.
    fn workflow_find(
        &self,
        name: &str,
        workflow_id: &str,
    ) -> impl Future<Output = Result<Option<Uuid>>> + Send;

    /// Lists runs, newest first, without their histories.
    fn workflow_list(
        &self,
        filter: &RunFilter,
    ) -> impl Future<Output = Result<Vec<RunInfo>>> + Send;

    /// Reads a query value set by `ctx.set_state`.
    fn workflow_query(
        &self,
        run: Uuid,
        key: &str,
    ) -> impl Future<Output = Result<Option<serde_json::Value>>> + Send;

    /// Asks a run and its unfinished descendants to stop: suspended ones are due at once, and
    /// running ones see the request at their next heartbeat. `None` when no run has this id.
    fn workflow_cancel(&self, run: Uuid) -> impl Future<Output = Result<Option<RunCancel>>> + Send;

    /// Starts `new` as a restart of the ended run `from`: copies the history records before
    /// position `keep` (so the new run's replay returns their results), links the two, and
    /// moves the workflow id to the new run. Refuses a run that has not ended.
    fn workflow_restart(
        &self,
        from: Uuid,
        keep: i32,
        new: &NewRun,
    ) -> impl Future<Output = Result<RunStarted>> + Send;

    /// Records (or clears) why a run is not progressing, for `describe`.
    fn workflow_note(
        &self,
        run: Uuid,
        note: Option<&str>,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Deletes ended runs (with their histories, signals and state) that ended more than
    /// `older_than` ago, up to `limit`; returns how many.
    fn workflow_prune(
        &self,
        older_than: Duration,
        limit: u32,
    ) -> impl Future<Output = Result<u64>> + Send;
}
