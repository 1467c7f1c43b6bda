"""Event rules: seed use cases by hand, and random rules against brute force."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from fractions import Fraction
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitseg.index import compare as compare_module
from bitseg.index.engine import Engine
from bitseg.index.errors import DataError, RuleError

AS_OF = datetime(2026, 11, 20, 15, 30, tzinfo=timezone.utc)


def ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ago(days: float = 0, **kw: float) -> str:
    return ts(AS_OF - timedelta(days=days, **kw))


@pytest.fixture
def engine(tmp_path):
    with Engine.open(tmp_path / "store") as engine:
        yield engine


# ------------------------------------------------------------------ seed use cases
def test_popup_opened_three_times_in_30_days_but_never_filled(engine):
    opened = {"anna": [1, 2, 3], "ben": [1, 2, 3, 4], "cleo": [1, 2, 40],  # 40 is too old
              "dan": [5, 6, 7], "eve": [29.9, 29.95, 29.99]}
    filled = {"ben": [10], "dan": [100]}  # dan filled long ago: "never" means never
    events = [{"profile": p, "event": "popup_opened", "ts": ago(d), "popup": "spring"}
              for p, days in opened.items() for d in days]
    events += [{"profile": p, "event": "popup_filled", "ts": ago(d), "popup": "spring"}
               for p, days in filled.items() for d in days]
    engine.track_events(events)
    rule = {"and": [
        {"event": "popup_opened", "where": {"field": "popup", "op": "eq", "value": "spring"},
         "window": {"last_days": 30}, "having": {"agg": "count", "op": "gte", "value": 3}},
        {"not": {"event": "popup_filled"}},
    ]}
    assert sorted(engine.members(rule, as_of=AS_OF)) == ["anna", "eve"]
    assert engine.count(rule, as_of=AS_OF) == 2


def test_points_accrued_100_to_500_in_the_next_7_days(engine):
    engine.track_events([
        {"profile": "a", "event": "points_accrued", "ts": ago(-1), "points": 50},
        {"profile": "a", "event": "points_accrued", "ts": ago(-6.9), "points": 60},   # 110
        {"profile": "b", "event": "points_accrued", "ts": ago(-2), "points": 600},    # 600
        {"profile": "c", "event": "points_accrued", "ts": ago(-8), "points": 200},    # too late
        {"profile": "c", "event": "points_accrued", "ts": ago(1), "points": 200},     # past
        {"profile": "d", "event": "points_accrued", "ts": ago(-7), "points": 500},    # edge: in
        {"profile": "e", "event": "points_accrued", "ts": ago(0), "points": 300},     # as_of: out
    ])
    rule = {"event": "points_accrued", "window": {"next_days": 7},
            "having": {"agg": "sum", "of": "points", "op": "between", "value": [100, 500]}}
    assert sorted(engine.members(rule, as_of=AS_OF)) == ["a", "d"]


def test_windows_are_exact_to_the_microsecond(engine):
    edge = AS_OF - timedelta(days=30)
    engine.track_events([
        {"profile": "at_edge", "event": "e", "ts": ts(edge)},                      # excluded
        {"profile": "inside", "event": "e", "ts": ts(edge + timedelta(microseconds=1))},
        {"profile": "at_as_of", "event": "e", "ts": ts(AS_OF)},                     # included
        {"profile": "after", "event": "e", "ts": ts(AS_OF + timedelta(microseconds=1))},
    ])
    last30 = {"event": "e", "window": {"last_days": 30}}
    assert sorted(engine.members(last30, as_of=AS_OF)) == ["at_as_of", "inside"]
    everything = {"event": "e"}  # no window: whatever happened by as_of
    assert sorted(engine.members(everything, as_of=AS_OF)) == ["at_as_of", "at_edge", "inside"]
    span = {"event": "e", "window": {"from": ts(edge), "to": ts(AS_OF)}}  # [from, to)
    assert sorted(engine.members(span, as_of=AS_OF)) == ["at_edge", "inside"]


def test_zero_rows_count_zero_and_sum_zero_but_not_avg(engine):
    engine.upsert_profiles([{"id": "quiet"}])
    engine.track_events([{"profile": "busy", "event": "buy", "ts": ago(1), "n": 5}])
    def members(having):
        return sorted(engine.members({"event": "buy", "having": having}, as_of=AS_OF))
    assert members({"agg": "count", "op": "eq", "value": 0}) == ["quiet"]
    assert members({"agg": "count", "op": "lt", "value": 3}) == ["busy", "quiet"]
    assert members({"agg": "sum", "of": "n", "op": "lte", "value": 10}) == ["busy", "quiet"]
    assert members({"agg": "avg", "of": "n", "op": "lte", "value": 10}) == ["busy"]
    assert members({"agg": "min", "of": "n", "op": "gte", "value": 0}) == ["busy"]
    assert members({"agg": "max", "of": "n", "op": "ne", "value": 4}) == ["busy"]


def test_sums_and_averages_of_huge_amounts_are_exact_past_int64(engine):
    """Amounts are kept as 10**-8 units below 2**62: three of 4e10 sum to 1.2e19 units,
    past int64, which numpy's sums would wrap to a negative total."""
    engine.track_events([{"profile": "whale", "event": "buy", "ts": ago(d), "amount": 4e10}
                         for d in (1, 2, 3)] +
                        [{"profile": "minnow", "event": "buy", "ts": ago(1), "amount": 1.5},
                         {"profile": "debtor", "event": "buy", "ts": ago(1), "amount": -4e10},
                         {"profile": "debtor", "event": "buy", "ts": ago(2), "amount": -4e10},
                         {"profile": "debtor", "event": "buy", "ts": ago(3), "amount": -4e10}])

    def members(agg, op, value):
        rule = {"event": "buy", "having": {"agg": agg, "of": "amount", "op": op, "value": value}}
        return sorted(engine.members(rule, as_of=AS_OF))
    assert members("sum", "eq", 120_000_000_000) == ["whale"]
    assert members("sum", "gt", 100_000_000_000) == ["whale"]
    assert members("sum", "lt", -100_000_000_000) == ["debtor"]
    assert members("sum", "between", [0, 2]) == ["minnow"]
    assert members("avg", "eq", 40_000_000_000) == ["whale"]
    assert members("avg", "gt", 1.5) == ["whale"]


