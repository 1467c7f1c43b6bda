"""Reads over shards that are more than a sum (server/shard_reads.py): the merges alone,
then Describe, Values and size history of 3 shards against 1 on the same random data.
The property test of every rule form, top included, is in test_shards.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path

import pytest
from test_shards import AS_OF, T0, Front, build_store, make_dataset

from bitseg import ClientError
from bitseg.index.rules import parse_rule
from bitseg.index.schema import Schema
from bitseg.loaders.split import shard_folder
from bitseg.server.shard_reads import merge_field, merge_top, tops_of
from bitseg.server.shards import ShardSet

SCHEMA = Schema.from_json({"profiles": {"n": "int", "x": "float"}})


# ---------------------------------------------------------------------- top
def test_merge_top_ranks_by_value_then_id_in_utf8_order() -> None:
    found = [[(5, "u9", 3), (4, "a", 1)],  # shard 0
             [(5, "u10", 0), (Fraction(9, 2), "b", 2)],  # shard 1
             [(5, "é", 7), (5, "z", 8)]]  # shard 2
    # 5 x 4 tied: u10 < u9 < z < é (code points, as UTF-8 bytes); then 4.5
    assert merge_top(found, 3, "desc") == [[3], [0], [8]]
    assert merge_top(found, 5, "desc") == [[3], [0, 2], [7, 8]]
    assert merge_top(found, 2, "asc") == [[1], [2], []]
    assert merge_top(found, 100, "asc") == [[1, 3], [0, 2], [7, 8]]
    assert merge_top([[], []], 3, "desc") == [[], []]


def test_tops_of_lists_each_top_after_the_tops_inside_it() -> None:
    inner = {"top": {"n": 3, "by": "x"}}
    outer = {"top": {"n": 2, "by": "n", "of": {"or": [inner, {"field": "n", "op": "gt",
                                                               "value": 1}]}}}
    rule = parse_rule({"and": [outer, {"not": inner}, {"top": {"n": 2, "by": "n"}}]}, SCHEMA)
    found = tops_of(rule)
    assert [(t.n, t.by) for t in found] == [(3, "x"), (2, "n"), (2, "n")]
    assert found[1].of != found[2].of  # the same n and by, another `of`: another top
    assert tops_of(parse_rule({"field": "n", "op": "gt", "value": 1}, SCHEMA)) == []


# ---------------------------------------------------------------------- 3 shards against 1
@pytest.fixture(scope="module")
def fronts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Front, Front]]:
    """One shard and three, in process, over the same random dataset."""
    root = tmp_path_factory.mktemp("reads")
    make_dataset(root / "data", seed=21, profiles=120)
    build_store(root / "data", root / "one", 1)
    build_store(root / "data", root / "three", 3)
    one = Front(ShardSet.embedded([str(shard_folder(root / "one", 0))]))
    three = Front(ShardSet.embedded([str(shard_folder(root / "three", s)) for s in range(3)]))
    for front in (one, three):
        front.shards.unify_schema()
    yield one, three
    one.close()
    three.close()


def test_describe_of_three_shards_is_one_stores(fronts: tuple[Front, Front]) -> None:
    one, three = fronts
    for top in (1, 3, 20):
        expected = replace(one.client.describe(top), version=0, eval_micros=0)
        found = replace(three.client.describe(top), version=0, eval_micros=0)
        assert found == expected
    described = one.client.describe(2)
    numbers = {f.name: f for f in described.fields}
    assert numbers["x"].quantiles and numbers["t"].max  # the merges had work to do
    assert any(len(f.top) == 2 and f.distinct > 2 for f in described.fields)
    assert described.events and described.order_fields and described.item_fields


def test_values_of_three_shards_are_one_stores(fronts: tuple[Front, Front]) -> None:
    one, three = fronts
    for name in ("kw", "tags", "ok"):
        for limit in (1, 2, 100):
            assert three.client.values(name, limit) == one.client.values(name, limit)
    for bad in ("nope", "n"):  # unknown; a number field
        with pytest.raises(ClientError) as caught:
            one.client.values(bad)
        with pytest.raises(ClientError) as again:
            three.client.values(bad)
        assert (again.value.code, again.value.message) == \
            (caught.value.code, caught.value.message)


def test_size_history_of_three_shards_is_one_stores(fronts: tuple[Front, Front]) -> None:
    one, three = fronts
    rule = {"event": "view", "window": {"last_days": 10}}
    later = [(T0 + timedelta(days=d)).isoformat() for d in (2, 5, 9)]
    ids = [f"u{i}" for i in range(1, 60)]
    for front in (one, three):
        client = front.client
        client.create_segment("seen", "materialized", rule, as_of=AS_OF)
        client.refresh_segment("seen", as_of=later[0])
        client.refresh_segment("seen", as_of=later[1])
        client.refresh_segment("seen", as_of=later[2])
        client.refresh_segment("seen", as_of=later[2])  # the same as_of twice: two points
        client.create_segment("picked", "static", profile_ids=ids[:20], as_of=AS_OF)
        client.add_to_segment("picked", ids[10:40])
        client.remove_from_segment("picked", ids[::3])
        client.add_to_segment("picked", ids[:5])  # removed ones back, on several shards
    expected = one.client.segment_history("seen")
    assert len(expected) == 5
    assert three.client.segment_history("seen") == expected
    # an edit by id is at each store's own clock: the sizes and causes agree
    found = [(p.size, p.cause) for p in three.client.segment_history("picked")]
    assert found == [(p.size, p.cause) for p in one.client.segment_history("picked")]
    assert [c for _, c in found] == ["create", "add", "remove", "add"]
    with pytest.raises(ClientError) as caught:
        three.client.segment_history("nope")
    assert caught.value.code == "NOT_FOUND"


def test_merge_field_ranks_the_summed_counts_again() -> None:
    from bitseg.index.describe import FieldInfo

    shards = [FieldInfo("kw", "keyword", 9, 3, (("a", 5), ("b", 3), ("c", 1))),
              FieldInfo("kw", "keyword", 7, 3, (("e", 4), ("c", 2), ("a", 1))),
              FieldInfo("kw", "keyword", 6, 2, (("e", 3), ("c", 3))),
              FieldInfo("kw", "keyword", 0)]
    # c is no shard's most common, yet ties a (6 each): ties by value
    assert merge_field(shards, 3) == FieldInfo("kw", "keyword", 22, 4,
                                               (("e", 7), ("a", 6), ("c", 6)))
    assert merge_field(shards, 9).top[-1] == ("b", 3)
    assert merge_field([FieldInfo("amount", "float", 4), FieldInfo("amount", "float", 3)],
                       5) == FieldInfo("amount", "float", 7)


def test_insights_of_three_shards_are_one_stores(fronts: tuple[Front, Front]) -> None:
    one, three = fronts
    rules = [{"all": True}, {"field": "kw", "op": "in", "value": ["red", "blue"]},
             {"event": "buy", "window": {"last_days": 20}},
             {"top": {"n": 15, "by": "x", "of": {"not": {"field": "ok", "op": "eq",
                                                         "value": True}}}},
             {"field": "kw", "op": "eq", "value": "nothing like it"}]
    for rule in rules:
        for top in (1, 3):
            expected = one.client.insights(rule, fields=["tags", "kw", "ok"], as_of=AS_OF,
                                           top=top)
            found = three.client.insights(rule, fields=["tags", "kw", "ok"], as_of=AS_OF,
                                          top=top)
            expected.pop("eval_micros")
            found.pop("eval_micros")
            assert found == expected
    assert expected["events"] and expected["orders"]
    with pytest.raises(ClientError) as caught:
        three.client.insights({"all": True}, fields=["nope"], as_of=AS_OF)
    with pytest.raises(ClientError) as expected_error:
        one.client.insights({"all": True}, fields=["nope"], as_of=AS_OF)
    assert caught.value.message == expected_error.value.message


def test_insights_of_number_date_and_timestamp_fields_over_three_shards_are_one_stores(
        fronts: tuple[Front, Front]) -> None:
    one, three = fronts
    rules = [{"all": True}, {"field": "kw", "op": "in", "value": ["red", "blue"]},
             {"top": {"n": 15, "by": "x"}}, {"field": "n", "op": "gt", "value": 14},
             {"field": "kw", "op": "eq", "value": "nothing like it"}]
    for rule in rules:
        for fields, buckets in (([], 0), (["n", "x", "d", "t"], 1), (["t", "x"], 3),
                                (["n", "d"], 100)):
            expected = one.client.insights(rule, fields=fields, as_of=AS_OF,
                                           buckets=buckets)
            found = three.client.insights(rule, fields=fields, as_of=AS_OF, buckets=buckets)
            expected.pop("eval_micros")
            found.pop("eval_micros")
            assert found == expected, (rule, fields, buckets)
    shown = {f["name"]: f for f in one.client.insights({"all": True}, as_of=AS_OF)["fields"]}
    assert all(len(shown[n]["buckets"]) >= 5 and shown[n]["quantiles"] for n in "nxdt")
    with pytest.raises(ClientError) as caught:
        three.client.insights({"all": True}, fields=["n"], buckets=101, as_of=AS_OF)
    with pytest.raises(ClientError) as expected_error:
        one.client.insights({"all": True}, fields=["n"], buckets=101, as_of=AS_OF)
    assert caught.value.message == expected_error.value.message


def grid_stores(root: Path, records: list[dict], shards: int) -> ShardSet:
    """A store of `shards` shards with these profiles (each on its shard), as engines."""
    from bitseg.index.engine import Engine
    from bitseg.index.shard_key import shard_of
    from bitseg.server.shard_store import Manifest, write_manifest

    paths = [str(shard_folder(root, s)) for s in range(shards)]
    for s, path in enumerate(paths):
        with Engine.open(path) as engine:
            engine.declare_schema({"profiles": {"n": "int", "x": "float", "d": "date",
                                                "t": "timestamp"}})
            mine = [r for r in records if shard_of(r["id"], shards) == s]
            if mine:
                engine.upsert_profiles(mine)
            engine.delete_profiles([r["id"] for r in mine if r["id"] == "p0"])
    write_manifest(root, Manifest(shards))
    return ShardSet.embedded(paths)


def test_insight_buckets_over_shards_with_other_key_units_are_one_stores(
        tmp_path: Path) -> None:
    """Each shard's keys have their own gcd and base (shard s: ints 300 + 7s + 21m,
    floats s/4 + 1.5m, hours s + 3m, days s + 3m), so no shard's unit is the one store's:
    the buckets are cut on the grid of all of them, as one store holding every key cuts
    them; p0, deleted, held the smallest values (the buckets start at the live
    profiles' smallest)."""
    from bitseg.index.shard_key import shard_of

    day, hour = date(2024, 1, 1), datetime(2025, 3, 1, tzinfo=timezone.utc)
    records = []
    for k in range(40):
        pid, s = f"p{k}", shard_of(f"p{k}", 3)
        m = -10 if k == 0 else k * k % 23
        records.append({"id": pid, "n": 300 + 7 * s + 21 * m, "x": s / 4 + 1.5 * m,
                        "d": (day + timedelta(days=s + 3 * m)).isoformat(),
                        "t": (hour + timedelta(hours=s + 3 * m)).isoformat()})
    fronts = [Front(grid_stores(tmp_path / str(n), records, n)) for n in (1, 3)]
    try:
        units = {fronts[1].shards.call(s, "insights_part", {"all": True}, T0, ["n"], 1, 1,
                                       "amount")[2]["n"][2] for s in range(3)}
        assert 7 not in units  # no shard's own unit is the one store's
        for rule in ({"all": True}, {"field": "x", "op": "lt", "value": 20}):
            for buckets in (1, 4, 7, 10, 100):
                want, got = (f.client.insights(rule, as_of=AS_OF, buckets=buckets)
                             for f in fronts)
                want.pop("eval_micros")
                got.pop("eval_micros")
                assert got == want, (rule, buckets)
        assert all(len(f["buckets"]) > 20 for f in want["fields"])  # up to 100: one a key
    finally:
        for front in fronts:
            front.close()


def test_scheduled_exports_of_three_shards_write_one_stores_rows(
        fronts: tuple[Front, Front], tmp_path: Path) -> None:
    from bitseg.index.exports import ExportScheduler
    from bitseg.server.shard_reads import ShardExports

    one, three = fronts
    rule = {"or": [{"field": "kw", "op": "in", "value": ["red", "New York"]},
                   {"event": "buy"}]}
    fields = ["kw", "tags", "n", "x", "ok", "d", "t"]
    files = {}
    for name, front in (("one", one), ("three", three)):
        front.client.create_segment("export-me", "dynamic", rule)
        for fmt in ("csv", "jsonl"):
            made = front.client.create_export_schedule(
                "export-me", 3600, fields, str(tmp_path / name / fmt), require=["n"],
                format=fmt)
            assert made["segment"] == "export-me"
        ran = ExportScheduler(ShardExports(front.shards)).run_once()
        assert len(ran) == 2
        files[name] = {fmt: (tmp_path / name / fmt / f"export-me-000001.{fmt}").read_text()
                       .splitlines() for fmt in ("csv", "jsonl")}
        listed = front.client.export_schedules()
        assert [(s["runs"], s["last_error"]) for s in listed] == [("1", ""), ("1", "")]
        files[name]["rows"] = [int(s["last_rows"]) for s in listed]
    # the same rows; a sharded store writes shard 0's members first, then shard 1's, …
    assert files["three"]["csv"][0] == files["one"]["csv"][0] == "id," + ",".join(fields)
    for fmt in ("csv", "jsonl"):
        assert sorted(files["three"][fmt]) == sorted(files["one"][fmt])
    assert files["three"]["rows"] == files["one"]["rows"] == [len(files["one"]["jsonl"])] * 2
    assert len(files["one"]["jsonl"]) > 10
    for front in (one, three):
        for schedule in front.client.export_schedules():
            front.client.delete_export_schedule(int(schedule["id"]))
        assert front.client.export_schedules() == []
    with pytest.raises(ClientError) as caught:
        three.client.create_export_schedule("nope", 60, ["kw"], str(tmp_path / "x"))
    assert caught.value.code == "NOT_FOUND"


def test_the_export_scheduler_skips_a_tick_when_a_shard_does_not_answer() -> None:
    from bitseg.server.service import ShardUnavailable
    from bitseg.server.shard_reads import export_scheduler

    class Restarting:
        count = 2

        def call(self, index: int, method: str, *args: object) -> object:
            raise ShardUnavailable(f"shard {index} is unavailable")

    assert export_scheduler(Restarting()).run_once() == []  # and the thread ticks on
