"""Insights against plain Python over the stored rows: value shares and lift, histogram
buckets and quantiles, event activity per window, orders; and through server and CLI."""

from __future__ import annotations

import random
from collections import Counter
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_profiles import SCHEMA, nearest_rank, random_profiles

from bitseg.index.engine import Engine, as_of_micros
from bitseg.index.errors import BitsegError
from bitseg.index.insights import insights

AS_OF = "2025-06-01T00:00:00Z"
Q = {"p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9, "p99": 0.99}


def make_data(seed: int, n: int = 60):
    rng = random.Random(seed)
    profiles = random_profiles(rng, n, ltv_decimals=2)
    as_of = datetime(2025, 6, 1, tzinfo=timezone.utc)
    events = [{"profile": f"u{rng.randrange(n)}", "event": rng.choice(["open", "click"]),
               "ts": (as_of - timedelta(hours=rng.randint(1, 24 * 120))).isoformat()}
              for _ in range(rng.randint(0, 150))]
    orders = [{"id": f"o{i}", "profile": f"u{rng.randrange(n)}",
               "ts": (as_of - timedelta(days=rng.randint(1, 50))).isoformat(),
               "amount": rng.randint(1, 9000) / 100} for i in range(rng.randint(0, 40))]
    return profiles, events, orders


def open_engine(path: Path, profiles: list, events: list, orders: list) -> Engine:
    engine = Engine.open(path)
    engine.declare_schema(SCHEMA)
    engine.upsert_profiles(profiles)
    if events:
        engine.track_events(events)
    if orders:
        engine.add_orders(orders)
    return engine



def key(name: str, value):
    return Decimal(repr(value)) if name == "ltv" else value


RULES = [{"field": "country", "op": "in", "value": ["DE", "FR"]},
         {"field": "age", "op": "gte", "value": 30},
         {"or": [{"field": "vip", "op": "eq", "value": True},
                 {"field": "tags", "op": "in", "value": ["beta"]}]},
         {"not": {"field": "country", "op": "eq", "value": "US"}}]


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10**6), which=st.integers(0, len(RULES) - 1),
       deleted=st.integers(0, 8), buckets=st.integers(1, 12))
def test_insights_equal_a_naive_count_over_the_rows(tmp_path_factory, seed, which, deleted,
                                                    buckets):
    profiles, events, orders = make_data(seed)
    engine = open_engine(tmp_path_factory.mktemp("i"), profiles, events, orders)
    try:
        gone = {f"u{i}" for i in range(deleted)}
        if gone:
            engine.delete_profiles(sorted(gone))
        rows = {p["id"]: p for p in profiles if p["id"] not in gone}
        rule = RULES[which]
        members = set(engine.members(rule, as_of=AS_OF))
        snap = engine.snapshot
        found = insights(snap, engine.bitmap(rule, as_of=AS_OF), as_of_micros(AS_OF),
                         top=3, buckets=buckets)
        assert (found.profiles, found.total_profiles) == (len(members), len(rows))
        mine = [rows[m] for m in members]
        for info in found.fields:
            name = info.name
            base = [key(name, p[name]) for p in rows.values() if name in p]
            inside = [key(name, p[name]) for p in mine if name in p]
            assert (info.count, info.base_count) == (len(inside), len(base)), name
            if info.type in ("keyword", "keywords", "bool"):
                _check_values(info, inside, base, len(mine), len(rows))
            else:
                _check_numbers(info, inside, base, buckets)
        _check_events(found, events, members, rows)
        _check_orders(found, orders, members, rows)
    finally:
        engine.close()


def _flat(values: list) -> Counter:
    return Counter(v for x in values for v in (x if isinstance(x, list) else [x]))


def _check_values(info, inside, base, size, total):
    counted, base_counted = _flat(inside), _flat(base)
    ranked = sorted(counted.items(), key=lambda vn: (-vn[1], str(vn[0])))[:3]
    assert [(v.value, v.count) for v in info.values] == ranked, info.name
    assert info.distinct == len(counted)
    for v in info.values:
        assert v.base_count == base_counted[v.value]
        assert v.share == Fraction(v.count, size)
        assert v.base_share == Fraction(v.base_count, total)
        assert v.lift == v.share / v.base_share