@given(st.lists(st.integers(0, 2**32 - 2), max_size=60), st.lists(st.integers(0, 2**32 - 2),
                                                                   max_size=60),
       st.booleans())
def test_signed_counts_are_rows_in_less_rows_out_per_profile(plus, minus, small):
    """The partial days' signed counts, in 32-bit keys while ids are below 2**31 and in
    64-bit ones past it."""
    from collections import Counter

    from bitseg.index.events import _signed_counts

    if small:
        plus, minus = [p % 2**31 for p in plus], [m % 2**31 for m in minus]
    ids, rows = _signed_counts(np.array(plus, dtype=np.uint32), np.array(minus, dtype=np.uint32))
    expected = Counter(plus)
    expected.subtract(Counter(minus))
    assert ids.tolist() == sorted(set(plus) | set(minus))
    assert rows.tolist() == [expected[i] for i in ids.tolist()]


def test_counts_add_across_batches_months_and_reopen(tmp_path):
    path = tmp_path / "store"
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with Engine.open(path) as engine:
        for batch in range(3):  # the same profiles in every batch: buckets must add up
            engine.track_events([{"profile": f"p{i}", "event": "visit",
                                  "ts": ts(start + timedelta(days=d, hours=batch))}
                                 for i in range(6) for d in range(0, 300, 7 + i)])
        rule = {"event": "visit", "window": {"last_days": 200},
                "having": {"agg": "count", "op": "gte", "value": 70}}
        before = sorted(engine.members(rule, as_of=AS_OF))
    expected = sorted(f"p{i}" for i in range(6)
                      if 3 * sum(1 for d in range(0, 300, 7 + i)
                                 if start + timedelta(days=d) > AS_OF - timedelta(days=200)) >= 70)
    assert before == expected and before
    with Engine.open(path) as engine:
        assert sorted(engine.members(rule, as_of=AS_OF)) == before


