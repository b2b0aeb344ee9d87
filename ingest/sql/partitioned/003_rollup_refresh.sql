-- Rollups recomputed from the raw rows instead of incremented in the write transaction
-- (ingest/rollups.py). The write transaction now only notes which hours got rows; the
-- per-device membership tables that kept distinct devices exact on every write cost
-- as much as the rows themselves, and go.
--
-- The rollups already materialised stay: they were exact, and nothing is noted for
-- them, so they are not recomputed.

DROP TABLE {table}_hourly_devices, {table}_daily_devices;

-- Hours with rows not yet in the rollups: one row per hour per batch, no key, so
-- concurrent writers never wait on each other here. `refresh_rollups` empties it.
CREATE TABLE {table}_rollup_invalidations (
    bucket timestamptz NOT NULL
);

-- Raw rows before this were dropped by retention (`drop_expired`): buckets before it
-- are never recomputed, so the rollups keep their history.
ALTER TABLE {table}_layout ADD COLUMN retained_from timestamptz;

-- A refresh reads a bucket's rows by event time. Rows arrive in about event-time
-- order, so a BRIN index finds them for almost no write cost (a btree on event_time
-- would cost every COPY a second index).
CREATE INDEX {table}_event_time_brin ON {table} USING brin (event_time);
