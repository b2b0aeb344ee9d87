-- The owners of each UTC hour, for the heat map's owners per local hour
-- (insights/reports.py, `_heatmap`; ingest/rollups.py, `hourly_owners_query`, whose
-- SELECT list and GROUP BY this repeats exactly): one row per (UTC hour, category,
-- model, firmware, region, owner key) with the events stored. Why, and what it holds:
-- see ingest/sql/partitioned/015_hourly_owners.sql.
--
-- A continuous aggregate with real-time aggregation, as `_hourly` and `_device_daily`
-- (003): refreshed by the consumers from the notes (`ingest.caggs`, with `_hourly`'s
-- hours), read with the noted hours taken from the raw rows.
CREATE MATERIALIZED VIEW {table}_hourly_owners
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 hour', event_time) AS bucket,
       split_part(schema, '.', 1) AS category, model, firmware, region, owner_key,
       count(*) AS events
FROM {table}
GROUP BY time_bucket(INTERVAL '1 hour', event_time), split_part(schema, '.', 1), model,
         firmware, region, owner_key
WITH NO DATA;

-- Erasure clears an owner's key in the materialised rows by key (`ingest.erasure`);
-- TimescaleDB puts the index on the materialisation hypertable.
CREATE INDEX {table}_hourly_owners_owner_key ON {table}_hourly_owners (owner_key);

-- Every hour that already holds rows: the next refresh materialises them, reads take
-- them from the raw rows until then.
INSERT INTO {table}_rollup_invalidations (bucket)
SELECT DISTINCT time_bucket(INTERVAL '1 hour', event_time) FROM {table};
