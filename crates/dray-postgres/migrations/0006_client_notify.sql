-- Dray schema version 6: wake-ups are sent by Dray after an enqueue commits, no longer by an
-- insert trigger inside the enqueue's transaction.
--
-- A transaction that has called NOTIFY takes, at commit, a lock that is global to the whole
-- server and holds it until its commit record is flushed. So enqueues from concurrent
-- connections committed one at a time, each waiting for its own flush, instead of sharing
-- flushes: with 8 connections inserting one row each, 3,300 commits/s with the trigger, 6,700
-- without (this 2-core box, pgbench). Now `Queue::enqueue` and friends commit first; the store
-- then sends the NOTIFY from a transaction that writes nothing (so it holds that lock only for
-- an instant), coalescing the wake-ups of enqueues made meanwhile. An enqueue made inside the
-- caller's transaction (`enqueue_in`) still sends its NOTIFY in that transaction, delivered at
-- commit. A wake-up is a hint either way: receivers also poll.

DROP TRIGGER dray_jobs_notify_insert ON dray_jobs;
DROP FUNCTION dray_jobs_notify();
