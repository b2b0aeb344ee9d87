-- The continuous aggregates are refreshed by the consumers from notes of the hours they
-- wrote, as the plain layout's rollups are (ingest/rollups.py, ingest/caggs.py), no
-- longer by refresh policies.
--
-- A refresh policy reaches back only its window: buckets older than it that were never
-- materialised fell below the watermark and out of every read (real-time aggregation
-- adds raw rows above the watermark only), and a late event below the watermark was
-- not counted until a policy happened to reach it. Notes tell a read which buckets to
-- take from the raw rows until a refresh has materialised them, and tell the refresh
-- which buckets to materialise, however old. The policies are removed by the store
-- after this migration (`remove_continuous_aggregate_policy` is not transactional
-- with respect to the scheduler, so it runs beside the migration, not in it).

-- Hours with rows not yet materialised: one row per hour per batch, no key, so
-- concurrent writers never wait on each other. `id` lets a refresh, which commits
-- between its CALLs, remove exactly the notes it read.
CREATE TABLE {table}_rollup_invalidations (
    bucket      timestamptz NOT NULL,
    hourly_done boolean     NOT NULL DEFAULT false,
    id          bigint      GENERATED ALWAYS AS IDENTITY
);

-- Buckets before this lie before the retained raw rows (retention dropped them): they
-- are never recomputed, so the aggregates keep their history.
ALTER TABLE {table}_layout ADD COLUMN retained_from timestamptz;

-- Every hour that already holds rows, so that a table the policies refreshed is
-- repaired by the next refresh and read exactly until then. TimescaleDB recomputes
-- only what its own invalidation log says changed, so a note for a bucket already
-- materialised costs a look-up, not a recompute.
INSERT INTO {table}_rollup_invalidations (bucket)
SELECT DISTINCT time_bucket(INTERVAL '1 hour', event_time) FROM {table};
