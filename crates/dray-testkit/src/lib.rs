//! The store conformance suite: every test here runs, unchanged, against every store.
//!
//! A store crate implements [`Fixture`] (how to make a fresh, isolated store: a temp file for
//! SQLite, a schema of its own for PostgreSQL) and expands [`conformance_tests!`] in one
//! integration-test file; each test then runs in its own process under nextest, in parallel.
//! Where a store differs on purpose, the fixture says so through a capability
//! ([`Fixture::CROSS_HANDLE_WAKE`]) and the test checks the weaker promise — never a silent skip.

#![allow(missing_docs)] // test code: the test names are the documentation

pub mod crons;
pub mod jobs;
pub mod outbox;
pub mod queue;
pub mod workflows;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dray_core::{CronStore, OutboxStore};

/// How a store crate makes stores for the suite.
pub trait Fixture: Send + Sync + Sized + 'static {
    /// The store under test.
    type Store: CronStore + OutboxStore;

    /// True when a receiver on one handle is woken within milliseconds by an enqueue on another
    /// handle (another process): PostgreSQL's LISTEN/NOTIFY. False when it is woken by polling
    /// (SQLite): then the suite checks wake-up within the poll interval instead.
    const CROSS_HANDLE_WAKE: bool;

    /// A fresh, migrated store that no other test sees.
    fn store(&self) -> impl Future<Output = Self::Store> + Send;

    /// A second, independent handle on the same database (its own connections and wake-up
    /// hub), as another process would have.
    fn reopen(&self, store: &Self::Store) -> impl Future<Output = Self::Store> + Send;

    /// Runs `UPDATE <Dray's job table> SET {set} WHERE id = <id>` behind Dray's back, as a
    /// hand edit, another tool or another version might: `set` is SQL both databases accept.
    fn set_columns(
        &self,
        store: &Self::Store,
        id: uuid::Uuid,
        set: &str,
    ) -> impl Future<Output = ()> + Send;

    /// Runs `UPDATE <Dray's workflow runs table> SET {set} WHERE id = <id>` behind Dray's back,
    /// as a newer version or another tool might: its checks on stored values do not apply (a
    /// newer version may store values this build does not know).
    fn set_run_columns(
        &self,
        store: &Self::Store,
        id: uuid::Uuid,
        set: &str,
    ) -> impl Future<Output = ()> + Send;

    /// Moves schedule `name`'s last handled tick `secs` seconds back behind Dray's back, as
    /// if no scheduler had run meanwhile (an outage).
    fn cron_rewind(
        &self,
        store: &Self::Store,
        name: &str,
        secs: i64,
    ) -> impl Future<Output = ()> + Send;

    /// Removes what [`Fixture::store`] made.
    fn cleanup(&self, store: Self::Store) -> impl Future<Output = ()> + Send;
}

/// Runs one suite test on a fresh store and cleans up after it, even when it fails.
pub async fn run<F, T, Fut>(fixture: F, test: T)
where
    F: Fixture,
    T: FnOnce(Arc<F>, F::Store) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let fixture = Arc::new(fixture);
    let store = fixture.store().await;
    let outcome = tokio::spawn(test(fixture.clone(), store.clone())).await;
    fixture.cleanup(store).await;
    if let Err(e) = outcome {
        if e.is_panic() {
            std::panic::resume_unwind(e.into_panic());
        }
        panic!("test task failed: {e}");
    }
}

