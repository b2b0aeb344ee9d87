-- Rate limits on registration per caller (devices/limits.py): one token bucket per key,
-- `subject:<owner>` or `address:<IPv4 address or IPv6 prefix>`. Kept in the database
-- so that every API process counts against the same buckets. A row whose bucket has
-- refilled (untouched for a window) is pruned by `usagepipe registry dormancy`.
CREATE TABLE registration_limits (
    caller_key text PRIMARY KEY,
    tokens     double precision NOT NULL CHECK (tokens >= 0),
    updated_at timestamptz NOT NULL
);

CREATE INDEX registration_limits_updated ON registration_limits (updated_at);

-- Attempts were counted per serial for the former lockout; nothing reads them so now.
DROP INDEX registration_attempts_serial;
