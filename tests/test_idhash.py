"""index/idhash.py: batches find external ids in a hash table of the IdMap, exactly as
LMDB would (each hit checked against the id's name, the rest asked of LMDB)."""

from __future__ import annotations

import time
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitseg.index import batch, idhash
from bitseg.index.engine import Engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    with Engine.open(tmp_path_factory.mktemp("idhash") / "store") as engine:
        engine.declare_schema({"profiles": {"n": "int"}})
        names = [f"u{i}" for i in range(300)] + ["é-ü", "a\x00b", "x" * 400, "a", "ab"]
        engine.upsert_profiles([{"id": name, "n": i} for i, name in enumerate(names)])
        engine.delete_profiles(["u7", "u8"])
        engine.upsert_profiles([{"id": "u8", "n": 8}])  # u8 again: a second dense id
        yield engine


ASKED = st.lists(st.one_of(st.sampled_from(["u0", "u7", "u8", "u299", "é-ü", "a\x00b", "x" * 400,
                                            "a", "ab", "", "x" * 401, "u300", "b", "a\x00"]),
                           st.integers(0, 400).map(lambda i: f"u{i}")), max_size=80)


def _live(engine: Engine):
    return lambda dense: batch.within(engine.snapshot.live, dense)


def _by_lmdb(engine: Engine, asked: list[str]) -> list[int]:
    return engine.ids.lookup_many(asked, engine.snapshot.reader).tolist()


@settings(max_examples=40, deadline=None)
@given(asked=ASKED, collide=st.booleans())
def test_the_table_answers_as_lmdb(engine, asked, collide):
    """collide: every name hashes alike, so each hit but one fails its name check and is
    asked of LMDB."""
    same = (lambda blob, offsets: np.zeros(len(offsets) - 1, dtype=np.uint64)) if collide \
        else idhash.hashes
    idhash._TABLES.clear()
    with mock.patch.object(idhash, "SYNC", True), mock.patch.object(idhash, "hashes", same):
        got = idhash.lookup_many(engine.ids, asked, engine.snapshot.reader, _live(engine))
        got = got.tolist()
        members = batch.is_member_many(engine, asked, {"field": "n", "op": "gte", "value": 3})
    assert got == _by_lmdb(engine, asked)
    live = {i for i in asked if i and len(i.encode()) <= 400 and i != "u7"
            and (i in ("é-ü", "a\x00b", "x" * 400, "a", "ab") or
                 (i[1:].isdigit() and int(i[1:]) < 300))}
    assert members.unknown == [i for i in asked if i not in live]
    idhash._TABLES.clear()


def test_hashes_tell_lengths_and_bytes_apart():
    names = [b"", b"a", b"a\x00", b"ab", b"ba", "é".encode(), b"x" * 600]
    offsets = np.concatenate(([0], np.cumsum([len(n) for n in names])))
    together = idhash.hashes(b"".join(names), offsets)
    assert len(set(together.tolist())) == len(names)
    for name, h in zip(names, together.tolist(), strict=True):  # alone, as in a batch
        assert idhash.hashes(name, np.array([0, len(name)]))[0] == h


def test_the_table_is_made_in_the_background(engine):
    """The first batch of an IdMap asks LMDB and starts the table; later ones use it."""
    idhash._TABLES.clear()
    assert idhash.table(engine.ids) is None
    for _ in range(200):
        if engine.ids in idhash._TABLES:
            break
        time.sleep(0.01)
    table = idhash.table(engine.ids)
    assert table is not None and len(table.hashes) == engine.ids.count
    assert idhash.lookup_many(engine.ids, ["u5", "nope", "u7"], engine.snapshot.reader,
                              _live(engine)).tolist() == [engine.ids.lookup("u5"), -1, -1]
