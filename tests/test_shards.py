"""Shards (issue 16): the shard key, the split and sharded load, and the front.

The front's answers over 3 shards (in process, and as actors on one local Ray runtime
for the module) are compared with one shard's on the same random data, for random
rules; one end-to-end test drives `bitseg serve --shards 2` with the CLI; one kills a
shard actor's process in the middle of a call.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest
from conftest_grpc import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import FLOATS, INT_MAX, INT_MIN, KEYWORDS, conditions

from bitseg import Client, ClientError
from bitseg.index.engine import Engine
from bitseg.index.errors import DataError, StoreError
from bitseg.index.shard_key import shard_of
from bitseg.loaders.dataset import load_dataset
from bitseg.loaders.split import original_line, shard_folder, split_dataset
from bitseg.server.shard_graph import FastReads
from bitseg.server.shard_service import create_sharded_server
from bitseg.server.shard_store import (
    MANIFEST,
    Manifest,
    load_part,
    load_sharded,
    read_manifest,
    write_manifest,
)
from bitseg.server.shards import RAY_STARTS, ShardSet, start_ray

UTC = timezone.utc
AS_OF = "2026-11-01T00:00:00Z"
T0 = datetime(2026, 11, 1, tzinfo=UTC)
FIELDS = {"kw": "keyword", "tags": "keywords", "n": "int", "x": "float", "ok": "bool",
          "d": "date", "t": "timestamp"}
SCHEMA = {"profiles": FIELDS, "events": {"p": "keyword"},
          "orders": {"status": "keyword", "amount": "float"}}
SEGMENTS = ("dyn", "mat", "stat", "dyntop")


# ---------------------------------------------------------------------- random data
def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def make_dataset(folder: Path, seed: int, profiles: int = 60) -> dict[str, list[dict]]:
    """A random dataset folder (profile ids both strings and integers); its records."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    people, events, orders = [], [], []
    for i in range(profiles):
        pid: Any = i if i % 5 == 0 else f"u{i}"  # an integer id is its decimal string
        person: dict[str, Any] = {"id": pid}
        for name, type_ in FIELDS.items():
            if rng.random() < 0.2:
                continue
            person[name] = _value(rng, type_)
        people.append(person)
        for _ in range(rng.randint(0, 5)):
            events.append({"profile": pid, "event": rng.choice(["view", "buy"]),
                           "ts": iso(T0 - timedelta(hours=rng.randint(1, 24 * 40))),
                           "p": rng.choice(KEYWORDS)})
        for k in range(rng.randint(0, 2)):
            orders.append({"id": f"o{i}-{k}", "profile": pid,
                           "ts": iso(T0 - timedelta(days=rng.randint(1, 60))),
                           "status": rng.choice(["paid", "returned"]),
                           "amount": rng.choice(FLOATS[1:]),
                           "items": [{"sku": "s1", "brand": rng.choice(["acme", "zeta"]),
                                      "qty": rng.randint(1, 3), "price": 2.5}]})
    if rng.random() < 0.5:  # an event of a profile with no profile line
        events.append({"profile": "ghost", "event": "view", "ts": iso(T0 - timedelta(1))})
    (folder / "schema.json").write_bytes(orjson.dumps(SCHEMA))
    for name, rows in (("profiles", people), ("events", events), ("orders", orders)):
        (folder / f"{name}.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return {"profiles": people, "events": events, "orders": orders}


def _value(rng: random.Random, type_: str) -> Any:
    if type_ == "keyword":
        return rng.choice(KEYWORDS)
    if type_ == "keywords":
        return rng.sample(KEYWORDS, rng.randint(1, 2))
    if type_ == "int":
        return rng.randint(INT_MIN, INT_MAX)
    if type_ == "float":
        return rng.choice(FLOATS)
    if type_ == "bool":
        return rng.random() < 0.5
    if type_ == "date":
        return (date(2023, 1, 1) + timedelta(days=rng.randint(0, 730))).isoformat()
    return iso(datetime(2023, 1, 1, tzinfo=UTC) + timedelta(hours=rng.randint(0, 17000)))


def build_store(dataset: Path, db: Path, shards: int) -> None:
    """A sharded store as `load --shards` makes it, loaded in this process (quick)."""
    split_dataset(dataset, shards, db / "split")
    for s in range(shards):
        assert load_part(str(shard_folder(db / "split", s)), str(shard_folder(db, s)))["ok"]
    write_manifest(db, Manifest(shards))


# ---------------------------------------------------------------------- random rules
def leaf_rules() -> st.SearchStrategy[dict]:
    when = st.one_of(st.none(), st.integers(1, 40).map(lambda n: {"last_days": n}))
    having = st.builds(lambda op, v: {"agg": "count", "op": op, "value": v},
                       st.sampled_from(["gte", "lt", "eq"]), st.integers(0, 3))

    def event(kind: str, where: Any, window: Any, have: dict) -> dict:
        rule: dict[str, Any] = {"event": kind, "having": have}
        if where is not None:
            rule["where"] = {"field": "p", "op": "eq", "value": where}
        if window is not None:
            rule["window"] = window
        return rule

    events = st.builds(event, st.sampled_from(["view", "buy", "*"]),
                       st.one_of(st.none(), st.sampled_from(KEYWORDS)), when, having)
    orders = st.builds(lambda status, agg, v: {
        "orders": {"field": "status", "op": "eq", "value": status},
        "having": {"agg": agg, "of": "amount", "op": "gt", "value": v}},
        st.sampled_from(["paid", "returned"]), st.sampled_from(["sum", "avg", "min", "max"]),
        st.sampled_from([0, 1.25, 3.0, 10.01]))
    absence = st.builds(lambda days: {"sequence": [{"event": "view"}],
                                      "then_not": {"orders": {"all": True}},
                                      "within_days": days, "window": {"last_days": 30}},
                        st.integers(0, 5))
    between = st.builds(lambda start, days: {
        "event": "*", "window": {"from": iso(T0 - timedelta(days=start)),
                                 "to": iso(T0 - timedelta(days=start - days))}},
        st.integers(5, 40), st.integers(1, 5))
    items = st.builds(lambda brand, n: {
        "items": {"field": "brand", "op": "eq", "value": brand},
        "having": {"agg": "count", "op": "gte", "value": n}},
        st.sampled_from(["acme", "zeta"]), st.integers(1, 2))
    sequence = st.builds(lambda days: {"sequence": [{"event": "view"}, {"event": "buy"}],
                                       "within_days": days}, st.integers(0, 5))
    recency = st.builds(lambda days: {"event": "buy", "having": {
        "agg": "last", "op": "gt", "value": {"days_ago": days}}}, st.integers(1, 30))
    sample = st.builds(lambda salt, p: {"sample": {"salt": salt, "percent": p}},
                       st.sampled_from(["a", "spring"]), st.sampled_from([10, 50, 85.5]))
    segment = st.sampled_from(SEGMENTS).map(lambda name: {"segment": name})
    return st.one_of(conditions(FIELDS), conditions(FIELDS), events, orders, items,
                     sequence, absence, between, recency, sample, segment,
                     st.just({"all": True}), tops())


def tops(of: st.SearchStrategy[dict] | None = None) -> st.SearchStrategy[dict]:
    """Top N rules (many ties: the fields take few distinct values), of all or of `of`."""
    def top(n: int, by: str, order: str | None, rule: dict | None) -> dict:
        params: dict[str, Any] = {"n": n, "by": by}
        if order is not None:
            params["order"] = order
        if rule is not None:
            params["of"] = rule
        return {"top": params}

    return st.builds(top, st.integers(1, 40), st.sampled_from(["n", "x", "d", "t"]),
                     st.sampled_from([None, "desc", "asc"]),
                     st.none() if of is None else of)


def rules() -> st.SearchStrategy[dict]:
    def combined(inner: st.SearchStrategy[dict]) -> st.SearchStrategy[dict]:
        children = st.lists(inner, min_size=1, max_size=3)
        return st.one_of(children.map(lambda c: {"and": c}),
                         children.map(lambda c: {"or": c}),
                         inner.map(lambda c: {"not": c}), tops(inner))

    return st.recursive(leaf_rules(), combined, max_leaves=5)


# ---------------------------------------------------------------------- fronts
class Front:
    """A ShardSet served by a real gRPC server on port 0, and a client of it."""

    def __init__(self, shards: ShardSet) -> None:
        self.shards = shards
        self.server, port = create_sharded_server(shards, "127.0.0.1:0")
        self.server.start()
        self.client = Client(f"127.0.0.1:{port}", timeout=60)

    def close(self) -> None:
        self.client.close()
        self.server.stop(None)
        self.shards.close()


def make_segments(client: Client) -> None:
    client.create_segment("dyn", "dynamic", {"field": "kw", "op": "in",
                                             "value": KEYWORDS[:2]})
    client.create_segment("dyntop", "dynamic", {"top": {"n": 4, "by": "n",
                                                        "of": {"segment": "dyn"}}})
    client.create_segment("mat", "materialized", {"event": "view"}, as_of=AS_OF)
    client.create_segment("stat", "static", {"field": "n", "op": "gt", "value": 5},
                          profile_ids=["u1", "u2", "0", "nobody"], as_of=AS_OF)


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[Any]:
    ray = pytest.importorskip("ray")  # the dev extra installs it (pyproject: shards)
    start_ray(ray, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, ray_runtime: Any
         ) -> Iterator[tuple[Front, Front, dict]]:
    """One shard in process and three on Ray, over the same random dataset."""
    root = tmp_path_factory.mktemp("shards")
    records = make_dataset(root / "data", seed=7, profiles=90)
    build_store(root / "data", root / "one", 1)
    build_store(root / "data", root / "three", 3)
    one = Front(ShardSet.embedded([str(shard_folder(root / "one", 0))]))
    three = Front(ShardSet.on_ray([str(shard_folder(root / "three", s)) for s in range(3)]))
    for front in (one, three):
        front.shards.unify_schema()
        make_segments(front.client)
    yield one, three, records
    one.close()
    three.close()


def ids_of(records: dict) -> list[str]:
    return sorted({str(p["id"]) for p in records["profiles"]}
                  | {str(e["profile"]) for e in records["events"]})


# ---------------------------------------------------------------------- the shard key
def test_shard_key_is_the_documented_hash() -> None:
    for ident in ["u1", "ü-ß", "42", "a" * 300]:
        digest = hashlib.blake2b(ident.encode("utf-8"), digest_size=8).digest()
        assert shard_of(ident, 7) == int.from_bytes(digest, "big") % 7
    assert shard_of(42, 5) == shard_of("42", 5)  # integer ids hash as their decimal string
    assert shard_of("u1", 1) == 0
    counts = [0, 0, 0]
    for i in range(3000):
        counts[shard_of(f"u{i}", 3)] += 1
    assert min(counts) > 900  # spread evenly
    with pytest.raises(DataError):
        shard_of(True, 3)


# ---------------------------------------------------------------------- split and load
def test_split_puts_every_line_on_its_profiles_shard(tmp_path: Path) -> None:
    records = make_dataset(tmp_path / "data", seed=3)
    split_dataset(tmp_path / "data", 3, tmp_path / "split")
    for name, key in (("profiles", "id"), ("events", "profile"), ("orders", "profile")):
        seen = []
        for s in range(3):
            folder = shard_folder(tmp_path / "split", s)
            assert (folder / "schema.json").read_bytes() == orjson.dumps(SCHEMA)
            for line in (folder / f"{name}.jsonl").read_bytes().splitlines():
                record = orjson.loads(line)
                assert shard_of(record[key], 3) == s
                seen.append(record)
        assert sorted(map(orjson.dumps, seen)) == sorted(map(orjson.dumps, records[name]))


def test_a_bad_line_names_the_input_file_and_line(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data", seed=4, profiles=20)
    events = tmp_path / "data" / "events.jsonl"
    lines = events.read_bytes().splitlines()
    lines[5] = b'{"event": "view", "ts": "2026-10-01T00:00:00Z"}'  # no profile
    events.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as caught:
        split_dataset(tmp_path / "data", 2, tmp_path / "split")
    assert (caught.value.file, caught.value.line, caught.value.field) == \
        ("events.jsonl", 6, "profile")


@pytest.mark.parametrize("compress", [False, True])  # the split's copies gzip'd or not
def test_a_failed_new_sharded_load_leaves_nothing(tmp_path: Path, compress: bool) -> None:
    records = make_dataset(tmp_path / "data", seed=5, profiles=30)
    events = tmp_path / "data" / "events.jsonl"
    lines = events.read_bytes().splitlines()
    bad = orjson.loads(lines[7])
    bad["ts"] = "not a time"
    lines[7] = orjson.dumps(bad)
    events.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError) as caught:
        load_sharded(tmp_path / "data", tmp_path / "db", 2, compress=compress)
    assert (caught.value.file, caught.value.line, caught.value.field) == \
        ("events.jsonl", 8, "ts")
    assert f"shard {shard_of(bad['profile'], 2)}" in str(caught.value)
    assert not (tmp_path / "db").exists()
    # the line map agrees with a direct look
    shard = shard_of(records["events"][0]["profile"], 2)
    assert original_line(tmp_path / "data", shard, 2, "events.jsonl", 1) == ("events.jsonl", 1)


def test_sharded_load_then_reload_adds_to_the_shards(tmp_path: Path) -> None:
    records = make_dataset(tmp_path / "data", seed=6, profiles=40)
    report = load_sharded(tmp_path / "data", tmp_path / "db", 2)
    assert read_manifest(tmp_path / "db") == Manifest(2)
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == sorted([MANIFEST, "shard-0",
                                                                          "shard-1"])
    assert report.profiles_total == len(ids_of(records))
    assert report.events == len(records["events"])
    again = load_sharded(tmp_path / "data", tmp_path / "db", 2)
    assert again.profiles_created == 0 and again.profiles_total == report.profiles_total
    with pytest.raises(Exception, match="holds 2 shards"):
        load_sharded(tmp_path / "data", tmp_path / "db", 3)


# ---------------------------------------------------------------------- the property
def check_same(one: Front, other: Front, rule: dict, probe: list[str]) -> None:
    """Counts, member sets (paged with cursors), memberships and segments agree."""
    try:
        expected = one.client.count(rule, as_of=AS_OF)
    except ClientError as exc:  # a rule one shard refuses, all refuse the same way
        with pytest.raises(ClientError) as caught:
            other.client.count(rule, as_of=AS_OF)
        assert (caught.value.code, caught.value.message) == (exc.code, exc.message)
        return
    assert other.client.count(rule, as_of=AS_OF) == expected
    assert nodes(other.client.explain(rule, as_of=AS_OF).root) == \
        nodes(one.client.explain(rule, as_of=AS_OF).root)
    metrics = other.client.metrics(rule, as_of=AS_OF)
    assert replace(metrics, eval_micros=0) == \
        replace(one.client.metrics(rule, as_of=AS_OF), eval_micros=0)
    members = list(paged(other.client, rule))
    assert len(members) == len(set(members)) == expected
    assert set(members) == set(one.client.members(rule, as_of=AS_OF))
    rows = {p.id: p.fields for p in other.client.rows(["kw", "n"], rule, as_of=AS_OF,
                                                       page_size=5)}
    assert rows == {p.id: p.fields for p in one.client.rows(["kw", "n"], rule, as_of=AS_OF)}
    preview = other.client.preview(rule, as_of=AS_OF, limit=4)
    assert preview.total == expected and len(preview.profiles) == min(4, expected)
    assert all(rows[p.id] == {"kw": p.fields.get("kw"), "n": p.fields.get("n")}
               for p in preview.profiles)
    batch = one.client.is_member_many(probe, rule, as_of=AS_OF)
    found = other.client.is_member_many(probe, rule, as_of=AS_OF)
    assert (found.answers, found.unknown) == (batch.answers, batch.unknown)
    for profile_id in probe[:3]:
        if profile_id in batch.unknown:
            continue
        assert other.client.is_member(profile_id, rule, as_of=AS_OF) == \
            one.client.is_member(profile_id, rule, as_of=AS_OF)


def nodes(node: Any) -> list[tuple[str, str, int, bool]]:
    """An explain tree, flat: (path, words, count, whether noted) of every node (a note's
    suggestions are one shard's values)."""
    return [(node.path, node.text, node.count, bool(node.note)),
            *(n for child in node.children for n in nodes(child))]


def paged(client: Client, rule: dict, page: int = 7) -> Iterator[str]:
    """The members, a page per call, each call resuming from the last page's cursor."""
    cursor = None
    while True:
        found = next(client.pages(rule, as_of=AS_OF, page_size=page, limit=page,
                                  cursor=cursor))
        yield from found.ids
        if found.done or not found.ids:
            return
        cursor = found.cursor


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule=rules(), picks=st.lists(st.integers(0, 200), min_size=1, max_size=12))
def test_three_shards_on_ray_answer_as_one(pair: tuple[Front, Front, dict],
                                           rule: dict, picks: list[int]) -> None:
    one, three, records = pair
    known = ids_of(records)
    probe = [known[i] if i < len(known) else f"nobody{i}" for i in picks]
    check_same(one, three, rule, probe)


