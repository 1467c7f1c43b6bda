"""Event count windows as dyadic day blocks and months (index/event_windows.py): the
decomposition itself, and random windows at random as_of against the raw rows, with
writes between evaluations into days of blocks already made and cached."""

from __future__ import annotations

import math
from collections import Counter
from datetime import datetime, timedelta, timezone
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitseg.index import event_counts, event_windows
from bitseg.index.engine import Engine
from bitseg.index.evaluate import Evaluator
from bitseg.index.events import count_event
from bitseg.index.timeline import first_day
from bitseg.index.types import US_PER_DAY, parse_timestamp

BASE = datetime(2026, 8, 20, tzinfo=timezone.utc)  # rows span Aug .. Dec: four month starts
SPAN_DAYS = 120
PROFILES = [f"p{i}" for i in range(6)]
TYPES = ["open", "buy"]
CHANNELS = ["web", "app"]


def ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def days_of(term: tuple[int, int, int]) -> range:
    _, level, number = term
    if level == event_windows.MONTH:
        return range(first_day(number), first_day(number + 1))
    return range(number << level, (number + 1) << level)


def signed_days(terms: tuple[tuple[int, int, int], ...]) -> Counter:
    total: Counter = Counter()
    for term in terms:
        for day in days_of(term):
            total[day] += term[0]
    return +total


# ------------------------------------------------------------------ the decomposition
@pytest.mark.parametrize("months", [True, False])
def test_every_window_is_its_days_once_in_a_handful_of_blocks(monkeypatch, months):
    """Every span of 1..400 days, at every offset within a year: the blocks' signed sum
    counts each of its days once and no other day; a window up to a year takes at most
    9 blocks (8 operations, issue 15's bound), a 30-day one at most 7 (where the blocks
    only added are cheaper to sum than the fewest, they may be one or two more)."""
    monkeypatch.setattr(event_windows, "USE_MONTHS", months)
    for length in [*range(1, 70), 90, 180, 365, 366, 400]:
        for first in range(20_450, 20_450 + 365, 1 if length <= 40 else 7):
            terms = event_windows.terms(first, first + length)
            assert signed_days(terms) == Counter(range(first, first + length)), (first, length)
            assert len(terms) <= (7 if length <= 31 else 9 if length <= 366 else 12), \
                (first, length, terms)


def test_presence_uses_only_added_blocks_that_tile_the_window():
    for length in (1, 7, 29, 30, 31, 90, 365):
        for first in range(20_450, 20_450 + 64):
            terms = event_windows.terms(first, first + length, signed=False)
            assert all(sign == 1 for sign, _, _ in terms)
            assert signed_days(terms) == Counter(range(first, first + length))


def test_a_mid_month_window_costs_what_a_month_start_one_does():
    """Issue 15: 30 days back from 2026-10-17 13:45 (whole days Sep 18 .. Oct 16) and from
    2026-11-01 00:00 both take a handful of blocks; before, mid-month summed 29 days.
    Mid-month, the six added blocks (2, 4, 16, 4, 2 and 1 days) are cheaper to sum than
    the five signed ones (+32 +8 -2 -8 -1 days): 4.8 against 5.6 ms at 10M."""
    mid = event_windows.terms(20_714, 20_743)
    start = event_windows.terms(20_729, 20_758)
    assert len(mid) <= 6 and len(start) <= 3
    assert all(sign > 0 for sign, _, _ in mid)
    assert mid == event_windows.terms(20_714, 20_743, signed=False)


def test_the_cheaper_path_is_chosen_by_the_days_its_blocks_sum():
    """_cost: subtracting a large block costs an add over the whole window, so the
    fewest blocks lose to more added ones when what they subtract is large."""
    fewest = event_windows._shortest(20_714, 20_743, True, event_windows.MAX_LEVEL, True)
    assert len(fewest) == 5 and any(sign < 0 for sign, _, _ in fewest)
    added = event_windows.terms(20_714, 20_743, signed=False)
    assert event_windows._cost(added) < event_windows._cost(fewest)
    # a window one day short of a 32-day block: the block less that day, not 5 blocks
    assert event_windows.terms(20_704, 20_735) == ((1, 5, 647), (-1, 0, 20_735))


