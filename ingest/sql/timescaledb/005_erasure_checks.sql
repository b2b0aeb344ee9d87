-- An erasure is done once a later pass finds nothing of the owner left
-- (`ingest.erasure`): until then the consumers apply it again every cache TTL. A
-- batch enriched before the erasure and committed after it, or a refresh that read
-- the rows before the erasure committed (one of ours waits for the erasure; one run
-- by hand or by a policy does not), can put the key back after the first pass.
-- Erasures recorded before this migration are checked once more: on TimescaleDB 2.28
-- a refresh refused "due to a concurrent refresh" left keys in `_device_daily`.
ALTER TABLE {table}_erasures ADD COLUMN verified boolean NOT NULL DEFAULT false;

-- Erasure clears an owner's key in the aggregate's materialised rows by key, as the
-- plain layout does in its table (TimescaleDB puts an index on a continuous
-- aggregate on its materialisation hypertable).
CREATE INDEX {table}_device_daily_owner_key ON {table}_device_daily (owner_key);
