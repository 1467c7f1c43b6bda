"""Sequences (CONTRACT §2.4c): rows matching steps in strictly increasing time, and
`then_not`, a step that did not follow within n days.

A sequence is answered in two passes.  The candidates are the profiles with a row for
every step in the window: each step is held as the leaf "has such a row" (an EventCond
or OrdersCond with count >= 1 over the sequence's window), an ordinary bitmap
evaluation, and their intersection is usually far smaller than any step's rows.  Only
then are rows read, and only the candidates' rows: per step the (profile, ts) pairs,
from the raw event blocks of the window's days or from the order columns.  Timestamps
are replaced by their rank among all the gathered ones, so (profile, rank) packs into
one sortable int64 key and each search along a chain is one np.searchsorted over every
candidate profile at once.

Chains are found greedily: from a first row r1, the earliest row of the next step that
is strictly later, and so on.  Taking the earliest row at each step is never worse, so a
profile matches when some r1 completes, with ts(rk) - ts(r1) <= within_days when that
is given; without within_days only each profile's earliest r1 needs trying.

`then_not` keeps a profile when some r1 (in the window, at least n days before as_of)
has no then_not row in (ts(r1), ts(r1) + n days].  When the then_not step is any order,
each r1 is first settled by its profile's last live order (kept per snapshot by
index/orders.py): none after ts(r1), it holds; the last within the n days, it does not;
only the rows whose last order is later are searched as below.  Its one step is not evaluated as a
leaf first: its rows are read for every profile (the leaf would prune nothing but the
profiles no longer live, which are dropped at the end).  The then_not rows read are
those of the r1 profiles in (min ts(r1), max ts(r1) + n days].  An r1 of a profile
with none of them holds outright; for the others, (profile, ts) packs into one int64
key, the offset of ts from the earliest below the profile (the rank of ts when that
would not fit in 63 bits), and the first then_not row after r1 is one searchsorted
away, compared with the key of (profile, ts(r1) + n days).  No np.unique: numpy's is
a hash pass and then a sort, slower than one sort of the few rows that need it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.compare import I64_MAX
from bitseg.index.errors import RuleError
from bitseg.index.event_index import EventIndex
from bitseg.index.event_keys import ANY
from bitseg.index.events import blocks_in, row_mask
from bitseg.index.fields import EMPTY, bitmap_of, ids_of
from bitseg.index.order_index import OrderIndex
from bitseg.index.orders import _extremes_of, select_orders
from bitseg.index.recency import NO_LAST
from bitseg.index.rules import (
    All,
    EventCond,
    OrdersCond,
    Rule,
    SequenceCond,
    Window,
    _kind,
    _only,
)
from bitseg.index.snapshot import Snapshot

DAY = T.US_PER_DAY
MAX_SPAN_DAYS = (T.MAX_US - T.MIN_US) // DAY + 1  # more days than any two rows lie apart
PACKED_LIMIT = I64_MAX  # keys of (profile, ts offset) up to this; tests lower it
STEP_KEYS = ("event", "orders")
SEQUENCE_KEYS = {"sequence", "then_not", "within_days", "window"}
STEP_FORMS = 'expected a step: {"event": TYPE, "where": C} or {"orders": RULE}'

Step = EventCond | OrdersCond
Rows = tuple[np.ndarray, np.ndarray]  # (profiles int64, ts int64 µs) of matching rows


# ---------------------------------------------------------------------- parsing
def parse_sequence(parser: Any, obj: dict, path: str) -> SequenceCond:
    """{"sequence": [steps], "within_days": n, "window": W, "then_not": step} -> the
    typed node; `parser` is the rules parser (its event/orders/window parsing is reused)."""
    _only(obj, SEQUENCE_KEYS, path)
    here, listed = f"{path}.sequence", obj["sequence"]
    if not isinstance(listed, list):
        raise RuleError(here, f"expected a list of steps, got {_kind(listed)}")
    if not listed:
        raise RuleError(here, "expected a non-empty list of steps")
    window = parser._window(obj, path)
    steps = tuple(_step(parser, s, f"{here}[{i}]", window) for i, s in enumerate(listed))
    within = obj.get("within_days")
    if "within_days" in obj and (isinstance(within, bool) or not isinstance(within, int)
                                 or within < 0):
        raise RuleError(f"{path}.within_days", "expected a whole number of days >= 0, "
                        f"got {_kind(within)}")
    then_not = None
    if "then_not" in obj:
        if len(steps) != 1:
            raise RuleError(f"{path}.then_not", "then_not follows a sequence of exactly one "
                            f"step; this sequence has {len(steps)}")
        if within is None:
            raise RuleError(f"{path}.within_days", "then_not needs within_days: the days "
                            "after the step in which the then_not step must not happen")
        then_not = _step(parser, obj["then_not"], f"{path}.then_not", Window("all"))
    return SequenceCond(steps, window, within, then_not)


def _step(parser: Any, obj: Any, path: str, window: Window) -> Step:
    """One step, as the leaf "has such a row in the window"."""
    if not isinstance(obj, dict):
        raise RuleError(path, f"{STEP_FORMS}, got {_kind(obj)}")
    kinds = [k for k in STEP_KEYS if k in obj]
    if not kinds:
        raise RuleError(path, STEP_FORMS)
    if kinds[0] == "event":
        _only(obj, {"event", "where"}, path)
        return replace(parser._event(obj, path), window=window)
    _only(obj, {"orders"}, path)
    return replace(parser._orders(obj, path), window=window)


# ---------------------------------------------------------------------- evaluation
def evaluate_sequence(cond: SequenceCond, snap: Snapshot, as_of: int,
                      bitmap: Callable[[Rule], BitMap]) -> BitMap:
    """The live profiles for which the sequence holds; `bitmap` evaluates a step's leaf."""
    if cond.then_not is not None:  # its rows are read for every profile: no leaf first
        return _distinct(matching(cond, snap, as_of, None)) & snap.live
    steps = sorted((bitmap(step) for step in cond.steps), key=len)
    candidates = steps[0] & snap.live
    for other in steps[1:]:
        if not candidates:
            return EMPTY
        candidates &= other
    if len(cond.steps) == 1:
        return candidates  # one step alone: has such a row
    if not candidates:
        return EMPTY
    return bitmap_of(matching(cond, snap, as_of, ids_of(candidates)))


