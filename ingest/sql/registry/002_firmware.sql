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
-- leaves it alone); its own trigger then tells the consumers' caches.
-- The registry lives in a schema of its own and a trigger runs with the writer's
-- search_path, hence the schema-qualified dynamic statement.
-- It names the device by id (`device <device_id>`), so a consumer's cache drops that
-- device alone, even while it is loading it.
CREATE FUNCTION firmware_history_current() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    device text;
BEGIN
    EXECUTE format(
        'UPDATE %1$I.devices SET firmware_version = $1
         WHERE device_key = $2 AND firmware_version IS DISTINCT FROM $1
           AND NOT EXISTS (SELECT 1 FROM %1$I.firmware_history h
                           WHERE h.device_key = $2 AND h.installed_at > $3)',
        TG_TABLE_SCHEMA)
    USING NEW.to_version, NEW.device_key, NEW.installed_at;
    EXECUTE format('SELECT device_id FROM %I.devices WHERE device_key = $1', TG_TABLE_SCHEMA)
    INTO device USING NEW.device_key;
    PERFORM pg_notify('usagepipe_registry', TG_TABLE_SCHEMA || ' device ' || device);
    RETURN NULL;
END
$$;

CREATE TRIGGER firmware_history_current AFTER INSERT ON firmware_history
    FOR EACH ROW EXECUTE FUNCTION firmware_history_current();
