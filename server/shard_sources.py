"""SQL sources of a sharded store: the front runs each query, every shard gets its part.

One store answers an {"sql": ...} rule from its sources (server/sources.py: pools, READ
ONLY transactions, statement_timeout, row_limit, the ttl cache and its refresher). A
sharded front holds those same Sources; its shards never connect to a database.

- A shard's engine answers sql rules with `CallIds` (index/sqlrule.py): the answers the
  call it runs carries, or `SqlNeeded` naming the queries it lacks (a rule's own nodes,
  or those of the dynamic segments it names).
- The front sends its calls through `install`'s wrappers of the ShardSet: a call that
  comes back SqlNeeded has its queries run (or taken from the ttl cache), the ids split by
  `shard_of`, and is asked again with each shard's part (`Shard.do_with_sql`). The sql
  nodes written in a read's rule are seen in its JSON before the first call, so most
  calls go once.
- Every RPC of the front (and every scheduler tick) holds a *pin*: the answers it has
  taken, so each query is answered once for all shards and every call of that RPC, as one
  store's one evaluation. A materialized refresh asks for answers run again, once.
- A shard is sent its part of an answer once: it keeps it mapped (KeptAnswers, by the
  front's number for that answer), later calls carry the number alone, and a shard that
  lost it asks again. Count and IsMember take the fast path (shard_graph) when every
  shard holds the answers they need.
- A write must not come back for an answer after it wrote: a dynamic segment's
  definition is written before its size is counted, so a segment change has its rule's
  answers sent with it (those met through named segments found by counting the rule
  first); a refresh asks before it writes anything.
- Errors are one store's: SourceUnavailable naming the source, a failed query's
  RuleError at the path of its node, "no SQL sources are configured" without --sources.

Choice: the front resolves (not each shard with pools of its own), so N shards cost one
query, and a count is never made of two states of a table.
"""

from __future__ import annotations

import copy
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import orjson

from bitseg.index.errors import BitsegError, RuleError
from bitseg.index.sqlrule import (
    KEPT_ANSWERS,
    CallIds,
    Given,
    GivenIds,
    KeptAnswers,
    Key,
    NoSources,
    SqlRule,
    carrying,
    key_of,
    parse_sql,
)
from bitseg.server.shard_segments import has_top

# the shard calls that only read: they answer on a view of the snapshot with the given
# answers (its worker threads see them too); any other call answers through this thread
VIEWED = frozenset({
    "count", "page", "preview", "explain", "metrics", "overlap", "is_member",
    "is_member_many", "segments_of", "segments_of_many", "get_segment", "list_segments",
    "with_tops", "top_candidates", "insights_part", "insights_at_most", "export_part",
    "bulk_dry_run", "traits_metrics",
})
_NEEDED = ("bitseg.index.sqlrule", "SqlNeeded")
_FAILED_QUERY = {("bitseg.index.errors", "SourceUnavailable"),
                 ("bitseg.index.errors", "RuleError")}
MAX_RULE_BYTES = 1 << 20  # JSON text looked into for sql nodes before a call
ASK_ROUNDS = 8  # a call asked again with the answers it names, at most (one is usual)


# ---------------------------------------------------------------------- on a shard
def call_with_sql(shard: Any, given: Given, method: str, args: tuple) -> Any:
    """shard.do_<method>(*args) with sql rules answered from `given` (this shard's ids)."""
    kept = shard.__dict__.setdefault("sql_kept", KeptAnswers())
    ids = GivenIds(given, shard.engine.ids, kept).keep()
    target = shard
    if method in VIEWED:
        from bitseg.index.segments import Segments

        target = copy.copy(shard)
        target.engine = shard.engine.reading(replace(shard.engine.snapshot, external=ids))
        target.segments = Segments(target.engine)
    with carrying(ids):
        return getattr(target, "do_" + method)(*args)


# ---------------------------------------------------------------------- at the front
class _Pin:
    """The answers one front operation took: per query, each shard's ids, the answer's
    age, whether it was run afresh, and the front's number for it."""

    def __init__(self) -> None:
        self.answers: dict[Key, tuple[list[list[str]], float, bool, int]] = {}
        self.failed: dict[Key, BitsegError] = {}  # seen before a call: raised when needed


