//! The cron layer's part of the store contract: schedules, and the record of every tick.

use std::future::Future;
use std::time::Duration;

use crate::cron::types::{CronFire, FireReport, ScheduleRow, ScheduleSpec, TickRow};
use crate::error::Result;
use crate::workflow::WorkflowStore;

/// A store that keeps cron schedules (both of Dray's stores do).
pub trait CronStore: WorkflowStore {
    /// Creates or updates schedules declared in code (source `code`), enabling them; code
    /// schedules not in `specs` are disabled, their history kept. A new schedule's last tick
    /// is now (database clock): it does not fire for times before it existed.
    fn cron_declare(&self, specs: &[ScheduleSpec]) -> impl Future<Output = Result<()>> + Send;

    /// Creates or updates one schedule made at run time (source `api`).
    fn cron_upsert(&self, spec: &ScheduleSpec) -> impl Future<Output = Result<()>> + Send;

    /// Deletes a schedule (its tick history stays until pruned); false when there was none.
    fn cron_remove(&self, name: &str) -> impl Future<Output = Result<bool>> + Send;

    /// Every schedule, by name.
    fn cron_list(&self) -> impl Future<Output = Result<Vec<ScheduleRow>>> + Send;

    /// Fires and skips ticks of one schedule (see [`CronFire`]), in one transaction.
    fn cron_fire(&self, fire: &CronFire) -> impl Future<Output = Result<FireReport>> + Send;

    /// Pauses or resumes a schedule; false when there is none of that name.
    fn cron_set_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// A schedule's ticks, newest first, with their jobs' outcomes.
    fn cron_history(
        &self,
        name: &str,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<TickRow>>> + Send;

    /// Deletes tick records older than `older_than` (they are behind every schedule's last
    /// tick, so no scheduler can fire them again); returns how many.
    fn cron_prune(&self, older_than: Duration) -> impl Future<Output = Result<u64>> + Send;
}