def test_segments_of_and_segment_sizes_agree(pair: tuple[Front, Front, dict]) -> None:
    one, three, records = pair
    for profile_id in ids_of(records):
        assert three.client.segments_of(profile_id, as_of=AS_OF) == \
            one.client.segments_of(profile_id, as_of=AS_OF)
    known = ids_of(records)[:25] + ["nobody", ""]
    assert three.client.segments_of_many(known, as_of=AS_OF) == \
        one.client.segments_of_many(known, as_of=AS_OF)
    for profile_id in known[:10]:
        assert three.client.profile(profile_id) == one.client.profile(profile_id)
    with pytest.raises(ClientError) as caught:
        three.client.profile("nobody")
    assert caught.value.code == "NOT_FOUND"
    edit = known[:12] + ["nobody"]
    for adding in (True, False, True):
        edit_one = (one.client.add_to_segment if adding else one.client.remove_from_segment)
        edit_three = (three.client.add_to_segment if adding
                      else three.client.remove_from_segment)
        assert edit_three("stat", edit[::2 if adding else 3]) == \
            edit_one("stat", edit[::2 if adding else 3])
    with pytest.raises(ClientError) as caught:
        three.client.add_to_segment("dyn", ["u1"])
    assert caught.value.code == "INVALID_ARGUMENT" and "static" in caught.value.message
    overlap = three.client.overlap(SEGMENTS, as_of=AS_OF)
    expected = one.client.overlap(SEGMENTS, as_of=AS_OF)
    assert (overlap.sizes, overlap.matrix) == (expected.sizes, expected.matrix)
    for name in SEGMENTS:
        assert three.client.get_segment(name).size == one.client.get_segment(name).size
    assert [(s.name, s.size) for s in three.client.list_segments()] == \
        [(s.name, s.size) for s in one.client.list_segments()]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), rules_=st.lists(rules(), min_size=4, max_size=4))
