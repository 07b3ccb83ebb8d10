-- Dray schema version 8: a little more room on each page, so that every claim is a HOT update.
--
-- A claim writes a new version of each row it takes, in one transaction for the whole batch, so
-- the old versions cannot be pruned to make room until it commits: a page needs room for a
-- claimed version of every row on it. Version 5 left half of each page free (fillfactor 50),
-- the room for a copy of each row as it was enqueued. But a claimed version is wider than the
-- row it replaces: it adds the lease end (8 bytes) and the lease holder's id (a worker's default
-- id, `worker-` and 12 hex digits, is 20 bytes). For a small job (a payload of a few bytes, a
-- 148-byte row) that is ~15% more, so on a 20,000-job drain ~15% of claims found no room,
-- became non-HOT updates, and each wrote two index entries (the primary key's and the claim
-- index's) that later had to be cleaned up. With fillfactor 45 (23 such rows per page instead
-- of 26) every claim of that drain was HOT; a worker id up to ~40 characters still fits.
-- (Applies to pages filled from now on; bench/README.md, "Session 13", has the measurements.)

ALTER TABLE dray_jobs SET (fillfactor = 45);