def _check_numbers(info, inside, base, buckets):
    shown = Decimal if info.name == "ltv" else (lambda v: v)
    if not base:
        assert info.buckets == ()
        return
    assert 1 <= len(info.buckets) <= buckets
    assert shown(info.buckets[0].low) == min(base) and shown(info.buckets[-1].high) == max(base)
    for i, b in enumerate(info.buckets):
        last = i == len(info.buckets) - 1
        low, high = shown(b.low), shown(b.high)

        def within(x, low=low, high=high, last=last):
            return low <= x <= high if last else low <= x < high
        assert b.count == sum(1 for x in inside if within(x)), (info.name, i)
        assert b.base_count == sum(1 for x in base if within(x)), (info.name, i)
    assert sum(b.base_count for b in info.buckets) == len(base)
    if inside:
        assert shown(info.min) == min(inside) and shown(info.max) == max(inside)
        for label, value in info.quantiles:
            assert shown(value) == nearest_rank(inside, Q[label]), (info.name, label)
    else:
        assert info.min is None and info.quantiles == ()


def _check_events(found, events, members, rows):
    as_of = datetime(2025, 6, 1, tzinfo=timezone.utc)
    assert [e.event for e in found.events] == sorted({e["event"] for e in events})
    for ev in found.events:
        for w in ev.windows:
            start = as_of - timedelta(days=w.days)
            picked = [e for e in events if e["event"] == ev.event and e["profile"] in rows
                      and start < datetime.fromisoformat(e["ts"]) <= as_of]
            ours = [e for e in picked if e["profile"] in members]
            assert (w.events, w.profiles) == (len(ours), len({e["profile"] for e in ours}))
            assert (w.base_events, w.base_profiles) == (
                len(picked), len({e["profile"] for e in picked}))


def _check_orders(found, orders, members, rows):
    ours = [o for o in orders if o["profile"] in members]
    everyone = [o for o in orders if o["profile"] in rows]
    m = found.orders
    assert (m.orders, m.customers) == (len(ours), len({o["profile"] for o in ours}))
    assert m.revenue == sum((Fraction(Decimal(repr(o["amount"]))) for o in ours), Fraction(0))
    assert m.total_revenue == sum((Fraction(Decimal(repr(o["amount"]))) for o in everyone),
                                  Fraction(0))


def test_insights_of_chosen_fields_and_bad_ones(tmp_path):
    profiles, events, orders = make_data(3)
    engine = open_engine(tmp_path, profiles, events, orders)
    try:
        snap, audience = engine.snapshot, engine.bitmap(RULES[0], as_of=AS_OF)
        found = insights(snap, audience, as_of_micros(AS_OF), fields=["age", "country", "age"])
        assert [f.name for f in found.fields] == ["age", "country"]
        with pytest.raises(BitsegError, match="unknown profile field 'nope'"):
            insights(snap, audience, as_of_micros(AS_OF), fields=["nope"])
        with pytest.raises(BitsegError, match="buckets: expected 1 to 100"):
            insights(snap, audience, as_of_micros(AS_OF), buckets=0)
    finally:
        engine.close()


def _exact_total(engine: Engine, profiles, as_of=None, field: str = "cents"):
    from bitseg.index.orders import order_totals
    snap = engine.snapshot
    chosen = snap.live if profiles is None else \
        type(snap.live)(engine.dense_id(p) for p in profiles)
    as_of_us = None if as_of is None else as_of_micros(as_of)
    return order_totals(snap.orders, chosen, as_of_us, field, "int")


