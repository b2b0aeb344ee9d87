-- When owners' product-planning (analytics) consent ended, for the usage side to unlink
-- the rows stored under it (ingest/withdrawal.py), as erasure does with `erased_owners`.
--
-- An end is a withdrawal (an analytics decision `granted = false` whose previous
-- analytics decision was a grant: a decline after a decline ends nothing) or a lapse
-- (a policy version re-asking analytics takes effect while the owner's latest analytics
-- decision is a grant made under an earlier version). `resumed_at` is the first
-- analytics grant after the end (NULL: none yet): rows stored from then on were
-- attributed under the new grant and are not the end's to unlink. Erased owners have
-- no consent events left; erasure unlinks them.

-- Withdrawals are found by time, without reading the grants.
CREATE INDEX consent_events_analytics_withdrawals ON consent_events (changed_at)
    WHERE purpose = 'analytics' AND NOT granted;

-- The ends at or after `since` that have happened by now, of the owners in `among`
-- (NULL: every owner): `event` names the end ('withdrawn <consent_event_id>',
-- 'lapsed <policy version>'), unique per owner. Cheap for a recent `since` or a few
-- owners: withdrawals through the index above or the owner's; lapses only for the
-- re-asking versions that took effect since then, each reading the latest analytics
-- decision of every owner (or of those in `among`) once, by `consent_events_latest`.
-- Each list is two branches, one for all and one for `among`, so that each has a plan
-- of its own (a parameter-only condition turns the other off). Without JIT: the plan,
-- made without knowing the arguments, costs the every-owner branches high enough for
-- PostgreSQL to compile it, which took a second where the answer takes a millisecond
-- (bench/consent_ends.py).
CREATE FUNCTION analytics_consent_ends(since timestamptz, among uuid[] DEFAULT NULL)
    RETURNS TABLE (owner_id uuid, event text, ended_at timestamptz, resumed_at timestamptz)
    LANGUAGE sql STABLE
    SET search_path FROM CURRENT
    SET jit = off
AS $$
    WITH withdrawals AS (
        SELECT w.owner_id, w.consent_event_id, w.changed_at FROM consent_events w
        WHERE among IS NULL AND w.purpose = 'analytics' AND NOT w.granted
          AND w.changed_at >= since AND w.changed_at <= now()
        UNION ALL
        SELECT w.owner_id, w.consent_event_id, w.changed_at FROM consent_events w
        WHERE w.owner_id = ANY(among) AND w.purpose = 'analytics' AND NOT w.granted
          AND w.changed_at >= since AND w.changed_at <= now()
    ), people AS (
        SELECT o.owner_id FROM owners o WHERE among IS NULL AND o.status <> 'erased'
        UNION ALL
        SELECT o.owner_id FROM owners o WHERE o.owner_id = ANY(among) AND o.status <> 'erased'
    ), ends AS (
        SELECT w.owner_id, 'withdrawn ' || w.consent_event_id AS event,
               w.changed_at AS ended_at, w.consent_event_id AS after_id
        FROM withdrawals w
        WHERE (SELECT p.granted FROM consent_events p
               WHERE p.owner_id = w.owner_id AND p.purpose = 'analytics'
                 AND (p.changed_at, p.consent_event_id) < (w.changed_at, w.consent_event_id)
               ORDER BY p.changed_at DESC, p.consent_event_id DESC LIMIT 1)
        UNION ALL
        SELECT o.owner_id, 'lapsed ' || r.version, n.effective_at, NULL::bigint
        FROM policy_reasks r
        JOIN policy_versions n ON n.version = r.version
        CROSS JOIN people o
        CROSS JOIN LATERAL (
            SELECT e.granted, v.effective_at
            FROM consent_events e JOIN policy_versions v ON v.version = e.policy_version
            WHERE e.owner_id = o.owner_id AND e.purpose = 'analytics'
              AND e.changed_at < n.effective_at
            ORDER BY e.changed_at DESC, e.consent_event_id DESC LIMIT 1
        ) latest
        WHERE r.purpose = 'analytics'
          AND n.effective_at >= since AND n.effective_at <= now()
          AND latest.granted AND latest.effective_at < n.effective_at
    )
    SELECT ends.owner_id, ends.event, ends.ended_at, (
               SELECT min(g.changed_at) FROM consent_events g
               WHERE g.owner_id = ends.owner_id AND g.purpose = 'analytics' AND g.granted
                 AND (g.changed_at > ends.ended_at
                      OR (g.changed_at = ends.ended_at AND g.consent_event_id > ends.after_id)
                      OR (ends.after_id IS NULL AND g.changed_at >= ends.ended_at))
           ) AS resumed_at
    FROM ends
$$;
