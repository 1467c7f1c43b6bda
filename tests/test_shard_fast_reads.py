"""The sharded front's fast reads (server/shard_graph.FastReads) without Ray: requests of
concurrent callers go out together, one batch at a time, each shard asked only for the
requests it is needed for; a shard's failure fails exactly the requests that needed it.

The shards here are plain functions behind a fake submit/wait: the batching and the
bookkeeping are what is tested; tests/test_shards.py runs the same class on Ray actors.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from bitseg.server.shard_graph import FastReads, Graph, ShardDied


class Unavailable(Exception):
    """The stand-in of ShardUnavailable."""


class FakeShards:
    """Shards answering (method, value) requests: "count" answers value + shard index,
    "boom" a shard's rule error as data. `gate` holds every batch until it is set;
    `dead` shards fail their waits; every batch a shard is sent is recorded."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.gate = threading.Event()
        self.gate.set()
        self.dead: set[int] = set()
        self.sent: list[tuple[int, list[tuple]]] = []
        self.lock = threading.Lock()

    def submit(self, index: int, requests: list[tuple]) -> Any:
        with self.lock:
            self.sent.append((index, list(requests)))
        return index, requests

    def wait(self, index: int, pending: Any) -> list[tuple[bool, Any]]:
        self.gate.wait(10)
        if index in self.dead:
            raise Unavailable(f"shard {index} is unavailable")
        _, requests = pending
        return [(True, value + index) if method == "count" else (False, ("rule", value))
                for _, method, value in requests]

    def unavailable(self, index: int, exc: BaseException) -> Exception:
        return Unavailable(f"shard {index} died: {exc}")

    def reads(self, graph: Any = None) -> FastReads:
        return FastReads(self.count, graph, self.submit, self.wait, self.unavailable)


def test_a_lone_caller_sends_its_request_at_once_to_every_shard_it_needs() -> None:
    shards = FakeShards(3)
    reads = shards.reads()
    assert reads.ask((None, "count", 10)) == [(True, 10), (True, 11), (True, 12)]
    assert reads.ask((2, "count", 5)) == [(True, None), (True, None), (True, 7)]
    assert [index for index, _ in shards.sent] == [0, 1, 2, 2]  # the second: shard 2 alone
    assert reads.batches == 2


def test_callers_arriving_while_a_batch_is_out_go_out_together_next() -> None:
    shards = FakeShards(2)
    reads = shards.reads()
    shards.gate.clear()
    answers: dict[int, Any] = {}

    def ask(k: int) -> None:
        answers[k] = reads.ask((None, "count", k))

    first = threading.Thread(target=ask, args=(100,))
    first.start()
    deadline = time.monotonic() + 10
    while len(shards.sent) < 2:  # the first batch is out, held by the gate
        assert time.monotonic() < deadline
        time.sleep(0.01)
    waiting = [threading.Thread(target=ask, args=(k,)) for k in range(6)]
    for thread in waiting:
        thread.start()
    while len(reads._queue) < 6:  # all six queued behind it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    shards.gate.set()
    for thread in [first, *waiting]:
        thread.join(10)
    assert answers == {k: [(True, k), (True, k + 1)] for k in [100, *range(6)]}
    assert reads.batches == 2
    second = [requests for index, requests in shards.sent[2:] if index == 0]
    assert len(second) == 1 and sorted(r[2] for r in second[0]) == list(range(6))


def test_a_rule_error_fails_its_own_request_only() -> None:
    shards = FakeShards(2)
    reads = shards.reads()
    found = reads.answers([(None, "count", 1), (None, "boom", "bad"), (1, "count", 3)])
    assert found == [[(True, 1), (True, 2)], [(False, ("rule", "bad"))] * 2,
                     [(True, None), (True, 4)]]


def test_a_dead_shard_fails_the_requests_that_needed_it_and_no_other() -> None:
    shards = FakeShards(3)
    shards.dead.add(1)
    reads = shards.reads()
    found = reads.answers([(None, "count", 1), (0, "count", 2), (1, "count", 3),
                           (2, "count", 4)])
    assert isinstance(found[0], Unavailable) and "shard 1" in str(found[0])
    assert found[1] == [(True, 2), (True, None), (True, None)]
    assert isinstance(found[2], Unavailable)
    assert found[3] == [(True, None), (True, None), (True, 6)]
    with pytest.raises(Unavailable, match="shard 1"):
        reads.ask((None, "count", 1))
    assert reads.ask((2, "count", 1)) == [(True, None), (True, None), (True, 3)]


class FakeGraph:
    """A compiled graph's stand-in: answers every batch, or fails as told."""

    def __init__(self, shards: FakeShards) -> None:
        self.shards = shards
        self.fail: BaseException | None = None
        self.runs = 0

    def run(self, requests: list[tuple]) -> list[list[tuple[bool, Any]]] | None:
        if self.fail is not None:
            fail, self.fail = self.fail, None
            if isinstance(fail, ShardDied):
                raise fail
            return None  # failed naming no shard: plain tasks answer
        self.runs += 1
        return [[(True, value + i) if shard in (None, i) else (True, None)
                 for shard, _, value in requests] for i in range(self.shards.count)]


def test_through_the_graph_and_back_to_tasks_when_it_fails() -> None:
    shards = FakeShards(2)
    graph = FakeGraph(shards)
    reads = shards.reads(graph)
    assert reads.ask((None, "count", 1)) == [(True, 1), (True, 2)]
    assert graph.runs == 1 and shards.sent == []
    graph.fail = RuntimeError("channels closed")
    assert reads.ask((None, "count", 1)) == [(True, 1), (True, 2)]  # by tasks
    assert [index for index, _ in shards.sent] == [0, 1]
    shards.sent.clear()
    graph.fail = ShardDied(0, RuntimeError("actor died"))
    found = reads.answers([(None, "count", 1), (1, "count", 2), (0, "count", 3)])
    assert isinstance(found[0], Unavailable) and "shard 0 died" in str(found[0])
    assert found[1] == [(True, None), (True, 3)]  # asked again by a task, of shard 1
    assert isinstance(found[2], Unavailable)
    assert shards.sent == [(1, [(1, "count", 2)])]


def test_a_batch_that_raises_fails_every_waiter_and_the_next_batch_goes_out() -> None:
    shards = FakeShards(1)
    reads = shards.reads()

    def broken(requests: list[tuple]) -> Any:
        raise MemoryError("out of memory")

    reads.answers = broken  # type: ignore[method-assign]
    with pytest.raises(MemoryError):
        reads.ask((None, "count", 1))
    del reads.answers
    assert reads.ask((None, "count", 1)) == [(True, 1)]


def test_a_batch_of_several_takes_tasks_and_keeps_the_graph_from_being_built() -> None:
    """The graph serves a lone caller: a batch of several requests is sent by tasks, and
    lone requests right after it do not start building the graph (its loops would spin
    beside the crowd's tasks)."""
    graph = Graph(ray=None, actors=[], idle=60.0, crowd=60.0)
    assert graph.run([(None, "count", 1), (None, "count", 2)]) is None
    for _ in range(3):
        assert graph.run([(None, "count", 1)]) is None
    assert graph._keeper is None and not graph.ready
