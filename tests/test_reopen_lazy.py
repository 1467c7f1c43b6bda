"""Issue 14: a store opens without reading its profile field bitmaps, its orders or its
id map chunks; each is read the first time it is used.  What is read lazily equals what
a writer holds after building it (eagerly, in memory): after a reopen, after writes on a
partly read engine in the same process, and in a second process."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bitseg.index.engine import Engine
from bitseg.index.fields import RangeIndex, StoredFields
from bitseg.index.ids import ID_CHUNK
from bitseg.index.order_index import StoredOrders
from bitseg.index.snapshot import Snapshot

SCHEMA = {"profiles": {"n": "int", "c": "keyword", "tags": "keywords", "f": "float",
                       "d": "date", "seen": "timestamp", "ok": "bool"}}
LONG = "L" * 600  # a keyword whose bitmap is named by its digest
AS_OF = "2026-06-01T00:00:00Z"


def profiles(n: int, seed: int, prefix: str = "p") -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row: dict[str, Any] = {"id": f"{prefix}{i}"}
        if rng.random() < 0.8:
            row["n"] = rng.randint(-5, 900)
        if rng.random() < 0.8:
            row["c"] = rng.choice(["A", "B", "C", LONG])
        if rng.random() < 0.7:
            row["tags"] = rng.sample(["x", "y", "z"], rng.randint(1, 3))
        if rng.random() < 0.5:
            row["f"] = rng.choice([1.5, 2.25, -3.0])
        if rng.random() < 0.5:
            row["d"] = rng.choice(["2024-01-01", "2025-06-30", "1990-02-28"])
        if rng.random() < 0.5:
            row["seen"] = f"2026-0{rng.randint(1, 5)}-1{rng.randint(0, 9)}T10:00:00Z"
        if rng.random() < 0.5:
            row["ok"] = rng.random() < 0.5
        rows.append(row)
    return rows


def orders(n: int, seed: int, people: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        line: dict[str, Any] = {
            "id": f"o{rng.randint(0, n)}", "profile": f"p{rng.randint(0, people - 1)}",
            "ts": f"2026-0{rng.randint(1, 5)}-{rng.randint(10, 28)}T12:00:00Z",
            "status": rng.choice(["paid", "open", LONG]), "amount": rng.choice([9.99, 20.0, 5.5])}
        if rng.random() < 0.8:
            line["items"] = [{"sku": rng.choice(["s1", "s2", LONG]), "qty": rng.randint(1, 4),
                              "price": rng.choice([1.25, 3.0])}
                             for _ in range(rng.randint(1, 3))]
        lines.append(line)
    return lines


def events(n: int, seed: int, people: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [{"profile": f"p{rng.randint(0, people - 1)}", "event": rng.choice(["view", "buy"]),
             "ts": f"2026-05-{rng.randint(10, 28)}T08:00:00Z"} for _ in range(n)]


def _bits(bitmap: Any) -> list[int]:
    return list(bitmap)


def _array(values: np.ndarray) -> list[Any]:
    return values.tolist()


def state_of(engine: Engine) -> dict[str, Any]:
    """Everything a snapshot holds of fields, orders and ids, as plain data (reading
    whatever was not read yet)."""
    snap: Snapshot = engine.snapshot
    fields = {}
    for name in sorted(snap.fields):
        index = snap.fields[name]
        entry: dict[str, Any] = {"exists": _bits(index.exists)}
        if isinstance(index, RangeIndex):
            entry.update(base=index.base, unit=index.unit, digits=index.digits,
                         rounded=index.rounded, slices=[_bits(s) for s in index.slices],
                         monthdays={md: _bits(b) for md, b in sorted(index.monthdays.items())
                                    if b})
        else:
            entry["values"] = {orjson.dumps(v).decode(): _bits(b)
                               for v, b in sorted(index.values.items(), key=repr) if b}
        fields[name] = entry
    o = snap.orders
    values = {name: {orjson.dumps(v).decode(): _bits(b) for v, b in index.values.items() if b}
              | {"exists": _bits(index.exists)} for name, index in o.values.items()}
    item_values = {name: {orjson.dumps(v).decode(): _bits(b)
                          for v, b in index.values.items() if b}
                   | {"exists": _bits(index.exists)} for name, index in o.item_values.items()}
    columns = {name: [_array(k), _array(v)] for name in o.columns
               for k, v in [o.column(name)]}
    item_columns = {name: [_array(k), _array(v)] for name in o.item_columns
                    for k, v in [o.item_column(name)]}
    ids = engine.ids
    return {"version": snap.version, "live": _bits(snap.live), "fields": fields,
            "orders": {"count": o.count, "items": o.item_count, "live": _bits(o.live),
                       "owner": _array(o.owner), "ts": _array(o.ts),
                       "runs": None if o.runs is None else _array(o.runs),
                       "item_owner": _array(o.item_owner), "values": values,
                       "item_values": item_values, "columns": columns,
                       "item_columns": item_columns},
            "ids": ids.externals(np.arange(ids.count, dtype=np.uint32)),
            "counts": [engine.count(rule, as_of=AS_OF) for rule in RULES]}


RULES = [{"field": "c", "op": "eq", "value": LONG},
         {"orders": {"field": "status", "op": "eq", "value": LONG}},
         {"orders": {"field": "items.sku", "op": "eq", "value": LONG}},
         {"field": "n", "op": "between", "value": [10, 400]},
         {"field": "d", "op": "exists"},
         {"orders": {"field": "items.sku", "op": "eq", "value": "s2"},
          "having": {"agg": "sum", "of": "amount", "op": "gt", "value": 10}},
         {"event": "view", "window": {"last_days": 30}}]


def _plain(state: dict[str, Any]) -> Any:
    """The state through JSON (as a second process reports it: keys become text)."""
    return json.loads(json.dumps(state))


def build(path: Path) -> dict[str, Any]:
    """A store of every field type, events and orders with items; its writer's state."""
    with Engine.open(path) as engine:
        engine.declare_schema(SCHEMA)
        engine.upsert_profiles(profiles(300, 1))
        engine.track_events(events(400, 2, 300))
        engine.add_orders(orders(250, 3, 300))
        engine.upsert_profiles(profiles(80, 4))  # upserts: values move between bitmaps
        engine.delete_profiles([f"p{i}" for i in range(0, 300, 37)])
        return state_of(engine)


