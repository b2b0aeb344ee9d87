-- The message ids (007) written by the database, in the statement that inserts the
-- rows: a statement-level trigger reads the rows a COPY or INSERT just put into
-- `{table}` (its transition table) and inserts their ids into `{table}_ids` in one
-- set-based INSERT. The store's usual write is then one COPY, of the rows, and a
-- second message with a stored id fails it on the ids' key, as before, so the store
-- takes its slow path (ingest.store).
--
-- Why: written by the store, the ids cost it a second COPY, whose records (key, event
-- time, a digest of the content) the client built, sorted and encoded: 5-6 us a row
-- on the client, which made the store stage 0.67-0.71 of raw COPY into the table as it
-- was keyed before 007. Written here they cost the client nothing and the server about
-- what the old key's btree did (bench/store.py).
--
-- The digest is computed here too, `{table}_content_digest`: 8 bytes of PostgreSQL's
-- 64-bit jsonb hash of the body, seeded with the schema and its version. It hashes the
-- stored jsonb itself (no text is made of it), and like every hash function an index
-- or a hash partition relies on, it is kept the same across PostgreSQL versions (which
-- pg_upgrade needs). The digests the store wrote before (BLAKE2b of the body's text)
-- are recomputed from the stored rows; those 007 left empty stay empty.
--
-- Whatever writes rows some other way (a manual INSERT, a backfill) now gets their ids
-- too. The store's slow path inserts the ids itself, with ON CONFLICT, before the rows:
-- it sets `usagepipe.ids_written` for its transaction, and the trigger then does
-- nothing. The TimescaleDB layout keeps writing the ids from the store (its 007).

CREATE OR REPLACE FUNCTION {table}_content_digest(schema text, schema_version integer, body jsonb)
RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT int8send(jsonb_hash_extended(body, hashtextextended(schema || ':' || schema_version, 0))) $$;

UPDATE {table}_ids i
SET digest = {table}_content_digest(u.schema, u.schema_version, u.body)
FROM {table} u
WHERE i.digest IS NOT NULL
  AND u.device_id = i.device_id COLLATE "C" AND u.boot_id = i.boot_id COLLATE "C"
  AND u.seq = i.seq AND u.event_time = i.event_time;

CREATE OR REPLACE FUNCTION {table}_write_ids() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('usagepipe.ids_written', true) = 'on' THEN
        RETURN NULL;
    END IF;
    -- {table}_content_digest written out: called, it is not inlined here and costs
    -- the server 0.5 s per 100,000 rows; written out, about nothing. In the key's order
    -- (each id goes into the btree beside the one before): 0.1 s per 100,000 cheaper
    -- than in arrival order, sort included (bench/store.py).
    INSERT INTO {table}_ids (device_id, boot_id, seq, event_time, digest)
    SELECT device_id, boot_id, seq, event_time,
           int8send(jsonb_hash_extended(body, hashtextextended(schema || ':' || schema_version, 0)))
    FROM inserted
    ORDER BY device_id COLLATE "C", boot_id COLLATE "C", seq;
    RETURN NULL;
END
$$;

CREATE TRIGGER {table}_write_ids AFTER INSERT ON {table}
REFERENCING NEW TABLE AS inserted
FOR EACH STATEMENT EXECUTE FUNCTION {table}_write_ids();
