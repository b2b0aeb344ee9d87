-- Enrichment (ingest/enrich.py): the rest of the registry's facts on each usage row.
--
-- model, firmware and region (001) come from the registry too. category is the product
-- model's; purchase_channel that of the ownership period covering the event time;
-- analytics_consent the owner's consent when the row was stored (NULL: no owner then);
-- region, membership_tier and owner_key only with that consent, owner_key being
-- HMAC-SHA256(enrich.owner_key_secret, owner id), never the owner id itself.
ALTER TABLE {table}
    ADD COLUMN category          text,
    ADD COLUMN membership_tier   text,
    ADD COLUMN purchase_channel  text,
    ADD COLUMN analytics_consent boolean,
    ADD COLUMN owner_key         text;

-- Erasure finds an owner's rows by key (`UsageStore.unlink_owners`).
CREATE INDEX {table}_owner_key ON {table} (owner_key) WHERE owner_key IS NOT NULL;

-- Erased owners whose keys were removed from this table: the consumer applies every
-- erased owner of the registry not listed here (at start-up and every cache TTL), so
-- an erasure made while no consumer ran is still applied. Holds the random owner id
-- only, which after erasure names nobody.
CREATE TABLE IF NOT EXISTS {table}_erasures (
    owner_id   uuid        PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now(),
    unlinked   bigint      NOT NULL
);