def test_open_reads_no_field_bitmaps_orders_or_id_chunks(tmp_path: Path) -> None:
    build_state = build(tmp_path / "s")
    with Engine.open(tmp_path / "s", readonly=True) as engine:
        snap = engine.snapshot
        assert isinstance(snap.fields, StoredFields)
        assert set(snap.fields) == set(SCHEMA["profiles"])
        assert not any(snap.fields.loaded(name) for name in snap.fields)
        assert isinstance(snap.orders, StoredOrders) and snap.orders._index is None
        assert engine.count({"field": "c", "op": "eq", "value": "A"}) > 0
        assert [name for name in snap.fields if snap.fields.loaded(name)] == ["c"]
        assert snap.orders._index is None  # a profile rule reads no orders
        assert len(snap.orders.live) == len(build_state["orders"]["live"])  # read alone
        assert snap.orders._index is None
        assert engine.count({"orders": {"field": "status", "op": "eq", "value": "paid"}}) > 0
        assert not snap.orders._whole  # no items rule yet: no item owners read
        orders = snap.orders.loaded()
        assert [name for name in orders.values if orders.values.loaded(name)] == ["status"]
        assert not any(orders.item_values.loaded(name) for name in orders.item_values)
        assert snap.orders._whole and len(orders.item_owner) == orders.item_count > 0


def test_lazily_read_state_equals_the_writers(tmp_path: Path) -> None:
    written = build(tmp_path / "s")
    with Engine.open(tmp_path / "s") as engine:
        assert _plain(state_of(engine)) == _plain(written)