/// Waits until `cond` holds, checking often, failing after `limit`. This waits on a condition,
/// not for a guessed amount of time.
pub async fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Expands to one `#[tokio::test]` per conformance test, each running against the fixture
/// expression given.
#[macro_export]
macro_rules! conformance_tests {
    ($fixture:expr) => {
        $crate::conformance_tests!(@each $fixture;
            enqueue_receive_ack_round_trip,
            enqueue_many_is_one_batch_in_id_order,
            keys_dedup_unfinished_messages,
            keys_dedup_under_concurrent_enqueues,
            delay_and_not_before_are_exclusive,
            payload_limit_is_enforced,
            bad_arguments_are_refused,
            priority_then_due_time_then_id,
            delay_is_measured_on_the_database_clock,
            not_before_is_honoured,
            expired_lease_is_redelivered_and_fenced,
            receivers_sweep_by_their_rescue_interval,
            nack_requeue_and_dead,
            exhausted_attempts_go_dead,
            extend_keeps_the_lease,
            expired_leases_behind_a_large_backlog_are_rescued,
            caller_transaction_rollback_and_commit,
            consume_streams_until_idle,
            concurrent_consumers_receive_each_message_once,
            receiver_wakes_on_enqueue_in_process,
            receiver_wakes_on_enqueue_from_another_handle,
            a_waiting_receiver_is_handed_a_new_message_directly,
            keyed_delayed_and_batched_messages_are_not_handed_over,
            messages_for_a_receiver_that_left_stay_in_the_queue,
            stats_count_every_state,
            get_unknown_id_is_none,
            rows_that_sort_before_a_drained_backlog_are_not_left_behind,
            release_gives_back_without_counting_an_attempt,
            long_lists_of_lease_writes,
            migrations_twice_change_nothing,
        );
        $crate::conformance_tests!(@jobs $fixture;
            retries_follow_the_backoff_then_succeed,
            timeouts_count_as_failed_attempts,
            panics_retry_and_permanent_errors_do_not,
            watch_sees_progress_from_0_to_100,
            cancel_a_queued_and_a_running_job,
            submit_and_wait_result_and_callbacks,
            fencing_refuses_a_worker_whose_lease_was_taken,
            unique_jobs_under_concurrent_enqueues,
            dead_jobs_are_re_driven_and_listed,
            leadership_is_exclusive_and_fails_over,
            finished_jobs_are_pruned,
            shutdown_releases_unfinished_jobs_and_maintenance_rescues,
            http_callbacks_fire_once_per_terminal_state,
            each_queue_runs_at_most_its_concurrency,
            claimed_ahead_jobs_are_given_back_unstarted,
            a_cancel_reaches_a_job_claimed_ahead,
            claimed_rows_read_as_stored,
            an_unreadable_row_costs_only_itself,
            an_unreadable_row_costs_only_its_callback,
            every_duration_parameter_is_clamped_or_refused,
            a_worker_gives_back_kinds_it_does_not_run,
            enqueue_options_and_errors_say_what_they_mean,
            scheduled_jobs_start_at_their_due_time,
        );
        $crate::conformance_tests!(@workflows $fixture;
            workflow_steps_run_once_and_replay,
            a_sleeping_run_holds_no_slot_and_survives_a_restart,
            signals_before_and_after_the_wait_in_order,
            concurrent_starts_of_one_workflow_id_make_one_run,
            compensations_run_newest_first_once,
            a_renamed_step_is_a_non_determinism_error,
            versions_run_side_by_side_and_an_unknown_version_waits,
            child_results_and_cancel_cascades,
            restart_from_a_step_reuses_the_steps_before_it,
            bad_input_to_workflows_is_a_typed_error,
            the_whole_run_timeout_ends_a_run,
            forges_explicit_step_api_and_loops,
            start_workflow_in_commits_or_rolls_back_with_the_callers_transaction,
            a_panic_is_a_transient_failure,
            a_cancel_stops_a_running_run_at_its_next_step,
            an_unreadable_run_costs_only_itself,
        );
        $crate::conformance_tests!(@crons $fixture;
            every_tick_runs_once_across_schedulers,
            catch_up_runs_the_latest_missed_ticks_in_order,
            overlapping_ticks_are_skipped_and_recorded,
            schedules_start_workflows_and_refuse_bad_input,
            undeclared_schedules_are_disabled_with_history_kept,
        );
        $crate::conformance_tests!(@outbox $fixture;
            rollback_leaves_no_event_and_two_relays_deliver_each_once,
            publish_failures_retry_then_fail_until_requeued,
            order_per_key_and_a_retrying_row_does_not_block_its_key,
            the_inbox_marks_each_message_once,
        );
    };
    (@outbox $fixture:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::run($fixture, |fx, store| $crate::outbox::$name(fx, store)).await
            }
        )*
    };
    (@crons $fixture:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::run($fixture, |fx, store| $crate::crons::$name(fx, store)).await
            }
        )*
    };
    (@workflows $fixture:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::run($fixture, |fx, store| $crate::workflows::$name(fx, store)).await
            }
        )*
    };
    (@jobs $fixture:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::run($fixture, |fx, store| $crate::jobs::$name(fx, store)).await
            }
        )*
    };
    (@each $fixture:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                $crate::run($fixture, |fx, store| $crate::queue::$name(fx, store)).await
            }
        )*
    };
}
