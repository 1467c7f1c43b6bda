"""Sequences (CONTRACT §2.4c): the engine against a brute force over every row tuple,
the contract's examples, equal instants, then_not near as_of, and invalid forms."""

from __future__ import annotations

import itertools
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitseg.index import sequence
from bitseg.index.engine import Engine, as_of_micros
from bitseg.index.errors import RuleError
from bitseg.index.explain import explain
from bitseg.index.segments import open_segments
from bitseg.server.convert import rule_from_json, rule_to_json

sys.path.insert(0, str(Path(__file__).parent))
from conftest_grpc import ServerProcess, run_cli  # noqa: E402

UTC = timezone.utc
AS_OF = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
DAY, US = timedelta(days=1), timedelta(microseconds=1)
PROFILES = ["p0", "p1", "p2", "p3", "p4"]
# instants around the edges that matter: as_of, one and two days before it, a microsecond
# either side, and some after as_of (outside every window but next_days)
OFFSETS = [-3 * DAY, -2 * DAY - US, -2 * DAY, -DAY - US, -DAY, -DAY + US, -DAY / 2, -US,
           timedelta(0), US, DAY / 2]
WINDOW_START = AS_OF - 2 * DAY  # the edge of the range windows below


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# ------------------------------------------------------------------ the reference
def in_window(ts: datetime, window: dict | None) -> bool:
    if window is None:
        return ts <= AS_OF
    if "last_days" in window:
        return AS_OF - window["last_days"] * DAY < ts <= AS_OF
    if "next_days" in window:
        return AS_OF < ts <= AS_OF + window["next_days"] * DAY
    start = datetime.fromisoformat(window["from"].replace("Z", "+00:00"))
    end = datetime.fromisoformat(window["to"].replace("Z", "+00:00"))
    return start <= ts < end


def matches(step: dict, row: dict) -> bool:
    """Whether one row (an event or an order, as loaded) matches one step."""
    if "event" in step:
        if row["kind"] != "event" or step["event"] not in ("*", row["event"]):
            return False
        where = step.get("where")
        return where is None or row.get(where["field"]) == where["value"]
    if row["kind"] != "order":
        return False
    cond = step["orders"]
    return "all" in cond or row.get(cond["field"]) == cond["value"]


def naive_sequence(rule: dict, rows: list[dict]) -> bool:
    """The contract's words, over every tuple of one profile's rows."""
    window, days = rule.get("window"), rule.get("within_days")
    steps = rule["sequence"]
    if "then_not" in rule:
        span = days * DAY
        return any(matches(steps[0], r1) and in_window(r1["ts"], window)
                   and r1["ts"] + span <= AS_OF
                   and not any(matches(rule["then_not"], r)
                               and r1["ts"] < r["ts"] <= r1["ts"] + span for r in rows)
                   for r1 in rows)
    for chain in itertools.product(rows, repeat=len(steps)):
        if (all(matches(s, r) and in_window(r["ts"], window)
                for s, r in zip(steps, chain, strict=True))
                and all(a["ts"] < b["ts"] for a, b in zip(chain, chain[1:], strict=False))
                and (days is None or chain[-1]["ts"] - chain[0]["ts"] <= days * DAY)):
            return True
    return False


def naive(rule: dict, profile: dict, rows: list[dict]) -> bool:
    if "and" in rule:
        return all(naive(c, profile, rows) for c in rule["and"])
    if "or" in rule:
        return any(naive(c, profile, rows) for c in rule["or"])
    if "not" in rule:
        return not naive(rule["not"], profile, rows)
    if "field" in rule:
        return profile.get(rule["field"]) == rule["value"]
    return naive_sequence(rule, rows)


# ------------------------------------------------------------------ random data and rules
instants = st.sampled_from(OFFSETS).map(lambda d: AS_OF + d)
events = st.lists(st.fixed_dictionaries({
    "profile": st.sampled_from(PROFILES), "event": st.sampled_from(["cart", "view"]),
    "ts": instants, "c": st.sampled_from(["x", "y"])}), max_size=14)
