"""Streamed events take the columnar path whole (issue 14, session 8).

A batch adds its counts to the buckets already stored by reading them back into runs
(index/event_merge.py) and merging in numpy; these tests check that reading against
pyroaring's own, and that a stream of many batches stores the counts one batch of all
its events stores.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from storecmp import store_entries

from bitseg.index import event_batch
from bitseg.index.engine import Engine
from bitseg.index.errors import DataError, StoreError
from bitseg.index.event_counts import add_counts, count_index, decode_counts, encode_counts
from bitseg.index.event_merge import merged, stored_runs
from bitseg.loaders.columnar import texts_block


def _bucket(shape: str, low: int, size: int, rng: random.Random) -> list[int]:
    if shape == "few":
        chosen = {low + rng.randrange(200_000) for _ in range(min(size, 8))}
    elif shape == "consecutive":  # a run container
        chosen = set(range(low, low + size))
    elif shape == "dense":  # a bitset container, once past 4,096 ids in one
        chosen = {low + rng.randrange(70_000) for _ in range(size)}
    else:
        chosen = {rng.randrange(2**32) for _ in range(min(size, 60))}
    return sorted(v for v in chosen if v < 2**32)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["few", "consecutive", "dense", "wide"]),
                          st.integers(0, 2**32 - 70_000), st.integers(1, 9_000),
                          st.booleans(), st.randoms(use_true_random=False)),
                min_size=1, max_size=10))
def test_stored_buckets_read_back_as_runs_are_the_counts_they_hold(
        buckets: list[tuple[str, int, int, bool, Any]]) -> None:
    """Every layout pyroaring writes — arrays, bitsets, runs, and a sum made with
    bitmaps as older batches stored it — reads back as its profiles and counts."""
    raws, expected = [], []
    for shape, low, size, summed, rng in buckets:
        ids = np.array(_bucket(shape, low, size, rng), dtype=np.int64)
        counts = np.array([rng.choice([1, 1, 2, 3, 9, 300]) for _ in ids], dtype=np.int64)
        index = count_index(ids, counts)
        if summed:  # as add_counts leaves it: not the layout count_index builds
            index = add_counts(index, count_index(ids[:5], np.ones(len(ids[:5]), np.int64)))
            counts[:5] += 1
        raws.append(encode_counts(index))
        expected.append((ids.tolist(), counts.tolist()))
    bounds, ids, counts = stored_runs(raws)
    assert [(ids[a:b].tolist(), counts[a:b].tolist())
            for a, b in zip(bounds[:-1], bounds[1:], strict=True)] == expected


def test_runs_merged_add_the_counts_of_a_profile_in_both() -> None:
    bounds, ids, counts = merged(np.array([0, 2, 2, 3]), np.array([1, 5, 7]),
                                 np.array([1, 2, 3]),
                                 np.array([0, 2, 3, 3]), np.array([0, 5, 9]),
                                 np.array([4, 1, 1]))
    assert bounds.tolist() == [0, 3, 4, 5]
    assert ids.tolist() == [0, 1, 5, 9, 7]
    assert counts.tolist() == [4, 1, 3, 1, 3]


def test_a_bucket_whose_parts_overrun_its_bytes_is_a_store_error() -> None:
    raw = encode_counts(count_index(np.array([3, 4]), np.array([1, 2])))
    with pytest.raises(StoreError):
        stored_runs([raw[:-3]])


def _events(count: int, seed: int) -> list[str]:
    """Events of 300 profiles over 40 days, with keyword, bool and number properties."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        event = {"profile": f"u{rng.randrange(300)}", "event": rng.choice(["view", "buy"]),
                 "ts": f"2026-{rng.choice(['09', '10'])}-{rng.randrange(1, 21):02d}T"
                       f"{rng.randrange(24):02d}:00:00Z",
                 "page": rng.choice(["/", "/a", "/b"]), "vip": rng.random() < 0.3,
                 "n": rng.randrange(5)}
        out.append(orjson.dumps(event).decode())
    return out


def _counts(store: Path) -> dict[bytes, bytes]:
    return {key: raw for key, raw in store_entries(store)["events"].items()
            if key.startswith(b"c")}


@pytest.mark.parametrize(("merge_bytes", "put_items"), [
    (event_batch.MERGE_BYTES, event_batch.PUT_ITEMS), (0, event_batch.PUT_ITEMS),
    (event_batch.MERGE_BYTES, 7)])
def test_events_streamed_in_many_batches_store_the_counts_of_one_batch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, merge_bytes: int,
        put_items: int) -> None:
    """Each batch adds to the buckets the ones before it stored: in the end every
    count bucket holds what one batch of all the events writes, merged in numpy or
    (merge_bytes 0) every one with bitmaps, the stored ones read PUT_ITEMS at a time.
    (Not always the same bytes: a bucket whose stored bitmap has a run container is
    added to with bitmaps, which keep it.)"""
    monkeypatch.setattr(event_batch, "MERGE_BYTES", merge_bytes)
    monkeypatch.setattr(event_batch, "PUT_ITEMS", put_items)
    read_back: list[int] = []
    monkeypatch.setattr(event_batch, "stored_runs",
                        lambda raws: read_back.append(sum(map(bool, raws))) or stored_runs(raws))
    texts = _events(6_000, seed=7)
    with Engine.open(tmp_path / "one") as engine:
        engine.track_events(texts_block(texts))
    with Engine.open(tmp_path / "many") as engine:
        for first in range(0, len(texts), 1_000):
            engine.track_events(texts_block(texts[first:first + 1_000]))
    one, many = _counts(tmp_path / "one"), _counts(tmp_path / "many")
    assert one.keys() == many.keys()
    decoded = {key: (list(index.exists), [list(s) for s in index.slices])
               for key, index in ((k, decode_counts(v)) for k, v in many.items())}
    assert decoded == {key: (list(index.exists), [list(s) for s in index.slices])
                       for key, index in ((k, decode_counts(v)) for k, v in one.items())}
    assert (sum(read_back) > 100) == (merge_bytes > 0)  # the path this case is about