def test_order_totals_past_int64_fall_back_to_exact_sums(tmp_path):
    small = [{"id": f"s{i}", "profile": f"u{i % 3}", "ts": f"2025-0{1 + i % 5}-01T00:00:00Z",
              "cents": (i * 7919) % 10007 - 5000} for i in range(40)]
    huge = [{"id": f"h{i}", "profile": "u3", "ts": "2025-01-01T00:00:00Z",
             "cents": 2**62 - 1 - i} for i in range(3)]  # the largest keys; 3 pass 2**63
    with Engine.open(tmp_path / "s") as engine:
        engine.declare_schema({"orders": {"cents": "int"}})
        engine.upsert_profiles([{"id": f"u{i}"} for i in range(4)])
        engine.add_orders(small)
        fast = _exact_total(engine, None)  # small keys: summed in int64
        assert fast == (40, 3, sum(o["cents"] for o in small))
        engine.add_orders(huge)
        exact = _exact_total(engine, None)  # could pass 2**63: exact Python ints
        assert exact == (43, 4, fast[2] + sum(o["cents"] for o in huge))
        assert exact[2] >= 2**63
        assert _exact_total(engine, ["u0", "u1", "u2"]) == fast  # back on the fast path
        assert _exact_total(engine, ["u3"]) == (3, 1, sum(o["cents"] for o in huge))
        before = [o for o in small if o["ts"] <= "2025-02-01T00:00:00Z"]
        assert _exact_total(engine, None, "2025-02-01T00:00:00Z") == \
            (len(before) + 3, 4, sum(o["cents"] for o in before + huge))


def test_the_base_total_follows_each_snapshot_and_as_of(tmp_path):
    profiles, events, orders = make_data(5)
    orders = orders or [{"id": "o0", "profile": "u1", "ts": "2025-05-01T00:00:00Z",
                         "amount": 1.5}]
    engine = open_engine(tmp_path, profiles, events, orders)
    try:
        def base(as_of: str = AS_OF) -> Fraction:
            snap = engine.snapshot
            return insights(snap, engine.bitmap({"all": True}, as_of=as_of),
                            as_of_micros(as_of), fields=()).orders.total_revenue

        def naive(rows, as_of: str = AS_OF) -> Fraction:
            return sum((Fraction(Decimal(repr(o["amount"]))) for o in rows
                        if datetime.fromisoformat(o["ts"]) <= datetime.fromisoformat(as_of)),
                       Fraction(0))

        assert base() == base() == naive(orders)  # the second from the kept total
        earlier = "2025-05-01T00:00:00Z"
        assert base(earlier) == naive(orders, earlier)
        extra = {"id": "late", "profile": "u2", "ts": "2025-05-31T00:00:00Z", "amount": 12.25}
        engine.add_orders([extra])  # a new snapshot: a new base total
        assert base() == naive(orders + [extra])
        assert base(earlier) == naive(orders, earlier)
        gone = orders[0]["profile"]
        engine.delete_profiles([gone])  # the same orders, fewer live profiles
        rest = [o for o in orders + [extra] if o["profile"] != gone]
        assert base() == naive(rest)
    finally:
        engine.close()


def test_order_totals_leave_out_deleted_orders(tmp_path):
    from dataclasses import replace

    from pyroaring import BitMap

    from bitseg.index.orders import order_totals
    lines = [{"id": f"o{i}", "profile": f"u{i % 2}", "ts": "2025-01-01T00:00:00Z",
              "cents": 10 + i} for i in range(6)]
    with Engine.open(tmp_path / "s") as engine:
        engine.declare_schema({"orders": {"cents": "int"}})
        engine.upsert_profiles([{"id": "u0"}, {"id": "u1"}])
        engine.add_orders(lines)
        snap = engine.snapshot
        assert order_totals(snap.orders, snap.live, None, "cents", "int") == (6, 2, 75)
        kept = BitMap(i for i in range(6) if i not in (1, 4))  # dense ids follow the lines
        index = replace(snap.orders, live=kept)  # as if o1 and o4 were deleted
        assert order_totals(index, snap.live, None, "cents", "int") == (4, 2, 75 - 11 - 14)
        index = replace(snap.orders, live=BitMap([0, 2, 4]))  # u1 has no orders left
        assert order_totals(index, snap.live, None, "cents", "int") == (3, 1, 10 + 12 + 14)


def test_segment_metrics_keep_the_base_total_per_snapshot(tmp_path, monkeypatch):
    """segments.metrics sums the base's orders once per snapshot (insights.base_total),
    not on every call; the audience's own total is still summed each time."""
    from bitseg.index import insights as insights_module
    from bitseg.index import orders as orders_module
    from bitseg.index.segments import open_segments

    profiles, events, orders = make_data(7)
    orders = orders or [{"id": "o0", "profile": "u1", "ts": "2025-05-01T00:00:00Z",
                         "amount": 1.5}]
    engine = open_engine(tmp_path, profiles, events, orders)
    try:
        segs = open_segments(engine)
        summed: list = []
        real = orders_module.order_totals

        def counting(index, profiles, *rest):
            summed.append(len(profiles))
            return real(index, profiles, *rest)

        monkeypatch.setattr(orders_module, "order_totals", counting)
        monkeypatch.setattr(insights_module, "order_totals", counting)
        rule = {"field": "country", "op": "eq", "value": "DE"}
        first = segs.metrics(rule, as_of=AS_OF)
        summed.clear()
        again = segs.metrics(rule, as_of=AS_OF)
        assert again == first
        assert summed == [first.profiles]  # the audience only: the base total was kept
    finally:
        engine.close()


