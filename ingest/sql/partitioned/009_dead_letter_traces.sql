-- The refused message's W3C traceparent (`ingest.trace`), where it had one: the letter
-- can be followed, and a replay carries it on. Null for untraced messages and for the
-- letters stored before this migration.
ALTER TABLE {table}_dead_letters ADD COLUMN traceparent text;
