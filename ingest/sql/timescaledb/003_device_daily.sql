-- The per-device daily rollup the planners' reports read (ingest/rollups.py,
-- `device_daily_query`, whose SELECT list and GROUP BY this repeats exactly): one row
-- per (UTC day, device, boot, schema, category, model, firmware, region, membership
-- tier, purchase channel, owner key, detail, trigger) with events and the lowest and
-- highest sequence number.
--
-- Followed: https://docs.tigerdata.com/api/latest/continuous-aggregates/create_materialized_view/
-- (WITH (timescaledb.continuous, timescaledb.materialized_only = false), the
-- time_bucket in the GROUP BY, WITH NO DATA), .../use-timescale/latest/continuous-aggregates/about-continuous-aggregates/
-- and .../use-timescale/latest/continuous-aggregates/create-a-continuous-aggregate/
-- (only aggregates that can be computed from partials, here count, min and max; the
-- other GROUP BY expressions immutable: `->>`, split_part, coalesce and CASE are).
-- Real-time aggregation on (materialized_only = false), as for `_hourly` and `_daily`:
-- reads include rows not materialised yet. The refresh policy is added with the
-- others from settings (`UsageStore._apply_policies`), and the store materialises the
-- history once after this migration (`refresh_continuous_aggregate` cannot run inside
-- the migration's transaction).
CREATE MATERIALIZED VIEW {table}_device_daily
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 day', event_time) AS bucket,
       device_id, boot_id, schema, split_part(schema, '.', 1) AS category,
       model, firmware, region, membership_tier, purchase_channel, owner_key,
       coalesce(body ->> 'program', body ->> 'mode', CASE WHEN body ->> 'state' = 'raised' THEN body ->> 'code' END) AS detail,
       body ->> 'trigger' AS trigger,
       count(*) AS events, min(seq) AS min_seq, max(seq) AS max_seq
FROM {table}
GROUP BY time_bucket(INTERVAL '1 day', event_time), device_id, boot_id, schema,
         split_part(schema, '.', 1), model, firmware, region, membership_tier,
         purchase_channel, owner_key,
         coalesce(body ->> 'program', body ->> 'mode', CASE WHEN body ->> 'state' = 'raised' THEN body ->> 'code' END),
         body ->> 'trigger'
WITH NO DATA;
