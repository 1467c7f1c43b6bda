"""Ray's compiled graph over the shard actors: the fast path of the hot fan-out reads.

A plain actor call submits a task per shard and waits on Ray's object store: ~1.1-1.8 ms
for two actors on a 2-core machine, whatever the shards do. A compiled graph
(`ray.dag`, `experimental_compile`) starts one loop in each actor (in Ray's system
concurrency group, so the actor's own threads still take every other call) and passes
the request and the answers through shared-memory channels: ~0.2-0.5 ms for two actors.

Its costs, and what this module does about them:
- an actor's graph loop spins while it waits (measured: 0.4-0.9 of a core per idle
  actor, and with 4 clients counting at once 5-20% fewer Counts a second than plain
  tasks, whose threads it takes CPU from). So the graph serves a lone caller: it is
  built when a second fast call comes within GRAPH_IDLE_SECONDS of the one before, in a
  thread of its own (the calls meanwhile take the plain path), torn down after
  GRAPH_IDLE_SECONDS without one, and torn down, and not built for CROWD_SECONDS, when
  two fast calls overlap (concurrent callers are served by plain tasks);
- `execute` is not thread-safe: one request at a time is in the graph, and a call that
  finds it busy takes the plain path, never waits;
- a dead actor closes the graph's channels: the call in flight fails with the shard
  named when Ray says which actor it was (ShardUnavailable, as the plain path), else it
  is asked again on the plain path, which names the shard or, once Ray has restarted
  it, answers; the graph is dropped and built again by later calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

GRAPH_IDLE_SECONDS = 2.0
CROWD_SECONDS = 10.0


class Graph:
    """One compiled graph over every shard actor, built and torn down as calls come."""

    def __init__(self, ray: Any, actors: Sequence[Any],
                 unavailable: Callable[[int, BaseException], Exception],
                 idle: float = GRAPH_IDLE_SECONDS, crowd: float = CROWD_SECONDS) -> None:
        self._ray = ray
        self._actors = list(actors)
        self._ids = {handle._actor_id.hex(): index for index, handle in enumerate(actors)}
        self._unavailable = unavailable  # the plain path's error for shard i
        self._idle, self._crowd = idle, crowd
        self._busy = threading.Lock()  # held while a request is in the graph
        self._state = threading.Lock()  # held to start the keeper
        self._graph: Any = None  # the compiled graph, when built
        self._keeper: threading.Thread | None = None  # builds, keeps, tears down
        self._stop = threading.Event()
        self._last = float("-inf")  # when the last fast call came (time.monotonic)
        self._crowded = float("-inf")  # when two last overlapped
        self._callers = 0  # fast calls under way
        self.built = 0  # how many graphs were built (tests and benchmarks read it)

    @property
    def ready(self) -> bool:
        return self._graph is not None

    def ask(self, request: tuple, plain: Callable[[], list[tuple[bool, Any]]]
            ) -> list[tuple[bool, Any]]:
        """Every shard's `call_request(request)` answer: through the graph, or from
        `plain` (no graph, busy, crowded, or it failed without naming a shard);
        ShardUnavailable when a shard died under the call in the graph."""
        with self._state:
            self._callers += 1
            crowded = self._callers > 1
        try:
            now = time.monotonic()
            if crowded:
                self._crowded = now
            answers = None if crowded else self._through_graph(request, now)
            return plain() if answers is None else answers
        finally:
            with self._state:
                self._callers -= 1

    def _through_graph(self, request: tuple, now: float) -> list[tuple[bool, Any]] | None:
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
            return list(self._ray.get(graph.execute(request), timeout=-1))
        except self._ray.exceptions.RayTaskError:
            return None  # a shard's bug: asked again plainly, the error names the shard
        except self._ray.exceptions.RayActorError as exc:
            self._graph = None
            index = self._ids.get(exc.actor_id or "")
            if index is None:
                return None
            raise self._unavailable(index, exc) from None
        except Exception:  # noqa: BLE001 -- channels closed: the plain path answers
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
            with self._busy:  # no request in the graph from here on
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

        with InputNode() as request:
            dag = MultiOutputNode([a.call_request.bind(request) for a in self._actors])
        return dag.experimental_compile()