def test_random_data_three_shards_in_process_answer_as_one(
        tmp_path_factory: pytest.TempPathFactory, seed: int, rules_: list[dict]) -> None:
    root = tmp_path_factory.mktemp("random")
    records = make_dataset(root / "data", seed, profiles=40)
    build_store(root / "data", root / "one", 1)
    build_store(root / "data", root / "three", 3)
    one = Front(ShardSet.embedded([str(shard_folder(root / "one", 0))]))
    three = Front(ShardSet.embedded([str(shard_folder(root / "three", s)) for s in range(3)]))
    try:
        for front in (one, three):
            front.shards.unify_schema()
            make_segments(front.client)
        probe = ids_of(records)[:10] + ["nobody"]
        for rule in rules_:
            check_same(one, three, rule, probe)
    finally:
        one.close()
        three.close()


def test_top_and_unsharded_rpcs_are_refused_never_wrong(
        pair: tuple[Front, Front, dict]) -> None:
    one, three, _ = pair
    top = {"top": {"n": 3, "by": "n"}}
    assert three.client.count(top, as_of=AS_OF) == one.client.count(top, as_of=AS_OF) == 3
    assert replace(three.client.describe(3), version=0, eval_micros=0) == \
        replace(one.client.describe(3), version=0, eval_micros=0)  # test_shard_reads.py
    # bulk actions: tests/test_shard_actions.py; SQL sources: tests/test_shard_sources.py
    assert three.client.sources() == one.client.sources() == []  # served without them
    # writes through the front: tests/test_shard_writes.py