def test_the_base_buckets_follow_each_snapshot(tmp_path, monkeypatch):
    """A range field's base buckets are worked out once per field index and live base,
    and again after a change to either (same live profiles, new values; a deletion)."""
    from bitseg.index import insights as insights_module

    walks: list = []  # the sizes of the id sets walked
    real = insights_module._Descent

    def counting(index, within):
        walks.append(len(within))
        return real(index, within)

    monkeypatch.setattr(insights_module, "_Descent", counting)
    with Engine.open(tmp_path / "s") as engine:
        engine.declare_schema({"profiles": {"age": "int"}})
        engine.upsert_profiles([{"id": f"u{i}", "age": i} for i in range(40)])

        def age_buckets() -> tuple[list, list]:
            snap = engine.snapshot
            audience = engine.bitmap({"field": "age", "op": "lt", "value": 20})
            info = insights(snap, audience, as_of_micros(AS_OF), ["age"], buckets=4).fields[0]
            return ([(b.low, b.high) for b in info.buckets],
                    [(b.count, b.base_count) for b in info.buckets])

        assert age_buckets() == ([(0, 10), (10, 20), (20, 30), (30, 39)],
                                 [(10, 10), (10, 10), (0, 10), (0, 10)])
        walks.clear()
        age_buckets()
        assert walks == [20]  # the audience's; the base's buckets were kept
        engine.upsert_profiles([{"id": f"u{i}", "age": 100 + i} for i in range(30, 40)])
        assert age_buckets() == ([(0, 35), (35, 70), (70, 105), (105, 139)],
                                 [(20, 30), (0, 0), (0, 0), (0, 10)])
        engine.delete_profiles([f"u{i}" for i in range(30, 40)])
        assert age_buckets() == ([(0, 8), (8, 16), (16, 24), (24, 29)],
                                 [(8, 8), (8, 8), (4, 8), (0, 6)])


@settings(max_examples=60, deadline=None)
@given(values=st.dictionaries(st.integers(0, 300), st.integers(-50, 5000), max_size=80),
       keep=st.sets(st.integers(0, 300)), asks=st.lists(st.integers(-3, 5100), max_size=30))
def test_one_descent_answers_many_questions_as_a_naive_count(values, keep, asks):
    """below(k) and kth(k) asked in any order of one shared walk equal a sort of the
    stored keys of the ids kept (the nodes made by earlier questions are reused)."""
    from pyroaring import BitMap

    from bitseg.index.fields import RangeIndex
    from bitseg.index.insights import _Descent

    base = min(values.values(), default=0)
    depth = max((v - base for v in values.values()), default=0).bit_length()
    slices = tuple(BitMap(i for i, v in values.items() if (v - base) >> bit & 1)
                   for bit in range(depth))
    index = RangeIndex(base, 1, slices, BitMap(values))
    within = index.exists & BitMap(keep)
    stored = sorted(v - base for i, v in values.items() if i in keep)
    walk = _Descent(index, within)
    for a in asks:
        k = (a - index.base) // index.unit
        assert walk.below(k) == sum(1 for s in stored if s < k)
        if stored:
            rank = a % len(stored) + 1
            assert walk.kth(rank) == stored[rank - 1]