# ------------------------------------------------------------------ against the raw rows
def reference_counts(rows: list[dict], rule: dict, as_of: datetime) -> dict[str, int]:
    """Each profile's count of selected rows, the contract's §2.4 read literally."""
    window = rule.get("window")
    counts: Counter = Counter()
    for row in rows:
        if rule["event"] not in ("*", row["event"]):
            continue
        where = rule.get("where")
        if where is not None:
            wanted = [where["value"]] if where["op"] == "eq" else where["value"]
            if row.get("channel") not in wanted:
                continue
        moment = row["ts"]
        if window is None:
            inside = moment <= as_of
        elif "last_days" in window:
            inside = as_of - timedelta(days=window["last_days"]) < moment <= as_of
        elif "next_days" in window:
            inside = as_of < moment <= as_of + timedelta(days=window["next_days"])
        else:
            inside = datetime.fromisoformat(window["from"]) <= moment < \
                datetime.fromisoformat(window["to"])
        if inside:
            counts[row["profile"]] += 1
    return counts


def holds(count: int, op: str, value) -> bool:
    if op == "between":
        return value[0] <= count <= value[1]
    if op in ("in", "not_in"):
        return (Fraction(count) in [Fraction(str(v)) for v in value]) == (op == "in")
    return {"eq": count == value, "ne": count != value, "gt": count > value,
            "gte": count >= value, "lt": count < value, "lte": count <= value}[op]


moments = st.builds(lambda day, us: BASE + timedelta(days=day, microseconds=us),
                    st.integers(0, SPAN_DAYS), st.integers(0, US_PER_DAY - 1))
# as_of any time of day; at midnight, on month starts, mid-month
busy = st.builds(lambda day, us: BASE + timedelta(days=day, microseconds=us),  # many a day
                 st.integers(40, 45), st.integers(0, US_PER_DAY - 1))
as_ofs = st.one_of(
    moments, busy,
    st.integers(0, SPAN_DAYS).map(lambda d: BASE + timedelta(days=d)),
    st.sampled_from([datetime(2026, m, 1, tzinfo=timezone.utc) for m in (9, 10, 11, 12)]),
    st.sampled_from([datetime(2026, m, 1, tzinfo=timezone.utc) for m in (9, 10, 11, 12)])
    .map(lambda t: t + timedelta(microseconds=1)),
    st.builds(lambda m, h: datetime(2026, m, 15, tzinfo=timezone.utc) + timedelta(hours=h),
              st.integers(9, 11), st.integers(0, 23)))
rows_strategy = st.lists(st.fixed_dictionaries({
    "profile": st.sampled_from(PROFILES), "event": st.sampled_from(TYPES),
    "ts": moments | busy, "channel": st.sampled_from(CHANNELS + [None])}),
    min_size=1, max_size=60)
windows = st.one_of(
    st.none(),
    st.integers(1, 100).map(lambda n: {"last_days": n}),
    st.integers(1, 40).map(lambda n: {"next_days": n}),
    st.tuples(moments, st.integers(0, 90 * 24 * 3600)).map(
        lambda t: {"from": ts(t[0]), "to": ts(t[0] + timedelta(seconds=t[1]))}))
havings = st.one_of(
    st.tuples(st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte"]), st.integers(0, 7)),
    st.tuples(st.just("between"), st.tuples(st.integers(0, 4), st.integers(0, 4)).map(
        lambda t: (t[0], t[0] + t[1]))),
    st.tuples(st.sampled_from(["in", "not_in"]),
              st.lists(st.integers(0, 6) | st.just(1.5), min_size=1, max_size=3)))
rules_strategy = st.builds(
    lambda event, where, window, having: {
        "event": event, **({"where": where} if where else {}),
        **({"window": window} if window else {}),
        "having": {"agg": "count", "op": having[0],
                   "value": list(having[1]) if having[0] == "between" else having[1]}},
    st.sampled_from(TYPES + ["*"]),
    st.sampled_from([None, {"field": "channel", "op": "eq", "value": "web"},
                     {"field": "channel", "op": "in", "value": ["web", "app"]}]),
    windows, havings)
steps = st.lists(st.one_of(rows_strategy.map(lambda rows: ("write", rows)),
                           st.tuples(st.just("ask"), rules_strategy, as_ofs)),
                 min_size=1, max_size=8)


@pytest.mark.parametrize("months, top, from_months, window_cache, path",
                         [(True, 8, 6, True, "cheaper"), (False, 3, 6, True, "cheaper"),
                          (True, 8, 2, True, "cheaper"), (True, 8, 6, False, "cheaper"),
                          (True, 8, 6, True, "fewest"), (False, 3, 6, False, "added"),
                          (True, 8, 6, True, "halves")])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=rows_strategy, steps=steps)
