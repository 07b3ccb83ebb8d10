-- Dray schema version 7: only the CHECK constraints that guard a job's life stay.
--
-- PostgreSQL does not keep a table's CHECK constraints compiled between statements: every
-- INSERT or UPDATE reads each constraint's stored expression tree back from its text form and
-- plans it again before checking its first row. For a one-row statement (`Queue::enqueue`, a
-- failed attempt, a progress report) that was about 15% of the server's time per statement with
-- five constraints (perf on this 2-core box; the text parser alone was 10%).
--
-- Kept, because a row that broke them could be stuck or lost:
--   dray_jobs_finished_check  a row is finished exactly when it has a finished_at (the claim
--                             index and pruning rely on it);
--   dray_jobs_lease_check     a running row has a lease end (else no sweep would ever rescue it).
-- Dropped, because every value they limited is checked before it is written (`JobOptions`,
-- `Progress`, the state machine in Dray's own statements) and again when a row is read (an
-- unknown state or a progress outside 0..=100 is a `CorruptRow` error naming the row):
--   dray_jobs_state_check     (a state outside the finished check's pending list is, by that
--                             check, a finished row, so it is never claimed);
--   dray_jobs_attempts_check;
--   dray_jobs_progress_check.

ALTER TABLE dray_jobs
    DROP CONSTRAINT dray_jobs_state_check,
    DROP CONSTRAINT dray_jobs_attempts_check,
    DROP CONSTRAINT dray_jobs_progress_check;
