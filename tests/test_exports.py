"""Exports: the rows written equal the members having the required fields; a crash
between writing and renaming leaves the previous file whole; schedules survive a
restart and write numbered or rotating files."""

from __future__ import annotations

import csv
import json
import random

import pytest

from bitseg.index import exports
from bitseg.index.engine import Engine
from bitseg.index.errors import BitsegError, NotFound
from bitseg.index.exports import Exports, ExportScheduler, export
from bitseg.index.segments import open_segments

SCHEMA = {"profiles": {"country": "keyword", "tags": "keywords", "age": "int",
                       "email": "keyword"}}
RULE = {"field": "country", "op": "in", "value": ["DE", "FR"]}


def profiles(seed: int, n: int = 200) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p: dict = {"id": f"u{i}", "country": rng.choice(["DE", "FR", "US"])}
        if rng.random() < 0.6:
            p["email"] = f"u{i}@example.com"
        if rng.random() < 0.7:
            p["age"] = rng.randint(18, 80)
        if rng.random() < 0.5:
            p["tags"] = rng.sample(["vip", "news"], rng.randint(1, 2))
        out.append(p)
    return out


@pytest.fixture
def engine(tmp_path):
    e = Engine.open(tmp_path / "store")
    e.declare_schema(SCHEMA)
    yield e
    e.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_exported_rows_are_the_members_with_the_required_fields(engine, tmp_path, seed, fmt):
    rows = profiles(seed)
    engine.upsert_profiles(rows)
    out = tmp_path / f"out.{fmt}"
    done = export(engine, RULE, out, ["email", "age", "tags"], ["email", "age"], fmt)
    members = [p for p in rows if p["country"] in ("DE", "FR")]
    wanted = [p for p in members if "email" in p and "age" in p]
    assert (done.rows, done.members) == (len(wanted), len(members))
    if fmt == "jsonl":
        got = [json.loads(line) for line in out.read_text().splitlines()]
        assert got == [{"id": p["id"], "email": p["email"], "age": p["age"],
                        "tags": sorted(p["tags"]) if "tags" in p else None} for p in wanted]
    else:
        got = list(csv.reader(out.open()))
        assert got[0] == ["id", "email", "age", "tags"]
        assert got[1:] == [[p["id"], p["email"], str(p["age"]), ";".join(sorted(p.get("tags", [])))]
                           for p in wanted]
    assert not (tmp_path / f"out.{fmt}.tmp").exists()


def test_bad_export_requests(engine, tmp_path):
    engine.upsert_profiles(profiles(1, 10))
    with pytest.raises(BitsegError, match="format: expected csv or jsonl"):
        export(engine, RULE, tmp_path / "x", ["age"], [], "xml")
    with pytest.raises(BitsegError, match="require: unknown profile field 'nope'"):
        export(engine, RULE, tmp_path / "x", ["age"], ["nope"], "csv")
    assert not (tmp_path / "x").exists()


def test_a_crash_between_write_and_rename_leaves_the_previous_file(engine, tmp_path,
                                                                   monkeypatch):
    engine.upsert_profiles(profiles(1))
    out = tmp_path / "out.csv"
    export(engine, RULE, out, ["email"], [], "csv")
    before = out.read_bytes()
    engine.upsert_profiles([{"id": "new", "country": "DE", "email": "n@x"}])

    def crash(src, dst):
        raise KeyboardInterrupt  # the process dies after writing, before the rename

    monkeypatch.setattr(exports.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        export(engine, RULE, out, ["email"], [], "csv")
    assert out.read_bytes() == before
    monkeypatch.undo()
    export(engine, RULE, out, ["email"], [], "csv")
    assert b"new,n@x" in out.read_bytes()


def test_schedules_survive_a_restart_and_write_numbered_or_rotating_files(tmp_path):
    path, out = tmp_path / "store", tmp_path / "out"
    with Engine.open(path) as engine:
        engine.declare_schema(SCHEMA)
        engine.upsert_profiles(profiles(4, 50))
        open_segments(engine).create("fr", "dynamic",
                                     rule={"field": "country", "op": "eq", "value": "FR"})
        ex = Exports(engine)
        numbered = ex.create("fr", 60, ["email"], ["email"], "jsonl", str(out))
        rotating = ex.create("fr", 60, ["age"], [], "csv", str(out), rotate=True)
        with pytest.raises(NotFound):
            ex.create("nope", 60, [], [], "csv", str(out))
        with pytest.raises(BitsegError, match="absolute directory"):
            ex.create("fr", 60, [], [], "csv", "relative")
    with Engine.open(path) as engine:
        open_segments(engine)
        ex = Exports(engine)
        assert [s.id for s in ex.list()] == [numbered.id, rotating.id]
        scheduler = ExportScheduler(ex)
        t0 = 10**15
        assert scheduler.run_once(t0) == [numbered.id, rotating.id]
        assert scheduler.run_once(t0 + 30 * 10**6) == []  # not due yet
        assert scheduler.run_once(t0 + 60 * 10**6) == [numbered.id, rotating.id]
        names = sorted(p.name for p in out.iterdir())
        assert names == ["fr-000001.jsonl", "fr-000002.jsonl", "fr.csv"]
        fr = [p for p in profiles(4, 50) if p["country"] == "FR"]
        lines = (out / "fr-000002.jsonl").read_text().splitlines()
        assert [json.loads(x)["id"] for x in lines] == [p["id"] for p in fr if "email" in p]
        assert ex.get(numbered.id).runs == 2
        assert ex.get(rotating.id).last_rows == len(fr)
        ex.delete(numbered.id)
        with pytest.raises(NotFound):
            ex.delete(numbered.id)
    with Engine.open(path) as engine:
        assert [s.id for s in Exports(engine).list()] == [rotating.id]


def test_a_scheduled_export_a_shard_does_not_answer_is_said_once_and_run_when_it_does(
        engine, tmp_path, monkeypatch, caplog):
    """Under `serve --shards` an export fails while a shard's process is down (Ray
    restarts it): one warning without a traceback, the schedule stays due and runs on the
    first tick the shard answers again."""
    import logging

    from bitseg.server.service import ShardUnavailable

    engine.upsert_profiles(profiles(5, 20))
    open_segments(engine).create("fr", "dynamic",
                                 rule={"field": "country", "op": "eq", "value": "FR"})
    ex = Exports(engine)
    made = ex.create("fr", 60, ["email"], [], "jsonl", str(tmp_path / "out"))
    run = ex.run
    down = [True]

    def maybe(schedule, now_us):
        if down[0]:
            raise ShardUnavailable("shard 1 (/db/shard-1) is unavailable: actor died")
        return run(schedule, now_us)

    monkeypatch.setattr(ex, "run", maybe)
    scheduler = ExportScheduler(ex)
    t0 = 10**15
    with caplog.at_level(logging.INFO, logger="bitseg.exports"):
        assert [scheduler.run_once(t0 + k * 10**6) for k in range(3)] == [[], [], []]
        down[0] = False
        assert scheduler.run_once(t0 + 3 * 10**6) == [made.id]
    said = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and said[0].exc_info is None and "shard 1" in said[0].getMessage()
    assert ex.get(made.id).runs == 1
