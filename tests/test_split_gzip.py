"""`load --shards` on a disk without room for a plain copy: the split's copies gzip'd.

The copies must hold exactly the lines a plain split writes, and the shards loaded from
them must answer as the plain ones (test_shards checks that an error still names the
input's file and line, with either copies).
"""

from __future__ import annotations

import gzip
from pathlib import Path

from test_shards import AS_OF, make_dataset

from bitseg.index.engine import Engine
from bitseg.loaders.split import input_bytes, shard_folder, split_dataset
from bitseg.server.shard_store import _short_of_disk, load_sharded

RULES = [{"all": True}, {"event": "view"}, {"field": "kw", "op": "exists"},
         {"orders": {"field": "status", "op": "eq", "value": "paid"}}]


def test_gzipped_copies_hold_the_plain_copies_lines(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data", seed=21)
    plain_split = split_dataset(tmp_path / "data", 3, tmp_path / "plain")
    packed_split = split_dataset(tmp_path / "data", 3, tmp_path / "gz", compress=True)
    assert packed_split == plain_split  # the same lines, and bytes counted uncompressed
    assert plain_split.shard_bytes == [
        sum(f.stat().st_size for f in shard_folder(tmp_path / "plain", s).glob("*.jsonl"))
        for s in range(3)]
    for s in range(3):
        plain, packed = shard_folder(tmp_path / "plain", s), shard_folder(tmp_path / "gz", s)
        assert sorted(p.name for p in packed.iterdir()) == [
            "events.jsonl.gz", "orders.jsonl.gz", "profiles.jsonl.gz", "schema.json"]
        for name in ("profiles", "events", "orders"):
            copied = gzip.decompress((packed / f"{name}.jsonl.gz").read_bytes())
            assert copied == (plain / f"{name}.jsonl").read_bytes()
            assert copied  # every shard got lines of every file at this size


def _answers(db: Path, shards: int) -> list[list[int]]:
    found = []
    for s in range(shards):
        with Engine.open(shard_folder(db, s), readonly=True) as engine:
            found.append([engine.count(rule, as_of=AS_OF) for rule in RULES])
    return found


def test_shards_loaded_from_gzipped_copies_answer_as_plain_ones(tmp_path: Path) -> None:
    records = make_dataset(tmp_path / "data", seed=22)
    load_sharded(tmp_path / "data", tmp_path / "plain", 2, compress=False)
    load_sharded(tmp_path / "data", tmp_path / "gz", 2, compress=True)
    packed = _answers(tmp_path / "gz", 2)
    assert packed == _answers(tmp_path / "plain", 2)
    assert sum(p[0] for p in packed) == len(records["profiles"]) + any(
        e["profile"] == "ghost" for e in records["events"])


def test_the_split_is_gzipped_only_when_the_disk_is_short(tmp_path: Path) -> None:
    make_dataset(tmp_path / "data", seed=24, profiles=10)
    size = input_bytes(tmp_path / "data")
    assert size == sum(f.stat().st_size for f in (tmp_path / "data").glob("*.jsonl"))
    assert not _short_of_disk(tmp_path / "no" / "such" / "db", size, 2)  # its parent's disk
    assert _short_of_disk(tmp_path / "db", 10**18, 2)  # no disk has half an exabyte free