# ------------------------------------------------------------------ streams
def _event_batch(first: int, count: int) -> Any:
    from bitseg.v1 import bitseg_pb2 as pb
    return pb.EventBatch(events_json=[
        orjson.dumps({"profile": f"u{i}", "event": "view", "ts": "2026-10-01T10:00:00Z",
                      "page": "/"}).decode() for i in range(first, first + count)])


def test_a_streamed_message_is_parsed_and_prepared_on_the_thread_reading_the_stream(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the file loader's reader thread does for a block, the stream's reading
    thread does for a message while the one before is applied; the engine gets the
    prepared blocks, a group's records numbered on across its messages."""
    import threading

    from test_group_commit import Context, stream

    from bitseg.loaders import columnar
    from bitseg.server import service

    threads: list[str] = []
    original = columnar.decoded

    def spy(texts: Any, kind: str) -> list[Any]:
        threads.append(threading.current_thread().name)
        return original(texts, kind)

    monkeypatch.setattr(service, "decoded", spy)
    started, sent = threading.Event(), threading.Event()
    applied: list[list[Any]] = []
    with Engine.open(tmp_path / "store") as engine:
        def apply(items: list[Any]) -> Any:
            if not applied:
                started.set()
                assert sent.wait(10)
            applied.append(items)
            return engine.track_events(items)

        messages = [_event_batch(first, 3) for first in range(0, 12, 3)]
        results = list(service._batches(stream(messages, started, sent), "events_json",
                                        apply, Context()))
        assert [count for count, _ in results] == [1, 3]
        assert engine.count({"event": "view"}) == 12
    assert threads == ["bitseg-group-events_json"] * 4
    assert all(block.prepared for items in applied for block in items)
    assert [block.first_line for block in applied[1]] == [1, 4, 7]
    assert [n for n, _ in applied[1][2].records(None)] == [7, 8, 9]


def test_a_message_that_is_not_json_is_named_after_the_batches_before_it(
        tmp_path: Path) -> None:
    import threading

    from test_group_commit import Context, stream

    from bitseg.server import service

    bad = _event_batch(6, 3)
    bad.events_json[1] = '{"profile": "u7", "event": '
    messages = [_event_batch(0, 3), _event_batch(3, 3), bad, _event_batch(9, 3)]
    context = Context()
    started, sent = threading.Event(), threading.Event()
    with Engine.open(tmp_path / "store") as engine:
        def apply(items: list[Any]) -> Any:
            started.set()
            return engine.track_events(items)

        with pytest.raises(DataError) as failed:
            list(service._batches(stream(messages, started, sent), "events_json", apply,
                                  context))
        assert str(failed.value).startswith("batch 3 (2 before it committed): record 2")
        assert context.trailing == ((service.COMMITTED_KEY, "2"),)
        assert engine.count({"event": "view"}) == 6


def test_a_files_lines_sent_as_read_are_one_block_as_they_are() -> None:
    """Lines read from a file keep their line break; joined as they are they are the
    block (the usual stream), and its records are the texts as sent."""
    from bitseg.loaders.columnar import _lines_of, _read_lines

    texts = ['{"id": "a", "n": 1}\n', '{"id": "b", "n": 2.5}\n', '{"id": "é"}\n']
    assert _lines_of(texts[:2]) == "".join(texts[:2]).encode()
    assert _lines_of(texts) == '{"id": "a", "n": 1}\n{"id": "b", "n": 2.5}\n{"id": "é"}'.encode()
    [block] = texts_block(texts[:2])
    assert block.rows == 2 and [r for _, r in block.records(None)] == [
        {"id": "a", "n": 1}, {"id": "b", "n": 2.5}]
    for odd in (['{"id": "a"}\n', ' \n'], ['{"id": "a"}\n', '{"id":\n"b"}\n'],
                ['{"id": "a"}\n', '{"id": "b"}'], ['{"id": "a"}\n', '\n']):
        assert _read_lines(odd) is None  # the general way decides


def test_a_streamed_profile_batch_with_a_ts_field_stores_what_its_records_store(
        tmp_path: Path) -> None:
    """A stream's profile batch is parsed as a profile file's block is (no "ts" column
    of the events' schema): given, null, spelt with an escape or absent, "ts" is a field
    like any other, as one record at a time stores it."""
    from bitseg.loaders.columnar import decoded

    batches = [['{"id":"u1","ts":"a","age":1}', '{"id":"u2","age":2}'],
               ['{"id":"u1","ts":null}', '{"id":"u3","\\u0074s":"b"}'],
               ['{"id":"u2","age":5}', '{"id":"u3","ts":null}', '{"id":"u4","ts":"c"}']]
    for name, items_of in (("blocks", lambda texts: decoded(texts, "profiles")),
                           ("records", lambda texts: [orjson.loads(t) for t in texts])):
        with Engine.open(tmp_path / name) as engine:
            for texts in batches:
                engine.upsert_profiles(items_of(texts))
            assert engine.members({"field": "ts", "op": "exists"}) == ["u4"]
    assert store_entries(tmp_path / "blocks") == store_entries(tmp_path / "records")
