"""Bulk actions (index/bulk.py) against a plain Python model of the rows: the same members
change, dry runs change nothing, errors change nothing, and a kill -9 in the middle of a
big action leaves the store as it was."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from bitseg.index import bulk
from bitseg.index.bulk import BulkAction
from bitseg.index.engine import Engine
from bitseg.index.errors import BitsegError, DataError, NotFound
from bitseg.index.fields import RangeIndex, ids_of
from bitseg.index.segments import open_segments

SCHEMA = {"profiles": {"n": "int", "c": "keyword", "tags": "keywords", "f": "float",
                       "d": "date", "ok": "bool"}}


def make_profiles(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"id": f"p{i}"}
        if rng.random() < 0.8:
            row["n"] = rng.randint(0, 5)
        if rng.random() < 0.8:
            row["c"] = rng.choice("ABC")
        if rng.random() < 0.7:
            row["tags"] = rng.sample(["x", "y", "z"], rng.randint(1, 3))
        if rng.random() < 0.5:
            row["f"] = rng.choice([1.5, 2.25, 3.0])
        if rng.random() < 0.5:
            row["d"] = rng.choice(["2024-01-01", "2025-06-30"])
        if rng.random() < 0.5:
            row["ok"] = rng.random() < 0.5
        rows.append(row)
    return rows


def rows_of(engine: Engine) -> dict[str, dict[str, Any]]:
    return {pid: engine.profile(pid) for pid in engine.members({"all": True})}


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine.open(tmp_path / "db") as eng:
        eng.declare_schema(SCHEMA)
        eng.upsert_profiles(make_profiles(120, 7))
        yield eng


def naive(rows: dict[str, dict[str, Any]], members: set[str], action: str, field: str,
          value: Any) -> tuple[dict[str, dict[str, Any]], int]:
    """The rows after the action, and how many changed, by plain dict edits."""
    after, changed = {}, 0
    for pid, row in rows.items():
        new = dict(row)
        if pid in members:
            if action == "set":
                new[field] = sorted(set(value)) if isinstance(value, list) else value
            elif action == "unset":
                new.pop(field, None)
            else:
                words = set(new.get(field, []))
                (words.add if action == "add" else words.discard)(value)
                if words:
                    new[field] = sorted(words)
                else:
                    new.pop(field, None)
        changed += new != row
        after[pid] = new
    return after, changed


CASES = [("set", "c", "B"), ("set", "n", 3), ("set", "f", 2.25), ("set", "d", "2024-01-01"),
         ("set", "ok", True), ("set", "tags", ["y", "x"]), ("set", "new", "hello"),
         ("unset", "c", None), ("unset", "tags", None), ("unset", "never", None),
         ("add", "tags", "z"), ("add", "tags", "w"), ("remove", "tags", "x"),
         ("remove", "tags", "nope"), ("add", "labels", "first")]
TARGETS = [{"field": "n", "op": "lte", "value": 2}, {"field": "c", "op": "eq", "value": "A"},
           {"all": True}, {"field": "n", "op": "eq", "value": 99}]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
@pytest.mark.parametrize("target", range(len(TARGETS)))
def test_action_equals_naive(engine: Engine, case: tuple, target: int,
                             tmp_path: Path) -> None:
    action, field, value = case
    rule = TARGETS[target]
    before = rows_of(engine)
    members = set(engine.members(rule))
    expected, changed = naive(before, members, action, field, value)
    dry = bulk.run(engine, BulkAction(action, field, value, rule=rule), dry_run=True)
    assert (dry.members, dry.changed, dry.entry) == (len(members), changed, None)
    assert rows_of(engine) == before  # a dry run changes nothing
    version = engine.snapshot.version
    done = bulk.run(engine, BulkAction(action, field, value, rule=rule))
    assert (done.members, done.changed) == (len(members), changed)
    assert rows_of(engine) == expected
    assert engine.snapshot.version == version + 1
    # the field's bitmaps follow the rows
    if field in engine.schema.profiles:
        holders = {pid for pid, row in expected.items() if field in row}
        assert set(engine.members({"field": field, "op": "exists"})) == holders
    if action in ("add", "set") and not isinstance(value, list) and members:
        assert members <= set(engine.members({"field": field, "op": "eq", "value": value}))
    # the field indexes equal those of a store loaded from the expected rows
    with Engine.open(tmp_path / "fresh") as fresh:
        fresh.declare_schema({"profiles": dict(engine.schema.profiles)})
        fresh.upsert_profiles(list(expected.values()))
        assert index_of(fresh) == index_of(engine)


def index_of(engine: Engine) -> dict[str, Any]:
    """Every field's index by external id: values (exact numbers) and who has them."""
    out: dict[str, Any] = {}
    ext = engine.ids.externals
    for name, index in engine.snapshot.fields.items():
        if not index.exists:  # an emptied field is the same as none
            continue
        if isinstance(index, RangeIndex):
            ids, keys = index.decode()
            scale = 10 ** (index.digits or 0)
            out[name] = sorted(zip(ext(ids), (Fraction(k, scale) for k in keys.tolist()),
                                   strict=True))
        else:
            out[name] = {v: sorted(ext(ids_of(b))) for v, b in index.values.items() if b}
        out[name + ".exists"] = sorted(ext(ids_of(index.exists)))
    return out


