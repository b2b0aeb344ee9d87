"""Suppression that generalises before it hides: segments below k merged, level by
level along their report's hierarchy, until a group has k owners.

A report's SQL finds *fine* segments (a model, firmware, schema and program; an hour
of the week; a region; ...), each with its distinct owners. Those with at least k are
shown as they are. The others are not simply withheld; `generalise` merges them along
the report's `Generalisation` (its hierarchy: `insights.hierarchies`):

1. At each level the still-small segments are grouped by their parent at that level
   (programs, first level: the same model, schema and program, any firmware). A group
   of two or more whose owners *together* number at least k becomes one row: its
   coarsened dimensions hold a label instead of a fine value ("1.0, 1.1", "all
   versions", "0-5 (night)"), `generalised` says in a sentence what was merged, and
   `members` lists the fine segments. The small segments left go on to the next level.
2. After the last level, all that remain are merged into one "other" row, shown if it
   has k owners; if not, it is one suppressed row (or, when a single segment is left,
   that segment, suppressed, as it was found).

So every fine segment is in exactly one row: shown, inside one generalised row, or in
the suppressed remainder; and no shown row has fewer than k distinct owners.

**Exact numbers.** A merged row's numbers are what the report's SQL would give for the
union of its members' rows. Distinct owners, devices and device-days are not additive,
so the SQL returns, for each segment below k and only for those, the sets a merge needs
(owner keys, device ids, device-day pairs) and any additive intermediate it does not
show (`Segment.parts`); the report's `merge` unions the sets, sums the sums and
recomputes ratios with PostgreSQL's rounding (`ratio`). Segments of k owners or more
carry no sets, so the common case costs what it did.

**What the rows of one report cannot reveal.** Only small siblings are merged, never a
parent shown beside its shown children: the rows partition the fine segments, and each
row's numbers depend on its own members only. So no shown row, and no sum or difference
of shown rows, is the number of a group below k: a small segment cannot be recovered by
subtracting the rows of one report. Differencing *across* reports (two overlapping time
ranges; a filter that takes one member out of a merged row) can still isolate a small
segment; that is not addressed here (issue 20).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

from ingest.owner_keys import owners_at_least

Scalar = str | int | float | None

OWNERS = "_owners"
"""The part every segment below k carries: its distinct owner keys."""
_LISTED = 3  # a label lists at most this many values (or ranges of them), else counts them
_DESCRIBED = 4  # a sentence names at most this many members


@dataclass(frozen=True, slots=True)
class Segment:
    """One fine segment as the SQL found it.

    `parts` holds the SQL's hidden columns (named `_...`): for a segment below k the sets
    and sums merging needs (`OWNERS` always), and for every segment the attributes its
    hierarchy reads (`_category` where the key does not say it)."""

    key: dict[str, Scalar]
    values: dict[str, Scalar]
    owners: int
    parts: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Row:
    """One row of a report: a fine segment, or small segments merged (`members`, their
    fine keys; `segment` then holds labels in the dimensions they differ in).

    `suppressed` gives the reason its values are withheld (then `values` is empty);
    `generalised` is the sentence saying what a shown merged row merged."""

    segment: dict[str, Scalar]
    values: dict[str, Scalar]
    suppressed: str | None = None
    generalised: str | None = None
    members: tuple[dict[str, Scalar], ...] = ()


@dataclass(frozen=True, slots=True)
class Label:
    """How a level names a dimension it coarsens in a merged row: `whole` when the row
    is all of its parent (every sibling was small), else the members' values listed
    ("1.0, 1.1", ranges for numbers: "0-2, 4"), followed by `context` in parentheses;
    `part`, when set, replaces that listing ("other regions")."""

    whole: str
    context: str | None = None
    part: str | None = None


Parent = tuple[Hashable, Mapping[str, Label]]


@dataclass(frozen=True, slots=True)
class Level:
    """One step up a hierarchy: `parent` gives a segment's parent at this level (the
    key its siblings share) and the labels of the dimensions the level coarsens;
    `noun` names the members of a merged row that differ in one dimension ("firmware
    versions"), `mixed` those that differ in several ("segments")."""

    noun: str
    parent: Callable[[Segment], Parent]
    mixed: str = "segments"


@dataclass(frozen=True, slots=True)
class Generalisation:
    """A report's hierarchy and how its merged numbers are computed.

    `levels` run from the finest; the last step, merging all that remain into one
    "other" row, is implied. `merge` computes a merged row's measures from its members.
    `nouns` name each dimension's values in the plural ("versions"); `show` says how a
    fine value reads in a label where `str` would not (weekday numbers as names)."""

    levels: tuple[Level, ...]
    merge: Callable[[Sequence[Segment]], dict[str, Scalar]]
    nouns: Mapping[str, str]
    show: Mapping[str, Callable[[Scalar], str]] = field(default_factory=dict)

    def other(self) -> Level:
        """The implied last level: everything left, "other ..." (or "all ..." when
        nothing at all was shown)."""
        labels = {d: Label(f"all {n}", part=f"other {n}") for d, n in self.nouns.items()}
        noun = next(iter(self.nouns.values())) if len(self.nouns) == 1 else "segments"
        return Level(noun, lambda _s: ((), labels))


def generalise(
    found: Iterable[Segment],
    rule: Generalisation,
    k: int,
    reason: Callable[[int], str | None],
    remainder_reason: Callable[[int], str],
) -> list[Row]:
    """The rows of a report from its fine segments: those of `k` owners or more as they
    are, the others merged along `rule` (module docstring). `reason(owners)` is why a
    segment is withheld; `remainder_reason(n)` why the merged remainder of `n` is.

    Rows come in the order of their first fine segment, the final "other" row last."""
    found = list(found)
    placed: list[tuple[tuple[Any, ...], Row]] = []
    small: list[Segment] = []
    for s in found:
        if s.owners >= k:
            placed.append(((False, _order(s.key)), Row(dict(s.key), dict(s.values))))
        else:
            small.append(s)
    levels = (*rule.levels, rule.other())
    for depth, level in enumerate(levels):
        last = depth == len(levels) - 1
        siblings = Counter(level.parent(s)[0] for s in found)
        groups: dict[Hashable, list[Segment]] = {}
        for s in small:
            groups.setdefault(level.parent(s)[0], []).append(s)
        small = []
        for parent, members in groups.items():
            members.sort(key=lambda m: _order(m.key))
            if len(members) < 2 or owners_at_least(union(members, OWNERS)) < k:
                small.extend(members)
                continue
            whole = len(members) == siblings[parent]
            segment = _labels(members, level, rule, whole)
            said = _sentence(members, level, rule, k)
            row = Row(segment, rule.merge(members), None, said, tuple(m.key for m in members))
            placed.append(((last, _order(members[0].key)), row))
    small.sort(key=lambda m: _order(m.key))
    if len(small) == 1:
        s = small[0]
        placed.append(((True, _order(s.key)), Row(dict(s.key), {}, reason(s.owners))))
    elif small:
        segment = _labels(small, levels[-1], rule, len(small) == len(found))
        why = remainder_reason(len(small))
        keys = tuple(m.key for m in small)
        placed.append(((True, _order(small[0].key)), Row(segment, {}, why, None, keys)))
    placed.sort(key=lambda p: p[0])
    return [row for _, row in placed]


def union(members: Iterable[Segment], part: str) -> set[Any]:
    """The union of the members' sets `part` (a missing or NULL set is empty)."""
    out: set[Any] = set()
    for m in members:
        out.update(m.parts.get(part) or ())
    return out


def total(members: Iterable[Segment], name: str) -> int:
    """The sum of measure (or, failing that, part) `name` over the members."""
    out = 0
    for m in members:
        value = m.values[name] if name in m.values else m.parts.get(name)
        out += int(value or 0)
    return out


def ratio(numerator: int, denominator: int, places: int, scale: int = 1) -> float | None:
    """`round(scale * numerator / denominator, places)` as PostgreSQL gives it for
    numeric (half away from zero), or None where the denominator is 0 (`nullif`).

    Computed on the exact fraction: PostgreSQL's numeric division keeps at least 16
    significant digits before `round`, and a quotient of counts below 10^8 is never
    closer than 10^-13 to a rounding boundary it is not on, so the two always agree."""
    if denominator == 0:
        return None
    exact = Fraction(scale * numerator, denominator) * 10**places
    whole, rest = divmod(abs(exact.numerator), exact.denominator)
    if 2 * rest >= exact.denominator:
        whole += 1
    return float(Decimal(whole if exact >= 0 else -whole).scaleb(-places))


def listing(values: Iterable[Scalar], noun: str, show: Callable[[Scalar], str] = str) -> str:
    """Distinct values as a label: "1.0, 1.1"; whole numbers in ranges ("0-2, 4"); more
    than three items counted instead ("5 versions")."""
    distinct = sorted(set(values), key=lambda v: (v is not None, v))
    if distinct and all(isinstance(v, int) for v in distinct):
        items = [show(lo) if lo == hi else f"{show(lo)}-{show(hi)}" for lo, hi in _runs(distinct)]
    else:
        items = ["unknown" if v is None else show(v) for v in distinct]
    return ", ".join(items) if len(items) <= _LISTED else f"{len(distinct)} {noun}"


def _runs(numbers: list[Any]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for n in numbers:
        if runs and runs[-1][1] == n - 1:
            runs[-1] = (runs[-1][0], n)
        else:
            runs.append((n, n))
    return runs


def _labels(
    members: Sequence[Segment], level: Level, rule: Generalisation, whole: bool
) -> dict[str, Scalar]:
    """The merged row's key: a dimension its members share keeps its value; the others
    are labelled as the level says."""
    labels = level.parent(members[0])[1]
    out: dict[str, Scalar] = {}
    for d in members[0].key:
        values = [m.key[d] for m in members]
        if len(set(values)) == 1:
            out[d] = values[0]
            continue
        noun = rule.nouns.get(d, "values")
        label = labels.get(d) or Label(f"all {noun}")
        if whole:
            out[d] = label.whole
        elif label.part is not None:
            out[d] = label.part
        else:
            text = listing(values, noun, rule.show.get(d, str))
            out[d] = f"{text} ({label.context})" if label.context else text
    return out


def _sentence(members: Sequence[Segment], level: Level, rule: Generalisation, k: int) -> str:
    """What was merged, for a planner: "3 firmware versions merged (1.0, 1.1, 1.2): each
    had fewer than 10 owners"; whole numbers in ranges ("6-8, 10-13")."""
    varying = [d for d in members[0].key if len({m.key[d] for m in members}) > 1]
    values = [m.key[varying[0]] for m in members] if len(varying) == 1 else []
    if values and all(isinstance(v, int) for v in values):
        show = rule.show.get(varying[0], str)
        names = [show(lo) if lo == hi else f"{show(lo)}-{show(hi)}" for lo, hi in _runs(values)]
    else:
        names = [" ".join(_show(rule, d, m.key[d]) for d in varying) for m in members]
    more = len(names) - _DESCRIBED
    named = ", ".join(names[:_DESCRIBED]) + (f" and {more} more" if more > 0 else "")
    noun = level.noun if len(varying) == 1 else level.mixed
    return f"{len(members)} {noun} merged ({named}): each had fewer than {k} owners"


def _show(rule: Generalisation, dimension: str, value: Scalar) -> str:
    if value is None:
        return "unknown"
    return rule.show.get(dimension, str)(value)


def _order(key: Mapping[str, Scalar]) -> tuple[tuple[bool, Any], ...]:
    """A fine key's sort order: by each dimension, None first."""
    return tuple((v is not None, v) for v in key.values())