def test_random_windows_match_the_raw_rows(tmp_path_factory, monkeypatch, months, top,
                                           from_months, window_cache, path, first, steps):
    """Writes and counts interleaved: each count is compared with the raw rows; a write
    between two counts lands in days whose derived blocks the first count cached.
    Months on and off, blocks up to 256 or 8 days, and (from_months 2) every block of 4
    days or more first made from months and 1-2 day blocks. Each rule is asked three
    times: with the window cache on, the first sums its whole days and compares them, the
    others take both from the cache; with it off, every ask sums. A window's blocks are
    the cheaper of the two paths (event_windows._cheaper), or always the fewest (with
    subtractions), or always only added ones; with those two, the partial days' profiles
    find their whole-day counts through counts_at's position table (at 4,096 or more
    otherwise). With those and with from_months 2, a window asked again reads them
    from its table of every profile's count (counts_at_days; also at 4,096 or more).
    "halves": the fewest blocks, each window's summed in two id ranges on two threads
    (event_windows._window_slices; at 200,000 profiles or more otherwise)."""
    if path == "halves":
        monkeypatch.setattr(event_windows, "SPLIT_FROM", 0)
        monkeypatch.setattr(event_windows, "SPLIT_STEP", 1)
    if path != "cheaper":
        monkeypatch.setattr(event_counts, "POSITIONS_FROM", 0)
    if path != "cheaper" or from_months == 2:
        monkeypatch.setattr(event_windows, "TABLE_FROM", 0)
        monkeypatch.setattr(event_windows, "_cheaper", lambda first, end, top, months:
                            event_windows._shortest(first, end, path != "added", top, months))
    monkeypatch.setattr(event_windows, "WINDOW_CACHE", window_cache)
    monkeypatch.setattr(event_windows, "USE_MONTHS", months)
    monkeypatch.setattr(event_windows, "MAX_LEVEL", top)
    monkeypatch.setattr(event_windows, "FROM_MONTHS", from_months)
    monkeypatch.setattr(event_windows, "PIECES", min(4, from_months - 1))
    rows: list[dict] = []
    with Engine.open(tmp_path_factory.mktemp("win") / "store") as engine:
        engine.declare_schema({"events": {"channel": "keyword"}})
        engine.upsert_profiles([{"id": p} for p in PROFILES])
        engine.cache_results = False
        for kind, *args in [("write", first), *steps]:
            if kind == "write":
                engine.track_events([{k: (ts(v) if k == "ts" else v) for k, v in row.items()
                                      if v is not None} for row in args[0]])
                rows += args[0]
                continue
            rule, as_of = args
            counts = reference_counts(rows, rule, as_of)
            having = rule["having"]
            expected = {p for p in PROFILES if holds(counts[p], having["op"], having["value"])}
            assert set(engine.members(rule, as_of=as_of)) == expected, (rule, as_of)
            assert engine.count(rule, as_of=as_of) == len(expected), (rule, as_of)
            snap = engine.snapshot  # the count that ends in cardinalities
            assert count_event(engine.parse(rule), snap.events, snap.schema, snap.live,
                               parse_timestamp(ts(as_of))) == len(expected), (rule, as_of)
            present = {"event": rule["event"], **({"window": rule["window"]}
                                                  if "window" in rule else {}),
                       **({"where": rule["where"]} if "where" in rule else {})}
            assert engine.count(present, as_of=as_of) == len(+counts), (present, as_of)


# ------------------------------------------------------------------ invalidation
def _rule(days: int, op: str = "gte", value: int = 1) -> dict:
    return {"event": "open", "window": {"last_days": days},
            "having": {"agg": "count", "op": op, "value": value}}


def _spy_window_sums(monkeypatch) -> list[tuple[int, int]]:
    """The (first, end) days of every window whose whole days are summed from now on."""
    calls: list[tuple[int, int]] = []
    original = event_windows.window_counts

    def spy(index, streams, first, end):
        calls.append((first, end))
        return original(index, streams, first, end)

    monkeypatch.setattr(event_windows, "window_counts", spy)
    return calls