def test_an_event_for_an_unknown_profile_creates_it(engine):
    report = engine.track_events([{"profile": 7, "event": "signup", "ts": ago(1)}])
    assert report.created == 1 and report.rows == 1
    assert engine.profile("7") == {"id": "7"}
    assert engine.members({"event": "signup"}, as_of=AS_OF) == ["7"]


@pytest.mark.parametrize("line, field", [
    ({"event": "x", "ts": "2026-01-01T00:00:00Z"}, "profile"),
    ({"profile": "a", "ts": "2026-01-01T00:00:00Z"}, "event"),
    ({"profile": "a", "event": "x"}, "ts"),
    ({"profile": "a", "event": "x", "ts": "yesterday"}, "ts"),
    ({"profile": "a", "event": "x", "ts": "2026-01-01T00:00:00Z", "tags": ["a"]}, "tags"),
    ({"profile": "a", "event": "x", "ts": "2026-01-01T00:00:00Z", "n": "five"}, "n"),
])
def test_a_bad_event_line_names_its_field_and_changes_nothing(engine, line, field):
    engine.track_events([{"profile": "a", "event": "x", "ts": ago(1), "n": 1}])
    before = (engine.total(), engine.snapshot.version)
    with pytest.raises(DataError) as info:
        engine.track_events([{"profile": "new", "event": "x", "ts": ago(2)}, line],
                            file="events.jsonl")
    assert (info.value.file, info.value.line, info.value.field) == ("events.jsonl", 2, field)
    assert (engine.total(), engine.snapshot.version) == before
    assert engine.count({"event": "x"}, as_of=AS_OF) == 1


