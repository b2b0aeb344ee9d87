-- The usage store on PostgreSQL with TimescaleDB (2.13+ for the `by_range` form of
-- create_hypertable; 2.11+ so that INSERT ... ON CONFLICT DO NOTHING also deduplicates
-- into compressed chunks; 2.7+ for count(DISTINCT) in continuous aggregates).
--
-- Followed: https://docs.tigerdata.com/api/latest/hypertable/create_hypertable/ ,
-- .../api/latest/continuous-aggregates/create_materialized_view/ and
-- .../use-timescale/latest/compression/modify-compressed-data/ (2.11: "you can insert
-- data into compressed chunks ... even if the data you are inserting has unique
-- constraints, and those constraints are preserved").
--
-- The settings-dependent policies (refresh windows, compression, retention) are not
-- here: the store applies them from settings after migrating (`apply_policies`).
-- The store creates the extension (CREATE EXTENSION IF NOT EXISTS timescaledb) before
-- choosing this directory, and sets `usagepipe.partition_interval` for the session.

DO $$
BEGIN
    IF to_regclass('{table}') IS NOT NULL THEN
        ALTER TABLE {table} RENAME TO {table}_unversioned;
        ALTER INDEX IF EXISTS {table}_pkey RENAME TO {table}_unversioned_pkey;
        ALTER INDEX IF EXISTS {table}_event_time_idx RENAME TO {table}_unversioned_event_time_idx;
        RAISE NOTICE 'the unversioned usage table was renamed to {table}_unversioned';
    END IF;
END
$$;

CREATE TABLE {table}_layout (
    kind               text     NOT NULL CHECK (kind IN ('partitioned', 'timescaledb')),
    partition_interval interval NOT NULL CHECK (partition_interval >= interval '1 hour'),
    one_row            boolean  PRIMARY KEY DEFAULT true CHECK (one_row)
);
INSERT INTO {table}_layout (kind, partition_interval)
VALUES ('timescaledb', current_setting('usagepipe.partition_interval')::interval);

CREATE TABLE {table} (
    device_id       text        NOT NULL,
    boot_id         text        NOT NULL,
    seq             bigint      NOT NULL,
    event_time      timestamptz NOT NULL,
    schema          text        NOT NULL,
    schema_version  integer     NOT NULL,
    body            jsonb       NOT NULL,
    model           text,
    firmware        text,
    region          text,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    ingested_at     timestamptz NOT NULL DEFAULT now(),
    -- A hypertable's unique keys must include its partitioning column.
    PRIMARY KEY (device_id, boot_id, seq, event_time)
);

SELECT create_hypertable(
    '{table}',
    by_range('event_time', current_setting('usagepipe.partition_interval')::interval)
);

-- Compressed chunks are segmented by device: a late event's conflict check then
-- decompresses only that device's batches. Every key column is in segmentby or
-- orderby, as TimescaleDB asks of a unique constraint's columns (it warns otherwise).
ALTER TABLE {table} SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id',
    timescaledb.compress_orderby = 'event_time DESC, boot_id, seq'
);

CREATE TABLE {table}_offsets (
    group_id       text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    next_offset    bigint      NOT NULL CHECK (next_offset > 0),
    last_timestamp bigint,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- The rollups: continuous aggregates with the same columns as the plain-PostgreSQL
-- rollup tables, so `ingest.rollups.usage_rollup` reads either. WITH NO DATA: nothing
-- to materialise yet, and it keeps the statement legal inside the migration's
-- transaction. materialized_only = false (the default is true since 2.13): queries add
-- the not yet materialised recent rows, as the plain rollups include every row.
-- Buckets are UTC (time_bucket on timestamptz), as date_bin's are on the other path.
CREATE MATERIALIZED VIEW {table}_hourly
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 hour', event_time) AS bucket,
       split_part(schema, '.', 1) AS category,
       schema, model, firmware, region,
       count(*) AS events,
       count(DISTINCT device_id) AS devices,
       sum((body ->> 'energy_wh')::numeric) AS energy_wh,
       sum((body ->> 'duration_s')::numeric) AS duration_s
FROM {table}
GROUP BY time_bucket(INTERVAL '1 hour', event_time), split_part(schema, '.', 1),
         schema, model, firmware, region
WITH NO DATA;

-- Daily straight from the hypertable, not from the hourly aggregate: distinct devices
-- per day cannot be summed from distinct devices per hour.
CREATE MATERIALIZED VIEW {table}_daily
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 day', event_time) AS bucket,
       split_part(schema, '.', 1) AS category,
       schema, model, firmware, region,
       count(*) AS events,
       count(DISTINCT device_id) AS devices,
       sum((body ->> 'energy_wh')::numeric) AS energy_wh,
       sum((body ->> 'duration_s')::numeric) AS duration_s
FROM {table}
GROUP BY time_bucket(INTERVAL '1 day', event_time), split_part(schema, '.', 1),
         schema, model, firmware, region
WITH NO DATA;