class FrontSql:
    """The front's side: its Sources (None without --sources) and the pins of the
    operations running in its threads."""

    def __init__(self, sources: Any, count: int, shard_of: Callable[[str], int]) -> None:
        self.sources = sources
        self.count = count
        self._shard_of = shard_of
        self._local = threading.local()
        self._splits: dict[Key, tuple[list[str], list[list[str]], int]] = {}
        self._numbers = itertools.count(int.from_bytes(os.urandom(6), "big"))
        self._sent: list[set[int]] = [set() for _ in range(count)]  # numbers each holds
        self._lock = threading.Lock()

    @contextmanager
    def pinned(self) -> Iterator[_Pin]:
        """This thread's pin (a new one unless an outer operation holds one)."""
        pin = getattr(self._local, "pin", None)
        if pin is not None:
            yield pin
            return
        pin = self._local.pin = _Pin()
        try:
            yield pin
        finally:
            self._local.pin = None

    def given(self, shard: int) -> Given:
        """The answers the current pin holds, this shard's part of each."""
        pin = getattr(self._local, "pin", None)
        if pin is None:
            return {}
        given: Given = {}
        with self._lock:
            sent = self._sent[shard]
            for key, (parts, age, fresh, number) in pin.answers.items():
                mine = parts[shard]
                given[key] = (number, None if number in sent else mine, len(mine), age, fresh)
                if len(sent) > 4 * KEPT_ANSWERS:  # more than a shard keeps: forget the rest
                    sent.clear()
                sent.add(number)
        return given

    def numbered(self) -> Given | None:
        """The current pin's answers by their numbers alone, the same for every shard,
        when every shard holds every one of them (None otherwise): what the fast path
        of Count and IsMember can carry."""
        pin = getattr(self._local, "pin", None)
        if pin is None:
            return None
        with self._lock:
            if not all(number in sent for _, _, _, number in pin.answers.values()
                       for sent in self._sent):
                return None
        return {key: (number, None, 0, age, fresh)
                for key, (_, age, fresh, number) in pin.answers.items()}

    def holds(self) -> bool:
        """Whether the current pin holds answers (calls then carry them)."""
        pin = getattr(self._local, "pin", None)
        return pin is not None and bool(pin.answers)

    def resolve(self, needed: list[tuple[str, str, tuple[Any, ...], str, bool]],
                shard: int) -> None:
        """Run (or take from the cache) the queries `shard` named, into the current pin;
        one the pin holds already, the shard did not keep: it is sent again in full."""
        pin = getattr(self._local, "pin", None)
        assert pin is not None, "resolve() runs under pinned()"
        for source, query, params, path, fresh in needed:
            key = (source, query, tuple(params))
            held = pin.answers.get(key)
            if held is not None and (held[2] or not fresh):
                with self._lock:
                    self._sent[shard].discard(held[3])
                continue
            if key in pin.failed:
                raise pin.failed[key]
            self._take(pin, SqlRule(source, query, tuple(params), path), fresh)

    def _take(self, pin: _Pin, rule: SqlRule, fresh: bool) -> None:
        if self.sources is None:
            NoSources().answer(rule, None)  # raises: no SQL sources are configured
        ids, age = self.sources.external_ids(rule, fresh=fresh)
        parts, number = self._split(rule, ids)
        pin.answers[key_of(rule)] = (parts, age, fresh, number)

    def _split(self, rule: SqlRule, ids: list[str]) -> tuple[list[list[str]], int]:
        """The ids by shard, and the front's number for this answer (both kept while
        the sources' cache keeps it)."""
        key = key_of(rule)
        with self._lock:
            kept = self._splits.get(key)
        if kept is not None and kept[0] is ids:
            return kept[1], kept[2]
        parts: list[list[str]] = [[] for _ in range(self.count)]
        for external in ids:
            parts[self._shard_of(external)].append(external)
        with self._lock:
            self._splits[key] = (ids, parts, next(self._numbers))
            if len(self._splits) > 2 * 256:  # the sources cache's bound, twice over
                self._splits.pop(next(iter(self._splits)))
            return parts, self._splits[key][2]

    def prepare(self, args: tuple) -> bool:
        """Run the sql leaves written in a call's rule (JSON) before it is sent, under the
        current pin; whether it has any. A query that fails is raised when a shard
        names it (at its node's path), not here."""
        pin = getattr(self._local, "pin", None)
        found = [leaf for arg in args for leaf in _leaves(arg, "$")]
        if pin is None or not found:
            return bool(found)
        for rule in found:
            key = key_of(rule)
            if key in pin.answers or key in pin.failed:
                continue
            try:
                self._take(pin, rule, fresh=False)
            except BitsegError as exc:
                if type(exc).__name__ == "SourceUnavailable":
                    pin.failed[key] = exc  # the same words wherever it is asked
        return True

    def status(self) -> list[Any]:
        return [] if self.sources is None else self.sources.status()

    def close(self) -> None:
        if self.sources is not None:
            self.sources.close()


