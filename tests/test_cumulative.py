"""Range leaves over the range-encoded layouts (index/cumulative.py) agree with the naive
reference, in each layout a field can have: a bin per distinct key ("exact"), a few bins
with edge bins answered by the slices ("few"), and no layout at all ("slices").

The layouts are built on first use and carried batch to batch, so these tests count
after every batch, and check that an older snapshot keeps its answers.
"""

from __future__ import annotations

import copy
import gc
import json
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import strategies as S
import test_properties as P
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroaring import BitMap
from reference import Reference

from bitseg.index import cumulative
from bitseg.index.cumulative import SLICES, Layout
from bitseg.index.engine import Engine, as_of_micros
from bitseg.index.evaluate import Evaluator

MODES = ("exact", "few", "few-parts", "few-slices", "slices")
SCHEMA = {"n0": "int", "x0": "float", "d0": "date", "ts0": "timestamp", "kw0": "keyword",
          "flag0": "bool"}
RANGED = [name for name, type_ in SCHEMA.items() if type_ in ("int", "float", "date",
                                                              "timestamp")]


def force(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Make every range field take one layout, however small the data."""
    if mode == "exact":
        monkeypatch.setattr(cumulative, "MAX_BINS", 10**6)
        monkeypatch.setattr(cumulative, "MIN_BINS", 1)
    elif mode.startswith("few"):  # 3 bins: most ranges cut one, and new keys widen a bin
        monkeypatch.setattr(cumulative, "MAX_BINS", 3)
        monkeypatch.setattr(cumulative, "MIN_BINS", 1)
        if mode.startswith("few-p"):  # a cut bin's kept parts span many keys: cut ones too
            monkeypatch.setattr(cumulative, "PARTS", 3)  # (and a running head of each)
            monkeypatch.setattr(cumulative, "HEADS", 3)
        if mode in ("few", "few-parts"):  # a cut bin from its kept keys and parts, however
            monkeypatch.setattr(cumulative, "FEW_IDS", 0)  # few ids it runs within
        else:  # a cut bin from the slices: no bin's keys are kept
            monkeypatch.setattr(cumulative, "MIN_SHARE", 0)
            monkeypatch.setattr(cumulative, "EDGE_SHARE", 10**9)
    else:
        monkeypatch.setattr(cumulative, "BUDGET_BYTES", 0)


@pytest.fixture(params=MODES)
def mode(request, monkeypatch) -> str:
    force(monkeypatch, request.param)
    return request.param


def range_rules(seen: dict) -> st.SearchStrategy[dict]:
    """A range condition alone, negated, or in an AND / OR with other leaves; or an AND of
    negations only (a Count's own path: live less a union, a range leaf in it counted)."""
    ranged = {name: SCHEMA[name] for name in RANGED}
    leaf = S.conditions(ranged, seen)
    other = S.conditions(SCHEMA, seen)
    negated = st.one_of(leaf, other, st.lists(st.one_of(leaf, other), min_size=2, max_size=3)
                        .map(lambda c: {"or": c})).map(lambda r: {"not": r})
    return st.one_of(
        leaf,
        leaf.map(lambda r: {"not": r}),
        st.lists(st.one_of(leaf, other, leaf.map(lambda r: {"not": r})),
                 min_size=2, max_size=4).map(lambda c: {"and": c}),
        st.lists(st.one_of(leaf, other), min_size=2, max_size=3).map(lambda c: {"or": c}),
        st.lists(negated, min_size=1, max_size=4).map(lambda c: {"and": c}),
    )


def check(engine: Engine, ref: Reference, rule: dict, as_of: datetime) -> None:
    expected = ref.members(rule, as_of)
    got = set(engine.members(rule, as_of=as_of))
    assert got == expected, P.explain(ref, rule, as_of, expected, got)
    assert engine.count(rule, as_of=as_of) == len(expected), json.dumps(rule)
    for pid in sorted(ref.live())[:3]:
        assert engine.is_member(pid, rule, as_of=as_of) == (pid in expected), json.dumps(rule)


@settings(P.PROPERTY, max_examples=15)
@given(data=st.data())
def test_counts_between_batches_match_reference(tmp_path_factory, mode, data):
    """Layouts built after one batch are updated by the next (changed and removed values,
    deletions); every rule agrees with the reference after each step, and a snapshot
    taken before a batch answers as it did."""
    scenario = data.draw(S.scenarios(SCHEMA, max_batches=5, max_batch=10, pool_size=20),
                         label="scenario")
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.mktemp("c")) as tmp:
        engine = Engine.open(Path(tmp) / "x")
        try:
            engine.declare_schema({"profiles": SCHEMA})
            ref = Reference(SCHEMA)
            seen: dict = {}
            old = None
            for kind, payload in scenario.steps:
                if old is not None:
                    snap, typed, at, before = old
                if kind == "upsert":
                    engine.upsert_profiles(copy.deepcopy(payload))
                    ref.upsert(copy.deepcopy(payload))
                    for name, values in S.Scenario(SCHEMA, [(kind, payload)]).values_seen(
                            ).items():
                        seen.setdefault(name, []).extend(values)
                else:
                    engine.delete_profiles(list(payload))
                    ref.delete(payload)
                if old is not None:  # the older snapshot is untouched by the batch
                    assert Evaluator(snap, at).bitmap(typed) == before
                for _ in range(3):
                    rule = data.draw(range_rules(seen), label="rule")
                    as_of = data.draw(S.as_ofs(seen, SCHEMA), label="as_of")
                    check(engine, ref, rule, as_of)
                snap = engine.snapshot
                typed, at = engine.parse(rule, snap), as_of_micros(as_of)
                old = (snap, typed, at, BitMap(Evaluator(snap, at).bitmap(typed)))
        finally:
            engine.close()


# ---------------------------------------------------------------- the existing properties
# The engine-wide property tests, re-run with each field forced into each layout.
@pytest.mark.parametrize(("test", "examples"), [
    (P.test_engine_matches_reference, 15), (P.test_bigger_stores_match_reference, 2),
    (P.test_wide_numbers_and_instants_match_reference, 10),
    (P.test_not_partitions_the_live_profiles, 10)], ids=lambda v: getattr(v, "__name__", v))
def test_properties_in_each_layout(tmp_path, mode, test, examples):
    inner = test.hypothesis.inner_test

    def again(tmp_path, data):  # a fresh function: hypothesis settings mark what they wrap
        inner(tmp_path, data)

    given(data=st.data())(settings(P.PROPERTY, max_examples=examples)(again))(
        tmp_path=tmp_path)


# ---------------------------------------------------------------- layouts and counts
def _engine(path: Path, records: list[dict]) -> Engine:
    engine = Engine.open(path)
    engine.declare_schema({"profiles": SCHEMA})
    engine.upsert_profiles(records)
    return engine


AS_OF = "2025-01-01T00:00:00Z"


def test_a_layout_is_built_on_first_use_and_carried_to_the_next_batch(tmp_path):
    records = [{"id": f"p{i}", "n0": i % 7, "ts0": f"2024-01-{1 + i % 20:02d}T10:00:00Z"}
               for i in range(200)]
    with _engine(tmp_path / "x", records) as engine:
        index = engine.snapshot.fields["n0"]
        assert index.cell.state is None  # nothing built at open or at load
        assert engine.count({"field": "n0", "op": "between", "value": [2, 4]},
                            as_of=AS_OF) == sum(2 <= i % 7 <= 4 for i in range(200))
        built = index.cell.state
        assert isinstance(built, Layout) and len(built) == 7  # a bin per distinct key
        engine.upsert_profiles([{"id": "p0", "n0": 9}, {"id": "p1", "n0": None},
                                {"id": "new", "n0": 3}])
        carried = engine.snapshot.fields["n0"].cell.state
        assert isinstance(carried, Layout) and carried is not built
        assert len(carried) == 8  # the new key 9 got its own bin
        assert list(built.sizes) == [29, 58, 87, 116, 144, 172, 200]  # the old one unchanged
        assert engine.count({"field": "n0", "op": "gte", "value": 6}, as_of=AS_OF) == 29
        engine.delete_profiles(["p7"])  # had 0
        assert engine.count({"field": "n0", "op": "lte", "value": 0}, as_of=AS_OF) == 27


def test_a_large_field_builds_its_layout_on_a_thread(tmp_path, monkeypatch):
    """From BACKGROUND_IDS profiles the first Count answers from the slices while a thread
    builds the layout (seconds at 10M); the answers are the same before and after."""
    monkeypatch.setattr(cumulative, "BACKGROUND_IDS", 0)
    records = [{"id": f"p{i}", "n0": i % 7} for i in range(200)]
    rule = {"field": "n0", "op": "between", "value": [2, 4]}
    expected = sum(2 <= i % 7 <= 4 for i in range(200))
    gate = threading.Event()
    real = cumulative.build

    def held(index, type_):  # the build waits until the first answer is in
        assert gate.wait(10)
        return real(index, type_)

    monkeypatch.setattr(cumulative, "build", held)
    with _engine(tmp_path / "x", records) as engine:
        index = engine.snapshot.fields["n0"]
        assert engine.count(rule, as_of=AS_OF) == expected
        assert index.cell.state == cumulative.BUILDING  # answered from the slices
        gate.set()
        for _ in range(1000):
            if isinstance(index.cell.state, Layout):
                break
            time.sleep(0.01)
        assert isinstance(index.cell.state, Layout) and len(index.cell.state) == 7
        assert engine.count(rule, as_of=AS_OF) == expected


def test_timestamps_get_day_bins_and_a_mid_day_constant_cuts_one(tmp_path, monkeypatch):
    monkeypatch.setattr(cumulative, "MAX_BINS", 30)
    records = [{"id": f"p{i}", "ts0": f"2024-01-{1 + i % 20:02d}T{i % 24:02d}:00:00Z"}
               for i in range(200)]
    with _engine(tmp_path / "x", records) as engine:
        rule = {"field": "ts0", "op": "gte", "value": "2024-01-05T12:00:00Z"}
        expected = sum(i % 20 + 1 > 5 or (i % 20 + 1 == 5 and i % 24 >= 12)
                       for i in range(200))
        assert engine.count(rule, as_of=AS_OF) == expected
        layout = engine.snapshot.fields["ts0"].cell.state
        assert isinstance(layout, Layout) and len(layout) == 20  # 24 hours × 20 days: days
        assert layout.grain == 86_400 * 10**6
        assert len(engine.members(rule, as_of=AS_OF)) == expected


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.integers(-50, 50), min_size=1, max_size=120),
       grain=st.sampled_from([1, 7]), parts=st.integers(1, 12), heads=st.integers(1, 4),
       a=st.none() | st.integers(-60, 60), b=st.none() | st.integers(-60, 60))