def test_the_kept_base_activity_follows_each_snapshot(tmp_path):
    """The base's events and members per window are kept per snapshot and as_of: new
    events, a deleted profile and a new one each give counts equal to the rows again."""
    profiles, events, orders = make_data(5)
    engine = open_engine(tmp_path, profiles, events, orders)
    rows = {p["id"]: p for p in profiles}
    rule = RULES[1]
    as_of = datetime(2025, 6, 1, tzinfo=timezone.utc)

    def check() -> None:
        members = set(engine.members(rule, as_of=AS_OF))
        found = insights(engine.snapshot, engine.bitmap(rule, as_of=AS_OF),
                         as_of_micros(AS_OF), ["age"])
        _check_events(found, events, members, rows)

    try:
        check()
        check()  # from the kept base
        more = [{"profile": f"u{i % 7}", "event": "open",
                 "ts": (as_of - timedelta(hours=3 * i + 1)).isoformat()} for i in range(30)]
        engine.track_events(more)
        events = events + more
        check()
        engine.delete_profiles(["u1", "u2"])
        del rows["u1"], rows["u2"]
        check()
        engine.upsert_profiles([{"id": "new", "age": 50}])
        rows["new"] = {"id": "new", "age": 50}
        engine.track_events([{"profile": "new", "event": "click",
                              "ts": (as_of - timedelta(days=2)).isoformat()}])
        events = events + [{"profile": "new", "event": "click",
                            "ts": (as_of - timedelta(days=2)).isoformat()}]
        check()
    finally:
        engine.close()


def test_the_kept_per_profile_orders_follow_each_snapshot(tmp_path):
    """The audience's orders come from per-profile totals kept per orders index: new
    orders, a deleted profile, and an as_of before the latest order (summed from the
    orders instead) each give what the rows give."""
    profiles, events, orders = make_data(7)
    engine = open_engine(tmp_path, profiles, events, orders)
    rows = {p["id"]: p for p in profiles}
    rule = RULES[3]

    def check(as_of: str = AS_OF) -> None:
        members = set(engine.members(rule, as_of=as_of))
        found = insights(engine.snapshot, engine.bitmap(rule, as_of=as_of),
                         as_of_micros(as_of), ["age"])
        cut = datetime.fromisoformat(as_of.replace("Z", "+00:00"))
        _check_orders(found, [o for o in orders
                              if datetime.fromisoformat(o["ts"]) <= cut], members, rows)

    try:
        check()
        check()  # from the kept totals
        more = [{"id": f"n{i}", "profile": f"u{i % 5}", "ts": "2025-05-30T00:00:00+00:00",
                 "amount": 10 * i + 0.25} for i in range(12)]
        engine.add_orders(more)
        orders = orders + more
        check()
        engine.delete_profiles(["u0", "u3"])
        del rows["u0"], rows["u3"]
        check()
        check("2025-05-29T12:00:00Z")  # before the new orders
    finally:
        engine.close()


@pytest.mark.parametrize("rule", [RULES[3], {"field": "age", "op": "eq", "value": 33}])
def test_the_kept_base_value_counts_follow_each_snapshot(tmp_path, rule):
    """The base's count per keyword value is kept per snapshot (a large audience is
    counted from the complement, a small one directly): a changed value, a deleted
    profile and a new one each give counts equal to the rows again."""
    profiles, events, orders = make_data(11)
    engine = open_engine(tmp_path, profiles, events, orders)
    rows = {p["id"]: p for p in profiles}

    def check() -> None:
        members = set(engine.members(rule, as_of=AS_OF))
        found = insights(engine.snapshot, engine.bitmap(rule, as_of=AS_OF),
                         as_of_micros(AS_OF), ["country", "tags"], top=50)
        mine = [rows[m] for m in members]
        for info in found.fields:
            inside = [p[info.name] for p in mine if info.name in p]
            base = [p[info.name] for p in rows.values() if info.name in p]
            counted, base_counted = _flat(inside), _flat(base)
            assert {v.value: (v.count, v.base_count) for v in info.values} == \
                {v: (n, base_counted[v]) for v, n in counted.items()}, info.name

    try:
        check()
        check()  # from the kept counts
        changed = [{**rows[f"u{i}"], "country": "ZZ", "tags": ["new"]} for i in range(5)]
        engine.upsert_profiles(changed)
        rows.update({p["id"]: p for p in changed})
        check()
        engine.delete_profiles(["u7", "u8"])
        del rows["u7"], rows["u8"]
        check()
        engine.upsert_profiles([{"id": "extra", "country": "DE", "age": 33}])
        rows["extra"] = {"id": "extra", "country": "DE", "age": 33}
        check()
    finally:
        engine.close()