def _leaves(value: Any, path: str) -> Iterator[SqlRule]:
    """The {"sql": ...} nodes of a rule given as JSON text or dicts (and/or/not/top's of),
    with the JSON path the parser gives them."""
    if isinstance(value, (str, bytes)):
        raw = value if isinstance(value, bytes) else value.encode()
        if len(raw) > MAX_RULE_BYTES or not raw.lstrip().startswith(b"{") \
                or b'"sql"' not in raw:
            return  # not a rule with an sql node (a batch of records, a name)
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return
    if isinstance(value, dict):
        if "sql" in value:
            try:  # the parser's checks first: a query it refuses is never sent
                yield parse_sql(value, path)
            except RuleError:
                pass  # the shard's parse says so, at the rule's path
            return
        for name in ("and", "or"):
            if isinstance(value.get(name), list):
                for i, child in enumerate(value[name]):
                    yield from _leaves(child, f"{path}.{name}[{i}]")
        if "not" in value:
            yield from _leaves(value["not"], f"{path}.not")
        top = value.get("top")
        if isinstance(top, dict) and "of" in top:
            yield from _leaves(top["of"], f"{path}.top.of")


def _needs(answer: Any) -> list[tuple[str, str, tuple[Any, ...], str, bool]] | None:
    """The queries a shard's (ok, value) answer asks for, or None."""
    ok, value = answer
    if ok or tuple(value[:2]) != _NEEDED:
        return None
    return list(value[3].get("needed", []))


class _Asked:
    __slots__ = ("index", "method", "args", "handle")

    def __init__(self, index: int, method: str, args: tuple, handle: Any) -> None:
        self.index, self.method, self.args, self.handle = index, method, args, handle


class _Refused:
    """A call not sent: its answer is the error found before it (a failed query)."""

    __slots__ = ("answer",)

    def __init__(self, answer: tuple[bool, Any]) -> None:
        self.answer = answer


