-- Owners whose product-planning (analytics) consent ended, by withdrawal or by a lapse
-- when a re-asking policy version took effect (the registry's
-- `analytics_consent_ends`), and whose key the consumer removed from the rows, the
-- device-daily rollup and the dead letters stored under that consent
-- (ingest/withdrawal.py): one record per owner and end, as `{table}_erasures` is per
-- erased owner. An end is done once a later pass finds nothing left (`verified`);
-- until then the consumers apply it again every cache TTL. `ended_at` is the end's
-- time in the registry: the consumer asks the registry only for ends since the
-- earliest unverified one, or since shortly before the latest recorded. Holds the
-- owner's random id, which names nobody outside the registry; an owner's records are
-- deleted when the consumer applies their erasure.
CREATE TABLE IF NOT EXISTS {table}_consent_unlinks (
    owner_id   uuid        NOT NULL,
    event      text        NOT NULL,
    ended_at   timestamptz NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    unlinked   bigint      NOT NULL,
    verified   boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (owner_id, event)
);

CREATE INDEX {table}_consent_unlinks_ended_at ON {table}_consent_unlinks (ended_at);
