-- The dead letters' record (`ingest.dead_letter_table`): every message the pipeline
-- refused, kept in the usage database so that losing Kafka loses no record of it. The
-- consumer writes its own letters in the batch's transaction (with the rows and the
-- offsets); the bridge's letters come from the dead-letter topic. `letter_key` (a
-- SHA-256 of the letter's identity: its source position and reason, or for a bridge
-- letter its MQTT topic and failure time, and the original bytes) makes a
-- redelivered letter change nothing. A plain table on both layouts: letters are few,
-- and expire and are erased by DELETE.
CREATE TABLE {table}_dead_letters (
    letter_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    letter_key       bytea       NOT NULL UNIQUE,
    reason           text        NOT NULL,
    message          text        NOT NULL,
    device_id        text,
    original         bytea       NOT NULL,
    source_kind      text        NOT NULL CHECK (source_kind IN ('kafka', 'mqtt')),
    source_topic     text        NOT NULL,
    source_partition integer,
    source_offset    bigint,
    failed_at        timestamptz NOT NULL,
    model            text,
    owner_key        text,
    stored_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((source_kind = 'kafka') = (source_partition IS NOT NULL AND source_offset IS NOT NULL))
);
CREATE INDEX {table}_dead_letters_failed_at ON {table}_dead_letters (failed_at);
CREATE INDEX {table}_dead_letters_reason ON {table}_dead_letters (reason, letter_id);
CREATE INDEX {table}_dead_letters_source
    ON {table}_dead_letters (source_partition, source_offset);
CREATE INDEX {table}_dead_letters_owner_key
    ON {table}_dead_letters (owner_key) WHERE owner_key IS NOT NULL;
