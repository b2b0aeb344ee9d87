-- The per-device daily rollup the planners' reports read (ingest/rollups.py,
-- `device_daily_query`; insights/reports.py): one row per (UTC day, device, boot,
-- schema, category, model, firmware, region, membership tier, purchase channel, owner
-- key, detail, trigger) with events and the lowest and highest sequence number.
--
-- Kept like `_hourly` and `_daily`: `refresh_rollups` recomputes the days of the noted
-- hours from the raw rows, and reads take the days still noted from the raw rows. No
-- unique key: a day is always deleted and recomputed whole, and every report
-- re-aggregates the rows it reads, so two rows of one group (after an erasure cleared
-- a key, see below) change no answer.
CREATE TABLE {table}_device_daily (
    bucket           timestamptz NOT NULL,
    device_id        text        NOT NULL,
    boot_id          text        NOT NULL,
    schema           text        NOT NULL,
    category         text        NOT NULL,
    model            text,
    firmware         text,
    region           text,
    membership_tier  text,
    purchase_channel text,
    owner_key        text,
    detail           text,
    trigger          text,
    events           bigint      NOT NULL,
    min_seq          bigint      NOT NULL,
    max_seq          bigint      NOT NULL
);

-- Every report reads a range of days; the refresh deletes days by bucket too.
CREATE INDEX {table}_device_daily_bucket ON {table}_device_daily (bucket);

-- Erasure clears an owner's key here as in the raw rows (`UsageStore.unlink_owners`).
CREATE INDEX {table}_device_daily_owner_key ON {table}_device_daily (owner_key)
    WHERE owner_key IS NOT NULL;

-- A table that already has rows: note one hour of each day it holds, so the next
-- refresh materialises those days (and reads take them live until then). Days before
-- `retained_from` are skipped by the refresh: their raw rows are partly gone, so no
-- exact device-day can be made of them any more.
INSERT INTO {table}_rollup_invalidations (bucket)
SELECT DISTINCT date_bin('1 day', event_time, timestamptz '1970-01-01 00:00:00+00')
FROM {table};