def test_a_segment_create_that_fails_on_one_shard_leaves_it_on_none(
        pair: tuple[Front, Front, dict]) -> None:
    _, three, _ = pair
    shards = three.shards
    # a shard that already has the name (as a crash between create and rollback would
    # leave it): shard 0 creates, shard 2 refuses, shard 0 and 1 are rolled back
    shards.call(2, "segment_change", "create", {"name": "clash", "kind": "dynamic",
                                                "rule": {"all": True}, "as_of": datetime.now(UTC)})
    with pytest.raises(ClientError) as caught:
        three.client.create_segment("clash", "dynamic", {"all": True})
    assert caught.value.code == "ALREADY_EXISTS"
    names = [[i.name for i in found] for found in shards.each("list_segments", None, None)]
    assert ["clash" in n for n in names] == [False, False, True]
    shards.call(2, "delete_segment", "clash")
    with pytest.raises(ClientError) as caught:  # a bad rule fails on shard 0, alone
        three.client.create_segment("bad", "dynamic", {"field": "nope", "op": "eq",
                                                       "value": 1})
    assert caught.value.code == "INVALID_ARGUMENT" and "$" in caught.value.message
    made = three.client.create_segment("fine", "materialized", {"event": "buy"}, as_of=AS_OF)
    assert made.size == three.client.count({"event": "buy"}, as_of=AS_OF)
    refreshed = three.client.refresh_segment("fine", as_of=AS_OF)
    assert (refreshed.entered, refreshed.exited) == (0, 0)
    three.client.delete_segment("fine")
    assert all("fine" not in [i.name for i in found]
               for found in shards.each("list_segments", None, None))