def _distinct(profiles: np.ndarray) -> BitMap:
    """The bitmap of these profile ids (any order, repeated): marked in a table over the
    ids up to the largest and read back in order when they are many (a bitmap builds
    faster from sorted ids; at 10M, 255k ids: 6.6 ms to sort, ~4 ms by the table),
    sorted when few."""
    if not len(profiles):
        return BitMap()
    if len(profiles) * 64 < int(profiles.max()) + 1:
        ids = profiles.astype(np.uint32)
        ids.sort()
        return bitmap_of(ids)
    table = np.zeros(int(profiles.max()) + 1, dtype=bool)
    table[profiles] = True
    return bitmap_of(np.flatnonzero(table))


def sequence_contains(cond: SequenceCond, snap: Snapshot, as_of: int, pid: int) -> bool:
    """Whether one live profile satisfies the sequence, from its own rows only."""
    if pid not in snap.live:
        return False
    return len(matching(cond, snap, as_of, np.array([pid], dtype=np.uint32))) > 0


def matching(cond: SequenceCond, snap: Snapshot, as_of: int, among: np.ndarray | None
             ) -> np.ndarray:
    """The profiles of `among` (dense ids; None: every profile, live or not) for which the
    sequence holds, in any order and possibly repeated."""
    if cond.then_not is not None:  # parsing made sure within_days is given with it
        return _absent(cond, cond.then_not, cond.within_days or 0, snap, as_of, among)
    lo, hi = cond.window.bounds(as_of)
    rows = []
    for step in cond.steps:
        found = step_rows(step, snap, as_of, lo, hi, among)
        if not len(found[0]):
            return np.zeros(0, dtype=np.int64)
        rows.append(found)
        among = found[0]  # later steps: only these profiles
    return _chains(rows, cond.within_days)