orders = st.lists(st.fixed_dictionaries({
    "profile": st.sampled_from(PROFILES), "ts": instants,
    "status": st.sampled_from(["paid", "new"])}), max_size=8)
steps = st.one_of(
    st.builds(lambda e: {"event": e}, st.sampled_from(["cart", "view", "*", "never"])),
    st.builds(lambda e, v: {"event": e, "where": {"field": "c", "op": "eq", "value": v}},
              st.sampled_from(["cart", "*"]), st.sampled_from(["x", "y"])),
    st.just({"orders": {"all": True}}),
    st.builds(lambda v: {"orders": {"field": "status", "op": "eq", "value": v}},
              st.sampled_from(["paid", "new"])))
windows = st.one_of(st.none(), st.builds(lambda n: {"last_days": n}, st.integers(1, 3)),
                    st.just({"from": iso(WINDOW_START), "to": iso(AS_OF)}),
                    st.just({"next_days": 1}))


@st.composite
def sequences(draw: Any) -> dict:
    rule: dict[str, Any] = {}
    if draw(st.booleans()):
        rule["sequence"] = [draw(steps)]
        rule["then_not"] = draw(steps)
        rule["within_days"] = draw(st.integers(0, 2))
    else:
        rule["sequence"] = draw(st.lists(steps, min_size=1, max_size=3))
        days = draw(st.one_of(st.none(), st.integers(0, 2)))
        if days is not None:
            rule["within_days"] = days
    window = draw(windows)
    if window is not None:
        rule["window"] = window
    return rule


@st.composite
def rules(draw: Any) -> dict:
    seq = draw(sequences())
    shape = draw(st.sampled_from(["alone", "and", "or", "not"]))
    gold = {"field": "tier", "op": "eq", "value": "gold"}
    if shape == "and":
        return {"and": [seq, gold]}
    if shape == "or":
        return {"or": [gold, seq]}
    return {"not": seq} if shape == "not" else seq


def load(engine: Engine, tiers: dict, evs: list[dict], ords: list[dict]) -> None:
    engine.declare_schema({"profiles": {"tier": "keyword"}, "events": {"c": "keyword"},
                           "orders": {"status": "keyword"}})
    engine.upsert_profiles([{"id": p, "tier": tiers.get(p, "basic")} for p in PROFILES])
    if evs:
        engine.track_events([{**e, "ts": iso(e["ts"])} for e in evs])
    if ords:
        engine.add_orders([{"id": f"o{i}", **o, "ts": iso(o["ts"])}
                           for i, o in enumerate(ords)])