def test_a_mostly_inside_edge_day_joins_the_whole_days(tmp_path, monkeypatch):
    """A 30-day window at a month start begins a microsecond after midnight: its first
    day is whole days' work (one month block less the day before), not the month less two
    days plus that day's bucket; the counts still match the raw rows."""
    as_of = datetime(2026, 11, 1, tzinfo=timezone.utc)
    rows = [{"profile": PROFILES[i % 5], "event": "open",  # Oct 2 at 0:00 is outside
             "ts": as_of - timedelta(days=d) + timedelta(hours=h)}
            for i, (d, h) in enumerate((d, h) for d in (0, 1, 2, 29, 30, 31) for h in (0, 6, 12))]
    calls = _spy_window_sums(monkeypatch)
    with Engine.open(tmp_path / "store") as engine:
        engine.upsert_profiles([{"id": p} for p in PROFILES])
        engine.cache_results = False
        engine.track_events([{**row, "ts": ts(row["ts"])} for row in rows])
        counts = reference_counts(rows, _rule(30), as_of)
        for n in range(1, 5):
            expected = {p for p in PROFILES if counts[p] >= n}
            assert set(engine.members(_rule(30, "gte", n), as_of=as_of)) == expected, n
    first = (as_of - timedelta(days=30)).timestamp() // 86_400  # Oct 2, the edge day
    assert len(set(calls)) == 1 and calls[0][0] == first, calls


def test_a_write_into_a_cached_block_is_counted_and_old_snapshots_keep_theirs(tmp_path):
    as_of = datetime(2026, 10, 17, 13, 45, tzinfo=timezone.utc)
    with Engine.open(tmp_path / "store") as engine:
        engine.cache_results = False
        engine.track_events([{"profile": p, "event": "open",
                              "ts": ts(as_of - timedelta(days=d, hours=1))}
                             for p in ("a", "b") for d in range(1, 40)])
        assert engine.count(_rule(30, "gte", 29), as_of=as_of) == 2
        cache = engine.snapshot.events.cache
        derived = list(cache.derived._entries)
        assert derived, "the window was not counted through derived blocks"
        before = engine.snapshot
        day = (as_of - timedelta(days=5)).replace(hour=3)
        engine.track_events([{"profile": "a", "event": "open", "ts": ts(day)}] * 3)
        # a now has 32 opens in the window, b still 29
        assert engine.count(_rule(30, "gte", 31), as_of=as_of) == 1
        assert engine.count(_rule(30, "eq", 29), as_of=as_of) == 1
        assert set(engine.members(_rule(30, "gte", 32), as_of=as_of)) == {"a"}
        at = parse_timestamp(ts(as_of))
        rule = engine.parse(_rule(30, "gte", 31))
        assert Evaluator(before, at).count(rule) == 0  # its own days' blocks
        assert Evaluator(engine.snapshot, at).count(rule) == 1
        day_number = (day - datetime(1970, 1, 1, tzinfo=timezone.utc)).days
        stamps = {key[1] for key in cache.derived._entries
                  if key[0][0].startswith(b"y") and key[0][1] == "open"
                  and day_number in range(key[0][2] << int(key[0][0][1:]),
                                          (key[0][2] + 1) << int(key[0][0][1:]))}
        assert len(stamps) >= 2, "a block holding the written day kept one key"


