-- The usage store on plain PostgreSQL (15+: UNIQUE NULLS NOT DISTINCT).
--
-- `{table}` is partitioned by range on the device's event time. The store creates each
-- partition (`{table}_pYYYYMMDDHH`, one `partition_interval` wide, aligned to the Unix
-- epoch) before the COPY that needs it; the DEFAULT partition takes anything else, so no
-- row is ever refused. A partitioned table's unique keys must contain the partition key,
-- hence (device_id, boot_id, seq, event_time).
--
-- The session setting `usagepipe.partition_interval` is set by the store before it
-- runs this file; it is recorded in `{table}_layout` and never changes for the table.

-- A usage table from before versioned migrations (unpartitioned, keyed without
-- event_time) is set aside, not converted: its rows stay readable in {table}_unversioned.
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
VALUES ('partitioned', current_setting('usagepipe.partition_interval')::interval);

CREATE TABLE {table} (
    device_id       text        NOT NULL,
    boot_id         text        NOT NULL,
    seq             bigint      NOT NULL,
    event_time      timestamptz NOT NULL,
    schema          text        NOT NULL,
    schema_version  integer     NOT NULL,
    body            jsonb       NOT NULL,
    -- Filled by enrichment (a later issue); NULL until then, and grouped on already.
    model           text,
    firmware        text,
    region          text,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    ingested_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, boot_id, seq, event_time)
) PARTITION BY RANGE (event_time);

CREATE TABLE {table}_default PARTITION OF {table} DEFAULT;

-- Where each consumer group has got to, written in the same transaction as the rows.
-- last_timestamp is the Kafka timestamp of the record before next_offset: it tells the
-- same log from a topic that was deleted and created again (offsets restart at 0).
CREATE TABLE {table}_offsets (
    group_id       text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    next_offset    bigint      NOT NULL CHECK (next_offset > 0),
    last_timestamp bigint,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- Rollups for planners, kept up to date by the store in the write transaction (only
-- rows actually inserted count). model/firmware/region are NULL until enrichment.
-- COLLATE "C": these keys are compared on every write, and byte order is the cheapest.
CREATE TABLE {table}_hourly (
    bucket     timestamptz NOT NULL,
    category   text COLLATE "C" NOT NULL,
    schema     text COLLATE "C" NOT NULL,
    model      text COLLATE "C",
    firmware   text COLLATE "C",
    region     text COLLATE "C",
    events     bigint      NOT NULL,
    devices    bigint      NOT NULL,
    energy_wh  numeric,
    duration_s numeric,
    CONSTRAINT {table}_hourly_key
        UNIQUE NULLS NOT DISTINCT (bucket, category, schema, model, firmware, region)
);
CREATE TABLE {table}_daily (LIKE {table}_hourly);
ALTER TABLE {table}_daily ADD CONSTRAINT {table}_daily_key
    UNIQUE NULLS NOT DISTINCT (bucket, category, schema, model, firmware, region);

-- Which devices a rollup row has counted: a device is counted in `devices` the first
-- time it appears in a (bucket, group), whatever order its events arrive in. The
-- schema names the category, so the category is not part of the key.
CREATE TABLE {table}_hourly_devices (
    bucket    timestamptz NOT NULL,
    schema    text COLLATE "C" NOT NULL,
    model     text COLLATE "C",
    firmware  text COLLATE "C",
    region    text COLLATE "C",
    device_id text COLLATE "C" NOT NULL,
    CONSTRAINT {table}_hourly_devices_key
        UNIQUE NULLS NOT DISTINCT (bucket, schema, model, firmware, region, device_id)
);
CREATE TABLE {table}_daily_devices (LIKE {table}_hourly_devices);
ALTER TABLE {table}_daily_devices ADD CONSTRAINT {table}_daily_devices_key
    UNIQUE NULLS NOT DISTINCT (bucket, schema, model, firmware, region, device_id);
