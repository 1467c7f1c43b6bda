"""Time buckets: UTC days and calendar months, and how a window splits into them."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date

from bitseg.index.types import EPOCH_ORDINAL, US_PER_DAY


def day_of(micros: int) -> int:
    return micros // US_PER_DAY


def month_of(day: int) -> int:
    """Months since 1970-01 of a day number."""
    d = date.fromordinal(day + EPOCH_ORDINAL)
    return (d.year - 1970) * 12 + d.month - 1


def first_day(month: int) -> int:
    return date(1970 + month // 12, month % 12 + 1, 1).toordinal() - EPOCH_ORDINAL


@dataclass(frozen=True, slots=True)
class Plan:
    """A window [lo, hi) as whole buckets plus raw edges.

    months: months wholly inside; days: [day_lo, day_hi) whole days not covered by those
    months are taken one by one; edges: (lo, hi) µs ranges inside single days, read raw.
    """

    months: range
    covered: tuple[int, int]  # [first, end) days the months cover
    days: tuple[int, int]
    edges: tuple[tuple[int, int], ...]

    def whole_days(self, present: Sequence[int]) -> list[int]:
        """Days from a sorted list that fall in the whole-day span outside the months."""
        lo, hi = self.days
        c_lo, c_hi = self.covered
        start = bisect_left(present, lo)
        end = bisect_left(present, hi)
        return [d for d in present[start:end] if not c_lo <= d < c_hi]


def plan(lo: int | None, hi: int, earliest_day: int) -> Plan:
    """Split [lo, hi) µs (lo None: from earliest_day) into months, days and raw edges."""
    if lo is None:
        lo = min(earliest_day * US_PER_DAY, hi)
    first_whole = -(-lo // US_PER_DAY)  # ceil
    last_whole = hi // US_PER_DAY  # exclusive
    if first_whole >= last_whole:  # no whole day inside: one or two raw pieces
        edges = _split_by_day(lo, hi)
        return Plan(range(0), (0, 0), (0, 0), edges)
    edges = []
    if lo < first_whole * US_PER_DAY:
        edges.append((lo, first_whole * US_PER_DAY))
    if last_whole * US_PER_DAY < hi:
        edges.append((last_whole * US_PER_DAY, hi))
    m_first = month_of(first_whole)
    if first_day(m_first) != first_whole:
        m_first += 1
    m_last = month_of(last_whole) - 1
    if m_first <= m_last:
        months = range(m_first, m_last + 1)
        covered = (first_day(m_first), first_day(m_last + 1))
    else:
        months, covered = range(0), (0, 0)
    return Plan(months, covered, (first_whole, last_whole), tuple(edges))


def _split_by_day(lo: int, hi: int) -> tuple[tuple[int, int], ...]:
    if lo >= hi:
        return ()
    boundary = (lo // US_PER_DAY + 1) * US_PER_DAY
    if hi <= boundary:
        return ((lo, hi),)
    return ((lo, boundary), (boundary, hi))