def test_a_window_asked_again_reads_its_partial_days_profiles_from_a_table(
        tmp_path, monkeypatch):
    """The profiles with rows on a window's partial days find their whole-day counts by
    slice intersections on the first ask, from a table of every profile's count made on
    the second and kept for the asks after it; a write into the window's days is read
    through a new table, never the old one. Every answer against the raw rows."""
    monkeypatch.setattr(event_windows, "TABLE_FROM", 0)
    made: list[int] = []
    original = event_windows.count_table
    monkeypatch.setattr(event_windows, "count_table",
                        lambda slices, limit: made.append(1) or original(slices, limit))
    day = datetime(2026, 10, 17, tzinfo=timezone.utc)
    rows = [{"profile": PROFILES[(i * 5) % 6], "event": "open",
             "ts": day - timedelta(days=i % 31, hours=(i * 7) % 24, minutes=i)}
            for i in range(90)]

    def check(engine, as_of: datetime) -> None:
        counts = reference_counts(rows, _rule(30), as_of)
        for n in sorted(set(counts.values())):  # each profile's own count: any off by one
            for op in ("gte", "lt", "eq"):  # changes an answer
                expected = {p for p in PROFILES if holds(counts[p], op, n)}
                assert set(engine.members(_rule(30, op, n), as_of=as_of)) == expected, \
                    (op, n)

    with Engine.open(tmp_path / "store") as engine:
        engine.upsert_profiles([{"id": p} for p in PROFILES])
        engine.cache_results = False
        engine.track_events([{**row, "ts": ts(row["ts"])} for row in rows])
        as_of = day + timedelta(hours=13, minutes=45)
        engine.count(_rule(30, "gte", 8), as_of=as_of)
        assert made == []  # the first ask reads the slices
        check(engine, as_of)
        assert made == [1]  # made on the second, read after it
        check(engine, as_of + timedelta(hours=3))  # the partial days moved, the whole not
        assert made == [1]
        extra = {"profile": PROFILES[0], "event": "open", "ts": day - timedelta(days=3)}
        engine.track_events([{**extra, "ts": ts(extra["ts"])}] * 4)
        rows.extend([extra] * 4)
        check(engine, as_of)
        assert len(made) == 2

        def tables() -> int:
            return sum(key[0][0] == b"w" and key[0][4] == event_windows.TABLE
                       for key in engine.snapshot.events.cache.derived._entries)

        kept = tables()
        monkeypatch.setattr(event_windows, "TABLE_SHARE", 1 << 40)  # no table fits now
        check(engine, as_of - timedelta(days=2))  # another window: read off its slices
        assert tables() == kept and len(made) > 2


def test_a_deleted_profile_with_rows_on_a_partial_day_is_not_counted(tmp_path):
    """A count of a window reads its partial days' profiles by cardinalities, and takes
    their kept ones by number while all of them are live: a deleted profile whose rows
    stay on a partial day is counted as members leaves it out, for every op."""
    day = datetime(2026, 10, 17, tzinfo=timezone.utc)
    rows = [{"profile": PROFILES[i % 6], "event": "open",
             "ts": day - timedelta(days=i % 31, hours=(i * 7) % 24, minutes=i)}
            for i in range(120)]
    rows += [{"profile": PROFILES[0], "event": "open", "ts": day + timedelta(hours=h)}
             for h in (1, 2, 3)]  # today's rows: the last partial day
    as_of = day + timedelta(hours=13, minutes=45)
    counts = reference_counts(rows, _rule(30), as_of)
    with Engine.open(tmp_path / "store") as engine:
        engine.upsert_profiles([{"id": p} for p in PROFILES])
        engine.cache_results = False
        engine.track_events([{**row, "ts": ts(row["ts"])} for row in rows])
        assert engine.delete_profiles([PROFILES[0]]) == 1
        live = [p for p in PROFILES if p != PROFILES[0]]
        for n in sorted({*counts.values(), 0, 1}):
            for op in ("gte", "lt", "eq", "ne"):
                expected = {p for p in live if holds(counts[p], op, n)}
                assert set(engine.members(_rule(30, op, n), as_of=as_of)) == expected, (op, n)
                assert engine.count(_rule(30, op, n), as_of=as_of) == len(expected), (op, n)