def test_segment_target_and_audit_entries(engine: Engine, tmp_path: Path) -> None:
    segs = open_segments(engine)
    segs.create("vip", "static", rule={"field": "c", "op": "eq", "value": "C"})
    members = set(engine.members({"segment": "vip"}))
    done = bulk.run(engine, BulkAction("add", "tags", "vip", segment="vip"),
                    as_of="2026-01-01T00:00:00Z")
    assert done.members == len(members)
    assert members == set(engine.members({"field": "tags", "op": "eq", "value": "vip"}))
    bulk.run(engine, BulkAction("unset", "n", rule={"all": True}))
    bulk.run(engine, BulkAction("set", "c", "A", rule={"all": True}), dry_run=True)
    entries = bulk.list_entries(engine)
    assert [e["id"] for e in entries] == [2, 1]  # newest first; the dry run left none
    first = entries[1]
    assert {k: first[k] for k in ("action", "field", "value", "segment", "rule", "as_of",
                                  "members", "changed")} == {
        "action": "add", "field": "tags", "value": "vip", "segment": "vip", "rule": None,
        "as_of": "2026-01-01T00:00:00Z", "members": len(members), "changed": len(members)}
    assert first["time"].endswith("Z")
    assert bulk.list_entries(engine, limit=1) == entries[:1]
    engine.close()
    with Engine.open(tmp_path / "db") as again:  # entries are stored
        assert bulk.list_entries(again) == entries


@pytest.mark.parametrize("action, message", [
    (BulkAction("set", "n", "ten", rule={"all": True}), "expected an integer"),
    (BulkAction("add", "c", "x", rule={"all": True}), "keywords (multi-valued) field"),
    (BulkAction("add", "tags", ["x"], rule={"all": True}), "one keyword"),
    (BulkAction("unset", "n", 3, rule={"all": True}), "unset takes no value"),
    (BulkAction("set", "n", None, rule={"all": True}), "set needs a value"),
    (BulkAction("set", "id", "x", rule={"all": True}), "cannot be changed"),
    (BulkAction("grow", "n", 1, rule={"all": True}), "expected one of set, unset"),
    (BulkAction("set", "n", 1), "exactly one of a rule or a segment"),
    (BulkAction("set", "n", 1, rule={"field": "nope", "op": "exists"}), "nope"),
])
def test_bad_actions_change_nothing(engine: Engine, action: BulkAction, message: str) -> None:
    before, version = rows_of(engine), engine.snapshot.version
    for dry_run in (True, False):
        with pytest.raises(BitsegError, match=message.replace("(", r"\(").replace(")", r"\)")):
            bulk.run(engine, action, dry_run=dry_run)
    assert rows_of(engine) == before and engine.snapshot.version == version
    assert bulk.list_entries(engine) == []


def test_errors_are_of_the_vocabulary(engine: Engine) -> None:
    with pytest.raises(DataError):
        bulk.run(engine, BulkAction("set", "n", "x", rule={"all": True}))
    open_segments(engine)
    with pytest.raises(NotFound):
        bulk.run(engine, BulkAction("set", "n", 1, segment="ghost"))


# ---------------------------------------------------------------------- kill -9
# The child is killed inside the action's transaction: for a keyword field (held by its
# index, rows untouched) when the new version number is put, after the held-field mark
# and the bitmaps; for a float field (rows rewritten) when half the rows are.
CHILD = """
import sys, time
from pathlib import Path
from bitseg.index import bulk
from bitseg.index.engine import Engine
from bitseg.index.store import Store

marker, field, value = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
real_put, real_put_json = Store.put, Store.put_json
seen = [0]

def wait_to_be_killed():
    marker.write_text("inside")
    time.sleep(60)

def slow_put(self, txn, db, key, value):
    real_put(self, txn, db, key, value)
    seen[0] += db == "rows"
    if seen[0] == 3000:  # half the rows rewritten
        wait_to_be_killed()

def slow_put_json(self, txn, key, value):
    real_put_json(self, txn, key, value)
    if key == "version":  # every bitmap of the action written
        wait_to_be_killed()

Store.put, Store.put_json = slow_put, slow_put_json
engine = Engine.open(sys.argv[1])
bulk.run(engine, bulk.BulkAction("set", field, eval(value), rule={"all": True}))
"""


@pytest.mark.parametrize(("field", "value"), [("c", "'KILLED'"), ("f", "9.75")])
def test_kill_9_mid_action_leaves_the_store_as_before(tmp_path: Path, field: str,
                                                      value: str) -> None:
    db = tmp_path / "db"
    with Engine.open(db) as eng:
        eng.declare_schema(SCHEMA)
        eng.upsert_profiles(make_profiles(6000, 3))
        before, version = rows_of(eng), eng.snapshot.version
    marker = tmp_path / "inside"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(marker), field, value],
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert child.poll() is None, "the child ended before the action's middle"
            assert time.monotonic() < deadline, "the child never reached the action"
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with Engine.open(db) as eng:
        assert eng.snapshot.version == version
        assert rows_of(eng) == before
        shown = 9.75 if field == "f" else "KILLED"
        assert eng.count({"field": field, "op": "eq", "value": shown}) == 0
        assert bulk.list_entries(eng) == []