def test_event_rule_errors_name_their_path(engine):
    engine.track_events([{"profile": "a", "event": "x", "ts": ago(1), "n": 1, "k": "v"}])
    cases = [
        ({"event": "x", "having": {"agg": "sum", "of": "k", "op": "gt", "value": 1}},
         "$.having.of"),
        ({"event": "x", "having": {"agg": "median", "op": "gt", "value": 1}}, "$.having.agg"),
        ({"event": "x", "window": {"last_days": -1}}, "$.window.last_days"),
        ({"event": "x", "window": {"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}},
         "$.window"),
        ({"not": {"event": "x", "where": {"field": "nope", "op": "eq", "value": 1}}},
         "$.not.where.field"),
        ({"event": "x", "where": {"event": "y"}}, "$.where.event"),
    ]
    for rule, path in cases:
        with pytest.raises(RuleError) as info:
            engine.count(rule, as_of=AS_OF)
        assert info.value.path == path, (rule, str(info.value))


# ------------------------------------------------------------------ against brute force
TYPES = ["open", "click", "buy"]
CHANNELS = ["web", "app"]
PROFILES = [f"p{i}" for i in range(5)]

events_strategy = st.lists(st.fixed_dictionaries({
    "profile": st.sampled_from(PROFILES), "event": st.sampled_from(TYPES),
    # around AS_OF: exactly on window edges (as_of ± n days), on day boundaries, at as_of
    # itself, and densely in the last days so that bucket counts need carries
    "ts": st.one_of(st.integers(-70 * 24, 10 * 24).map(lambda h: AS_OF + timedelta(hours=h)),
                    st.integers(-6, 6).map(lambda d: AS_OF + timedelta(days=d)),
                    st.integers(-70, 10).map(lambda d: AS_OF.replace(hour=0, minute=0)
                                             + timedelta(days=d)),
                    st.integers(-4 * 24, 0).map(lambda h: AS_OF + timedelta(hours=h)),
                    st.just(AS_OF)),
    "channel": st.sampled_from(CHANNELS + [None]), "n": st.integers(-3, 9)}),
    max_size=150)

rules_strategy = st.fixed_dictionaries({
    "event": st.sampled_from(TYPES + ["*"]),
    "where": st.sampled_from([None, {"field": "channel", "op": "eq", "value": "web"},
                              {"field": "channel", "op": "in", "value": ["web", "app", "web"]},
                              {"field": "n", "op": "gt", "value": 2},
                              {"not": {"field": "channel", "op": "eq", "value": "app"}}]),
    "window": st.one_of(st.none(), st.integers(1, 75).map(lambda n: {"last_days": n}),
                        st.integers(1, 6).map(lambda n: {"last_days": n}),
                        st.integers(1, 6).map(lambda n: {"next_days": n}),
                        st.integers(1, 12).map(lambda n: {"next_days": n}),
                        st.tuples(st.integers(-80 * 24, 12 * 24), st.integers(0, 60 * 24)).map(
                            lambda t: {"from": ts(AS_OF + timedelta(hours=t[0])),
                                       "to": ts(AS_OF + timedelta(hours=t[0] + t[1]))})),
    "having": st.one_of(st.none(), st.tuples(
        st.sampled_from(["count", "sum", "avg", "min", "max"]),
        st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte"]), st.integers(-2, 12)),
        st.tuples(st.sampled_from(["count", "sum", "avg", "min", "max"]),
                  st.sampled_from(["in", "not_in"]),
                  st.lists(st.integers(-2, 12) | st.sampled_from([0.5, 2.5]), min_size=1,
                           max_size=3))),
})


def _in_window(moment: datetime, window: dict | None) -> bool:
    if window is None:
        return moment <= AS_OF
    if "last_days" in window:
        return AS_OF - timedelta(days=window["last_days"]) < moment <= AS_OF
    if "next_days" in window:
        return AS_OF < moment <= AS_OF + timedelta(days=window["next_days"])
    lo = datetime.fromisoformat(window["from"])
    hi = datetime.fromisoformat(window["to"])
    return lo <= moment < hi


def _where(event: dict, where: dict | None) -> bool:
    if where is None:
        return True
    if "not" in where:
        return not _where(event, where["not"])
    value = event.get(where["field"])
    if value is None:
        return False
    if where["op"] == "eq":
        return value == where["value"]
    if where["op"] == "in":
        return value in where["value"]
    return value > where["value"]


def brute_force(events: list[dict], rule: dict) -> set[str]:
    """Loop over every profile and every event; the contract's §2.4, literally."""
    having = rule.get("having") or {"agg": "count", "op": "gte", "value": 1}
    found = set()
    for profile in {e["profile"] for e in events}:
        rows = [e for e in events if e["profile"] == profile
                and rule["event"] in ("*", e["event"]) and _where(e, rule.get("where"))
                and _in_window(e["ts"], rule.get("window"))]
        values = [Fraction(e["n"]) for e in rows]
        agg = having["agg"]
        if agg == "count":
            x = len(rows)
        elif agg == "sum":
            x = sum(values)
        elif not values:
            continue  # avg / min / max have no value without rows
        else:
            x = {"avg": sum(values) / len(values), "min": min(values), "max": max(values)}[agg]
        v = having["value"]
        if having["op"] in ("in", "not_in"):
            ok = (x in [Fraction(str(item)) for item in v]) == (having["op"] == "in")
        else:
            ok = {"eq": x == v, "ne": x != v, "gt": x > v, "gte": x >= v, "lt": x < v,
                  "lte": x <= v}[having["op"]]
        if ok:
            found.add(profile)
    return found


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(events_strategy, min_size=1, max_size=3),
       rules=st.lists(rules_strategy, min_size=1, max_size=6))
def test_event_rules_match_brute_force(tmp_path_factory, batches, rules):
    with Engine.open(tmp_path_factory.mktemp("ev") / "store") as engine:
        engine.declare_schema({"events": {"channel": "keyword", "n": "int"}})
        engine.upsert_profiles([{"id": p} for p in PROFILES])
        everything = []
        for batch in batches:
            lines = [{k: (ts(v) if k == "ts" else v) for k, v in e.items() if v is not None}
                     for e in batch]
            if lines:
                engine.track_events(lines)
            everything += batch
        everything = [{k: v for k, v in e.items() if v is not None} for e in everything]
        for draft in rules:
            rule = {k: v for k, v in draft.items() if v is not None}
            if "having" in rule:
                agg, op, value = rule["having"]
                rule["having"] = {"agg": agg, "op": op, "value": value}
                if agg != "count":
                    rule["having"]["of"] = "n"
            expected = brute_force(everything, rule)
            if "having" in rule and rule["having"]["agg"] in ("count", "sum"):
                v, op = rule["having"]["value"], rule["having"]["op"]
                zero = (0 in v) == (op == "in") if op in ("in", "not_in") else {
                    "eq": 0 == v, "ne": 0 != v, "gt": 0 > v, "gte": 0 >= v, "lt": 0 < v,
                    "lte": 0 <= v}[op]
                if zero:  # profiles with no selected rows: count 0, sum 0
                    with_rows = brute_force(everything, {**rule, "having": {
                        "agg": "count", "op": "gte", "value": 1}})
                    expected |= set(PROFILES) - with_rows
            got = set(engine.members(rule, as_of=AS_OF))
            assert got == expected, rule
            assert engine.count(rule, as_of=AS_OF) == len(expected)
            engine.cache_results = False  # each grouping evaluates
            for ratio in (0, 10**9):  # rows grouped by bincount, then by sorting (compare.py)
                with mock.patch.object(compare_module, "DENSE_RATIO", ratio):
                    assert set(engine.members(rule, as_of=AS_OF)) == expected, (rule, ratio)
            engine.cache_results = True


def _stored_parts(path):
    """Every stored block part of a store as (type, day, seq) -> its rows, each keyword
    value given as its word (codes number words per part, in an order of their own)."""
    from storecmp import store_entries

    from bitseg.index.event_index import Block
    from bitseg.index.keys import BLOCKS, block_parts

    out = {}
    for key, raw in store_entries(path)["events"].items():
        if not key.startswith(BLOCKS):
            continue
        block = Block.decode(raw)
        props = {}
        for name, (values, valid) in block.props.items():
            words = block.words.get(name)
            props[name] = [(words[v] if words is not None else int(v)) if ok else None
                           for v, ok in zip(values.tolist(), valid.tolist(), strict=True)]
        out[block_parts(key)] = (block.profile.tolist(), block.ts.tolist(),
                                 block.version.tolist(), props)
    return out


def test_many_block_parts_give_the_same_answers(tmp_path, monkeypatch):
    """A batch larger than FLUSH_ROWS makes a part of a day per flush (a file not in time
    order touches every day in every flush); they are stashed and written as one part a
    batch: the same rows, in line order, as a batch of one flush writes, after the part
    an earlier batch committed, and read as one."""
    from bitseg.index import event_batch

    lines = [{"profile": f"p{i % 9}", "event": ["open", "buy"][i % 2],
              "ts": ago((i * 7) % 40, hours=i % 24),
              "channel": ["web", "app", "shop", "mail"][(i * i) % 4 if i % 3 else 1],
              "n": i % 5} for i in range(400)]
    rules = [{"event": "open", "window": {"last_days": 30},
              "having": {"agg": "count", "op": "gte", "value": 5}},
             {"event": "*", "where": {"field": "channel", "op": "eq", "value": "app"},
              "window": {"last_days": 7}, "having": {"agg": "count", "op": "gte", "value": 2}},
             {"event": "buy", "window": {"last_days": 20},
              "having": {"agg": "sum", "of": "n", "op": "gt", "value": 8}}]
    answers, stored = [], []
    for flush_rows in (1 << 20, 7):
        monkeypatch.setattr(event_batch, "FLUSH_ROWS", flush_rows)
        path = tmp_path / f"store-{flush_rows}"
        with Engine.open(path) as engine:
            engine.track_events(lines[:150])
            engine.track_events(lines[150:])
            # a batch's parts of a day are joined into one when it finishes
            assert max(engine.snapshot.events.parts.values()) <= 2
            answers.append([sorted(engine.members(r, as_of=AS_OF)) for r in rules])
        with Engine.open(path) as engine:
            assert [sorted(engine.members(r, as_of=AS_OF)) for r in rules] == answers[-1]
        stored.append(_stored_parts(path))
    assert answers[0] == answers[1]
    assert all(answers[0])
    assert stored[0] == stored[1]
    assert {seq for _, _, seq in stored[1]} == {0, 1}  # a part a batch, the second after
    assert sum(len(rows[0]) for rows in stored[1].values()) == len(lines)
    assert not [p for p in tmp_path.rglob("*") if "bitseg-parts" in p.name]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 40), st.integers(0, 40)),
                max_size=60))
