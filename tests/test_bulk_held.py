"""Fields held by their index (profiles.with_held): a bulk action writes a field's bitmaps
and not the rows, so every reader of a row must take the field from the index. Random
mixes of bulk actions, upserts (an id twice in one batch too), deletes and reopening are
checked against a plain dict model through each reader: Engine.profile, export rows,
the next upsert's merge (seen in the indexes) and a store loaded from the model."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_bulk import SCHEMA, index_of, make_profiles, rows_of

from bitseg.index import bulk
from bitseg.index.bulk import BulkAction
from bitseg.index.engine import Engine
from bitseg.index.export import profile_rows
from bitseg.index.profiles import HELD_KEY, held_fields

WORDS = ["x", "y", "z", "w"]


def _value(rng: random.Random, field: str) -> Any:
    return {"n": lambda: rng.randint(0, 5), "c": lambda: rng.choice("ABCD"),
            "tags": lambda: rng.sample(WORDS, rng.randint(1, 3)),
            "d": lambda: rng.choice(["2024-01-01", "2025-06-30", "2026-02-28"]),
            "ok": lambda: rng.random() < 0.5, "f": lambda: rng.choice([1.5, 2.0, 7.25]),
            "new": lambda: rng.choice(["p", "q"])}[field]()


def _shown(field: str, value: Any) -> Any:
    return sorted(set(value)) if field == "tags" else value


def _bulk(rng: random.Random, engine: Engine, model: dict[str, dict]) -> None:
    field = rng.choice(["n", "c", "tags", "d", "ok", "f", "new"])
    verb = rng.choice(["set", "unset", "add", "remove"] if field == "tags" else ["set", "unset"])
    value = rng.choice(WORDS) if verb in ("add", "remove") else \
        None if verb == "unset" else _value(rng, field)
    rule = rng.choice([{"all": True}, {"field": "n", "op": "lte", "value": 2},
                       {"field": "c", "op": "in", "value": ["A", "B"]}])
    members = set(engine.members(rule))
    bulk.run(engine, BulkAction(verb, field, value, rule=rule))
    for pid in members:
        row = model[pid]
        if verb == "set":
            row[field] = _shown(field, value)
        elif verb == "unset":
            row.pop(field, None)
        else:
            words = set(row.get(field, ()))
            (words.add if verb == "add" else words.discard)(value)
            row[field] = sorted(words)
            if not words:
                del row[field]


def _upsert(rng: random.Random, engine: Engine, model: dict[str, dict]) -> None:
    records = []
    for _ in range(rng.randint(1, 12)):
        pid = rng.choice(sorted(model)) if rng.random() < 0.85 else f"n{rng.randrange(10**6)}"
        record: dict[str, Any] = {"id": pid}
        for field in rng.sample(["n", "c", "tags", "d", "ok", "f"], rng.randint(0, 3)):
            record[field] = None if rng.random() < 0.25 else _value(rng, field)
        records.append(record)
        if rng.random() < 0.3:  # the same id again in the same batch
            records.append({"id": pid, "c": _value(rng, "c")})
    engine.upsert_profiles(records)
    for record in records:
        row = model.setdefault(record["id"], {"id": record["id"]})
        for field, value in record.items():
            if value is None:
                row.pop(field, None)
            elif field != "id":
                row[field] = _shown(field, value)


def _check(engine: Engine, model: dict[str, dict], tmp_path: Path, step: int) -> None:
    assert rows_of(engine) == model
    ids = np.array(sorted(engine.ids.lookup(pid) for pid in model), dtype=np.uint32)
    exported = {row["id"]: {k: v for k, v in row.items() if v is not None}
                for row in profile_rows(engine, ids, list(engine.schema.profiles))}
    assert exported == model
    with Engine.open(tmp_path / f"fresh{step}") as fresh:
        fresh.declare_schema({"profiles": dict(engine.schema.profiles)})
        fresh.upsert_profiles([{"id": pid, **row} for pid, row in model.items()])
        assert index_of(fresh) == index_of(engine)


@pytest.mark.parametrize("seed", range(4))
def test_held_fields_read_like_rows(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    db = tmp_path / "db"
    engine = Engine.open(db)
    try:
        engine.declare_schema(SCHEMA)
        profiles = make_profiles(60, seed)
        engine.upsert_profiles(profiles)
        model = {p["id"]: {k: _shown(k, v) for k, v in p.items()} for p in profiles}
        for step in range(14):
            roll = rng.random()
            if roll < 0.45:
                _bulk(rng, engine, model)
            elif roll < 0.85:
                _upsert(rng, engine, model)
            elif roll < 0.93:
                gone = rng.sample(sorted(model), 2)
                engine.delete_profiles(gone)
                for pid in gone:
                    del model[pid]
            else:
                engine.close()
                engine = Engine.open(db)
            if step % 5 == 4:
                _check(engine, model, tmp_path, step)
        _check(engine, model, tmp_path, 99)
    finally:
        engine.close()


def test_a_bulk_set_leaves_the_rows_and_marks_the_field_held(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "db") as engine:
        engine.declare_schema(SCHEMA)
        engine.upsert_profiles([{"id": "a", "c": "A", "f": 1.5}, {"id": "b", "c": "B"}])
        bulk.run(engine, BulkAction("set", "c", "Z", rule={"all": True}))
        bulk.run(engine, BulkAction("set", "f", 2.5, rule={"all": True}))
        store = engine.store
        with store.read() as txn:
            assert held_fields(store.get(txn, "meta", HELD_KEY.encode())) == ("c",)
            raw = bytes(store.get(txn, "rows", engine.ids.lookup("a").to_bytes(4, "big")))
        assert b'"A"' in raw and b'"f":2.5' in raw  # c's row copy stale, f's rewritten
        assert engine.profile("a") == {"id": "a", "c": "Z", "f": 2.5}
        # the stale row value written back by an upsert is a change, not a no-op
        engine.upsert_profiles([{"id": "a", "c": "A"}])
        assert engine.profile("a")["c"] == "A"
        assert engine.count({"field": "c", "op": "eq", "value": "A"}) == 1
