-- What the consumer uses of the registry besides reading its tables, as objects the
-- registry owns: it records the firmware installations devices report through the
-- registry's function (ingest/enrich.py, `Enricher.record_firmware`) instead of
-- writing `firmware_history` itself, and finds the owners whose keys must leave
-- stored usage rows in the view `erased_owners` (ingest/erasure.py).

CREATE VIEW erased_owners AS
    SELECT owner_id, erased_at FROM owners WHERE status = 'erased';

-- Each installation new to the history (a redelivered event records nothing), for
-- devices the registry knows; returns the device_key of each row added. Arguments:
-- device ids, installation times, from- and to-versions, element by element.
-- The search_path is the registry schema's, fixed when the function is created (the
-- migration runner sets it), whatever the caller's.
CREATE FUNCTION record_firmware(text[], timestamptz[], text[], text[])
    RETURNS SETOF bigint LANGUAGE sql
    SET search_path FROM CURRENT
AS $$
    INSERT INTO firmware_history (device_key, installed_at, from_version, to_version)
    SELECT d.device_key, u.at, u.from_version, u.to_version
    FROM unnest($1, $2, $3, $4) AS u (device_id, at, from_version, to_version)
    JOIN devices d ON d.device_id = u.device_id
    ON CONFLICT DO NOTHING
    RETURNING device_key
$$;