def test_subtracting_count_indexes_is_integer_subtraction(rows):
    from bitseg.index.event_counts import count_index, sub_counts

    a, b = {}, {}
    for pid, x, y in rows:  # b counts a subset of a's rows: b <= a per profile
        a[pid], b[pid] = max(x, y), min(x, y)

    def index(counts):
        ids = np.array([p for p, c in counts.items() if c], dtype=np.uint32)
        return count_index(ids, np.array([counts[p] for p in ids.tolist()], dtype=np.int64))

    got = sub_counts(index(a), index(b))
    ids, keys = got.decode()
    assert dict(zip(ids.tolist(), keys.tolist(), strict=True)) == \
        {p: a[p] - b[p] for p in a if a[p] - b[p]}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(st.integers(0, 300), st.integers(1, 40), max_size=30),
                max_size=5),
       st.lists(st.integers(0, 4), max_size=4), st.data())
def test_a_signed_sum_of_count_indexes_is_the_counts_added_and_taken(plus, picks, data):
    """signed_sum(plus, minus), minus counting a subset of plus's rows (each a part of
    one plus block, as a window's subtracted blocks lie inside its added ones), is the
    per-profile sum of plus less that of minus, with `exists` those left above 0."""
    from collections import Counter

    from bitseg.index.event_counts import count_index, signed_sum

    def index(counts):
        ids = np.array(sorted(p for p, c in counts.items() if c), dtype=np.uint32)
        return count_index(ids, np.array([counts[p] for p in ids.tolist()], dtype=np.int64))

    minus, left = [], [dict(counts) for counts in plus]
    for k in picks:
        if k < len(plus) and plus[k]:  # a part of what block k has not given yet
            part = {p: data.draw(st.integers(0, c)) for p, c in left[k].items()}
            minus.append(part)
            left[k] = {p: c - part[p] for p, c in left[k].items()}
    total = Counter()
    for counts in left:
        total.update(counts)
    got = signed_sum([index(c) for c in plus], [index(c) for c in minus])
    ids, keys = got.decode()
    assert dict(zip(ids.tolist(), keys.tolist(), strict=True)) == \
        {p: v for p, v in total.items() if v}
    assert set(got.exists) == {p for p, v in total.items() if v}


