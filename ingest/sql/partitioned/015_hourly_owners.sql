-- The owners of each UTC hour, for the heat map's owners per local hour
-- (insights/reports.py, `_heatmap`; ingest/rollups.py, `hourly_owners_query`): one row
-- per (UTC hour, category, model, firmware, region, owner key) with the events stored.
--
-- Why: the heat map counts each local hour of the week's distinct owners (k-anonymity).
-- A local hour is not within one UTC day, so the device-daily rollup cannot say who was
-- active in it, and the report read the raw rows of the whole range: every row's body
-- with it, 0.5-0.8 s on a month of 2,000 devices (bench/report_scale.py). A UTC hour
-- lies inside one local hour for every zone a whole number of hours from UTC, which is
-- what the heat map accepts. Rows without a key (no analytics consent) are kept, under
-- a NULL key, so a cell of only those still shows, counting no one, as before.
--
-- Kept like `_hourly`: `refresh_rollups` recomputes the noted hours from the raw rows,
-- reads take the hours still noted from the raw rows. No unique key: an hour is always
-- deleted and recomputed whole, and the report re-aggregates what it reads, so two rows
-- of one group (after an erasure cleared a key) change no answer.
CREATE TABLE {table}_hourly_owners (
    bucket    timestamptz NOT NULL,
    category  text        NOT NULL,
    model     text,
    firmware  text,
    region    text,
    owner_key text,
    events    bigint      NOT NULL
);

-- The report reads a range of hours; the refresh deletes hours by bucket too.
CREATE INDEX {table}_hourly_owners_bucket ON {table}_hourly_owners (bucket);

-- Erasure clears an owner's key here as in the raw rows (`ingest.erasure`).
CREATE INDEX {table}_hourly_owners_owner_key ON {table}_hourly_owners (owner_key)
    WHERE owner_key IS NOT NULL;

-- A table that already has rows: note each hour it holds, so the next refresh
-- materialises them (reads take them from the raw rows until then). Hours before
-- `retained_from` are skipped by the refresh, as for the other rollups.
INSERT INTO {table}_rollup_invalidations (bucket)
SELECT DISTINCT date_bin('1 hour', event_time, timestamptz '1970-01-01 00:00:00+00')
FROM {table};
