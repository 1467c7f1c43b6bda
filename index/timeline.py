"""Time buckets: UTC days and calendar months, and how a window splits into them.

Calendar arithmetic here is plain integer arithmetic on the proleptic Gregorian calendar
(days since 1970-01-01), so it is total: a window edge past 9999-12-31 or a day before
0001-01-01 has a month like any other, where `datetime.date` would raise.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

from bitseg.index.types import US_PER_DAY

_ERA_DAYS = 146_097  # days in 400 Gregorian years
_SHIFT = 719_468  # days from 0000-03-01 to 1970-01-01 (years counted from March)


def civil(day: int) -> tuple[int, int, int]:
    """(year, month, day of month) of a day number (days since 1970-01-01), any int."""
    z = day + _SHIFT
    era, doe = divmod(z, _ERA_DAYS)
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153  # months from March
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, doy - (153 * mp + 2) // 5 + 1


def day_number(year: int, month: int, day: int) -> int:
    """The day number (days since 1970-01-01) of a proleptic Gregorian date."""
    y = year - (month <= 2)
    era, yoe = divmod(y, 400)
    doy = (153 * (month - 3 if month > 2 else month + 9) + 2) // 5 + day - 1
    return era * _ERA_DAYS + yoe * 365 + yoe // 4 - yoe // 100 + doy - _SHIFT


def day_of(micros: int) -> int:
    return micros // US_PER_DAY


def month_of(day: int) -> int:
    """Months since 1970-01 of a day number."""
    year, month, _ = civil(day)
    return (year - 1970) * 12 + month - 1


def first_day(month: int) -> int:
    return day_number(1970 + month // 12, month % 12 + 1, 1)


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