def test_a_window_over_most_of_a_month_counts_exactly(engine):
    """30 days ending at midnight take October's bucket minus the days outside it (here
    Oct 1, and events after the window); the counts must be those of the rows."""
    start = datetime(2026, 10, 1, tzinfo=timezone.utc)
    lines, expected = [], {}
    for p in range(12):
        for day in range(31):
            for k in range((p * 7 + day * 3) % 5):
                moment = start + timedelta(days=day, hours=k + 1)
                lines.append({"profile": f"p{p}", "event": "open", "ts": ts(moment)})
                if day >= 1:
                    expected[f"p{p}"] = expected.get(f"p{p}", 0) + 1
    lines.append({"profile": "p0", "event": "open", "ts": ts(start + timedelta(days=33))})
    engine.track_events(lines)
    for n in (1, 20, 33, 40, 45, 47, 60):
        rule = {"event": "open", "window": {"last_days": 30},
                "having": {"agg": "count", "op": "gte", "value": n}}
        assert sorted(engine.members(rule, as_of="2026-11-01T00:00:00Z")) == \
            sorted(p for p, c in expected.items() if c >= n), n


def test_the_catalog_lists_what_the_keys_hold_also_for_stores_without_one(tmp_path):
    """Open reads the catalog; it must list exactly the buckets and block parts that a
    scan of the keys finds, and a store written before the catalog gets one at open."""
    from bitseg.index.event_index import load_events
    from bitseg.index.keys import CATALOG_MARK

    def listings(engine):
        store = engine.store
        with store.read() as txn:
            found = load_events(store, txn, engine.snapshot.version)
        return (found.catalogued, found.stream_days, found.stream_months, found.type_days,
                found.parts)

    def scanned(engine):  # the same store as one written before the catalog
        store = engine.store
        with store.write() as txn:
            store.delete(txn, "events", CATALOG_MARK)
            for key in list(store.keys(txn, "events", b"k")):
                store.delete(txn, "events", key)
        return listings(engine)

    lines = [{"profile": f"p{i % 7}", "event": ["open", "buy"][i % 2],
              "ts": ago(i % 70, hours=i % 24), "channel": ["web", "app"][i % 3 == 0]}
             for i in range(300)]
    path = tmp_path / "store"
    with Engine.open(path) as engine:
        engine.track_events(lines[:100])
        engine.track_events(lines[100:200])
        catalogued = listings(engine)
        assert catalogued[0]
        assert scanned(engine)[1:] == catalogued[1:]
    with Engine.open(path) as engine:  # opened without a catalog: scans, then writes it
        assert engine.snapshot.events.catalogued
        after = listings(engine)
        assert after[0] and after[1:] == catalogued[1:]
        engine.track_events(lines[200:])
        after = listings(engine)
        assert after[0] and after[1:] == scanned(engine)[1:]
    with Engine.open(path) as engine:
        rule = {"event": "*", "window": {"last_days": 60},
                "having": {"agg": "count", "op": "gte", "value": 20}}
        assert engine.members(rule, as_of=AS_OF)