def kill_under_a_count(front: Front, shard: int, rule: dict, expected: int) -> None:
    """Stop the shard's actor, ask a Count, kill the actor under it: the Count fails
    UNAVAILABLE naming the shard; then Counts answer `expected` again within 60 s,
    once Ray has restarted the actor and it has reopened its store."""
    pid = front.shards.call(shard, "pid")
    os.kill(pid, signal.SIGSTOP)  # the call reaches a shard that cannot answer ...
    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            answer["count"] = front.client.count(rule, as_of=AS_OF)
        except ClientError as exc:
            answer["error"] = exc

    asking = threading.Thread(target=ask)
    asking.start()
    time.sleep(1.0)
    os.kill(pid, signal.SIGKILL)  # ... and dies in the middle of it
    asking.join(60)
    error = answer.get("error")
    assert error is not None, answer
    assert error.code == "UNAVAILABLE" and f"shard {shard}" in error.message, error
    deadline = time.monotonic() + 60
    while True:
        try:
            assert front.client.count(rule, as_of=AS_OF) == expected
            return
        except ClientError as exc:
            assert exc.code == "UNAVAILABLE", exc
            assert time.monotonic() < deadline, "the shard did not come back in 60 s"
            time.sleep(0.5)


def test_a_killed_shard_fails_the_call_then_comes_back(
        pair: tuple[Front, Front, dict]) -> None:
    one, three, _ = pair
    rule = {"event": "view", "having": {"agg": "count", "op": "gte", "value": 2}}
    expected = one.client.count(rule, as_of=AS_OF)
    pid = three.shards.call(1, "pid")
    kill_under_a_count(three, 1, rule, expected)
    assert three.shards.call(1, "pid") != pid
    assert set(three.client.members(rule, as_of=AS_OF)) == \
        set(one.client.members(rule, as_of=AS_OF))


