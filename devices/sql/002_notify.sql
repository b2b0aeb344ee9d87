-- Change notifications for the consumer's registry cache (ingest/enrich.py).
--
-- Applied by the consumer in the registry's schema as migration component
-- `enrich.notify` (after the registry's own migrations), so the registry's migration
-- history is unchanged. Each trigger sends, on channel `usagepipe_registry`, the payload
-- `<schema> <kind> <id>`; PostgreSQL delivers it when the change commits (and drops
-- duplicates within one transaction). Kinds:
--   device <device_id>     a device's model or firmware changed, or it was registered
--   device_key <key>       one of the device's ownership periods changed
--   owner <owner_id>       status, region, tier or analytics consent changed
--   erased <owner_id>      the owner was erased (stored rows must lose their key)
--   model <model_number>   a product model's category changed

CREATE FUNCTION enrichment_notify_device() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('usagepipe_registry', TG_TABLE_SCHEMA || ' device ' || NEW.device_id);
    RETURN NULL;
END
$$;

CREATE FUNCTION enrichment_notify_period() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('usagepipe_registry', TG_TABLE_SCHEMA || ' device_key ' || OLD.device_key);
    ELSE
        PERFORM pg_notify('usagepipe_registry', TG_TABLE_SCHEMA || ' device_key ' || NEW.device_key);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION enrichment_notify_owner() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'erased' AND OLD.status <> 'erased' THEN
        PERFORM pg_notify('usagepipe_registry', TG_TABLE_SCHEMA || ' erased ' || NEW.owner_id);
    ELSE
        PERFORM pg_notify('usagepipe_registry', TG_TABLE_SCHEMA || ' owner ' || NEW.owner_id);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION enrichment_notify_model() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('usagepipe_registry', TG_TABLE_SCHEMA || ' model ' || NEW.model_number);
    RETURN NULL;
END
$$;

CREATE TRIGGER enrichment_notify AFTER INSERT OR UPDATE ON devices
    FOR EACH ROW EXECUTE FUNCTION enrichment_notify_device();

CREATE TRIGGER enrichment_notify AFTER INSERT OR UPDATE OR DELETE ON ownership_periods
    FOR EACH ROW EXECUTE FUNCTION enrichment_notify_period();

-- Not on every update: `last_active_at` moves on each sign-in and changes no fact.
CREATE TRIGGER enrichment_notify AFTER UPDATE ON owners
    FOR EACH ROW
    WHEN ((OLD.status, OLD.region, OLD.membership_tier, OLD.analytics_consent)
          IS DISTINCT FROM (NEW.status, NEW.region, NEW.membership_tier, NEW.analytics_consent))
    EXECUTE FUNCTION enrichment_notify_owner();

CREATE TRIGGER enrichment_notify AFTER UPDATE ON product_models
    FOR EACH ROW WHEN (OLD.category IS DISTINCT FROM NEW.category)
    EXECUTE FUNCTION enrichment_notify_model();