def test_a_window_asked_again_through_the_day_sums_its_whole_days_once(tmp_path,
                                                                       monkeypatch):
    """as_of moving through one day keeps a 30-day window's whole days: they are summed
    on the first ask only (the last day joins them or not as its rows fall, so at most
    twice), the partial days counted per call; every op against the raw rows. A write
    into one of those days is summed again; the snapshot before it keeps its answer."""
    calls = _spy_window_sums(monkeypatch)
    day = datetime(2026, 10, 17, tzinfo=timezone.utc)
    rows = [{"profile": PROFILES[(i * 7) % 6], "event": "open",
             "ts": day - timedelta(days=i % 33, hours=(i * 5) % 24, minutes=i)}
            for i in range(400)]
    with Engine.open(tmp_path / "store") as engine:
        engine.upsert_profiles([{"id": p} for p in PROFILES])
        engine.cache_results = False
        engine.track_events([{**row, "ts": ts(row["ts"])} for row in rows])
        for hour in range(1, 24, 2):
            as_of = day + timedelta(hours=hour, minutes=45)
            counts = reference_counts(rows, _rule(30), as_of)
            for op in ("gte", "lt", "eq"):
                for n in (0, 15, 20, 25):
                    expected = {p for p in PROFILES if holds(counts[p], op, n)}
                    assert set(engine.members(_rule(30, op, n), as_of=as_of)) == expected, \
                        (hour, op, n)
                    assert engine.count(_rule(30, op, n), as_of=as_of) == len(expected)
        assert 1 <= len(calls) <= 2 and len(set(calls)) == len(calls), calls
        before, as_of = engine.snapshot, day + timedelta(hours=13, minutes=45)
        counts = reference_counts(rows, _rule(30), as_of)
        top = max(counts.values())
        new = [{"profile": "p0", "event": "open", "ts": day - timedelta(days=3, hours=2)}] * 30
        engine.track_events([{**row, "ts": ts(row["ts"])} for row in new])
        summed = len(calls)
        assert engine.count(_rule(30, "gt", top), as_of=as_of) == 1
        assert len(calls) == summed + 1
        assert Evaluator(before, parse_timestamp(ts(as_of))).count(
            engine.parse(_rule(30, "gt", top))) == 0


def test_writes_into_today_keep_a_windows_cached_whole_days(tmp_path, monkeypatch):
    """as_of "now": the window's last partial day is today, which takes writes all day.
    It is counted from its rows, never taken into the whole days (even when every row of
    it is inside), so writes into today leave the window's cached sum as it is."""
    calls = _spy_window_sums(monkeypatch)
    now = datetime(2026, 10, 17, 13, 45, tzinfo=timezone.utc)
    rows = [{"profile": PROFILES[i % 6], "event": "open",
             "ts": now - timedelta(days=1 + i % 31, hours=i % 7)} for i in range(120)]
    with Engine.open(tmp_path / "store") as engine:
        engine.upsert_profiles([{"id": p} for p in PROFILES])
        engine.cache_results = False
        engine.track_events([{**row, "ts": ts(row["ts"])} for row in rows])
        for k in range(6):
            today = [{"profile": PROFILES[(k + j) % 6], "event": "open",
                      "ts": now - timedelta(minutes=5 + 30 * k + j)} for j in range(k + 1)]
            engine.track_events([{**row, "ts": ts(row["ts"])} for row in today])
            rows += today
            counts = reference_counts(rows, _rule(30), now)
            for n in (5, 6, 7):
                expected = {p for p in PROFILES if counts[p] >= n}
                assert set(engine.members(_rule(30, "gte", n), as_of=now)) == expected, (k, n)
        assert len(calls) == 1, calls


def test_derived_blocks_stay_within_their_bound(tmp_path, monkeypatch):
    """With room for almost nothing, the derived blocks are made again as needed: the
    answers stay the same and the cache keeps at most one (the least recent go first)."""
    from bitseg.index import event_index

    as_of = datetime(2026, 10, 17, 13, 45, tzinfo=timezone.utc)
    lines = [{"profile": f"p{i % 7}", "event": "open",
              "ts": ts(as_of - timedelta(days=i % 45, hours=i % 5))} for i in range(300)]
    answers = []
    for limit in (1 << 30, 1):
        monkeypatch.setattr(event_index, "DERIVED_BYTES", limit)
        with Engine.open(tmp_path / f"store-{limit}") as engine:
            engine.cache_results = False
            engine.track_events(lines)
            answers.append([engine.count(_rule(days, "gte", n), as_of=as_of)
                            for days in (7, 20, 30, 40) for n in (1, 3, 6)])
            derived = engine.snapshot.events.cache.derived
            assert len(derived._entries) >= 2 if limit > 1 else len(derived._entries) <= 1
    assert answers[0] == answers[1]
    assert any(answers[0])


