-- Firmware history, from the devices' own `<category>.firmware` events (ingest/enrich.py,
-- `Enricher.record_firmware`): which version a device ran at any event time.
--
-- A row per installation the device reported (outcome "installed"); a failed or
-- rolled-back update changes nothing. The key makes a redelivered event a no-op.
-- Enrichment takes a row's firmware as the `to_version` of the latest installation at
-- or before its event time, else the first installation's `from_version`, else
-- `devices.firmware_version` (what the factory or an operator recorded).
CREATE TABLE firmware_history (
    device_key   bigint      NOT NULL REFERENCES devices (device_key) ON DELETE CASCADE,
    installed_at timestamptz NOT NULL,
    from_version text        NOT NULL,
    to_version   text        NOT NULL,
    PRIMARY KEY (device_key, installed_at)
);

-- devices.firmware_version follows the newest installation (an older one arriving late
-- leaves it alone), and each device with a new installation is named on the channel
-- (`device <device_id>`), so a consumer's cache drops that device alone, even while it
-- is loading it. Once per INSERT statement (a transition table), not per row: a batch
-- records its installations in one statement.
-- The registry lives in a schema of its own and a trigger runs with the writer's
-- search_path, hence the schema-qualified dynamic statement.
CREATE FUNCTION firmware_history_current() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format($sql$
        WITH newest AS (
            SELECT DISTINCT ON (a.device_key) a.device_key, a.to_version, a.installed_at
            FROM added a
            ORDER BY a.device_key, a.installed_at DESC
        ), updated AS (
            UPDATE %1$I.devices d SET firmware_version = n.to_version
            FROM newest n
            WHERE d.device_key = n.device_key
              AND d.firmware_version IS DISTINCT FROM n.to_version
              AND NOT EXISTS (SELECT 1 FROM %1$I.firmware_history h
                              WHERE h.device_key = n.device_key
                                AND h.installed_at > n.installed_at)
        )
        SELECT pg_notify('usagepipe_registry', %1$L || ' device ' || d.device_id)
        FROM %1$I.devices d
        WHERE d.device_key IN (SELECT device_key FROM newest)
    $sql$, TG_TABLE_SCHEMA);
    RETURN NULL;
END
$$;

CREATE TRIGGER firmware_history_current AFTER INSERT ON firmware_history
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION firmware_history_current();