def _chains(rows: list[Rows], within_days: int | None) -> np.ndarray:
    """The profiles having rows r1 … rk of the steps' rows with strictly increasing ts
    (and ts(rk) - ts(r1) <= within_days days when given)."""
    stamps = np.sort(np.concatenate([ts for _, ts in rows]))  # ts -> rank keeps the order
    width = len(stamps)
    keys = [np.sort(_keys(profiles, ts, stamps)) for profiles, ts in rows]
    start = keys[0]
    if within_days is None:  # only the earliest first row of each profile matters
        start = start[np.concatenate(([True], start[1:] // width != start[:-1] // width))]
    profile, at = start // width, start
    for following in keys[1:]:
        i = np.searchsorted(following, at, side="right")  # the first later row
        nxt = following[np.minimum(i, len(following) - 1)]
        ok = (i < len(following)) & (nxt // width == profile)
        profile, start, at = profile[ok], start[ok], nxt[ok]
    if within_days is not None:
        span = stamps[at % width] - stamps[start % width]
        profile = profile[span <= min(within_days, MAX_SPAN_DAYS) * DAY]
    return profile


def _absent(cond: SequenceCond, then_not: Step, days: int, snap: Snapshot, as_of: int,
            among: np.ndarray | None) -> np.ndarray:
    """The profiles of `among` with a row r1 of the step, in the window and n days or
    more before as_of, that no then_not row follows in (ts(r1), ts(r1) + n days]."""
    span = min(days, MAX_SPAN_DAYS) * DAY
    lo, hi = cond.window.bounds(as_of)
    hi = min(hi, as_of - span + 1)  # ts(r1) + n days <= as_of
    if hi <= T.MIN_US or (lo is not None and lo >= hi):
        return np.zeros(0, dtype=np.int64)
    profiles, stamps = step_rows(cond.steps[0], snap, as_of, lo, hi, among)
    if not len(profiles) or span == 0:  # (t, t + 0] holds no row
        return profiles
    settled = None
    if _every_order(then_not):
        settled, profiles, stamps = _by_last_order(snap.orders, profiles, stamps, span)
        if not len(profiles):
            return settled
    found = _searched(then_not, span, snap, as_of, profiles, stamps)
    return found if settled is None else np.concatenate((settled, found))


def _every_order(step: Step) -> bool:
    return isinstance(step, OrdersCond) and isinstance(step.orders, All)


def _by_last_order(index: OrderIndex, profiles: np.ndarray, stamps: np.ndarray, span: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For then_not any order: (the profiles of the first rows settled as holding, and
    the profiles and ts of the rows left to search).  From each profile's last live order
    (kept per snapshot by index/orders.py, 8 bytes a profile id): none after ts(r1), the
    row holds; the last within (ts(r1), ts(r1) + n days], it does not; only a last
    later than that leaves the row to search (at 10M, 7 days: 14k of 267k rows)."""
    extremes = _extremes_of(index)
    if extremes is None:  # no live order: every row holds
        return profiles, profiles[:0], stamps[:0]
    last = extremes.per_profile("last")
    inside = profiles < len(last)
    latest = last.take(np.where(inside, profiles, 0))
    latest[~inside] = NO_LAST
    later = latest > stamps + span
    holds = latest <= stamps
    return profiles[holds], profiles[later], stamps[later]


def _searched(then_not: Step, span: int, snap: Snapshot, as_of: int, profiles: np.ndarray,
              stamps: np.ndarray) -> np.ndarray:
    """The profiles of the first rows (profiles, stamps) that no then_not row follows
    within span: the then_not rows of their profiles read and searched."""
    after = step_rows(then_not, snap, as_of, int(stamps.min()) + 1,
                      int(stamps.max()) + span + 1, profiles)
    if not len(after[0]):
        return profiles
    # a first row of a profile with no then_not row in the whole range holds outright;
    # only the others are searched
    busy = _membership(after[0])(profiles)
    idle = profiles[~busy]
    first, last, following, width = _spans(profiles[busy], stamps[busy], span, *after)
    following = np.append(np.sort(following), I64_MAX)
    nxt = following[np.searchsorted(following, first, side="right")]  # the first after r1
    return np.concatenate((idle, first[nxt > last] // width))


def _spans(profiles: np.ndarray, stamps: np.ndarray, span: int, other_profiles: np.ndarray,
           other_stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(profile, ts) packed in int64 keys that sort like the pairs, profile = key // width:
    the keys of (profile, ts) of the first rows, sorted (a sorted search is faster), the
    keys of (profile, ts + span) in the same order, those of the others, and width.

    The offset of ts from the earliest packs below the profile while that fits in 63
    bits (at 10M profiles, about 10 days of µs); otherwise the rank of ts among all."""
    base = min(int(stamps.min()), int(other_stamps.min()))
    width = max(int(stamps.max()) + span, int(other_stamps.max())) - base + 1
    top = max(int(profiles.max()), int(other_profiles.max()))
    if (top + 1) * width <= PACKED_LIMIT:
        first = np.sort(profiles * width + (stamps - base))
        return first, first + span, other_profiles * width + (other_stamps - base), width
    ranks = np.sort(np.concatenate((stamps, other_stamps)))
    first = _keys(profiles, stamps, ranks)
    last = profiles * len(ranks) + np.searchsorted(ranks, stamps + span, side="right") - 1
    order = np.argsort(first)
    return first[order], last[order], _keys(other_profiles, other_stamps, ranks), len(ranks)


def _keys(profiles: np.ndarray, ts: np.ndarray, stamps: np.ndarray) -> np.ndarray:
    """(profile, rank of ts among stamps) packed in one int64 that sorts like the pair;
    stamps is sorted and holds every ts (repeats are harmless: equal ts, equal rank)."""
    return profiles * len(stamps) + np.searchsorted(stamps, ts)


# ---------------------------------------------------------------------- rows
def step_rows(step: Step, snap: Snapshot, as_of: int, lo: int | None, hi: int,
              among: np.ndarray | None) -> Rows:
    """(profiles, ts) of the rows matching a step with lo <= ts < hi (lo None: from the
    first row), of the profiles in `among` (dense ids, any order; None: every profile)."""
    hi = min(hi, T.MAX_US + 1)
    member = None if among is None else _membership(among)
    if isinstance(step, EventCond):
        return _event_rows(step, snap.events, snap.schema.events, lo, hi, as_of, member)
    return _order_rows(step, snap.orders, lo, hi, as_of, member)


Member = Callable[[np.ndarray], np.ndarray] | None  # None: every profile is a member


def _membership(among: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A vectorised `profile in among` test: a bitset over the ids up to the largest (one
    bit an id: at 10M, 1.25 MB stays in cache where a bool table of 10 MB does not;
    668k lookups 6.4 -> 1.9 ms)."""
    if len(among) == 1:
        only = among[0]
        return lambda profiles: profiles == only
    top = int(among.max()) if len(among) else -1
    bits = np.zeros((top >> 3) + 1, dtype=np.uint8)
    np.bitwise_or.at(bits, among >> 3, np.left_shift(1, among & 7).astype(np.uint8))

    def within(profiles: np.ndarray) -> np.ndarray:
        return (bits[profiles >> 3] >> (profiles & 7).astype(np.uint8)) & 1 == 1

    def member(profiles: np.ndarray) -> np.ndarray:
        if len(profiles) and int(profiles.max()) <= top:
            return within(profiles)
        inside = profiles <= top
        out = np.zeros(len(profiles), dtype=bool)
        out[inside] = within(profiles[inside])
        return out

    return member


def _event_rows(step: EventCond, index: EventIndex, types: Any, lo: int | None, hi: int,
                as_of: int, member: Member) -> Rows:
    """The matching raw event rows, read block by block over the days of [lo, hi)."""
    profiles, stamps = [], []
    events = index.types if step.event == ANY else [step.event]
    for block, keep in blocks_in(index, events, lo, hi):
        if member is not None:
            keep &= member(block.profile)
        if step.where is not None and keep.any():
            keep &= row_mask(step.where, block, types, as_of)
        profiles.append(block.profile[keep])
        stamps.append(block.ts[keep])
    return _joined(profiles, stamps)


def _order_rows(step: OrdersCond, index: OrderIndex, lo: int | None, hi: int, as_of: int,
                member: Member) -> Rows:
    """The matching orders in [lo, hi), from the owner and ts columns."""
    span = Window("range", start=T.MIN_US if lo is None else lo, end=hi)
    selected = select_orders(replace(step, window=span), index, as_of)
    owners = index.owner_buf[selected]
    if member is not None:
        keep = member(owners)
        owners, selected = owners[keep], selected[keep]
    return _joined([owners], [index.ts_buf[selected]])


def _joined(profiles: list[np.ndarray], stamps: list[np.ndarray]) -> Rows:
    if not profiles:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return (np.concatenate(profiles).astype(np.int64),
            np.concatenate(stamps).astype(np.int64))