def test_a_kept_bin_selects_the_ids_within_bounds(keys, grain, parts, heads, a, b):
    """_Kept.select, outside and span against a filter of every key, for any parts,
    running heads and grain."""
    import numpy as np

    ids = np.arange(3, 3 + 2 * len(keys), 2, dtype=np.uint32)
    old = cumulative.PARTS, cumulative.HEADS
    cumulative.PARTS, cumulative.HEADS = parts, heads
    try:
        kept = cumulative._Kept(ids, np.array(keys, dtype=np.int64), BitMap(ids.tolist()), grain)
    finally:
        cumulative.PARTS, cumulative.HEADS = old
    assert len(kept.parts) <= max(parts, 1)
    expected = {int(i) for i, k in zip(ids, keys, strict=True)
                if (a is None or k >= a) and (b is None or k <= b)}
    assert set(kept.select(a, b)) == expected
    assert set(kept.outside(a, b)) == set(ids.tolist()) - expected
    n = len(keys)
    for lo, hi in ((0, n * 3 // 4), (n // 5, n), (n // 4, n * 3 // 4), (0, n)):
        assert set(BitMap.union(BitMap(), *kept._pieces(lo, hi))) == \
            set(kept.ids[lo:hi].tolist())
    lo, hi = kept.span(a, b)
    assert hi - lo == len(expected)


def test_a_field_over_the_budget_keeps_its_slices(tmp_path, monkeypatch):
    monkeypatch.setattr(cumulative, "BUDGET_BYTES", cumulative.LEDGER.used + 10)
    with _engine(tmp_path / "x", [{"id": f"p{i}", "n0": i} for i in range(100)]) as engine:
        assert engine.count({"field": "n0", "op": "lt", "value": 10}, as_of=AS_OF) == 10
        assert engine.snapshot.fields["n0"].cell.state is SLICES
        engine.upsert_profiles([{"id": "p1", "n0": 50}])  # decided once, not per batch
        assert engine.snapshot.fields["n0"].cell.state is SLICES
        assert engine.count({"field": "n0", "op": "lt", "value": 10}, as_of=AS_OF) == 9


def test_a_released_layout_gives_its_budget_back(tmp_path):
    gc.collect()  # layouts of earlier tests' engines
    before = cumulative.LEDGER.used
    with _engine(tmp_path / "x", [{"id": f"p{i}", "n0": i % 5} for i in range(1000)]) as e:
        e.count({"field": "n0", "op": "gt", "value": 2}, as_of=AS_OF)
        assert cumulative.LEDGER.used > before
        e.upsert_profiles([{"id": "p3", "n0": 4}])  # carried: one charge, not two
        e.count({"field": "n0", "op": "gt", "value": 2}, as_of=AS_OF)
        held = cumulative.LEDGER.used - before
        assert held == e.snapshot.fields["n0"].cell.state.nbytes
    del e  # its last snapshot holds the layout
    gc.collect()
    assert cumulative.LEDGER.used == before


def test_counts_do_not_build_the_range_they_count(tmp_path, monkeypatch):
    """A range leaf, and an AND ending in one, are counted with *_cardinality."""
    records = [{"id": f"p{i}", "n0": i % 50, "kw0": "red" if i % 3 else "blue"}
               for i in range(3000)]
    with _engine(tmp_path / "x", records) as engine:
        alone = {"field": "n0", "op": "between", "value": [10, 19]}
        inside = {"and": [{"field": "kw0", "op": "eq", "value": "blue"},
                          {"field": "n0", "op": "gte", "value": 40}]}
        expected = [600, sum(i % 3 == 0 and i % 50 >= 40 for i in range(3000))]
        assert [engine.count(r, as_of=AS_OF) for r in (alone, inside)] == expected

        def built(*args, **kwargs):
            raise AssertionError("a Count built the range bitmap")

        monkeypatch.setattr(Layout, "select", built)
        assert [engine.count(r, as_of=AS_OF) for r in (alone, inside)] == expected


def _spy_bitmaps(monkeypatch) -> list:
    """The rule nodes the evaluator makes into bitmaps from now on, in order."""
    built: list = []
    original = Evaluator._bitmap

    def spy(self, r):
        built.append(r)
        return original(self, r)

    monkeypatch.setattr(Evaluator, "_bitmap", spy)
    return built


def _count_and_members(tmp_path, monkeypatch, records, rule, expected) -> list:
    """Count and members of `rule` over `records` checked against `expected`; the rule
    nodes the evaluator made into bitmaps on the way."""
    built = _spy_bitmaps(monkeypatch)
    with _engine(tmp_path / "x", records) as engine:
        engine.cache_results = False
        assert engine.count(rule, as_of=AS_OF) == len(expected)
        assert set(engine.members(rule, as_of=AS_OF)) == expected
    return built


def test_a_negated_or_inside_an_and_subtracts_each_child(tmp_path, mode, monkeypatch):
    """AND(x, NOT(a OR b)) is evaluated as x - a - b, each within what is left (De Morgan);
    the OR's union is never built, and members and counts match a plain reading."""
    records = [{"id": f"p{i}", "n0": i % 11, "x0": (i % 13) / 4, "kw0": f"k{i % 3}",
                "flag0": i % 2 == 0} for i in range(300)]
    rule = {"and": [{"field": "flag0", "op": "eq", "value": True},
                    {"not": {"or": [{"field": "n0", "op": "between", "value": [2, 5]},
                                    {"field": "kw0", "op": "eq", "value": "k1"},
                                    {"field": "x0", "op": "gt", "value": 2.5}]}}]}
    expected = {f"p{i}" for i in range(300) if i % 2 == 0
                and not (2 <= i % 11 <= 5 or i % 3 == 1 or (i % 13) / 4 > 2.5)}
    built = _count_and_members(tmp_path, monkeypatch, records, rule, expected)
    assert "Or" not in [type(r).__name__ for r in built]


@pytest.mark.parametrize("negated", [4, 0])
def test_a_negated_in_list_subtracts_each_value(tmp_path, monkeypatch, negated):
    """AND(x, NOT(kw in [a, b]), NOT(kw eq c)): each value's bitmap taken out of what is
    left, the in-list never made into a bitmap (NEGATED 0: one union of them instead);
    members and counts match a plain reading, and a missing value takes nothing out."""
    from bitseg.index import evaluate

    monkeypatch.setattr(evaluate, "NEGATED", negated)
    records = [{"id": f"p{i}", "n0": i % 11, **({"kw0": f"k{i % 5}"} if i % 7 else {}),
                "flag0": i % 2 == 0} for i in range(300)]
    rule = {"and": [{"field": "flag0", "op": "eq", "value": True},
                    {"not": {"field": "kw0", "op": "in", "value": ["k1", "k2", "zz"]}},
                    {"not": {"field": "kw0", "op": "eq", "value": "k4"}},
                    {"field": "n0", "op": "gte", "value": 3}]}
    expected = {f"p{i}" for i in range(300) if i % 2 == 0 and i % 11 >= 3
                and not (i % 7 and i % 5 in (1, 2, 4))}
    built = _count_and_members(tmp_path, monkeypatch, records, rule, expected)
    assert not [r for r in built if getattr(r, "field", None) == "kw0"]


def test_an_and_of_negations_only_is_live_less_their_union(tmp_path, mode):
    """AND(NOT kw in [..], NOT (n0 between OR flag0), NOT missing value): live less one
    union (the range leaf built over its bins), in every layout mode, against a plain
    reading; profiles without the fields are in."""
    records = [{"id": f"p{i}", **({"n0": i % 11} if i % 4 else {}),
                **({"kw0": f"k{i % 5}"} if i % 7 else {}), "flag0": i % 3 == 0}
               for i in range(300)]
    rule = {"and": [{"not": {"field": "kw0", "op": "in", "value": ["k1", "zz"]}},
                    {"not": {"or": [{"field": "n0", "op": "between", "value": [2, 5]},
                                    {"field": "flag0", "op": "eq", "value": True}]}},
                    {"not": {"field": "kw0", "op": "eq", "value": "nothing"}}]}
    expected = {f"p{i}" for i in range(300) if not (i % 7 and i % 5 == 1)
                and not (i % 4 and 2 <= i % 11 <= 5) and i % 3 != 0}
    with _engine(tmp_path / "x", records) as engine:
        engine.cache_results = False
        assert engine.count(rule, as_of=AS_OF) == len(expected)
        assert set(engine.members(rule, as_of=AS_OF)) == expected


@pytest.mark.parametrize("others", [0, 1, 3])
def test_a_count_of_negations_only_builds_no_whole_bin_range(tmp_path, monkeypatch, others):
    """An AND of negations only counts a range leaf that is whole bins (a bin per key) as
    |live - (A | C[q])| + |C[p-1] - A|, never building it: from the first bin, to the
    last, in between; with 0, 1 or 3 other negated values (A); with profiles that have
    no key, after updates and deletes.  Counts and members match a plain reading."""
    force(monkeypatch, "exact")
    built = _spy_bitmaps(monkeypatch)
    state = {f"p{i}": {**({"n0": i % 11} if i % 5 else {}), "kw0": f"k{i % 4}",
                       "flag0": i % 3 == 0} for i in range(300)}
    values = [("kw0", "k1"), ("flag0", True), ("kw0", "k3")][:others]
    ranges = {"first bins": ("lte", 3, lambda n: n <= 3),
              "last bins": ("gte", 7, lambda n: n >= 7),
              "middle": ("between", [2, 5], lambda n: 2 <= n <= 5),
              "one key": ("eq", 4, lambda n: n == 4),
              "every key": ("gte", 0, lambda n: True)}

    def agree(engine: Engine) -> None:
        for name, (op, value, test) in ranges.items():
            leaf = {"field": "n0", "op": op, "value": value}
            negated = [{"field": f, "op": "eq", "value": v} for f, v in values]
            rule = {"and": [{"not": {"or": [leaf, *negated]}} if negated else {"not": leaf}]}
            expected = {pid for pid, v in state.items()
                        if not (v.get("n0") is not None and test(v["n0"]))
                        and not any(v.get(f) == x for f, x in values)}
            built.clear()
            assert engine.count(rule, as_of=AS_OF) == len(expected), name
            assert not [r for r in built if getattr(r, "field", None) == "n0"], name
            assert set(engine.members(rule, as_of=AS_OF)) == expected, name

    with _engine(tmp_path / "x", [{"id": pid, **v} for pid, v in state.items()]) as engine:
        engine.cache_results = False
        agree(engine)
        changes = [{"id": "p1", "n0": 10}, {"id": "p2", "n0": None}, {"id": "new", "n0": 3},
                   {"id": "p3", "kw0": "k1"}, {"id": "bare"}]
        engine.upsert_profiles(changes)
        for change in changes:
            state.setdefault(change["id"], {}).update(change)
            state[change["id"]].pop("id")
            if state[change["id"]].get("n0", 0) is None:
                del state[change["id"]]["n0"]
        agree(engine)
        engine.delete_profiles(["p4", "p6", "new"])
        for pid in ("p4", "p6", "new"):
            del state[pid]
        agree(engine)


def test_a_count_never_waits_for_another_fields_build(tmp_path, monkeypatch):
    """While a thread builds one field's layout, a first range leaf on another field is
    answered from its slices at once (and built on a later use), not queued behind it."""
    records = [{"id": f"p{i}", "n0": i % 7, "x0": i / 4} for i in range(200)]
    held, release = threading.Event(), threading.Event()

    def other_build() -> None:  # holds the build lock, as a long build of another field
        with cumulative._BUILD:
            held.set()
            release.wait(2)

    holder = threading.Thread(target=other_build)
    with _engine(tmp_path / "x", records) as engine:
        holder.start()
        assert held.wait(10)
        assert engine.count({"field": "n0", "op": "gte", "value": 3},
                            as_of=AS_OF) == sum(i % 7 >= 3 for i in range(200))
        assert engine.snapshot.fields["n0"].cell.state is None  # not built: not waited for
        release.set()
        holder.join()
        engine.cache_results = False
        assert engine.count({"field": "n0", "op": "gte", "value": 3},
                            as_of=AS_OF) == sum(i % 7 >= 3 for i in range(200))
        assert isinstance(engine.snapshot.fields["n0"].cell.state, Layout)


@pytest.mark.parametrize("layout_mode", ["exact", "few", "few-parts", "few-slices"])
def test_a_range_open_above_skips_the_and_only_while_every_live_profile_has_a_key(
        tmp_path, monkeypatch, layout_mode):
    """A range open above within an AND's result is that result less what is below, with no
    `& C[last]`, only while every live profile has a key (Layout.covers, asked per live
    bitmap): a new profile without the field, or a value removed with null, turns it off
    (those profiles must stay out), a delete of that profile turns it back on.  Members,
    counts and the negated and `ne` forms match a plain reading after every step."""
    force(monkeypatch, layout_mode)
    state = {f"p{i}": {"n0": i % 9, "ts0": f"2024-01-{1 + i % 9:02d}T{i % 24:02d}:00:00Z",
                       "flag0": i % 3 != 0} for i in range(240)}
    rules = {  # rule -> whether a profile's values satisfy it (a missing key never does)
        "n0 gte 3": ({"field": "n0", "op": "gte", "value": 3},
                     lambda v: v.get("n0") is not None and v["n0"] >= 3),
        "n0 gt 0": ({"field": "n0", "op": "gt", "value": 0},
                    lambda v: v.get("n0") is not None and v["n0"] > 0),
        "ts0 gte mid-day": ({"field": "ts0", "op": "gte", "value": "2024-01-05T12:00:00Z"},
                            lambda v: v.get("ts0") is not None
                            and v["ts0"] >= "2024-01-05T12:00:00Z"),
        "n0 ne 4": ({"field": "n0", "op": "ne", "value": 4},
                    lambda v: v.get("n0") is not None and v["n0"] != 4),
    }

    def agree(engine: Engine, covered: bool) -> None:
        snap = engine.snapshot
        for name, (leaf, test) in rules.items():
            for negated in (False, True):
                rule = {"and": [{"field": "flag0", "op": "eq", "value": True},
                                {"not": leaf} if negated else leaf]}
                expected = {pid for pid, v in state.items()
                            if v.get("flag0") and test(v) != negated}
                assert set(engine.members(rule, as_of=AS_OF)) == expected, (name, negated)
                assert engine.count(rule, as_of=AS_OF) == len(expected), (name, negated)
        for field in ("n0", "ts0"):
            layout = snap.fields[field].cell.state
            assert isinstance(layout, Layout), field
            missing = any(v.get(field) is None for v in state.values())
            assert layout.covers(snap.live) == (covered or not missing), field
            within = snap.fields["flag0"].eq(True)  # every key: within itself, no AND
            found = layout.select(None, None, snap.fields[field], within, snap.live)
            assert (found is within) == covered
            assert found == within & snap.fields[field].exists

    with _engine(tmp_path / "x", [{"id": pid, **v} for pid, v in state.items()]) as engine:
        engine.cache_results = False
        agree(engine, covered=True)
        # a new profile in the AND's first bitmap (flag0) without n0 or ts0
        state["new"] = {"flag0": True}
        engine.upsert_profiles([{"id": "new", "flag0": True}])
        agree(engine, covered=False)
        engine.delete_profiles(["new"])
        del state["new"]
        agree(engine, covered=True)
        engine.delete_profiles(["p4", "p7"])  # profiles with keys: still every live one
        del state["p4"], state["p7"]
        agree(engine, covered=True)
        # a value removed with null: the profile stays live, without the key
        engine.upsert_profiles([{"id": "p5", "n0": None, "ts0": None}])
        state["p5"] = {k: v for k, v in state["p5"].items() if k == "flag0"}
        agree(engine, covered=False)
        engine.upsert_profiles([{"id": "p5", "n0": 8, "ts0": "2024-01-09T01:00:00Z"}])
        state["p5"].update(n0=8, ts0="2024-01-09T01:00:00Z")
        agree(engine, covered=True)


@pytest.mark.parametrize("layout_mode", ["exact", "few", "few-parts", "few-slices", "slices"])
def test_an_and_changes_in_place_only_the_bitmaps_it_made(tmp_path, monkeypatch, layout_mode):
    """An AND's steps work in place on the bitmaps its earlier steps made (as the floor
    does), never on the index's: after counts and members of ANDs whose first bitmap is a
    field value, live, a memoized child or a range leaf, every bitmap of the snapshot
    (values, exists, live, the layouts' C[j]) is as before, and the answers match a plain
    reading, repeated within one Evaluator (its memo) and across calls."""
    force(monkeypatch, layout_mode)
    records = [{"id": f"p{i}", **({"n0": i % 13} if i % 5 else {}),
                "ts0": f"2024-02-{1 + i % 20:02d}T{i % 24:02d}:30:00Z",
                "kw0": f"k{i % 4}", "flag0": i % 3 != 0} for i in range(400)]
    values = {r["id"]: r for r in records}
    n_ge_4 = {"field": "n0", "op": "gte", "value": 4}
    ts_ge = {"field": "ts0", "op": "gte", "value": "2024-02-06T07:00:00Z"}
    flag = {"field": "flag0", "op": "eq", "value": True}
    kw1 = {"field": "kw0", "op": "eq", "value": "k1"}
    inner = {"and": [flag, n_ge_4]}
    rules = {
        "flag, n, ts, not kw1": ({"and": [flag, n_ge_4, ts_ge, {"not": kw1}]},
                                 lambda v: v["flag0"] and v.get("n0", -1) >= 4
                                 and v["ts0"] >= ts_ge["value"] and v["kw0"] != "k1"),
        "kw1, not n, not ts": ({"and": [kw1, {"not": n_ge_4}, {"not": ts_ge}]},
                               lambda v: v["kw0"] == "k1" and not v.get("n0", -1) >= 4
                               and v["ts0"] < ts_ge["value"]),
        "or of an and and its child": ({"or": [{"and": [inner, ts_ge, {"not": kw1}]},
                                               {"and": [inner, kw1]}]},
                                       lambda v: v["flag0"] and v.get("n0", -1) >= 4
                                       and (v["ts0"] >= ts_ge["value"] or v["kw0"] == "k1")),
    }

    def bitmaps(snap) -> list[BitMap]:
        found = [BitMap(snap.live)]
        for index in snap.fields.values():
            found.append(BitMap(index.exists))
            found += [BitMap(b) for b in getattr(index, "values", {}).values()]
            state = index.cell.state if hasattr(index, "cell") else None
            if isinstance(state, Layout):
                found += [BitMap(c) for c in state.cum]
        return found

    with _engine(tmp_path / "x", records) as engine:
        engine.cache_results = False
        for rule, _ in rules.values():  # layouts built on first use, before the copies
            engine.count(rule, as_of=AS_OF)
        snap = engine.snapshot
        before = bitmaps(snap)
        for _ in range(2):
            for name, (rule, test) in rules.items():
                expected = {pid for pid, v in values.items() if test(v)}
                assert set(engine.members(rule, as_of=AS_OF)) == expected, name
                assert engine.count(rule, as_of=AS_OF) == len(expected), name
                evaluator = Evaluator(snap, as_of_micros(AS_OF))
                typed = engine.parse(rule, snap)
                assert [len(evaluator.bitmap(typed)), evaluator.count(typed),
                        len(evaluator.bitmap(typed))] == [len(expected)] * 3, name
        assert bitmaps(snap) == before
        if layout_mode != "slices":
            assert isinstance(snap.fields["n0"].cell.state, Layout)


@pytest.mark.parametrize("always", [True, False], ids=["in place", "new bitmaps"])
def test_an_and_never_changes_the_bitmaps_it_starts_from(tmp_path, monkeypatch, mode, always):
    """An AND narrows its first bitmap, which may be the index's or a layout's, by
    differences taken in place only on bitmaps of its own: every leaf reads the same
    after it, in each layout, whichever way fields.in_place picks (the small stores of
    tests never pick in place by themselves)."""
    from bitseg.index import fields

    monkeypatch.setattr(fields, "in_place", lambda bitmap: always)
    records = [{"id": f"p{i}", "kw0": "x" if i % 2 else "z", "n0": i % 23,
                "flag0": i % 3 == 0} for i in range(60)]
    with _engine(tmp_path / "s", records) as engine:
        engine.cache_results = False
        leaves = [{"field": "kw0", "op": "eq", "value": "x"},
                  {"field": "n0", "op": "between", "value": [5, 17]},
                  {"field": "n0", "op": "gte", "value": 9}]
        negated = [{"field": "flag0", "op": "eq", "value": True},
                   {"field": "n0", "op": "lt", "value": 12},
                   {"field": "n0", "op": "between", "value": [3, 6]}]
        before = [set(engine.members(leaf, as_of=AS_OF)) for leaf in leaves + negated]
        for leaf in leaves:
            for other in negated:
                rule = {"and": [leaf, {"not": other}]}
                assert set(engine.members(rule, as_of=AS_OF)) == \
                    set(engine.members(leaf, as_of=AS_OF)) - set(engine.members(other,
                                                                                as_of=AS_OF))
        assert [set(engine.members(leaf, as_of=AS_OF)) for leaf in leaves + negated] == before
