-- Compression that compresses: no segmentby, batches ordered by the unique key.
--
-- Needs TimescaleDB 2.14+ (compression settings changed while chunks are compressed,
-- per-chunk settings in `timescaledb_information.chunk_compression_settings`). The
-- figures below are from 2.28.3, whose UPDATE and upserts skip compressed batches by
-- bloom filter (2.27+); older versions decompress more for the same statements.
--
-- Segmented by device_id (001), a compressed batch holds one device's rows of one
-- chunk: at appliance rates (about 4 events per device per day, the demo's 1,200
-- devices over four weeks) that is 4 rows a batch, and compressed one-day chunks came
-- out 1.12 times smaller than uncompressed (TimescaleDB warns below 1.0): each batch's
-- metadata (min/max and first/last of each orderby column, two bloom filters) and each
-- column's header cost about as much as its rows. Without segmentby, a chunk's rows
-- are cut into batches of up to 1,000 (TimescaleDB's batch size) in orderby order: 886
-- rows a batch on the same traffic, chunks 6.5 times smaller (bench/compression.py).
--
-- Followed: https://docs.tigerdata.com/use-timescale/latest/compression/compression-design/
-- (segmentby groups a batch, orderby sorts it and gets min/max metadata) and Tiger
-- Data's setup guide for hypertables (github.com/timescale/pg-aiguide, skill
-- setup-timescaledb-hypertables: a segmentby value needs more than 100 rows per chunk,
-- under 10 is poor; a column too sparse for segmentby goes first in orderby instead).
--
-- Why device_id first in orderby, then boot_id, seq and event_time (the primary key's
-- order; TimescaleDB asks that every key column be in segmentby or orderby):
-- - a device's rows lie together, so the per-device values (device_id, boot_id,
--   model, firmware, region, owner_key, tier, channel) compress as runs, and seq and
--   event_time as small deltas;
-- - a redelivered row's conflict check (INSERT ... ON CONFLICT DO NOTHING, the store's
--   slow path) finds the one or two batches whose device_id range holds the key, by the
--   index TimescaleDB builds on the orderby metadata, and checks them in memory:
--   duplicates into compressed chunks decompress nothing;
-- - erasure (`UPDATE ... WHERE owner_key = $1`) decompresses only the batches the
--   owner's devices are in (TimescaleDB's default bloom filter on owner_key, from its
--   index, skips the others): about one batch per chunk the owner has rows in. Ordered
--   by event_time first, every batch spans all devices and an erasure decompressed
--   nearly the whole table (137,504 of 143,068 rows for one owner).
--
-- Existing compressed chunks keep the settings they were compressed with until they
-- are recompressed (TimescaleDB: "updated compression settings will only apply to
-- future compressions"), so they are recompressed here, once: 2.4 s for the demo's 33
-- compressed one-day chunks (143,068 rows). Uncompressed chunks are left to the policy.

ALTER TABLE {table} SET (
    timescaledb.compress_segmentby = '',
    timescaledb.compress_orderby = 'device_id, boot_id, seq, event_time'
);

DO $$
DECLARE
    chunk regclass;
BEGIN
    FOR chunk IN
        SELECT s.chunk FROM timescaledb_information.chunk_compression_settings s
        WHERE s.hypertable = '{table}'::regclass
        ORDER BY s.chunk::text
    LOOP
        PERFORM compress_chunk(chunk, recompress => true);
    END LOOP;
END
$$;
