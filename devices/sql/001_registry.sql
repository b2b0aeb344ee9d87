-- The device registry. Personal data lives only in owner_contacts; everything analytics
-- may read is keyed by pseudonymous ids (owner uuid, device id).

CREATE TABLE product_models (
    model_number text PRIMARY KEY CHECK (model_number ~ '^[A-Z0-9][A-Z0-9._-]{0,39}$'),
    category     text NOT NULL CHECK (category IN ('washer', 'dryer', 'refrigerator',
                                                   'air_conditioner', 'air_purifier',
                                                   'robot_vacuum')),
    name         text NOT NULL CHECK (name <> ''),
    launched_on  date NOT NULL
);

-- What the factory built. Only a salted hash of the registration code is kept: a leak
-- of this table must not let anyone register units they never bought.
CREATE TABLE units (
    serial_number   text PRIMARY KEY CHECK (serial_number ~ '^[A-Z0-9][A-Z0-9-]{0,39}$'),
    model_number    text NOT NULL REFERENCES product_models,
    manufactured_on date NOT NULL,
    code_hash       text NOT NULL,
    imported_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE owners (
    owner_id             uuid PRIMARY KEY,
    status               text NOT NULL DEFAULT 'active'
                         CHECK (status IN ('active', 'dormant', 'erased')),
    region               text CHECK (region ~ '^[A-Z]{2}(-[A-Z0-9]{1,3})?$'),
    membership_tier      text CHECK (membership_tier IN ('standard', 'silver', 'gold',
                                                         'platinum')),
    analytics_consent    boolean NOT NULL DEFAULT false,
    analytics_consent_at timestamptz,
    marketing_consent    boolean NOT NULL DEFAULT false,
    marketing_consent_at timestamptz,
    created_at           timestamptz NOT NULL,
    last_active_at       timestamptz NOT NULL,
    dormant_since        timestamptz,
    erased_at            timestamptz,
    -- An erased owner keeps nothing but its id and status.
    CHECK (status <> 'erased' OR (region IS NULL AND membership_tier IS NULL
                                  AND NOT analytics_consent AND NOT marketing_consent
                                  AND erased_at IS NOT NULL))
);

CREATE INDEX owners_idle ON owners (last_active_at) WHERE status = 'active';

-- The only personal data in the registry; analytics never reads it, erasure deletes it.
CREATE TABLE owner_contacts (
    owner_id uuid PRIMARY KEY REFERENCES owners ON DELETE CASCADE,
    name     text NOT NULL,
    email    text NOT NULL,
    phone    text
);

-- Evidence of every consent change (purpose, granted or withdrawn, when, where from).
CREATE TABLE consent_events (
    consent_event_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id         uuid NOT NULL REFERENCES owners,
    purpose          text NOT NULL CHECK (purpose IN ('analytics', 'marketing')),
    granted          boolean NOT NULL,
    changed_at       timestamptz NOT NULL,
    source           text NOT NULL
);

CREATE INDEX consent_events_owner ON consent_events (owner_id, changed_at);

CREATE TABLE devices (
    device_key       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_id        text NOT NULL UNIQUE CHECK (device_id ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$'),
    serial_number    text NOT NULL UNIQUE REFERENCES units,
    model_number     text NOT NULL REFERENCES product_models,
    firmware_version text,
    registered_at    timestamptz NOT NULL
);

-- Who owned a device when: [valid_from, valid_to), valid_to NULL while current.
-- owner_id becomes NULL when the owner is erased: the period stays (the device had an
-- owner then), the link to a person does not.
CREATE TABLE ownership_periods (
    period_id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_key       bigint NOT NULL REFERENCES devices,
    owner_id         uuid REFERENCES owners,
    valid_from       timestamptz NOT NULL,
    valid_to         timestamptz,
    purchase_channel text NOT NULL CHECK (purchase_channel IN ('own_online_shop', 'own_store',
                                                               'third_party_retailer', 'gift')),
    store_id         text CHECK (store_id IS NULL
                                 OR purchase_channel IN ('own_store', 'third_party_retailer')),
    purchased_on     date,
    ended_reason     text CHECK (ended_reason IN ('released', 'transferred', 'resold',
                                                  'owner_erased')),
    CHECK (valid_to IS NULL OR valid_to > valid_from),
    CHECK ((valid_to IS NULL) = (ended_reason IS NULL)),
    -- Periods of one device never overlap. The device is compared as a one-point range
    -- so the constraint needs only core GiST range support, not the btree_gist
    -- extension (an extension is database-wide; this schema must stand alone).
    CONSTRAINT ownership_periods_no_overlap EXCLUDE USING gist (
        int8range(device_key, device_key, '[]') WITH &&,
        tstzrange(valid_from, valid_to, '[)') WITH &&
    )
);

CREATE INDEX ownership_periods_owner ON ownership_periods (owner_id);

-- Every registration attempt, for the lockout (failures per owner and per serial).
CREATE TABLE registration_attempts (
    attempt_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id      uuid REFERENCES owners,
    serial_number text NOT NULL,
    model_number  text NOT NULL,
    attempted_at  timestamptz NOT NULL,
    outcome       text NOT NULL,
    counts_as_failure boolean NOT NULL
);

CREATE INDEX registration_attempts_owner ON registration_attempts (owner_id, attempted_at)
    WHERE counts_as_failure;
CREATE INDEX registration_attempts_serial ON registration_attempts (serial_number, attempted_at)
    WHERE counts_as_failure;

-- MQTT credentials: a salted hash of the secret only; at most one live one per device.
CREATE TABLE device_credentials (
    credential_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    device_key    bigint NOT NULL REFERENCES devices,
    secret_hash   text NOT NULL,
    issued_at     timestamptz NOT NULL,
    revoked_at    timestamptz,
    CHECK (revoked_at IS NULL OR revoked_at >= issued_at)
);

CREATE UNIQUE INDEX device_credentials_live ON device_credentials (device_key)
    WHERE revoked_at IS NULL;

-- Transactional outbox: events are written with the change they describe and published
-- to Kafka after the commit, so none is lost if the process dies in between.
CREATE TABLE event_outbox (
    event_seq    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid NOT NULL UNIQUE,
    event_type   text NOT NULL,
    event_key    text NOT NULL,
    payload      jsonb NOT NULL,
    created_at   timestamptz NOT NULL,
    published_at timestamptz
);

CREATE INDEX event_outbox_pending ON event_outbox (event_seq) WHERE published_at IS NULL;

-- What analytics may read about owners: no contacts, only consenting, non-erased owners.
CREATE VIEW analytics_owners AS
    SELECT owner_id, region, membership_tier, status
    FROM owners
    WHERE analytics_consent AND status <> 'erased';
