"""The fast path of the hot fan-out reads (Count, IsMember) over shard actors on Ray:
concurrent callers' requests sent together, through Ray's compiled graph when it is up.

Batches (`FastReads`). A plain actor call costs the actor ~1-3 ms of CPU beyond the work
it carries and the front a task submission per shard, whatever the shards do; with 8
clients counting at once on a 2-core machine that overhead, not the evaluations, was
most of the CPU (RESULTS.md, issue 16 at 10M). So one request at a time is out to the
shards: whoever asks while none is out sends it at once (a lone caller waits for
nothing), and the requests that come while one is out wait for it and then go out
together, as one batch: one actor task per shard for all of them. Each
shard answers every request of the batch that is for it, in order, each with its own
answer or its own error (a bad rule fails its caller alone).

The graph (`Graph`) serves a lone caller. A compiled graph (`ray.dag`,
`experimental_compile`) starts one loop in each actor (in Ray's system concurrency group,
so the actor's own threads still take every other call) and passes a request and the
answers through shared-memory channels: ~0.2-0.5 ms for two actors, against ~1.1-1.8 ms
by tasks. But its loops spin while they wait, in the actors (0.4-0.9 of a core per idle
actor) and in the front reading the answers (at 10M with 8 clients the front spent
2.0 ms of CPU a request with the graph and 1.1 ms with tasks, and served 275 against 423
Counts a second). So the graph is built when a second lone request comes within
GRAPH_IDLE_SECONDS of the one before, in a thread of its own (requests meanwhile take
tasks), and torn down after GRAPH_IDLE_SECONDS without one; a batch of more than one
request goes by tasks, tears the graph down, and keeps it down for CROWD_SECONDS.
`execute` is not thread-safe: FastReads never has two batches out, and a request that
finds the graph being torn down takes tasks.

Failures. A dead actor closes the graph's channels. When Ray names it, the requests of
the batch that needed that shard fail with ShardUnavailable naming it, and the others are
asked again by plain tasks; a graph failure that names no shard asks the whole batch
again by plain tasks, which name the shard or, once Ray has restarted it, answer. The
graph is then dropped and built again by later batches. A shard's answer is never taken
from a run that failed, so no count is summed from fewer shards than there are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

GRAPH_IDLE_SECONDS = 2.0
CROWD_SECONDS = 10.0

Answer = tuple[bool, Any]  # a shard's (True, value) or (False, its error as data)
Request = tuple  # (shard index or None for every shard, method, *args)


class ShardDied(Exception):
    """Ray named the actor of shard `index` as dead under a graph run."""

    def __init__(self, index: int, cause: BaseException) -> None:
        super().__init__(index)
        self.index, self.cause = index, cause


def wants(request: Request, shard: int) -> bool:
    """Whether the request needs that shard's answer."""
    return request[0] is None or request[0] == shard


class _Waiter:
    __slots__ = ("request", "outcome")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.outcome: list[Answer] | BaseException | None = None


class FastReads:
    """Count and IsMember requests, sent to the shards one batch at a time.

    `submit(i, requests)` starts shard i's answers to a batch (a pending handle) and
    `wait(i, pending)` returns them, or raises ShardUnavailable naming shard i."""

    def __init__(self, count: int, graph: Graph | None,
                 submit: Callable[[int, list[Request]], Any],
                 wait: Callable[[int, Any], list[Answer]],
                 unavailable: Callable[[int, BaseException], Exception]) -> None:
        self.count = count
        self.graph = graph
        self._submit, self._wait, self._unavailable = submit, wait, unavailable
        self._lock = threading.Condition()
        self._queue: list[_Waiter] = []
        self._out = False  # a batch is out to the shards
        self.batches = 0  # how many were sent (tests and benchmarks read it)

    def ask(self, request: Request) -> list[Answer]:
        """Every shard's answer to the request ((True, None) from a shard it is not
        for); raises ShardUnavailable when a shard it needs died under it."""
        mine = _Waiter(request)
        with self._lock:
            self._queue.append(mine)
            while mine.outcome is None and self._out:
                self._lock.wait()
            batch = None
            if mine.outcome is None:  # nothing out: this caller sends what waits
                batch, self._queue, self._out = self._queue, [], True
        if batch is not None:
            self._send(batch)
        outcome = mine.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        assert outcome is not None
        return outcome

    def _send(self, batch: list[_Waiter]) -> None:
        outcomes: list[list[Answer] | BaseException]
        try:
            outcomes = self.answers([w.request for w in batch])
        except BaseException as exc:  # every waiter learns it, none waits forever
            outcomes = [exc] * len(batch)
        with self._lock:
            for waiter, outcome in zip(batch, outcomes, strict=True):
                waiter.outcome = outcome
            self._out = False
            self.batches += 1
            self._lock.notify_all()

    def answers(self, requests: list[Request]) -> list[list[Answer] | BaseException]:
        """Per request, every shard's answer, or the error that failed it."""
        graph = self.graph
        if graph is not None:
            try:
                ran = graph.run(requests)
            except ShardDied as died:
                lost = self._unavailable(died.index, died.cause)
                rest = [k for k, r in enumerate(requests) if not wants(r, died.index)]
                again = self._plain([requests[k] for k in rest])
                outcomes: list[list[Answer] | BaseException] = [lost] * len(requests)
                for k, outcome in zip(rest, again, strict=True):
                    outcomes[k] = outcome
                return outcomes
            if ran is not None:
                return [[ran[i][k] for i in range(self.count)]
                        for k in range(len(requests))]
        return self._plain(requests)

    def _plain(self, requests: list[Request]) -> list[list[Answer] | BaseException]:
        """The batch by one actor task per shard it needs (each given its requests)."""
        if not requests:
            return []
        asked = {i: [k for k, r in enumerate(requests) if wants(r, i)]
                 for i in range(self.count)}
        pending = {i: self._submit(i, [requests[k] for k in ks])
                   for i, ks in asked.items() if ks}
        found: list[list[Answer]] = [[(True, None)] * self.count for _ in requests]
        failed: list[BaseException | None] = [None] * len(requests)
        for i, handle in pending.items():
            try:
                answered = self._wait(i, handle)
            except Exception as exc:  # noqa: BLE001 -- the requests that needed shard i fail
                for k in asked[i]:
                    failed[k] = failed[k] or exc
                continue
            for k, answer in zip(asked[i], answered, strict=True):
                found[k][i] = answer
        return [failed[k] or found[k] for k in range(len(requests))]