def rows_of(evs: list[dict], ords: list[dict]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {p: [] for p in PROFILES}
    for e in evs:
        found[e["profile"]].append({"kind": "event", **e})
    for o in ords:
        found[o["profile"]].append({"kind": "order", **o})
    return found


@settings(max_examples=70, deadline=None, suppress_health_check=list(HealthCheck))
@given(tiers=st.dictionaries(st.sampled_from(PROFILES), st.just("gold")), evs=events,
       ords=orders, drawn=st.lists(rules(), min_size=1, max_size=5), packed=st.booleans(),
       by_last=st.booleans())
def test_sequences_match_the_brute_force(tmp_path_factory, tiers, evs, ords, drawn, packed,
                                         by_last):
    """`packed`: then_not keys pack the ts offset under the profile; else (as when that
    would not fit in 63 bits) they pack the rank of ts among the rows.  `by_last`: then_not
    any order settles rows by each profile's last order first; else every row is searched."""
    rows = rows_of(evs, ords)
    every_order = sequence._every_order if by_last else (lambda step: False)
    with Engine.open(tmp_path_factory.mktemp("seq") / "store") as engine, \
            mock.patch.object(sequence, "PACKED_LIMIT", sequence.PACKED_LIMIT if packed else 0), \
            mock.patch.object(sequence, "_every_order", every_order):
        load(engine, tiers, evs, ords)
        for rule in drawn:
            expected = {p for p in PROFILES
                        if naive(rule, {"tier": tiers.get(p, "basic")}, rows[p])}
            assert set(engine.members(rule, as_of=AS_OF)) == expected, rule
            assert engine.count(rule, as_of=AS_OF) == len(expected), rule
            for p in PROFILES:
                assert engine.is_member(p, rule, as_of=AS_OF) == (p in expected), (rule, p)
            assert rule_to_json(rule_from_json(rule)) == rule  # the protobuf form holds it


# ------------------------------------------------------------------ the contract's examples
@pytest.fixture
def engine(tmp_path):
    with Engine.open(tmp_path / "store") as engine:
        yield engine


def ago(delta: timedelta) -> str:
    return iso(AS_OF - delta)


CART_THEN_ORDER = {"sequence": [{"event": "add_to_cart"}, {"orders": {"all": True}}],
                   "within_days": 1, "window": {"last_days": 30}}
CART_ABANDONERS = {"sequence": [{"event": "add_to_cart"}], "then_not": {"orders": {"all": True}},
                   "within_days": 1, "window": {"last_days": 7}}


def test_added_to_cart_then_ordered_within_a_day(engine):
    engine.track_events([{"profile": p, "event": "add_to_cart", "ts": ago(d)} for p, d in [
        ("quick", 3 * DAY), ("slow", 3 * DAY), ("same_instant", 2 * DAY), ("edge", 5 * DAY),
        ("order_first", 4 * DAY), ("old", 40 * DAY)]])
    engine.add_orders([{"id": f"o{i}", "profile": p, "ts": ago(d)} for i, (p, d) in enumerate([
        ("quick", 2.5 * DAY), ("slow", 1.5 * DAY), ("same_instant", 2 * DAY),
        ("edge", 4 * DAY), ("order_first", 4 * DAY + US), ("old", 39.5 * DAY)])])
    # edge: the order exactly one day later still chains; same_instant never chains;
    # old: the cart lies outside the window
    assert sorted(engine.members(CART_THEN_ORDER, as_of=AS_OF)) == ["edge", "quick"]


@pytest.fixture(params=["packed", "ranked"])
def keys(request):
    """Both layouts of then_not's (profile, ts) keys (see the brute-force test)."""
    limit = sequence.PACKED_LIMIT if request.param == "packed" else 0
    with mock.patch.object(sequence, "PACKED_LIMIT", limit):
        yield request.param


def test_cart_abandoners(engine, keys):
    """"Added to cart, no order within a day", the contract's then_not example."""
    engine.track_events([{"profile": p, "event": "add_to_cart", "ts": ago(d)} for p, d in [
        ("abandoned", 3 * DAY), ("bought", 3 * DAY), ("bought_at_once", 2 * DAY),
        ("day_ends_at_as_of", DAY), ("day_not_over", DAY - US), ("bought_later", 5 * DAY),
        ("twice", 6 * DAY), ("twice", 2 * DAY), ("too_old", 8 * DAY)]])
    engine.add_orders([{"id": f"o{i}", "profile": p, "ts": ago(d)} for i, (p, d) in enumerate([
        ("bought", 2.5 * DAY), ("bought_at_once", 2 * DAY), ("bought_later", 4 * DAY - US),
        ("twice", 5.5 * DAY), ("day_ends_at_as_of", DAY / 2)])])
    # bought_at_once: an order at the very instant is not "after" the cart;
    # day_ends_at_as_of: ts + 1 day == as_of is allowed, but the order falls in that day;
    # twice: the first cart was followed by an order, the second was not
    assert sorted(engine.members(CART_ABANDONERS, as_of=AS_OF)) == [
        "abandoned", "bought_at_once", "bought_later", "twice"]
    assert engine.is_member("twice", CART_ABANDONERS, as_of=AS_OF)
    assert not engine.is_member("day_not_over", CART_ABANDONERS, as_of=AS_OF)


@pytest.mark.parametrize("by_last", [True, False], ids=["by_last", "searched"])
def test_cart_abandoners_at_the_edges_of_the_last_order(engine, by_last):
    """then_not any order settles most rows by the profile's last order; these sit on its
    edges: the last order 1 µs after the cart or exactly a day after it (not abandoned),
    1 µs past the day (abandoned), at the cart's instant (abandoned); the last past the
    day and the one before it inside (not abandoned) or before the cart (abandoned); the
    last two past the day, so searched, with a third inside (not) or none (abandoned)."""
    carts = [(p, 3 * DAY) for p in ("micro", "day", "past", "same", "two", "before", "late",
                                    "late_idle")]
    engine.track_events([{"profile": p, "event": "add_to_cart", "ts": ago(d)} for p, d in carts])
    engine.add_orders([{"id": f"o{i}", "profile": p, "ts": ago(d)} for i, (p, d) in enumerate([
        ("micro", 3 * DAY - US), ("day", 2 * DAY), ("past", 2 * DAY - US), ("same", 3 * DAY),
        ("two", 2.5 * DAY), ("two", DAY), ("before", 10 * DAY), ("before", DAY),
        ("late", 2.5 * DAY), ("late", 1.5 * DAY), ("late", DAY), ("late_idle", 1.5 * DAY),
        ("late_idle", DAY)])])
    every_order = sequence._every_order if by_last else (lambda step: False)
    with mock.patch.object(sequence, "_every_order", every_order):
        assert sorted(engine.members(CART_ABANDONERS, as_of=AS_OF)) == [
            "before", "late_idle", "past", "same"]


def test_then_not_at_as_of_exactly_and_just_after(engine):
    engine.track_events([{"profile": "a", "event": "cart", "ts": ago(DAY)}])
    rule = {"sequence": [{"event": "cart"}], "then_not": {"event": "buy"}, "within_days": 1}
    assert engine.members(rule, as_of=AS_OF) == ["a"]  # ts + 1 day == as_of
    assert engine.members(rule, as_of=AS_OF - US) == []  # the day is not over yet
    engine.track_events([{"profile": "a", "event": "buy", "ts": ago(timedelta(0))}])
    assert engine.members(rule, as_of=AS_OF) == []  # bought at the day's last instant
    assert engine.members(rule, as_of=AS_OF + DAY) == []


def test_then_not_counts_live_profiles_only(engine, keys):
    """then_not reads the rows of every profile: a deleted profile's rows stay behind
    under its dense id, and a profile created again with the same id is a new one."""
    engine.track_events([{"profile": p, "event": "add_to_cart", "ts": ago(3 * DAY)}
                         for p in ["kept", "gone", "again", "bought"]])
    engine.add_orders([{"id": "o", "profile": "bought", "ts": ago(2.5 * DAY)}])
    assert engine.delete_profiles(["gone", "again"]) == 2
    engine.upsert_profiles([{"id": "again"}])
    assert engine.members(CART_ABANDONERS, as_of=AS_OF) == ["kept"]
    assert engine.count(CART_ABANDONERS, as_of=AS_OF) == 1
    assert [engine.is_member(p, CART_ABANDONERS, as_of=AS_OF)
            for p in ["kept", "again", "bought"]] == [True, False, False]
    engine.track_events([{"profile": "again", "event": "add_to_cart", "ts": ago(2 * DAY)}])
    assert sorted(engine.members(CART_ABANDONERS, as_of=AS_OF)) == ["again", "kept"]


def test_then_not_rows_may_lie_outside_the_window(engine):
    engine.track_events([{"profile": "a", "event": "cart", "ts": iso(WINDOW_START - DAY / 2)},
                         {"profile": "a", "event": "buy", "ts": iso(WINDOW_START)}])
    rule = {"sequence": [{"event": "cart"}], "then_not": {"event": "buy"}, "within_days": 1,
            "window": {"from": iso(WINDOW_START - DAY), "to": iso(WINDOW_START)}}
    assert engine.members(rule, as_of=AS_OF) == []


def test_within_days_zero_and_equal_instants(engine):
    at = ago(DAY)
    engine.track_events([{"profile": "a", "event": "view", "ts": at},
                         {"profile": "a", "event": "cart", "ts": at}])
    engine.add_orders([{"id": "o", "profile": "a", "ts": at}])
    two = {"sequence": [{"event": "view"}, {"event": "cart"}]}
    assert engine.members(two, as_of=AS_OF) == []  # the same instant never chains
    assert engine.members({"sequence": [{"event": "*"}, {"orders": {"all": True}}]},
                          as_of=AS_OF) == []
    one = {"sequence": [{"event": "view"}], "within_days": 0}
    assert engine.members(one, as_of=AS_OF) == ["a"]  # one step: has such a row
    engine.track_events([{"profile": "a", "event": "cart", "ts": ago(DAY - US)}])
    assert engine.members(two, as_of=AS_OF) == ["a"]
    assert engine.members({**two, "within_days": 0}, as_of=AS_OF) == []


def test_sequences_in_segments_and_explain(engine):
    engine.track_events([{"profile": "a", "event": "add_to_cart", "ts": ago(3 * DAY)}])
    engine.add_orders([{"id": "o", "profile": "a", "ts": ago(2.5 * DAY)}])
    engine.track_events([{"profile": "b", "event": "add_to_cart", "ts": ago(3 * DAY)}])
    segments = open_segments(engine)
    segments.create("buyers", "dynamic", rule=CART_THEN_ORDER)
    segments.create("abandoners", "materialized", rule=CART_ABANDONERS, as_of=AS_OF)
    assert engine.members({"segment": "buyers"}, as_of=AS_OF) == ["a"]
    assert engine.members({"segment": "abandoners"}, as_of=AS_OF) == ["b"]
    found = explained(engine, CART_THEN_ORDER)
    assert found.sentence == ("Profiles who had an 'add_to_cart' event, then placed an order "
                              "within 1 day, in the last 30 days")
    assert found.root.count == 1
    found = explained(engine, {"not": CART_ABANDONERS})
    assert found.root.children[0].text == ("had an 'add_to_cart' event in the last 7 days not "
                                           "followed by an order within 1 day")
    assert [found.root.count, found.root.children[0].count] == [1, 1]


def explained(engine: Engine, rule: dict) -> Any:
    snap = engine.snapshot
    return explain(snap, rule, engine.parse(rule, snap), as_of_micros(AS_OF))


def test_a_later_as_of_is_another_cache_entry(engine):
    engine.track_events([{"profile": "a", "event": "cart", "ts": ago(DAY / 2)}])
    rule = {"sequence": [{"event": "cart"}], "then_not": {"event": "buy"}, "within_days": 1}
    assert engine.count(rule, as_of=AS_OF) == 0
    assert engine.count(rule, as_of=AS_OF + DAY) == 1


# ------------------------------------------------------------------ invalid forms
STEP = {"event": "cart"}


@pytest.mark.parametrize("rule, path", [
    ({"sequence": []}, "$.sequence"),
    ({"sequence": STEP}, "$.sequence"),
    ({"sequence": [5]}, "$.sequence[0]"),
    ({"sequence": [{}]}, "$.sequence[0]"),
    ({"sequence": [STEP, {"field": "tier", "op": "exists"}]}, "$.sequence[1]"),
    ({"sequence": [{"event": "cart", "window": {"last_days": 1}}]}, "$.sequence[0].window"),
    ({"sequence": [{"orders": {"all": True}, "having": {}}]}, "$.sequence[0].having"),
    ({"sequence": [{"event": ""}]}, "$.sequence[0].event"),
    ({"sequence": [{"event": "cart", "where": {"field": "nope", "op": "exists"}}]},
     "$.sequence[0].where.field"),
    ({"sequence": [{"orders": {"field": "nope", "op": "exists"}}]}, "$.sequence[0].orders.field"),
    ({"sequence": [STEP], "within_days": -1}, "$.within_days"),
    ({"sequence": [STEP], "within_days": 1.5}, "$.within_days"),
    ({"sequence": [STEP], "within_days": True}, "$.within_days"),
    ({"sequence": [STEP], "window": {"last_days": 0}}, "$.window.last_days"),
    ({"sequence": [STEP], "having": {"agg": "count"}}, "$.having"),
    ({"sequence": [STEP], "then_not": STEP}, "$.within_days"),
    ({"sequence": [STEP, STEP], "then_not": STEP, "within_days": 1}, "$.then_not"),
    ({"sequence": [STEP], "then_not": [STEP], "within_days": 1}, "$.then_not"),
    ({"sequence": [STEP], "then_not": {"event": "x", "window": {}}, "within_days": 1},
     "$.then_not.window"),
    ({"and": [{"all": True}, {"sequence": [{"event": 3}]}]}, "$.and[1].sequence[0].event"),
])
def test_invalid_sequences_name_their_path(engine, rule, path):
    engine.track_events([{"profile": "a", "event": "cart", "ts": ago(DAY), "c": "x"}])
    with pytest.raises(RuleError) as caught:
        engine.count(rule, as_of=AS_OF)
    assert caught.value.path == path, caught.value


def test_steps_count_towards_the_rule_depth(engine):
    deep: dict = {"field": "c", "op": "exists"}
    for _ in range(30):
        deep = {"not": deep}
    rule = {"sequence": [{"event": "cart", "where": deep}]}  # 1 + 1 + 31 levels
    with pytest.raises(RuleError) as caught:
        engine.count(rule, as_of=AS_OF)
    assert "nested too deep" in str(caught.value)
    assert caught.value.path == "$.sequence[0].where" + ".not" * 30
    from bitseg.server.convert import check_depth
    with pytest.raises(RuleError) as by_proto:
        check_depth(rule_from_json(rule))
    assert by_proto.value.path == caught.value.path


# ------------------------------------------------------------------ end to end
def test_sequences_through_grpc_and_the_cli(tmp_path):
    from bitseg import Client

    server = ServerProcess(tmp_path / "db")
    try:
        with Client(server.addr, timeout=20) as client:
            client.track_events([
                {"profile": "a", "event": "add_to_cart", "ts": ago(3 * DAY)},
                {"profile": "b", "event": "add_to_cart", "ts": ago(3 * DAY)}])
            client.add_orders([{"id": "o", "profile": "a", "ts": ago(2.5 * DAY)}])
            assert client.count(CART_THEN_ORDER, as_of=AS_OF) == 1
            assert client.count(rule_from_json(CART_ABANDONERS), as_of=AS_OF) == 1
            assert client.is_member("b", rule_from_json(CART_ABANDONERS), as_of=AS_OF)
            assert not client.is_member("a", CART_ABANDONERS, as_of=AS_OF)
            found = client.explain(rule_from_json(CART_ABANDONERS), as_of=AS_OF)
            assert "not followed by an order within 1 day" in found.sentence
        import orjson
        cli = run_cli("count", "--rule", orjson.dumps(CART_ABANDONERS).decode(),
                      "--as-of", iso(AS_OF), "--addr", server.addr, "--json")
        assert cli.returncode == 0, cli.stderr
        assert orjson.loads(cli.stdout)["count"] == 1
        bad = run_cli("count", "--rule", '{"sequence": [{"event": "x"}], "then_not": '
                      '{"event": "y"}}', "--addr", server.addr)
        assert bad.returncode != 0 and "$.within_days" in bad.stderr
    finally:
        assert server.stop() == 0, server.stderr()
