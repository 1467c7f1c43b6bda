"""Persistence: reopen gives the same answers; a killed writer leaves the store intact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from bitseg.index import store as store_module
from bitseg.index.engine import Engine
from bitseg.index.errors import StoreError

RULES = [
    {"field": "country", "op": "eq", "value": "DE"},
    {"field": "age", "op": "between", "value": [18, 40]},
    {"field": "ltv", "op": "gt", "value": 99.99},
    {"not": {"field": "tags", "op": "in", "value": ["vip", "x"]}},
    {"field": "birthday", "op": "anniversary_in", "value": {"next_days": 40}},
    {"field": "seen", "op": "gte", "value": "2026-01-01T00:00:00Z"},
    {"and": [{"field": "sub", "op": "eq", "value": True},
             {"not": {"field": "age", "op": "not_exists"}}]},
]
AS_OF = "2026-06-01T00:00:00Z"


def profiles(n: int, start: int = 0, shift: int = 0) -> list[dict]:
    countries = ["DE", "FR", "US", "PL"]
    out = []
    for i in range(start, start + n):
        p = {"id": f"u{i}", "country": countries[(i + shift) % 4], "sub": i % 3 == 0,
             "tags": ["vip"] if i % 5 == 0 else ["a", "b"][: i % 3],
             "ltv": round((i * 37 % 1000) / 7, 2) + shift,
             "birthday": f"19{50 + i % 50}-{1 + i % 12:02d}-{1 + i % 28:02d}",
             "seen": f"2026-0{1 + i % 5}-1{i % 10}T0{i % 10}:00:00Z"}
        if i % 7:
            p["age"] = 10 + (i * 13 + shift) % 60
        out.append(p)
    return out


def answers(engine: Engine) -> list:
    return [sorted(engine.members(r, as_of=AS_OF)) for r in RULES] + [engine.total()]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 ids, so a few hundred profiles span many stored chunks."""
    monkeypatch.setattr(store_module, "CHUNK_BITS", 4)


def test_reopen_gives_the_same_answers(tmp_path, small_chunks):
    path = tmp_path / "store"
    with Engine.open(path) as engine:
        engine.declare_schema({"profiles": {"ltv": "float"}})
        engine.upsert_profiles(profiles(300))
        engine.upsert_profiles(profiles(50, start=100, shift=1))  # updates across chunks
        engine.upsert_profiles([{"id": "u7", "age": None, "country": None}])
        engine.delete_profiles(["u3", "u250"])
        before = answers(engine)
        u7 = engine.profile("u7")
    with Engine.open(path) as engine:
        assert answers(engine) == before
        assert engine.profile("u7") == u7
        assert "age" not in u7 and "country" not in u7


def test_reopen_after_range_rebuild(tmp_path, small_chunks):
    """A value below the old base and a finer unit rebuild the range index; both persist."""
    path = tmp_path / "store"
    with Engine.open(path) as engine:
        engine.upsert_profiles([{"id": f"p{i}", "n": i * 100} for i in range(40)])
        engine.upsert_profiles([{"id": "neg", "n": -7}, {"id": "p5", "n": 3}])
        got = engine.members({"field": "n", "op": "lt", "value": 150})
    assert sorted(got) == ["neg", "p0", "p1", "p5"]
    with Engine.open(path) as engine:
        assert sorted(engine.members({"field": "n", "op": "lt", "value": 150})) == sorted(got)
        assert engine.members({"field": "n", "op": "eq", "value": 3}) == ["p5"]


CHILD = textwrap.dedent("""
    import sys, time
    from bitseg.index.engine import Engine
    engine = Engine.open(sys.argv[1])

    def records():
        for i in range(100_000):
            if i == 5_000:
                print("mid-batch", flush=True)
                time.sleep(60)
            yield {"id": f"new{i}", "country": "ZZ", "age": 99}
        yield {"id": "u1", "country": "ZZ"}

    engine.upsert_profiles(records())
""")


@pytest.mark.parametrize("bulk", [None, 1 << 26], ids=["plain", "bulk"])
def test_kill_during_a_batch_leaves_the_store_as_before(tmp_path, bulk):
    """Also in a bulk load, which writes straight into the memory map."""
    path = tmp_path / "store"
    with Engine.open(path, bulk=bulk) as engine:
        engine.upsert_profiles(profiles(200))
        before = answers(engine)
    script = CHILD.replace("Engine.open(sys.argv[1])", f"Engine.open(sys.argv[1], bulk={bulk})")
    child = subprocess.Popen([sys.executable, "-c", script, str(path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "mid-batch"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    with Engine.open(path) as engine:
        assert answers(engine) == before
        assert engine.count({"field": "country", "op": "eq", "value": "ZZ"}) == 0
        engine.upsert_profiles([{"id": "after", "country": "ZZ"}])  # still writable
        assert engine.members({"field": "country", "op": "eq", "value": "ZZ"}) == ["after"]


def test_a_bulk_load_reserves_what_it_needs_and_fails_whole_past_it(tmp_path, monkeypatch):
    path = tmp_path / "store"
    with Engine.open(path, bulk=1 << 20) as engine:
        engine.upsert_profiles(profiles(300))
        before = answers(engine)
    size = (path / "data.mdb").stat().st_size
    assert size <= 128 * store_module.MIB  # the reserve, not the 1 TiB address space
    monkeypatch.setattr(store_module, "BULK_HEADROOM", 1 << 20)  # a reserve far too small
    with Engine.open(path, bulk=0) as engine:
        big = [{"id": f"b{i}", "note": "x" * 2000} for i in range(2000)]  # ~4 MB of rows
        with pytest.raises(StoreError, match="outgrew the space this bulk load reserved"):
            engine.upsert_profiles(big)
        assert answers(engine) == before
    with Engine.open(path) as engine:  # an ordinary open reads what the bulk load wrote
        assert answers(engine) == before
        engine.upsert_profiles(big)  # and has the room
        assert engine.total() == 2300


def test_a_failed_batch_changes_nothing(tmp_path):
    with Engine.open(tmp_path / "store") as engine:
        engine.upsert_profiles(profiles(20))
        before = answers(engine)
        version = engine.snapshot.version
        with pytest.raises(Exception, match="record 3, field 'age'"):
            engine.upsert_profiles([{"id": "u1", "country": "ZZ"}, {"id": "n1", "age": 3},
                                    {"id": "n2", "age": "old"}])
        assert answers(engine) == before
        assert engine.snapshot.version == version
        assert engine.profile("u1")["country"] != "ZZ"
    with Engine.open(tmp_path / "store") as engine:
        assert answers(engine) == before


def test_a_folder_that_is_not_a_store_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(StoreError, match="not empty"):
        Engine.open(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        Engine.open(tmp_path / "file")


def test_timestamps_keep_their_precision_across_reopen(tmp_path):
    path = tmp_path / "store"
    with Engine.open(path) as engine:
        engine.upsert_profiles([{"id": "a", "t": "2026-01-01T00:00:00.000001Z"},
                                {"id": "b", "t": "2026-01-01T00:00:00Z"}])
    time.sleep(0)
    with Engine.open(path) as engine:
        rule = {"field": "t", "op": "gt", "value": "2026-01-01T00:00:00Z"}
        assert engine.members(rule) == ["a"]
        assert engine.profile("a")["t"] == "2026-01-01T00:00:00.000001Z"