def test_a_window_starting_early_in_a_day_takes_that_days_bucket_minus_the_rows_before(
        tmp_path):
    """A window from just after midnight holds most of its first day: it is counted as
    the day's bucket minus the rows before the window's start (and one from late in the
    day by its rows): start hours through the day, every count, against the raw rows."""
    day = datetime(2026, 10, 5, tzinfo=timezone.utc)
    rows = [{"profile": PROFILES[i % 4], "event": "open",
             "ts": day + timedelta(hours=h, minutes=i)} for i, h in enumerate(range(0, 24, 2))]
    rows += [{"profile": "p0", "event": "open", "ts": day + timedelta(days=3, hours=5)}]
    with Engine.open(tmp_path / "store") as engine:
        engine.upsert_profiles([{"id": p} for p in PROFILES])
        engine.cache_results = False
        engine.track_events([{**row, "ts": ts(row["ts"])} for row in rows])
        for hour in range(0, 24, 3):
            start = day + timedelta(hours=hour, minutes=30)
            for end_days in (1, 4):
                window = {"from": ts(start), "to": ts(day + timedelta(days=end_days, hours=12))}
                counts = reference_counts(rows, {"event": "open", "window": window}, day)
                for n in range(0, 5):
                    rule = {"event": "open", "window": window,
                            "having": {"agg": "count", "op": "eq", "value": n}}
                    expected = {p for p in PROFILES if counts[p] == n}
                    assert set(engine.members(rule, as_of=day)) == expected, (hour, n)


def test_a_window_a_day_on_is_the_day_befores_sum_moved_by_a_day(tmp_path, monkeypatch):
    """as_of "now" crosses midnight: the window's whole days move on by a day. With the
    day before's sum cached, it is taken less its first day plus the new last day, and no
    blocks are summed; every op against the raw rows, day after day, with writes into the
    days both windows hold (which give the earlier sum another key: summed again). Moving
    is forced here, whatever _cost says of the blocks (the next test checks that choice)."""
    monkeypatch.setattr(event_windows, "_cost", lambda path: math.inf)
    calls = _spy_window_sums(monkeypatch)
    moves = []
    original = event_windows.moved
    monkeypatch.setattr(event_windows, "moved",
                        lambda *args: moves.append(1) or original(*args))
    day = datetime(2026, 10, 3, 13, 45, tzinfo=timezone.utc)
    rows = [{"profile": PROFILES[(i * 5) % 6], "event": "open",
             "ts": day + timedelta(days=20) - timedelta(days=i % 60, hours=(i * 7) % 24)}
            for i in range(700)]
    with Engine.open(tmp_path / "store") as engine:
        engine.upsert_profiles([{"id": p} for p in PROFILES])
        engine.cache_results = False
        engine.track_events([{**row, "ts": ts(row["ts"])} for row in rows])
        for k in range(12):
            as_of = day + timedelta(days=k)
            if k == 6:  # a write into days both the last window and the next one hold
                new = [{"profile": "p1", "event": "open", "ts": as_of - timedelta(days=9)}] * 4
                engine.track_events([{**row, "ts": ts(row["ts"])} for row in new])
                rows += new
            counts = reference_counts(rows, _rule(30), as_of)
            summed = len(calls)
            for op, n in (("gte", 9), ("lt", 12), ("eq", 11), ("gte", 14)):
                expected = {p for p in PROFILES if holds(counts[p], op, n)}
                assert set(engine.members(_rule(30, op, n), as_of=as_of)) == expected, (k, op)
                assert engine.count(_rule(30, op, n), as_of=as_of) == len(expected), (k, op)
            assert len(calls) - summed == (1 if k in (0, 6) else 0), (k, calls)
        assert len(moves) == 10  # one stream, days 1-5 and 7-11


def test_a_window_is_moved_from_the_day_before_only_where_that_is_cheaper(tmp_path,
                                                                         monkeypatch):
    """Mid-month, two one-day steps over the whole window cost less than its six blocks
    (at 10M 5.4 against 7.8 ms): the day before's sum is moved. At a month start the
    window is its month less a day, one step already (1.6 against 2.8 ms): summed."""
    calls = _spy_window_sums(monkeypatch)
    day = datetime(2026, 10, 17, 13, 45, tzinfo=timezone.utc)
    rows = [{"profile": PROFILES[i % 6], "event": "open",
             "ts": day + timedelta(days=16) - timedelta(days=i % 70, hours=i % 24)}
            for i in range(500)]
    with Engine.open(tmp_path / "store") as engine:
        engine.upsert_profiles([{"id": p} for p in PROFILES])
        engine.cache_results = False
        engine.track_events([{**row, "ts": ts(row["ts"])} for row in rows])
        for as_of, moved in ((day, True), (datetime(2026, 11, 1, tzinfo=timezone.utc), False)):
            engine.snapshot.events.cache.derived.discard(event_windows.is_window)
            engine.count(_rule(30, "gte", 2), as_of=as_of - timedelta(days=1))
            summed = len(calls)
            counts = reference_counts(rows, _rule(30), as_of)
            assert engine.count(_rule(30, "gte", 2), as_of=as_of) == \
                sum(counts[p] >= 2 for p in PROFILES)
            assert len(calls) == summed + (0 if moved else 1), (as_of, calls)