class Graph:
    """One compiled graph over every shard actor, built and torn down as batches come."""

    def __init__(self, ray: Any, actors: Sequence[Any], idle: float = GRAPH_IDLE_SECONDS,
                 crowd: float = CROWD_SECONDS) -> None:
        self._ray = ray
        self._actors = list(actors)
        self._ids = {handle._actor_id.hex(): index for index, handle in enumerate(actors)}
        self._idle, self._crowd = idle, crowd
        self._busy = threading.Lock()  # held while a batch is in the graph
        self._state = threading.Lock()  # held to start the keeper
        self._graph: Any = None  # the compiled graph, when built
        self._keeper: threading.Thread | None = None  # builds, keeps, tears down
        self._stop = threading.Event()
        self._last = float("-inf")  # when the last lone request came (time.monotonic)
        self._crowded = float("-inf")  # when the last batch of several came
        self.built = 0  # how many graphs were built (tests and benchmarks read it)
        self.runs = 0  # how many batches it carried

    @property
    def ready(self) -> bool:
        return self._graph is not None

    def run(self, requests: list[Request]) -> list[list[Answer]] | None:
        """Per shard, its answers to every request of the batch ((True, None) to those
        not for it); None when the batch must take tasks (several requests, no graph
        yet, being torn down, or it failed naming no shard); ShardDied when Ray named a
        dead shard."""
        now = time.monotonic()
        if len(requests) > 1:
            self._crowded = now  # the keeper tears the graph down
            return None
        recent, self._last = now - self._last < self._idle, now
        graph = self._graph
        if graph is None:
            if recent and now - self._crowded > self._crowd:
                self._start()
            return None
        if not self._busy.acquire(blocking=False):
            return None
        try:
            if graph is not self._graph:  # torn down since
                return None
            answers = list(self._ray.get(graph.execute(requests), timeout=-1))
            self.runs += 1
            return answers
        except self._ray.exceptions.RayTaskError:
            return None  # a shard's bug: asked again plainly, the error names the shard
        except self._ray.exceptions.RayActorError as exc:
            self._graph = None
            index = self._ids.get(exc.actor_id or "")
            if index is None:
                return None
            raise ShardDied(index, exc) from None
        except Exception:  # noqa: BLE001 -- channels closed: plain tasks answer
            self._graph = None
            return None
        finally:
            self._busy.release()

    def close(self, wait: float = 5.0) -> None:
        """Tear the graph down before the actors are killed (a keeper still compiling
        against a restarting actor after `wait` seconds fails when they are)."""
        self._stop.set()
        keeper = self._keeper
        if keeper is not None:
            keeper.join(wait)

    def _start(self) -> None:
        with self._state:
            if self._keeper is not None or self._stop.is_set():
                return
            self._keeper = threading.Thread(target=self._keep, name="bitseg-shard-graph",
                                            daemon=True)
            self._keeper.start()

    def _keep(self) -> None:
        graph = None
        try:
            graph = self._compile()
            self._graph = graph
            self.built += 1
            while not self._stop.wait(self._idle / 8) and self._graph is graph:
                now = time.monotonic()
                if now - self._last >= self._idle or now - self._crowded < self._crowd:
                    break
        except Exception:  # noqa: BLE001 -- an actor not up: the plain path answers
            pass
        finally:
            with self._busy:  # no batch in the graph from here on
                self._graph = None
            if graph is not None:
                try:
                    graph.teardown()
                except Exception:  # noqa: BLE001 -- a dead actor's loop is gone already
                    pass
            with self._state:  # one graph at a time: the next is built after this is gone
                self._keeper = None

    def _compile(self) -> Any:
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as requests:
            dag = MultiOutputNode([a.call_batch.bind(requests) for a in self._actors])
        return dag.experimental_compile()
