-- An erasure is done once a later pass finds nothing of the owner left
-- (`ingest.erasure`): until then the consumers apply it again every cache TTL. A
-- batch enriched before the erasure and committed after it, or a refresh that read
-- the rows before the erasure committed, can put the key back after the first pass.
-- Erasures recorded before this migration are checked once more.
ALTER TABLE {table}_erasures ADD COLUMN verified boolean NOT NULL DEFAULT false;