def warm_graph(front: Front, rule: dict) -> None:
    """Count until the shards' compiled graph is built (shard_graph: on a second Count
    within its idle time, in a thread of its own), at most 30 s."""
    deadline = time.monotonic() + 30
    while not front.shards.graph.ready:
        assert time.monotonic() < deadline, "the compiled graph was not built in 30 s"
        front.client.count(rule, as_of=AS_OF)
        time.sleep(0.05)


def plain_calls(shards: ShardSet, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The methods the shards are asked through plain actor tasks from now on (a batch of
    Counts and IsMembers by tasks is recorded as its requests' methods)."""
    asked: list[str] = []
    submit, by_tasks = shards._submit, FastReads._plain

    def spy(index: int, method: str, args: tuple) -> Any:
        asked.append(method)
        return submit(index, method, args)

    def spy_batch(fast: FastReads, requests: list[tuple]) -> Any:
        asked.extend(method for _, method, *_ in requests)
        return by_tasks(fast, requests)

    monkeypatch.setattr(shards, "_submit", spy)
    monkeypatch.setattr(FastReads, "_plain", spy_batch)
    return asked


def test_counts_and_memberships_take_the_compiled_graph(
        pair: tuple[Front, Front, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    one, three, records = pair
    rules = [{"all": True}, {"field": "kw", "op": "in", "value": KEYWORDS[:2]},
             {"event": "view", "having": {"agg": "count", "op": "gte", "value": 2}},
             {"not": {"field": "n", "op": "gt", "value": 5}}]
    warm_graph(three, rules[0])
    plain = plain_calls(three.shards, monkeypatch)
    probe = ids_of(records)[:12] + ["nobody"]
    for rule in rules:
        assert three.client.count(rule, as_of=AS_OF) == one.client.count(rule, as_of=AS_OF)
        for profile_id in probe:
            try:
                expected: Any = one.client.is_member(profile_id, rule, as_of=AS_OF)
            except ClientError as exc:
                expected = (exc.code, exc.message)
            try:
                found: Any = three.client.is_member(profile_id, rule, as_of=AS_OF)
            except ClientError as exc:
                found = (exc.code, exc.message)
            assert found == expected, (profile_id, rule)
    bad = {"field": "nope", "op": "eq", "value": 1}  # a shard's rule error, word for word
    with pytest.raises(ClientError) as caught:
        one.client.count(bad, as_of=AS_OF)
    with pytest.raises(ClientError) as through:
        three.client.count(bad, as_of=AS_OF)
    assert (through.value.code, through.value.message) == \
        (caught.value.code, caught.value.message)
    assert three.shards.graph.ready
    assert not [m for m in plain if m in ("count", "is_member")], plain


def test_a_shard_killed_under_the_compiled_graph_fails_the_call_then_it_is_built_again(
        pair: tuple[Front, Front, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    one, three, records = pair
    rule = {"event": "view"}
    expected = one.client.count(rule, as_of=AS_OF)
    warm_graph(three, rule)
    built = three.shards.graph.built
    kill_under_a_count(three, 2, rule, expected)  # the graph's request is the one cut
    warm_graph(three, rule)  # and later Counts build the graph again, with the new actor
    assert three.shards.graph.built > built
    plain = plain_calls(three.shards, monkeypatch)
    assert three.client.count(rule, as_of=AS_OF) == expected
    for profile_id in ids_of(records)[:6]:
        assert three.client.is_member(profile_id, rule, as_of=AS_OF) == \
            one.client.is_member(profile_id, rule, as_of=AS_OF)
    assert "count" not in plain and "is_member" not in plain, plain


def test_counts_asked_at_once_go_out_together_by_tasks_and_tear_the_graph_down(
        pair: tuple[Front, Front, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    """Concurrent callers' Counts and IsMembers are sent in batches, one batch at a time,
    by actor tasks (shard_graph.FastReads): each caller gets its own answer, fewer
    batches go out than calls come, and the graph (whose loops would spin beside the
    tasks) is torn down and not built again for a while."""
    one, three, records = pair
    rules = [{"field": "kw", "op": "in", "value": KEYWORDS[:2]},
             {"event": "view", "having": {"agg": "count", "op": "gte", "value": 2}}]
    expected = [one.client.count(rule, as_of=AS_OF) for rule in rules]
    probe = ids_of(records)[:10]
    members = {(p, k): one.client.is_member(p, rule, as_of=AS_OF)
               for p in probe for k, rule in enumerate(rules)}
    warm_graph(three, rules[0])
    built = three.shards.graph.built
    plain = plain_calls(three.shards, monkeypatch)
    batches = three.shards.fast.batches
    wrong: list[Any] = []
    calls = [0]

    def ask(seed: int) -> None:
        for step in range(30):
            k = (seed + step) % 2
            if step % 3:
                found: Any = three.client.count(rules[k], as_of=AS_OF)
                want: Any = expected[k]
            else:
                profile_id = probe[(seed * 7 + step) % len(probe)]
                found = three.client.is_member(profile_id, rules[k], as_of=AS_OF)
                want = members[(profile_id, k)]
            calls[0] += 1
            if found != want:
                wrong.append((seed, step, found, want))

    asking = [threading.Thread(target=ask, args=(seed,)) for seed in range(4)]
    for thread in asking:
        thread.start()
    for thread in asking:
        thread.join(120)
    assert calls[0] == 120 and not wrong, wrong
    assert three.shards.fast.batches - batches < calls[0], "no requests went out together"
    assert "count" in plain and "is_member" in plain, plain
    deadline = time.monotonic() + 10
    while three.shards.graph.ready:
        assert time.monotonic() < deadline, "the graph stayed up beside the crowd"
        time.sleep(0.05)
    for _ in range(4):  # a lone caller again, soon after: tasks still
        assert three.client.count(rules[0], as_of=AS_OF) == expected[0]
    assert three.shards.graph.built == built and not three.shards.graph.ready


# ---------------------------------------------------------------------- end to end
def test_serve_two_shards_from_the_cli(tmp_path: Path, ray_runtime: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import conftest_grpc
    from conftest_grpc import ServerProcess

    make_dataset(tmp_path / "data", seed=9, profiles=50)
    done = run_cli("load", str(tmp_path / "data"), "--db", str(tmp_path / "db"),
                   "--shards", "2", "--quiet", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "into 2 shards" in done.stdout
    with Engine.open(tmp_path / "plain") as engine:
        load_dataset(tmp_path / "data", engine)
        rule = {"or": [{"field": "kw", "op": "eq", "value": KEYWORDS[0]},
                       {"event": "buy", "window": {"last_days": 20}}]}
        expected = set(engine.members(rule, as_of=AS_OF))
        bought = {"event": "buy", "window": {"last_days": 10}}
        later = (T0 + timedelta(days=5)).isoformat()
        moved = (engine.count(bought, as_of=AS_OF), engine.count(bought, as_of=later))
        halves = [engine.count({"and": [rule, {"sample": {"salt": "s", "from": f,
                                                          "to": t}}]}, as_of=AS_OF)
                  for f, t in ((0, 50), (50, 100))]
    monkeypatch.setattr(conftest_grpc, "START_SECONDS", 120.0)  # Ray starts in seconds
    server = ServerProcess(tmp_path / "db", ["--shards", "2"])
    try:
        assert "2 shards on Ray" in server.stderr()
        addr = ["--addr", server.addr]
        text = orjson.dumps(rule).decode()
        counted = run_cli("count", "--rule", text, "--as-of", AS_OF, "--json", *addr)
        assert orjson.loads(counted.stdout)["count"] == len(expected), counted.stderr
        listed = run_cli("members", "--rule", text, "--as-of", AS_OF, *addr)
        assert set(listed.stdout.split()) == expected
        made = run_cli("segment", "create", "kw0", "--dynamic", "--rule", text, *addr)
        assert made.returncode == 0, made.stderr
        some = sorted(expected)[0]
        found = run_cli("segments", some, "--as-of", AS_OF, "--json", *addr)
        assert "kw0" in found.stdout, found.stderr
        checked = run_cli("check", some, "--segment", "kw0", "--as-of", AS_OF, *addr)
        assert checked.stdout.strip() == "true"
        described = run_cli("describe", "--json", *addr)
        assert described.returncode == 0, described.stderr
        listed = run_cli("sources", *addr)  # none: served without --sources
        assert listed.returncode == 0, listed.stderr
        # a materialized segment refreshed later: sizes, entries and exits over both shards
        text = orjson.dumps(bought).decode()
        made = run_cli("segment", "create", "bought", "--materialized", "--rule", text,
                       "--as-of", AS_OF, "--json", *addr)
        assert orjson.loads(made.stdout)["size"] == moved[0], made.stderr
        again = run_cli("segment", "refresh", "bought", "--as-of", later, "--json", *addr)
        refreshed = orjson.loads(again.stdout)
        assert refreshed["size"] == moved[1], again.stderr
        assert refreshed["size"] == moved[0] + refreshed["entered"] - refreshed["exited"]
        split = run_cli("segment", "split", "kw0", "--salt", "s", "--into", "a:50,b:50",
                        "--as-of", AS_OF, "--json", *addr)
        assert [p["size"] for p in orjson.loads(split.stdout)] == halves, split.stderr
        kill_a_shard_mid_call(server, addr, len(expected), text=orjson.dumps(rule).decode())
    finally:
        assert server.stop() == 0


def kill_a_shard_mid_call(server: Any, addr: list[str], expected: int, text: str) -> None:
    """Stop one shard actor of the server, ask it, kill the actor: the call fails naming
    the shard (UNAVAILABLE, exit 4); once Ray has restarted it the count is right."""
    import subprocess

    import psutil  # a dependency of ray
    from conftest_grpc import bitseg_command

    def command(process: Any) -> str:
        try:
            return " ".join(process.cmdline())
        except psutil.NoSuchProcess:  # and a zombie: a Ray worker that just exited
            return ""

    shards = [p for p in psutil.Process(server.proc.pid).children(recursive=True)
              if "ray::Shard" in command(p)]
    assert len(shards) == 2, [p.cmdline() for p in shards]
    shards[0].send_signal(signal.SIGSTOP)
    asking = subprocess.Popen([*bitseg_command(), "count", "--rule", text, "--as-of", AS_OF,
                               *addr], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    time.sleep(1.5)
    shards[0].send_signal(signal.SIGKILL)
    out, err = asking.communicate(timeout=60)
    assert asking.returncode == 4, (out, err)
    assert "shard" in err and "is unavailable" in err, err
    deadline = time.monotonic() + 60
    while True:
        counted = run_cli("count", "--rule", text, "--as-of", AS_OF, "--json", *addr)
        if counted.returncode == 0:
            assert orjson.loads(counted.stdout)["count"] == expected
            return
        assert counted.returncode == 4 and time.monotonic() < deadline, counted.stderr
        time.sleep(0.5)


def test_one_shard_and_plain_serving_never_import_ray(tmp_path: Path) -> None:
    import subprocess
    import sys

    make_dataset(tmp_path / "data", seed=2, profiles=10)
    build_store(tmp_path / "data", tmp_path / "db", 1)
    script = f"""
import sys
from bitseg.server import app, cli, commands, shard_service
from bitseg.server.shards import open_shards
cli.build_parser().parse_args(["serve", "--db", "x", "--shards", "1"])
shards = open_shards({str(tmp_path / "db")!r}, expect=1)
print(shards.each("count", {{"all": True}}, None), "ray" in sys.modules)
shards.close()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False"


def test_without_ray_more_shards_say_how_to_install_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bitseg.server.shards import RayMissing, open_shards

    make_dataset(tmp_path / "data", seed=2, profiles=10)
    build_store(tmp_path / "data", tmp_path / "db", 2)
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # import ray fails
    with pytest.raises(RayMissing, match=r"pip install 'bitseg\[shards\]'"):
        open_shards(tmp_path / "db")
    with pytest.raises(Exception, match="holds 2 shards, not 3"):
        open_shards(tmp_path / "db", expect=3)
    shutil.rmtree(shard_folder(tmp_path / "db", 1))
    with pytest.raises(StoreError, match="no shard store at .*shard-1"):
        open_shards(tmp_path / "db")


class SlowRay:
    """A stand-in for the ray module's init/shutdown whose local runtime fails to start
    `failures` times with `error` (start_ray's policy, not Ray, is what is checked)."""

    def __init__(self, failures: int, error: str) -> None:
        self.failures, self.error = failures, error
        self.inits: list[dict] = []
        self.shutdowns = 0

    def init(self, **kwargs: Any) -> None:
        self.inits.append(kwargs)
        if len(self.inits) <= self.failures:
            raise RuntimeError(self.error)

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_a_local_ray_runtime_that_starts_too_slowly_is_started_again() -> None:
    slow = "Timed out waiting for file /tmp/ray/session_x/gcs_server_port_y"
    ray = SlowRay(RAY_STARTS - 1, slow)
    start_ray(ray, num_cpus=2)
    assert len(ray.inits) == RAY_STARTS and ray.shutdowns == RAY_STARTS - 1
    assert ray.inits[-1]["num_cpus"] == 2 and ray.inits[-1]["log_to_driver"] is False
    never = SlowRay(RAY_STARTS, slow)
    with pytest.raises(RuntimeError, match="Timed out"):
        start_ray(never)
    assert len(never.inits) == RAY_STARTS
    for failing, kwargs in ((SlowRay(1, "no such file"), {}),  # not a timeout
                            (SlowRay(1, slow), {"address": "10.0.0.1:6379"})):  # a cluster
        with pytest.raises(RuntimeError):
            start_ray(failing, **kwargs)
        assert len(failing.inits) == 1
