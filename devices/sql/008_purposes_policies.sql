-- Purposes, their legal basis, and the privacy-policy versions owners decide under
-- (devices/owners.py, devices/policies.py).
--
-- A purpose on the legal basis `contract` (service operation and diagnostics) needs no
-- consent: nothing is recorded for it and nothing gates on it. A purpose on `consent`
-- is used for an owner only while that owner's latest decision for it is a grant that
-- is *in force* (`consent_in_force`): given under a policy version that no later
-- version, now effective, marks as re-asking for that purpose (`policy_reasks`, a
-- version whose text for the purpose changed materially). A version that re-asks
-- nothing (a typo fixed, a new address) leaves every consent standing.

CREATE TABLE purposes (
    purpose     text PRIMARY KEY CHECK (purpose ~ '^[a-z][a-z_]{0,39}$'),
    legal_basis text NOT NULL CHECK (legal_basis IN ('contract', 'consent')),
    title       text NOT NULL CHECK (title <> ''),
    description text NOT NULL CHECK (description <> '')
);

INSERT INTO purposes (purpose, legal_basis, title, description) VALUES
    ('service', 'contract', 'Service operation and diagnostics',
     'Running the connected service the owner signed up for: receiving the appliance''s'
     ' telemetry, its firmware and faults, support. Needed by the contract; no consent.'),
    ('analytics', 'consent', 'Product planning analytics',
     'Linking the appliance''s usage to the owner''s region and membership tier, under a'
     ' pseudonymous key, for the product planners'' reports. Optional; consented alone.'),
    ('marketing', 'consent', 'Marketing',
     'Contacting the owner with offers, and counting their usage in the reports that'
     ' describe customers for campaigns. Optional; consented separately, never bundled.');

-- The policy texts owners accepted: a version takes effect at `effective_at` (versions
-- in order: each later than the one before) and stays current until the next does.
CREATE TABLE policy_versions (
    version      text PRIMARY KEY CHECK (version ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$'),
    effective_at timestamptz NOT NULL UNIQUE,
    policy_text  text NOT NULL CHECK (policy_text <> ''),
    published_at timestamptz NOT NULL
);

-- The consent purposes whose text version `version` changed materially: a grant made
-- under an earlier version is no longer in force from `effective_at` on.
CREATE TABLE policy_reasks (
    version text NOT NULL REFERENCES policy_versions ON DELETE CASCADE,
    purpose text NOT NULL REFERENCES purposes,
    PRIMARY KEY (version, purpose)
);

-- Everything decided before versions were recorded was decided under this one text;
-- effective since before any owner existed, re-asking nothing.
INSERT INTO policy_versions (version, effective_at, policy_text, published_at) VALUES
    ('initial', '1970-01-01 00:00:00+00',
     'The privacy policy in force before policy versions were recorded (issue 20):'
     ' analytics and marketing consent asked separately at sign-up and in the settings.',
     now());

-- The consent trail gains the version each decision was made under; existing rows keep
-- their ids, times, purposes, answers and sources, attributed to `initial`.
ALTER TABLE consent_events ADD COLUMN policy_version text REFERENCES policy_versions;
UPDATE consent_events SET policy_version = 'initial';
ALTER TABLE consent_events ALTER COLUMN policy_version SET NOT NULL;
ALTER TABLE consent_events DROP CONSTRAINT consent_events_purpose_check;
ALTER TABLE consent_events ADD FOREIGN KEY (purpose) REFERENCES purposes;

CREATE INDEX consent_events_latest ON consent_events (owner_id, purpose, changed_at DESC,
                                                      consent_event_id DESC);

-- owners.analytics_consent / marketing_consent (and their _at) stay: the owner's latest
-- decision, for the consumer's change notifications. Whether it is in force is
-- `consent_in_force`, which every gate reads.

-- Whether `owner`'s latest decision for `purpose` is a grant still in force now.
-- The search_path is the registry schema's, fixed when the function is created.
CREATE FUNCTION consent_in_force(owner uuid, purpose text) RETURNS boolean
    LANGUAGE sql STABLE
    SET search_path FROM CURRENT
AS $$
    SELECT coalesce((
        SELECT e.granted AND NOT EXISTS (
                   SELECT 1 FROM policy_reasks r
                   JOIN policy_versions w ON w.version = r.version
                   WHERE r.purpose = e.purpose
                     AND w.effective_at > v.effective_at AND w.effective_at <= now())
        FROM consent_events e
        JOIN policy_versions v ON v.version = e.policy_version
        WHERE e.owner_id = $1 AND e.purpose = $2
        ORDER BY e.changed_at DESC, e.consent_event_id DESC
        LIMIT 1
    ), false)
$$;

-- What analytics may read about owners: no contacts, only owners not erased whose
-- product-planning consent is in force.
CREATE OR REPLACE VIEW analytics_owners AS
    SELECT owner_id, region, membership_tier, status
    FROM owners
    WHERE status <> 'erased' AND consent_in_force(owner_id, 'analytics');

-- Owners marketing may be done for: active, with marketing consent in force.
CREATE VIEW marketing_owners AS
    SELECT owner_id
    FROM owners
    WHERE status = 'active' AND consent_in_force(owner_id, 'marketing');

-- Every analytics decision notifies the consumer's cache, a restated one too: a grant
-- after a lapse leaves the boolean true but puts the consent back in force.
DROP TRIGGER enrichment_notify ON owners;
CREATE TRIGGER enrichment_notify AFTER UPDATE ON owners
    FOR EACH ROW
    WHEN ((OLD.status, OLD.region, OLD.membership_tier, OLD.analytics_consent,
           OLD.analytics_consent_at)
          IS DISTINCT FROM (NEW.status, NEW.region, NEW.membership_tier,
                            NEW.analytics_consent, NEW.analytics_consent_at))
    EXECUTE FUNCTION enrichment_notify_owner();

-- A version published to take effect at once may end consents now: the consumer's
-- cache starts afresh (`policy <version>` is a kind it does not know, which clears it).
-- One taking effect later ends them when it does; the cache's TTL bounds that.
CREATE FUNCTION policy_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('usagepipe_registry', TG_TABLE_SCHEMA || ' policy ' || NEW.version);
    RETURN NULL;
END
$$;

CREATE TRIGGER policy_notify AFTER INSERT ON policy_reasks
    FOR EACH ROW EXECUTE FUNCTION policy_notify();