def install(shards: Any, sources: Any) -> FrontSql:
    """Route every call of `shards` through the front's sql answers (once per ShardSet)."""
    found = getattr(shards, "sql", None)
    if found is not None:
        if sources is not None:
            found.sources = sources
        return found
    from bitseg.server.shards import _error_data

    front = FrontSql(sources, shards.count, shards.shard_of)
    submit, wait, wait_all = shards._submit, shards._wait, shards._wait_all

    def send(index: int, method: str, args: tuple) -> Any:
        given = front.given(index)
        if given:
            return submit(index, "with_sql", (given, method, *args))
        return submit(index, method, args)

    def ask(index: int, method: str, args: tuple) -> Any:
        """One call, asked again with the answers it needs: (ok, value)."""
        with front.pinned():
            handle = send(index, method, args)
            return settled([_Asked(index, method, args, handle)], [wait(index, handle)])[0]

    def my_submit(index: int, method: str, args: tuple) -> _Asked:
        args = tuple(args)
        if method in VIEWED:
            front.prepare(args)
        elif method == "segment_change" and not str(args[0]).startswith("refresh"):
            # A dynamic segment's definition is written before its size is counted, so
            # this call must not come back for an answer: its rule's are sent with it, and
            # those of the segments it names are found by counting it first.  A refresh
            # asks for its answers (run again) before it writes anything.
            rule, as_of = args[1].get("rule"), args[1].get("as_of")
            if front.prepare((rule,)) or has_top(rule, ("segment",)):
                chosen = args[3] if len(args) > 3 else None  # top sets of args[2]
                ok, value = ask(index, "count", (rule, as_of)) if chosen is None else \
                    ask(index, "with_tops", (chosen[index], "count", args[2], as_of))
                if not ok and tuple(value[:2]) in _FAILED_QUERY:
                    return _Asked(index, method, args, _Refused((False, value)))
        return _Asked(index, method, args, send(index, method, args))

    def settled(asked: list[_Asked], answers: list[Any]) -> list[Any]:
        """The answers, each SqlNeeded one asked again with the queries it named."""
        answers = list(answers)
        for _ in range(ASK_ROUNDS):
            needing = [k for k, a in enumerate(answers) if _needs(a) is not None]
            if not needing:
                return answers
            try:
                for k in needing:
                    front.resolve(_needs(answers[k]) or [], asked[k].index)
            except BitsegError as exc:
                for k in needing:
                    answers[k] = (False, _error_data(exc))
                return answers
            again = [(k, send(asked[k].index, asked[k].method, asked[k].args))
                     for k in needing]
            for k, handle in again:
                answers[k] = wait(asked[k].index, handle)
        raise RuntimeError(f"a shard still asked for sql answers after {ASK_ROUNDS} "
                           "rounds of them")  # a bug, never a wait forever

    def waited(index: int, handle: Any) -> Any:
        return handle.answer if isinstance(handle, _Refused) else wait(index, handle)

    def my_wait(index: int, pending: Any) -> Any:
        if not isinstance(pending, _Asked):  # the default wait_all's call of _wait
            return wait(index, pending)
        with front.pinned():
            return settled([pending], [waited(index, pending.handle)])[0]

    def my_wait_all(pending: list[Any]) -> list[Any]:
        refused = {k: p.handle.answer for k, p in enumerate(pending)
                   if isinstance(p.handle, _Refused)}
        if refused:  # a failed query found before a write: answered without asking
            return [refused[k] if k in refused else my_wait(k, p)
                    for k, p in enumerate(pending)]
        with front.pinned():
            return settled(pending, wait_all([p.handle for p in pending]))

    shards._submit, shards._wait, shards._wait_all = my_submit, my_wait, my_wait_all
    if getattr(shards, "fast", None) is not None:  # Count and IsMember's (shard_graph)
        shards.fast = _Fast(shards.fast, shards, front)
    shards.sql = front
    return front


class _Fast:
    """The fast path of Count and IsMember (shard_graph): a rule without sql nodes as it
    is, one whose answers every shard holds with their numbers; any other (the first
    call of an answer, an sql node met through a segment) by tasks, each shard given
    its part."""

    def __init__(self, real: Any, shards: Any, front: FrontSql) -> None:
        self.real, self.shards, self.front = real, shards, front

    def ask(self, request: tuple) -> list[Any]:
        shard, method, *args = request
        with self.front.pinned():
            if self.front.prepare(tuple(args)) or self.front.holds():
                numbered = self.front.numbered()  # answers every shard holds: by number
                request = None if numbered is None \
                    else (shard, "with_sql", numbered, method, *args)
            if request is not None:
                answers = self.real.ask(request)
                if not any(_needs(a) is not None for a in answers):
                    return answers
            which = list(range(self.shards.count)) if shard is None else [shard]
            asked = [self.shards._submit(i, method, tuple(args)) for i in which]
            got = {i: self.shards._wait(i, a) for i, a in zip(which, asked, strict=True)}
        return [got.get(i, (True, None)) for i in range(self.shards.count)]

    @property
    def graph(self) -> Any:  # the real path's graph (a benchmark switches it off)
        return self.real.graph

    @graph.setter
    def graph(self, graph: Any) -> None:
        self.real.graph = graph

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def pinned_calls(front: FrontSql, method: Callable[..., Any]) -> Callable[..., Any]:
    """`method` with every call under one pin (a scheduler's tick)."""
    def run(*args: Any, **kwargs: Any) -> Any:
        with front.pinned():
            return method(*args, **kwargs)
    return run


__all__ = ["CallIds", "FrontSql", "VIEWED", "call_with_sql", "install", "pinned_calls"]
