"""Group commit of streamed batches (server/service.py _batches): the messages that
arrive while a transaction runs are applied together, and each stays all or nothing.

The stream is a generator that sends its first message, waits until the first
transaction has begun, then sends the rest, and the first transaction waits for that:
the next transaction takes all the messages after the first.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from bitseg.index.engine import Engine
from bitseg.index.errors import DataError
from bitseg.loaders.columnar import group_block, texts_block
from bitseg.server import service
from bitseg.v1 import bitseg_pb2 as pb


class Context:
    """What _batches uses of a gRPC context: the trailing metadata."""

    def __init__(self) -> None:
        self.trailing: tuple = ()

    def set_trailing_metadata(self, metadata: tuple) -> None:
        self.trailing = metadata


def profiles(first: int, count: int, **extra: Any) -> pb.ProfileBatch:
    return pb.ProfileBatch(profiles_json=[
        orjson.dumps({"id": f"p{i}", "n": i, **extra}).decode()
        for i in range(first, first + count)])


def stream(messages: list[Any], started: threading.Event, sent: threading.Event):
    yield messages[0]
    assert started.wait(10)
    yield from messages[1:]
    sent.set()  # the helper thread asked for one more: every message has arrived


def grouped(engine: Engine, messages: list[Any], context: Context
            ) -> tuple[list[int], list[tuple[int, Any]]]:
    """Run _batches over the messages; (records per engine call, what it yielded)."""
    started, sent = threading.Event(), threading.Event()
    calls: list[int] = []

    def apply(items: list[Any]) -> Any:
        if not calls:
            started.set()
            assert sent.wait(10)
        calls.append(sum(item.rows for item in items))
        return engine.upsert_profiles(items)

    messages_sent = stream(messages, started, sent)
    return calls, list(service._batches(messages_sent, "profiles_json", apply, context))


def ids(engine: Engine) -> set[str]:
    return set(engine.members({"all": True}))


def test_the_messages_that_arrived_meanwhile_commit_in_one_transaction(tmp_path: Path
                                                                       ) -> None:
    messages = [profiles(first, 3) for first in range(0, 15, 3)]
    with Engine.open(tmp_path / "store") as engine:
        calls, results = grouped(engine, messages, Context())
        assert calls == [3, 12]  # the first alone, the four that waited behind it together
        assert [count for count, _ in results] == [1, 4]
        assert sum(report.created for _, report in results) == 15
        assert results[-1][1].version == engine.snapshot.version
        assert ids(engine) == {f"p{i}" for i in range(15)}


def test_a_bad_record_in_a_grouped_batch_keeps_exactly_the_batches_before_it(
        tmp_path: Path) -> None:
    bad = profiles(6, 3)
    bad.profiles_json[1] = orjson.dumps({"id": "p7", "n": "seven"}).decode()
    messages = [profiles(0, 3), profiles(3, 3), bad, profiles(9, 3), profiles(12, 3)]
    context = Context()
    with Engine.open(tmp_path / "store") as engine:
        with pytest.raises(DataError) as failed:
            grouped(engine, messages, context)
        assert str(failed.value) == ("batch 3 (2 before it committed): record 2, field 'n': "
                                     "expected an integer, got 'seven'")
        assert context.trailing == ((service.COMMITTED_KEY, "2"),)
        assert ids(engine) == {f"p{i}" for i in range(6)}  # batches 1 and 2, nothing after
        assert engine.profile("p3")["n"] == 3


def test_a_stream_error_comes_after_the_batches_before_it(tmp_path: Path) -> None:
    def broken():
        yield profiles(0, 2)
        yield profiles(2, 2)
        raise service.Cancelled("the client cancelled the stream")

    with Engine.open(tmp_path / "store") as engine:
        applied = []
        with pytest.raises(service.Cancelled):
            for result in service._batches(broken(), "profiles_json",
                                           engine.upsert_profiles, Context()):
                applied.append(result)
        assert sum(count for count, _ in applied) == 2
        assert ids(engine) == {"p0", "p1", "p2", "p3"}


def test_a_group_block_numbers_records_across_batches_and_parses_a_batch_whole() -> None:
    batches = [['{"id": "a", "n": 1}', '{"id": "b", "n": 2}'],
               ['{"id": "c", "n": 3}', '{"id": "d", "n": NaN}']]  # pyarrow reads NaN
    [block] = group_block(batches)
    assert block.rows == 4
    assert [(n, r["id"]) for n, r in block.records({1, 2})] == [(1, "a"), (2, "b")]
    with pytest.raises(DataError) as failed:  # record 3 is fine, but its batch is not
        list(block.records({3}))
    assert failed.value.line == 2  # as texts_block of that batch alone would name it


def test_texts_that_cannot_be_one_block_are_each_batch_as_texts_block_makes_it() -> None:
    batches = [['{"id": "a"}'], ['{"id":\n"b"}']]
    items = group_block(batches)
    assert len(items) == 2 and items[1] == (1, {"id": "b"})


def test_texts_sent_as_read_from_a_file_with_their_line_break_are_one_block() -> None:
    texts = ['{"id": "a", "n": 1}\n', '{"id": "b", "n": 2.5}\r\n', '{"id": "c"} \n']
    for items in (texts_block(texts), group_block([texts[:1], texts[1:]])):
        [block] = items
        assert block.table is not None and block.rows == 3  # the columnar path, not rows
        assert [r for _, r in block.records(None)] == [orjson.loads(t) for t in texts]


def test_an_empty_last_text_is_named_not_dropped() -> None:
    for texts in (['{"id": "a"}', ''], ['{"id": "a"}\n', '\n']):
        with pytest.raises(DataError) as failed:
            texts_block(texts)
        assert failed.value.line == 2 and "not valid JSON" in str(failed.value)


def test_a_text_with_a_line_break_inside_is_parsed_as_sent(tmp_path: Path) -> None:
    texts = ['{"id": "a",\n "n": 1}', '{"id": "b", "n": 2}\n']
    assert texts_block(texts) == [(1, {"id": "a", "n": 1}), (2, {"id": "b", "n": 2})]


def test_the_server_reads_a_bounded_number_of_messages_ahead(monkeypatch) -> None:
    """A client sending faster than batches are applied is held back (gRPC flow control
    works while the server does not read), not buffered whole in the server's memory;
    and the reading thread stops when the call ends early."""
    monkeypatch.setattr(service, "INBOX_MESSAGES", 4)
    pulled = []

    def endless():
        for i in range(10_000):
            pulled.append(i)
            yield profiles(i, 1)

    groups = service._arrived(endless(), "profiles_json")
    first = next(groups)
    threading.Event().wait(0.5)  # time for the reader to run ahead as far as it may
    # the group handed out, a full inbox, and one message waiting to go in
    assert len(first) + 4 <= len(pulled) <= len(first) + 4 + 1
    groups.close()  # the call ends (e.g. a bad batch): the reader stops reading
    threading.Event().wait(0.5)
    stopped_at = len(pulled)
    threading.Event().wait(0.3)
    assert len(pulled) == stopped_at < 100