def test_an_event_for_a_deleted_profile_creates_a_new_one(engine):
    rule = {"event": "open", "window": {"last_days": 30},
            "having": {"agg": "count", "op": "gte", "value": 2}}
    engine.upsert_profiles([{"id": "a"}, {"id": "b"}])
    engine.track_events([{"profile": p, "event": "open", "ts": ago(1)} for p in "aab"])
    assert engine.members(rule, as_of=AS_OF) == ["a"]
    engine.delete_profiles(["a"])
    engine.track_events([{"profile": p, "event": "open", "ts": ago(1)} for p in "ab"])
    assert engine.total() == 2  # a is back, as a new profile without its old events
    assert engine.members(rule, as_of=AS_OF) == ["b"]


def test_joined_blocks_keep_every_rows_keyword():
    from bitseg.index.event_index import Block

    def block(profiles, words, codes, points=None):
        n = len(profiles)
        props = {"page": (np.array(codes, dtype=np.int64), np.array([c >= 0 for c in codes]))}
        if points is not None:
            props["n"] = (np.array(points, dtype=np.int64), np.ones(n, dtype=bool))
        return Block(np.array(profiles, dtype=np.uint32), np.arange(n, dtype=np.int64),
                     np.ones(n, dtype=np.uint32), props, {"page": words})

    parts = [block([1, 2], ["/a", "/b"], [1, 0]), block([3], ["/c"], [0], [7]),
             block([4, 5], ["/b", "/c"], [0, -1])]
    joined = Block.join(parts)

    def rows(b):
        keys, ok = b.props["page"]
        n = b.props.get("n")
        return [(int(p), b.words["page"][k] if v else None,
                 int(n[0][i]) if n is not None and n[1][i] else None)
                for i, (p, k, v) in enumerate(zip(b.profile, keys, ok, strict=True))]

    assert rows(joined) == [r for part in parts for r in rows(part)] == [
        (1, "/b", None), (2, "/a", None), (3, "/c", 7), (4, "/b", None), (5, None, None)]


_WORDS = st.lists(st.sampled_from(["/a", "/b", "/c", "é", ""]), unique=True, max_size=4)


@st.composite
def _blocks(draw):
    """Encoded-block parts as a batch's flushes make them: each with its own rows, any
    of the properties (a keyword one with the part's own table, codes within it or
    not, rows without a value), profiles and times anywhere."""
    from bitseg.index.event_index import Block

    parts = []
    for _ in range(draw(st.integers(1, 6))):
        n = draw(st.integers(0, 5))
        ints = st.lists(st.integers(-3, 2**40), min_size=n, max_size=n)
        flags = st.lists(st.booleans(), min_size=n, max_size=n)
        props, words = {}, {}
        for name in draw(st.sets(st.sampled_from(["n", "page", "tag"]))):
            valid = np.array(draw(flags), dtype=bool)
            if name == "n":
                values = draw(ints)
            else:
                words[name] = draw(_WORDS)
                values = draw(st.lists(st.integers(-1, 4), min_size=n, max_size=n))
            props[name] = (np.array(values, dtype=np.int64), valid)
        parts.append(Block(np.array(draw(st.lists(st.integers(0, 2**32 - 1), min_size=n,
                                                  max_size=n)), dtype=np.uint32),
                           np.array(draw(ints), dtype=np.int64),
                           np.full(n, draw(st.integers(0, 9)), dtype=np.uint32), props, words))
    return parts


