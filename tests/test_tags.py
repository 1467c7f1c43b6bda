"""Tags on segments at the engine level: validation, add/remove, the list filter, and
tags kept in LMDB across a reopen (an older store's definitions have none)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from bitseg.index import keys
from bitseg.index import segments as segments_module
from bitseg.index.engine import Engine
from bitseg.index.errors import BitsegError, NotFound
from bitseg.index.segments import Segments, open_segments
from bitseg.index.tags import MAX_TAGS

PROFILES = [{"id": f"p{i}", "n": i} for i in range(20)]
SMALL = {"field": "n", "op": "lt", "value": 5}


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    with Engine.open(tmp_path / "db") as eng:
        eng.upsert_profiles(PROFILES)
        yield eng


@pytest.fixture()
def segs(engine: Engine) -> Segments:
    return open_segments(engine)


def names(infos: list) -> list[str]:
    return [info.name for info in infos]


def test_create_with_tags_then_add_remove_and_filter(segs: Segments) -> None:
    info, _ = segs.create("small", "dynamic", rule=SMALL, tags=["q3", "email", "q3"])
    assert info.tags == ("email", "q3")  # a set: deduplicated, sorted
    segs.create("big", "materialized", rule={"field": "n", "op": "gte", "value": 15})
    segs.create("picked", "static", ids=["p1", "p2"], tags=["email"])
    assert segs.get("big").tags == ()

    assert segs.retag("big", add=["email", "Team:growth"]).tags == ("Team:growth", "email")
    assert names(segs.list(tag="email")) == ["big", "picked", "small"]
    assert names(segs.list(tag="Team:growth")) == ["big"]
    assert names(segs.list(tag="team:growth")) == []  # compared exactly
    assert names(segs.list(tag="nobody")) == []

    assert segs.retag("small", remove=["email", "absent"]).tags == ("q3",)
    assert names(segs.list(tag="email")) == ["big", "picked"]
    # members do not move and no history point is recorded by a tag change
    assert segs.get("picked").size == 2 and segs.get("big").size == 5
    assert [p.cause for p in segs.history("big")] == ["create"]


@pytest.mark.parametrize("bad", ["", "x" * 65, "has space", "ümlaut", "a/b", 7])
def test_bad_tags_are_refused_and_change_nothing(segs: Segments, bad: object) -> None:
    segs.create("s", "dynamic", rule=SMALL, tags=["ok"])
    with pytest.raises(BitsegError, match=r"tags\[1\]: expected 1-64 characters"):
        segs.retag("s", add=["fine", bad])  # type: ignore[list-item]
    with pytest.raises(BitsegError, match="expected 1-64 characters"):
        segs.create("t", "dynamic", rule=SMALL, tags=[bad])  # type: ignore[list-item]
    with pytest.raises(BitsegError, match="expected 1-64 characters"):
        segs.list(tag=bad)  # type: ignore[arg-type]
    assert segs.get("s").tags == ("ok",)
    assert "t" not in segs.current


def test_at_most_32_tags(segs: Segments) -> None:
    segs.create("s", "dynamic", rule=SMALL, tags=[f"t{i}" for i in range(MAX_TAGS)])
    segs.retag("s", add=["t0"])  # already there: still 32
    with pytest.raises(BitsegError, match="at most 32 tags; this would make 33"):
        segs.retag("s", add=["one-more"])
    assert len(segs.get("s").tags) == MAX_TAGS
    # the limit holds for the result: adding one while removing another is fine
    assert "one-more" in segs.retag("s", add=["one-more"], remove=["t0"]).tags
    with pytest.raises(BitsegError, match="at most 32"):
        segs.create("u", "dynamic", rule=SMALL, tags=[f"t{i}" for i in range(MAX_TAGS + 1)])


def test_unknown_segment(segs: Segments) -> None:
    with pytest.raises(NotFound):
        segs.retag("nope", add=["a"])


def test_tags_survive_a_reopen_and_old_stores_have_none(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "db") as engine:
        engine.upsert_profiles(PROFILES)
        segs = open_segments(engine)
        segs.create("a", "static", ids=["p1"], tags=["x", "y"])
        segs.create("b", "materialized", rule=SMALL, tags=["y"])
        segs.create("old", "dynamic", rule=SMALL)
        segs.retag("a", remove=["x"])
        # write "old" as an older version did: a definition without the key
        key = keys.segment_key("old")
        with engine.store.write() as txn:
            data = orjson.loads(bytes(engine.store.get(txn, segments_module.DB, key)))
            del data["tags"]
            engine.store.put(txn, segments_module.DB, key, orjson.dumps(data))
    with Engine.open(tmp_path / "db") as engine:
        segs = open_segments(engine)
        assert segs.get("a").tags == ("y",) and segs.get("a").size == 1
        assert segs.get("b").tags == ("y",) and segs.get("b").size == 5
        assert segs.get("old").tags == ()
        assert names(segs.list(tag="y")) == ["a", "b"]
        segs.refresh("b")  # a membership change keeps the tags
        assert segs.get("b").tags == ("y",)
