-- TLS client certificates the registry signed from devices' CSRs (devices/certificates.py).
-- The certificate itself is the device's to keep; the registry records what identifies
-- it: the serial the CA gave it and the SHA-256 fingerprint of its DER form, for an
-- operator matching a certificate seen on the wire, and for the revocation list the
-- broker reads (every certificate with a revoked_at that has not yet expired).
CREATE TABLE device_certificates (
    certificate_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_key     bigint NOT NULL REFERENCES devices,
    serial         numeric(49, 0) NOT NULL UNIQUE,  -- up to 159 bits (RFC 5280: 20 octets)
    fingerprint    text NOT NULL UNIQUE CHECK (fingerprint ~ '^[0-9a-f]{64}$'),
    not_before     timestamptz NOT NULL,
    not_after      timestamptz NOT NULL,
    issued_at      timestamptz NOT NULL,
    revoked_at     timestamptz,
    CHECK (not_after > not_before)
);

CREATE INDEX device_certificates_device ON device_certificates (device_key, not_after);
CREATE INDEX device_certificates_revoked ON device_certificates (not_after)
    WHERE revoked_at IS NOT NULL;