def test_writes_on_a_partly_read_engine(tmp_path: Path) -> None:
    """Writes on an engine that has read one field and no orders: what it then holds,
    what a reopen reads and what another process reads are the same."""
    path = tmp_path / "s"
    build(path)
    with Engine.open(path) as engine:
        engine.count({"field": "c", "op": "eq", "value": "B"})  # "c" read; the rest not
        old = engine.snapshot
        engine.upsert_profiles(profiles(60, 5))  # changes c, n, … some of them unread
        engine.upsert_profiles([{"id": "new1", "n": 5, "c": "Z"}])
        engine.track_events(events(50, 6, 300))
        engine.add_orders(orders(40, 7, 320))  # reads the orders, then adds
        engine.upsert_profiles([{"id": "p3", "f": None, "d": "2000-01-01"}])
        engine.delete_profiles(["p5", "new1"])
        after = state_of(engine)
        # the snapshot from before the writes still reads its own version
        assert old.fields["n"] is not engine.snapshot.fields["n"]
    with Engine.open(path) as engine:
        assert _plain(state_of(engine)) == _plain(after)
    done = subprocess.run([sys.executable, "-c", SECOND, str(path)], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == _plain(after)


SECOND = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_reopen_lazy import state_of
from bitseg.index.engine import Engine
with Engine.open(sys.argv[1], readonly=True) as engine:
    print(json.dumps(state_of(engine)))
"""


READER = """
import sys
from bitseg.index.engine import Engine
with Engine.open(sys.argv[1], readonly=True) as engine:
    print("open", flush=True)
    sys.stdin.readline()  # the writer has committed
    print(engine.count({"field": "f", "op": "exists"}),
          engine.count({"orders": {"all": True}}), flush=True)
"""


def test_a_reader_beside_a_writer_reads_what_was_committed_when_it_opened(
        tmp_path: Path) -> None:
    """A read-only engine of another process reads its unread field and orders as of its
    open, not as the writer left them since."""
    path = tmp_path / "s"
    before = len(build(path)["fields"]["f"]["exists"])
    with Engine.open(path) as engine:
        buyers = engine.count({"orders": {"all": True}})
        reader = subprocess.Popen([sys.executable, "-c", READER, str(path)], text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert reader.stdout is not None and reader.stdin is not None
            assert reader.stdout.readline().strip() == "open"
            engine.upsert_profiles([{"id": f"q{i}", "f": i / 4} for i in range(500)])
            engine.add_orders([{"id": f"new{i}", "profile": f"q{i}", "ts": AS_OF}
                               for i in range(30)])
            assert engine.count({"field": "f", "op": "exists"}) == before + 500
            assert engine.count({"orders": {"all": True}}) == buyers + 30
            out, _ = reader.communicate("go\n", timeout=60)
        finally:
            reader.kill()
        assert out.split() == [str(before), str(buyers)]


def test_id_chunks_are_read_when_first_used(tmp_path: Path) -> None:
    """Past one chunk of 2**16 ids: a reopen reads the last chunk only; the others are
    read on first use, also by a batch that fills the last chunk and starts another."""
    path = tmp_path / "s"
    first = [{"id": f"u{i}"} for i in range(ID_CHUNK + 100)]
    with Engine.open(path) as engine:
        engine.upsert_profiles(first)
    with Engine.open(path) as engine:
        assert engine.ids.chunks.entries()[0] is None and engine.ids.count == len(first)
        engine.upsert_profiles([{"id": f"v{i}"} for i in range(ID_CHUNK)])  # 3 chunks now
        assert engine.ids.chunks.entries()[0] is None  # the batch did not need it
        everything = engine.ids.externals(np.arange(engine.ids.count, dtype=np.uint32))
        assert engine.dense_id("u5") == 5 and engine.members({"all": True})[5] == "u5"
    assert everything == [row["id"] for row in first] + [f"v{i}" for i in range(ID_CHUNK)]
    with Engine.open(path) as engine:
        assert engine.ids.count == len(everything)
        assert engine.ids.externals(np.arange(engine.ids.count, dtype=np.uint32)) == everything