@settings(max_examples=300, deadline=None)
@given(_blocks())
def test_joined_encoded_parts_are_the_joined_blocks_encoded(parts):
    """join_encoded (what an events batch writes of a day's stashed parts) gives the
    bytes Block.join of the decoded parts encodes to, and reads back as the same rows."""
    from bitseg.index.event_index import Block, join_encoded

    raws = [part.encode() for part in parts]
    joined = join_encoded(raws)
    assert joined == Block.join([Block.decode(raw) for raw in raws]).encode()
    assert len(Block.decode(joined)) == sum(len(part) for part in parts)


def test_an_older_snapshot_keeps_reading_its_own_buckets(engine):
    """Buckets are read from LMDB lazily; a snapshot taken before a batch must still see
    the counts of its version after that batch rewrote the same buckets."""
    from bitseg.index.evaluate import Evaluator
    from bitseg.index.types import parse_timestamp

    rule = engine.parse({"event": "open", "window": {"last_days": 30},
                         "having": {"agg": "count", "op": "gte", "value": 2}})
    engine.track_events([{"profile": "a", "event": "open", "ts": ago(d)} for d in (10, 40)])
    before = engine.snapshot
    engine.track_events([{"profile": "a", "event": "open", "ts": ago(d)} for d in (10, 40)])
    after = engine.snapshot
    as_of = parse_timestamp(ts(AS_OF))
    assert Evaluator(after, as_of).count(rule) == 1  # two opens 10 days ago now
    assert Evaluator(before, as_of).count(rule) == 0  # still one in its own version
    before.events.cache.clear()  # nothing cached: read again through its reader
    assert Evaluator(before, as_of).count(rule) == 0


@pytest.mark.parametrize("bad, field", [
    ({"ts": "now"}, "ts"), ({"ts": "2026"}, "ts"), ({"ts": "NaT"}, "ts"), ({"ts": 5}, "ts"),
    ({"ts": "2026-13-01T00:00:00Z"}, "ts"), ({"profile": ["u1"]}, "profile"),
    ({"profile": True}, "profile"), ({"event": "*"}, "event"), ({"event": 3}, "event"),
    ({"n": "seven"}, "n"), ({"n": 2**70}, "n"), ({"n": 1.5}, "n"), ({"k": 4}, "k"),
    ({"f": float("inf")}, "f"),
])
def test_the_columnar_checks_name_the_bad_line_among_good_ones(engine, bad, field):
    engine.declare_schema({"events": {"n": "int", "k": "keyword", "f": "float"}})
    good = {"profile": "a", "event": "x", "ts": "2026-11-01T10:00:00+02:00", "n": 1, "k": "v",
            "f": 2}
    lines = [dict(good, profile=f"p{i}") for i in range(6)]
    lines[3] = {**good, **bad}
    with pytest.raises(DataError) as info:
        engine.track_events(lines, file="events.jsonl")
    assert (info.value.line, info.value.field) == (4, field), str(info.value)
    assert engine.total() == 0 and engine.snapshot.version == 0  # nothing was applied


def test_offsets_and_plain_dates_parse_like_the_contract_says(engine):
    engine.track_events([
        {"profile": "a", "event": "x", "ts": "2026-11-01T10:00:00+02:00"},   # 08:00Z
        {"profile": "b", "event": "x", "ts": "2026-11-01"},                  # midnight UTC
        {"profile": "c", "event": "x", "ts": "2026-11-01T08:00:00.000001"},  # no zone: UTC
    ])
    at = {"event": "x", "window": {"from": "2026-11-01T08:00:00Z", "to": "2026-11-01T08:00:01Z"}}
    assert sorted(engine.members(at, as_of=AS_OF)) == ["a", "c"]
    midnight = {"event": "x", "window": {"from": "2026-11-01T00:00:00Z",
                                         "to": "2026-11-01T00:00:00.000001Z"}}
    assert engine.members(midnight, as_of=AS_OF) == ["b"]
