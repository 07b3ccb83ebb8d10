-- Dray schema version 9: finished jobs leave the hot table.
--
-- Until now a finished job stayed in dray_jobs for the retention (24 h by default): at a steady
-- 1,000 jobs/s that is 86 M finished rows beside the few hundred live ones, pruned by DELETE
-- row by row. Every completion left a dead row version behind in the hot table and its indexes,
-- and while any transaction held the xmin horizon back (a long migration, an analytics query, a
-- forgotten BEGIN), VACUUM could remove none of them, so claims walked ever more dead index
-- entries: pick-up latency rose from 2 ms to 46 ms (p50) over two minutes of one held
-- transaction.
--
-- From here on, the statement that finishes a job (completes it, kills it, cancels it) deletes
-- its row from dray_jobs and inserts it, in its final form, into dray_jobs_history, in the same
-- statement. The history is partitioned by the hour of finished_at: retention drops whole
-- partitions (DROP TABLE, no row-by-row DELETE, no dead rows), and a re-drive moves a row back.
-- Reads that may meet a finished job (get, list, stats) read the view dray_jobs_all.
--
-- What this migration does not do: move the finished rows already in dray_jobs. They stay
-- where they are, readable through the same view, and leave by the old row-by-row pruning
-- once the retention has passed; every statement that acts on a finished job (re-drive,
-- callbacks) also looks for it there. So the upgrade copies nothing and takes no lock beyond
-- creating new objects.

-- The history: the hot table's columns (and defaults), no CHECK constraints (the rows arrive
-- finished, from Dray's own statements), finished_at always set.
CREATE TABLE dray_jobs_history (LIKE dray_jobs INCLUDING DEFAULTS)
    PARTITION BY RANGE (finished_at);
ALTER TABLE dray_jobs_history ALTER COLUMN finished_at SET NOT NULL;

-- Lookups by id (get, cancel, re-drive) and listings newest first.
CREATE INDEX dray_jobs_history_id_idx ON dray_jobs_history (id);
-- Pending callback deliveries.
CREATE INDEX dray_jobs_history_callback_idx ON dray_jobs_history (callback_next_at NULLS FIRST)
    WHERE callback_url IS NOT NULL AND callback_done_at IS NULL;

-- Rows whose hour has no partition yet (none should: partitions are made hours ahead) land here
-- rather than fail their completion; pruning empties it row by row.
CREATE TABLE dray_jobs_history_default PARTITION OF dray_jobs_history DEFAULT;

-- Every job, hot or finished, for reads that do not know which. (`*` is expanded now: a later
-- migration that adds a column to the job tables recreates this view.)
CREATE VIEW dray_jobs_all AS
    SELECT * FROM dray_jobs
    UNION ALL
    SELECT * FROM dray_jobs_history;

-- Makes the hourly partitions from the current hour to `hours_ahead` hours ahead that do not
-- exist yet; returns how many it made. A partition is made as a table of its own and then
-- attached, which locks the history only in SHARE UPDATE EXCLUSIVE mode: completions (inserts)
-- go on meanwhile. The attach also checks the (empty) default partition, which it must have to
-- itself for an instant: it waits at most 100 ms for that, else stops and leaves the rest to
-- the next call. An hour whose rows already went to the default partition is skipped (the
-- attach would fail); those rows are pruned from there.
CREATE FUNCTION dray_history_prepare(hours_ahead int) RETURNS int
LANGUAGE plpgsql SET search_path FROM CURRENT SET lock_timeout = '100ms' AS $$
DECLARE
    first timestamptz := date_trunc('hour', now(), 'UTC');
    lo timestamptz;
    part text;
    made int := 0;
BEGIN
    -- One maker at a time per schema, across processes; another one at work makes them.
    IF NOT pg_try_advisory_xact_lock(hashtext('dray.history.' || current_schema())) THEN
        RETURN 0;
    END IF;
    FOR i IN 0..hours_ahead LOOP
        lo := first + i * interval '1 hour';
        part := 'dray_jobs_history_' || to_char(lo AT TIME ZONE 'UTC', 'YYYYMMDDHH24');
        CONTINUE WHEN to_regclass(part) IS NOT NULL;
        CONTINUE WHEN EXISTS (SELECT 1 FROM dray_jobs_history_default
                              WHERE finished_at >= lo AND finished_at < lo + interval '1 hour');
        BEGIN
            EXECUTE format('CREATE TABLE %I (LIKE dray_jobs_history INCLUDING DEFAULTS)', part);
            EXECUTE format('ALTER TABLE dray_jobs_history ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                           part, lo, lo + interval '1 hour');
            made := made + 1;
        EXCEPTION WHEN lock_not_available THEN
            RETURN made;
        END;
    END LOOP;
    RETURN made;
END $$;

-- Drops the hourly partitions whose every row finished more than `older_than` ago; returns
-- how many rows they held (the planner's estimate, kept by autovacuum). A drop waits at most
-- 100 ms for its lock (it needs the history to itself for an instant): one that cannot get it
-- is left for the next call.
CREATE FUNCTION dray_history_drop(older_than interval) RETURNS bigint
LANGUAGE plpgsql SET search_path FROM CURRENT SET lock_timeout = '100ms' AS $$
DECLARE
    part record;
    dropped bigint := 0;
BEGIN
    FOR part IN
        SELECT c.oid, c.relname::text AS name, c.reltuples
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'dray_jobs_history'::regclass
          AND c.relname ~ '^dray_jobs_history_[0-9]{10}$'
          AND make_timestamptz(substr(c.relname, 19, 4)::int, substr(c.relname, 23, 2)::int,
                               substr(c.relname, 25, 2)::int, substr(c.relname, 27, 2)::int,
                               0, 0, 'UTC') + interval '1 hour' <= now() - older_than
        ORDER BY c.relname
    LOOP
        BEGIN
            EXECUTE format('DROP TABLE %I', part.name);
            dropped := dropped + greatest(part.reltuples, 0)::bigint;
        EXCEPTION WHEN lock_not_available THEN
            RETURN dropped;
        END;
    END LOOP;
    RETURN dropped;
END $$;

SELECT dray_history_prepare(3);
