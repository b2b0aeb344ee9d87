"""What a report may show, and about whom.

**k-anonymity.** Every report row is a segment (a model and firmware, an hour of the
week, a cohort, ...). Each report's SQL also counts the segment's distinct owners,
`count(DISTINCT owner_key)` over the rows behind it (the device-daily rollup's, which
keep the key, or the raw rows'). A segment with fewer than `insights.k_anonymity` (k,
default 10, at least `ingest.settings.K_ANONYMITY_MIN`, 3) is not shown as it is: it is merged with
other small segments along its report's hierarchy until the group has k owners
(`insights.generalise`), and only what no group can bring to k is *suppressed*:
kept as one row, its numbers withheld, with the reason. Nothing below k owners is ever
shown. Owners who withheld analytics consent (or were erased) carry no key and so cannot
be told apart: they count for no one, which errs on the side of suppressing. A range
across a rotation of the owner-key secret holds an owner active on both sides under two
keys: a segment's owners are the most keys of any one version
(`ingest.owner_keys.owners_at_least`), never the keys of all versions added up, which
errs the same way. The owner count itself is never shown.

**Marketing-usable reports** (`ReportSpec.marketing`: cohorts by purchase channel or
membership tier, app-feature adoption, regional hot spots) describe customers by the
kind of customer or place they are, which is what a campaign would target. They count
only usage of owners who are in the registry *now* as active (not dormant, not erased)
with both analytics and marketing consent *in force* (the registry's
`consent_in_force`: a grant lapsed by a newer policy version does not count): joined
through the registry's `devices`, `ownership_periods` and `owners` (the owner id is
used inside the query only). The
product reports (programs, heat map, cycles, errors, completeness) describe
appliances, not customers, and read every row, as the rollups do.

Marketing-usable reports read device-days (`<table>_device_daily`), which know the day
but not the time of each event, so the rule is per device and UTC day, and errs on the
side of leaving out (`marketing_day_clause`): a device-day counts only if its rows
carry an owner key (analytics consent when stored) and *every* ownership period of the
device overlapping that day belongs to an owner marketable now (and there is at least
one). On the day a device changes hands, it counts only if both owners are
marketable.
"""

from __future__ import annotations

from dataclasses import dataclass

from ingest.sql_names import quote_schema


@dataclass(frozen=True, slots=True)
class Privacy:
    """The rules one report run applies."""

    k: int
    registry_schema: str

    def reason(self, owners: int) -> str | None:
        """Why a segment with `owners` distinct owners is withheld (None: it is shown)."""
        if owners >= self.k:
            return None
        return f"fewer than {self.k} distinct owners (k-anonymity)"

    def remainder_reason(self, segments: int) -> str:
        """Why the merged remainder of `segments` small segments is withheld."""
        return (
            f"fewer than {self.k} distinct owners (k-anonymity), even the {segments} "
            "small segments left merged together"
        )

    def marketing_day_clause(self, alias: str = "d") -> str:
        """A WHERE condition keeping device-day rows (`bucket`, `device_id`, `owner_key`
        of `<table>_device_daily`) whose whole day belongs to owners marketing may be
        done for: at least one ownership period overlaps the UTC day, and every one that
        does is an active owner's with analytics and marketing consent in force (the
        registry's views `marketing_owners` and `analytics_owners`)."""
        reg = quote_schema(self.registry_schema)
        periods = f"""FROM {reg}.devices rd
                JOIN {reg}.ownership_periods rp ON rp.device_key = rd.device_key
                WHERE rd.device_id = {alias}.device_id
                  AND rp.valid_from < {alias}.bucket + interval '24 hours'
                  AND (rp.valid_to IS NULL OR rp.valid_to > {alias}.bucket)"""
        return f"""{alias}.owner_key IS NOT NULL
            AND EXISTS (SELECT 1 {periods})
            AND NOT EXISTS (
                SELECT 1 {periods}
                  AND NOT EXISTS (
                      SELECT 1 FROM {reg}.marketing_owners ro
                      JOIN {reg}.analytics_owners ra ON ra.owner_id = ro.owner_id
                      WHERE ro.owner_id = rp.owner_id
                  )
            )"""