def test_a_window_whose_day_before_is_not_cached_sums_its_blocks(tmp_path, monkeypatch):
    """Two days on, or with the window cache emptied, nothing is moved: the blocks are
    summed, and the answers are the raw rows'."""
    calls = _spy_window_sums(monkeypatch)
    day = datetime(2026, 10, 3, 13, 45, tzinfo=timezone.utc)
    rows = [{"profile": PROFILES[i % 6], "event": "open",
             "ts": day - timedelta(days=i % 40, hours=i % 24)} for i in range(300)]
    with Engine.open(tmp_path / "store") as engine:
        engine.upsert_profiles([{"id": p} for p in PROFILES])
        engine.cache_results = False
        engine.track_events([{**row, "ts": ts(row["ts"])} for row in rows])
        for k in (0, 2, 4):
            as_of = day + timedelta(days=k)
            counts = reference_counts(rows, _rule(30), as_of)
            expected = {p for p in PROFILES if counts[p] >= 7}
            assert set(engine.members(_rule(30, "gte", 7), as_of=as_of)) == expected
        assert len(calls) == 3
        engine.snapshot.events.cache.derived.discard(event_windows.is_window)
        as_of = day + timedelta(days=5)
        counts = reference_counts(rows, _rule(30), as_of)
        assert engine.count(_rule(30, "gte", 7), as_of=as_of) == \
            sum(counts[p] >= 7 for p in PROFILES)
        assert len(calls) == 4


def test_a_large_window_is_summed_in_two_id_ranges_with_its_blocks_halves_kept(
        tmp_path, monkeypatch):
    """Past SPLIT_FROM profiles, a window's blocks are split at an id (kept in the derived
    cache beside them) and the two ranges summed at once; the answers are the raw rows',
    a second window over the same blocks splits nothing again, and below SPLIT_FROM, or
    without the native path, nothing is split."""
    split_calls: list[int] = []
    original = event_windows.split_signed_slices

    def spy(plus, minus):
        split_calls.append(len(plus) + len(minus))
        return original(plus, minus)

    monkeypatch.setattr(event_windows, "split_signed_slices", spy)
    monkeypatch.setattr(event_windows, "SPLIT_STEP", 1)
    as_of = datetime(2026, 10, 17, 13, 45, tzinfo=timezone.utc)
    profiles = [f"q{i}" for i in range(40)]
    rows = [{"profile": profiles[(i * 7) % 40], "event": "open",
             "ts": as_of - timedelta(days=i % 45, hours=i % 7)} for i in range(900)]
    with Engine.open(tmp_path / "store") as engine:
        engine.upsert_profiles([{"id": p} for p in profiles])
        engine.cache_results = False
        engine.track_events([{**row, "ts": ts(row["ts"])} for row in rows])
        derived = engine.snapshot.events.cache.derived

        def halves() -> int:
            return sum(1 for key in derived._entries if key[0][0] == b"h")

        def check(days: int) -> None:
            counts = reference_counts(rows, _rule(days), as_of)
            for n in (1, 9, 20):
                expected = {p for p in profiles if counts[p] >= n}
                assert set(engine.members(_rule(days, "gte", n), as_of=as_of)) == expected

        monkeypatch.setattr(event_windows, "SPLIT_FROM", 10**9)
        check(30)
        assert not split_calls and halves() == 0
        derived.discard(event_windows.is_window)
        monkeypatch.setattr(event_windows, "SPLIT_FROM", 0)
        check(30)
        assert len(split_calls) == 1 and halves() == split_calls[0]
        kept = halves()
        derived.discard(event_windows.is_window)
        check(30)  # the same blocks: their halves come from the cache
        assert len(split_calls) == 2 and halves() == kept
        monkeypatch.setattr(event_windows.native_roaring, "AVAILABLE", False)
        derived.discard(event_windows.is_window)
        check(20)
        assert len(split_calls) == 2
