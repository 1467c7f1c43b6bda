"""Shards of the profile space: one engine per shard, and the front that fans out to them.

A `Shard` is one shard's engine and segments. It runs in this process (embedded: what
`serve --shards 1` does, with no Ray import at all) or as a Ray actor (`serve --shards N`
with N > 1; ray.init starts a local runtime, or joins --ray-address). Either way the
front calls `Shard.call(method, *args)`, which answers `(True, value)` or, for bitseg's
own errors, `(False, error)` as plain data: the same error is raised again in the front,
so a shard's rule error is the client's rule error, word for word.

A shard actor that dies (its process killed) fails the calls in flight with
ShardUnavailable (gRPC UNAVAILABLE) naming the shard; Ray restarts it (max_restarts), it
reopens its store, and the next call answers from it. Nothing is retried by the front, so
a count is never summed from fewer shards than there are.

On Ray, Count and IsMember take the fast path (shard_graph): concurrent callers' requests
go out together, one batch at a time, through Ray's compiled graph (shared-memory channels
to every actor, no task submission per call) while batches come often, and by one actor
task per shard otherwise; every other call takes one actor task per shard. A batch the
graph fails without Ray naming a dead shard is asked again by tasks, of every shard it
needs: the answer is still every shard's, or ShardUnavailable.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bitseg.index.errors import BitsegError, SchemaError, StoreError
from bitseg.index.schema import Schema
from bitseg.index.shard_key import shard_of
from bitseg.server.service import ShardUnavailable
from bitseg.server.shard_reads import call_on_refusal, each_on_refusal, outcomes_on_refusal

log = logging.getLogger(__name__)

RESTARTS = -1  # Ray restarts a dead shard actor without limit
ACTOR_THREADS = 8  # calls a shard actor runs at once (the engine's readers never wait)
FAST_READS = frozenset({"count", "is_member"})  # the calls shard_graph carries




class RayMissing(BitsegError):
    """--shards N > 1 without Ray installed."""


# ---------------------------------------------------------------------- one shard
class Shard:
    """One shard's store: its engine and segments, and the calls the front makes."""

    def __init__(self, path: str, index: int, count: int = 1) -> None:
        from bitseg.index.allocator import keep_freed_memory
        from bitseg.index.engine import Engine
        from bitseg.index.segments import open_segments
        from bitseg.index.sqlrule import CallIds

        keep_freed_memory()  # an actor's process serves; so does one shard in process
        self.index = index
        self.path = path
        self.engine = Engine.open(path)
        self.segments = open_segments(self.engine)
        if count > 1:  # one of several shards: top sets are chosen by the front
            self.engine.snapshot.tops.refuse_own()
        self.engine.set_external(CallIds(self.engine.ids))  # sql answers: from the front

    def call(self, method: str, *args: Any) -> tuple[bool, Any]:
        """Run one of this class's `do_` methods: (True, its value) or (False, the bitseg
        error it raised, as data)."""
        try:
            return True, getattr(self, "do_" + method)(*args)
        except BitsegError as exc:
            return False, _error_data(exc)

    def close(self) -> None:
        self.engine.close()

    def call_batch(self, requests: list[tuple]) -> list[tuple[bool, Any]]:
        """`call` of each request of a batch (shard_graph.FastReads), in order: a request
        is (shard, method, *args), and one for another shard is answered (True, None)
        without doing anything (every shard is in a compiled graph's run)."""
        return [self.call(method, *args) if shard is None or shard == self.index
                else (True, None) for shard, method, *args in requests]

    # ---------------------------------------------------------------- reading
    def do_pid(self) -> int:
        return os.getpid()

    def do_schema(self) -> dict[str, dict[str, str]]:
        return self.engine.schema.to_json()

    def do_declare(self, schema: dict[str, dict[str, str]]) -> None:
        self.engine.declare_schema(schema, source="the other shards' schema")

    def do_cache(self, on: bool) -> None:
        """Turn the engine's result cache on or off (benchmarks measure evaluation)."""
        self.engine.cache_results = on

    def do_version(self) -> int:
        return self.engine.snapshot.version

    def do_count(self, rule: Any, as_of: datetime) -> int:
        return self.engine.count(rule, as_of=as_of)

    def do_page(self, rule: Any, as_of: datetime, after: int | None, limit: int,
                fields: list[str] | None = None
                ) -> tuple[int, int, int, list[int], list[str], list[dict[str, Any]]]:
        """Up to `limit` of the rule's members after dense id `after` (from the first when
        None), in dense id order: (store version, how many members, the position of the
        first one given, their dense ids, their external ids, and with `fields` their
        rows of those fields)."""
        from bitseg.index.export import check_fields, profile_rows
        from bitseg.index.fields import ids_of

        wanted = check_fields(self.engine, fields) if fields else None
        version = self.engine.snapshot.version
        found = self.engine.bitmap(rule, as_of=as_of)
        start = found.rank(after) if after is not None else 0
        dense = ids_of(found[start:start + limit])
        rows = profile_rows(self.engine, dense, wanted) if wanted is not None else []
        return (version, len(found), start, dense.tolist(), self.engine.ids.externals(dense),
                rows)

    def do_preview(self, rule: Any, as_of: datetime, limit: int
                   ) -> tuple[int, list[dict[str, Any]]]:
        """How many members, and the first `limit` with every field they have."""
        from bitseg.index.export import profile_rows
        from bitseg.index.fields import ids_of

        found = self.engine.bitmap(rule, as_of=as_of)
        return len(found), profile_rows(self.engine, ids_of(found[0:limit]))

    def do_explain(self, rule: Any, as_of: datetime) -> Any:
        from bitseg.index.engine import as_of_micros
        from bitseg.index.explain import explain

        snap = self.engine.snapshot
        return explain(snap, rule, self.engine.parse(rule, snap), as_of_micros(as_of))

    def do_metrics(self, rule: Any, as_of: datetime, amount_field: str) -> Any:
        return self.segments.metrics(rule, as_of=as_of, amount_field=amount_field)

    def do_overlap(self, names: list[str], as_of: datetime) -> Any:
        return self.segments.overlap(names, as_of=as_of)

    def do_profile(self, profile_id: str) -> dict[str, Any]:
        return self.engine.profile(profile_id)

    def do_segments_of_many(self, profile_ids: list[str], as_of: datetime
                            ) -> tuple[list[list[str]], list[str]]:
        from bitseg.index.batch import segments_of_many

        found = segments_of_many(self.engine, profile_ids, as_of=as_of)
        return [list(names) for names in found.segments], list(found.unknown)

    def do_is_member(self, profile_id: str, rule: Any, as_of: datetime) -> bool:
        return self.engine.is_member(profile_id, rule, as_of=as_of)

    def do_is_member_many(self, profile_ids: list[str], rule: Any, as_of: datetime
                          ) -> tuple[list[bool], list[str]]:
        from bitseg.index.batch import is_member_many

        found = is_member_many(self.engine, profile_ids, rule, as_of=as_of)
        return list(found.member), list(found.unknown)

    def do_segments_of(self, profile_id: str, as_of: datetime) -> list[str]:
        return self.segments.segments_of(profile_id, as_of=as_of)

    def do_get_segment(self, name: str, as_of: datetime) -> Any:
        return self.segments.get(name, as_of=as_of)

    def do_list_segments(self, as_of: datetime, tag: str | None) -> list[Any]:
        return self.segments.list(as_of=as_of, tag=tag)

    # ---------------------------------------------------------------- top over shards
    def do_top_candidates(self, rule: Any, as_of: datetime, chosen: list[list[int]]
                          ) -> Any:
        """This shard's top n for the rule's next top node (shard_reads.top_candidates)."""
        from bitseg.server.shard_reads import top_candidates

        return top_candidates(self.engine, rule, as_of, chosen)

    def do_with_tops(self, chosen: list[list[int]], method: str, *args: Any) -> Any:
        """A read (count, page, ...) with the rule's top sets those chosen over the shards
        (this shard's dense ids of each)."""
        from bitseg.server.shard_reads import shard_view

        return getattr(shard_view(self, chosen, method, args), "do_" + method)(*args)

    def do_with_sql(self, given: Any, method: str, *args: Any) -> Any:
        """Any call with this shard's part of the sql answers the front ran for it
        (shard_sources)."""
        from bitseg.server.shard_sources import call_with_sql

        return call_with_sql(self, given, method, args)

    # ---------------------------------------------------------------- describe over shards
    def do_describe_part(self) -> Any:
        """Describe with every value listed, and the range fields' bounds (shard_reads)."""
        from bitseg.server.shard_reads import describe_part

        return describe_part(self.engine.snapshot)

    def do_at_most(self, bounds: dict[str, list[Any]]) -> dict[str, list[int]]:
        from bitseg.server.shard_reads import at_most

        return at_most(self.engine.snapshot, bounds)

    def do_values(self, name: str, limit: int) -> Any:
        from bitseg.index.describe import values

        return values(self.engine.snapshot, name, limit)

    def do_history(self, name: str) -> list[Any]:
        return self.segments.history(name)

    def do_insights_part(self, rule: Any, as_of: datetime, fields: list[str], top: int,
                         buckets: int, amount_field: str) -> Any:
        from bitseg.server.shard_reads import insights_part

        return insights_part(self.engine, rule, as_of, fields, top, buckets, amount_field)

    def do_insights_at_most(self, rule: Any, as_of: datetime,
                            bounds: dict[str, tuple[list[Any], list[Any]]]) -> Any:
        from bitseg.server.shard_reads import insights_at_most

        return insights_at_most(self.engine, rule, as_of, bounds)

    # ---------------------------------------------------------------- export schedules
    def do_export_create(self, segment: str, every: int, fields: list[str],
                         require: list[str], fmt: str, out: str, rotate: bool) -> Any:
        from bitseg.index.exports import Exports

        return Exports(self.engine).create(segment, every, fields, require, fmt, out, rotate)

    def do_export_list(self) -> list[Any]:
        from bitseg.index.exports import Exports

        return Exports(self.engine).list()

    def do_export_delete(self, schedule_id: int) -> None:
        from bitseg.index.exports import Exports

        Exports(self.engine).delete(schedule_id)

    def do_export_record(self, schedule: Any) -> None:
        from bitseg.index.exports import Exports

        Exports(self.engine)._record(schedule)

    def do_export_part(self, segment: str, fields: list[str], require: list[str], fmt: str,
                       header: bool) -> tuple[bytes, int]:
        from bitseg.server.shard_reads import export_part

        return export_part(self.engine, segment, fields, require, fmt, header)

    # ---------------------------------------------------------------- segments
    def do_edit_segment(self, name: str, ids: list[str], adding: bool) -> Any:
        return (self.segments.add if adding else self.segments.remove)(name, ids)

    def do_delete_segment(self, name: str) -> None:
        self.segments.delete(name)

    def do_retag_segment(self, name: str, add: list[str], remove: list[str]) -> Any:
        return self.segments.retag(name, add=add, remove=remove)

    def do_record_size(self, name: str, as_of: datetime) -> Any:
        return self.segments.record_size(name, as_of=as_of)

    def do_segment_change(self, change: str, kwargs: dict[str, Any], rule: Any = None,
                          chosen: list[list[list[int]]] | None = None) -> Any:
        """A segment create, update, split or refresh; with `chosen`, the rule's top sets
        chosen over every shard (shard_segments)."""
        from bitseg.server.shard_segments import change_on_shard

        return change_on_shard(self, change, kwargs, rule, chosen)

    def do_scheduled_segments(self, now_us: int) -> list[tuple[str, Any, bool]]:
        """(name, rule, due now) of each materialized segment with a refresh_every."""
        from bitseg.server.shard_segments import scheduled

        return scheduled(self.segments, now_us)

    # ---------------------------------------------------------------- writes (shard_writes)
    def do_prepare(self, txid: str, kind: str, payload: Any) -> dict[str, dict[str, str]]:
        from bitseg.server.shard_writes import prepare

        return prepare(self.engine, txid, kind, payload)

    def do_finish(self, txid: str, commit: bool, schema: Any) -> Any:
        from bitseg.server.shard_writes import finish

        return finish(self.engine, txid, commit, schema)

    def do_staged(self) -> list[str]:
        from bitseg.server.shard_writes import staged

        return staged(self.engine)

    # ---------------------------------------------------------------- bulk actions, traits
    def do_bulk_dry_run(self, payload: dict[str, Any]) -> tuple[int, int]:
        """(members, would change) of a bulk action on this shard (shard_actions)."""
        from bitseg.server.shard_actions import dry_run

        return dry_run(self.engine, payload)

    def do_last_action(self) -> int:
        from bitseg.index.bulk import last_entry_id

        return last_entry_id(self.engine)

    def do_action_entry(self, number: int) -> dict[str, Any] | None:
        from bitseg.index.bulk import entry_of

        return entry_of(self.engine, number)

    def do_actions(self, limit: int) -> list[dict[str, Any]]:
        from bitseg.index.bulk import list_entries

        return list_entries(self.engine, limit)

    def do_traits_metrics(self, config: Any, as_of_us: int) -> Any:
        """Each RFM trait's metrics on this shard, to cut the quintiles over all."""
        from bitseg.server.shard_actions import rfm_metrics

        return rfm_metrics(self.engine, config, as_of_us)


def _error_data(exc: BitsegError) -> tuple[str, str, str, dict[str, Any]]:
    """A bitseg error as (module, class, message, attributes), which always pickles."""
    try:
        state = pickle.loads(pickle.dumps(dict(vars(exc))))
    except Exception:  # an attribute that does not pickle: the message still says it
        state = {}
    kind = type(exc)
    return kind.__module__, kind.__qualname__, str(exc), state


def rebuilt_error(data: tuple[str, str, str, dict[str, Any]]) -> Exception:
    """The error a shard raised, of the same class and message (see _error_data)."""
    module, name, message, state = data
    kind: Any = BitsegError
    if module.startswith("bitseg."):
        kind = getattr(importlib.import_module(module), name, BitsegError)
    if not (isinstance(kind, type) and issubclass(kind, BitsegError)):
        kind = BitsegError
    made = kind.__new__(kind)  # not every error's __init__ takes the message alone
    Exception.__init__(made, message)
    made.__dict__.update(state)
    return made


# ---------------------------------------------------------------------- the set of shards
RAY_STARTS = 3  # tries at a local runtime whose processes start too slowly


def start_ray(ray: Any, **init: Any) -> None:
    """ray.init, quietly (no dashboard, no log forwarding); a local runtime whose GCS or
    raylet did not start within Ray's own timeout (a busy machine: it waits ~30 s for
    their files) is shut down and started again, up to RAY_STARTS times."""
    for attempt in range(1, RAY_STARTS + 1):
        try:
            ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False,
                     **init)
            return
        except Exception as exc:  # Ray raises RuntimeError or its own for these
            ray.shutdown()
            if attempt == RAY_STARTS or init.get("address") is not None \
                    or "timed out" not in str(exc).lower():
                raise
            log.warning("Ray's local runtime did not start in time (%s); again", exc)


class ShardSet:
    """The shards of one store, in process or as Ray actors; `call` and `each` reach
    them and raise what a shard raised."""

    def __init__(self, paths: Sequence[str], submit: Callable[[int, str, tuple], Any],
                 wait: Callable[[int, Any], tuple[bool, Any]],
                 close: Callable[[], None],
                 wait_all: Callable[[list[Any]], list[tuple[bool, Any]]] | None = None
                 ) -> None:
        self.paths = list(paths)
        self.count = len(self.paths)
        self._submit, self._wait, self._close = submit, wait, close
        self._wait_all = wait_all or (lambda pending: [self._wait(i, p)
                                                       for i, p in enumerate(pending)])
        self.fast: Any = None  # on Ray: FAST_READS' batches (shard_graph.FastReads)

    @classmethod
    def embedded(cls, paths: Sequence[str]) -> ShardSet:
        """Every shard in this process (no Ray)."""
        shards: list[Shard] = []
        try:
            for index, path in enumerate(paths):
                shards.append(Shard(path, index, len(paths)))
        except BaseException:
            for shard in shards:
                shard.close()
            raise

        def submit(index: int, method: str, args: tuple) -> Any:
            return shards[index].call(method, *args)

        def close() -> None:
            for shard in shards:
                shard.close()

        return cls(paths, submit, lambda index, answer: answer, close)

    @classmethod
    def on_ray(cls, paths: Sequence[str], address: str | None = None,
               init: dict[str, Any] | None = None) -> ShardSet:
        """Every shard a Ray actor opening its own store; ray.init joins `address`, or
        starts a local runtime when None (unless Ray already runs in this process)."""
        ray = import_ray()
        if not ray.is_initialized():
            start_ray(ray, address=address, **(init or {}))
        actor = ray.remote(num_cpus=0, max_restarts=RESTARTS, max_task_retries=0,
                           max_concurrency=ACTOR_THREADS, scheduling_strategy="SPREAD")(Shard)
        actors = [actor.remote(str(path), index, len(paths))
                  for index, path in enumerate(paths)]
        errors = ray.exceptions

        def submit(index: int, method: str, args: tuple) -> Any:
            return actors[index].call.remote(method, *args)

        def unavailable(index: int, exc: BaseException) -> ShardUnavailable:
            return ShardUnavailable(f"shard {index} ({paths[index]}) is unavailable: "
                                    f"{_first_line(exc)}; Ray restarts it, try again")

        def wait(index: int, pending: Any) -> tuple[bool, Any]:
            try:
                return ray.get(pending)
            except (errors.RayActorError, errors.ActorUnavailableError,
                    errors.ActorDiedError) as exc:
                raise unavailable(index, exc) from None
            except errors.RayTaskError as exc:  # a bug in the shard, not the caller's fault
                raise RuntimeError(f"shard {index}: {_first_line(exc)}") from exc

        def wait_all(pending: list[Any]) -> list[tuple[bool, Any]]:
            try:
                return ray.get(pending)  # one wait for all: a Count's fan-out in one step
            except (errors.RayActorError, errors.ActorUnavailableError,
                    errors.ActorDiedError, errors.RayTaskError):
                return [wait(i, p) for i, p in enumerate(pending)]  # names the shard

        from bitseg.server.shard_graph import FastReads, Graph

        graph = Graph(ray, actors)

        def close() -> None:
            graph.close()  # its loops leave the actors first
            for handle in actors:
                ray.kill(handle, no_restart=True)

        made = cls(paths, submit, wait, close, wait_all)
        made.actors = actors  # the tests kill one
        made.fast = FastReads(len(actors), graph,
                              lambda i, requests: actors[i].call_batch.remote(requests),
                              wait, unavailable)
        return made

    @property
    def graph(self) -> Any:
        """The fast path's compiled graph (shard_graph.Graph); None in process."""
        return None if self.fast is None else self.fast.graph

    def close(self) -> None:
        self._close()

    @call_on_refusal
    def call(self, index: int, method: str, *args: Any) -> Any:
        """One shard's answer."""
        if self.fast is not None and method in FAST_READS:
            return self._answer(index, self.fast.ask((index, method, *args))[index])
        return self._answer(index, self._wait(index, self._submit(index, method, args)))

    @each_on_refusal
    def each(self, method: str, *args: Any, per_shard: Sequence[tuple] | None = None
             ) -> list[Any]:
        """Every shard's answer, asked of all at once (the same args, or per_shard's)."""
        if per_shard is None and self.fast is not None and method in FAST_READS:
            answers = self.fast.ask((None, method, *args))
        else:
            argument = per_shard if per_shard is not None else [args] * self.count
            answers = self._wait_all([self._submit(i, method, tuple(argument[i]))
                                      for i in range(self.count)])
        return [self._answer(i, a) for i, a in enumerate(answers)]

    def these(self, indices: Sequence[int], method: str, per_shard: Sequence[tuple]
              ) -> list[Any]:
        """The answers of the shards `indices`, asked at once, each with its args."""
        pending = [self._submit(i, method, tuple(a))
                   for i, a in zip(indices, per_shard, strict=True)]
        answers = [self._wait(i, p) for i, p in zip(indices, pending, strict=True)]
        return [self._answer(i, a) for i, a in zip(indices, answers, strict=True)]

    @outcomes_on_refusal
    def outcomes(self, method: str, per_shard: Sequence[tuple],
                 indices: Sequence[int] | None = None) -> list[tuple[bool, Any]]:
        """Each shard's (True, answer) or (False, the error it raised or ShardUnavailable),
        asked at once, never raising: a caller that must undo on some shards learns which
        (the shards `indices`, each with its args; every shard when None)."""
        which = list(range(self.count)) if indices is None else list(indices)
        pending = [self._submit(i, method, tuple(a))
                   for i, a in zip(which, per_shard, strict=True)]
        found: list[tuple[bool, Any]] = []
        for i, handle in zip(which, pending, strict=True):
            try:
                found.append((True, self._answer(i, self._wait(i, handle))))
            except Exception as exc:  # noqa: BLE001 -- handed to the caller as data
                found.append((False, exc))
        return found

    @staticmethod
    def _answer(index: int, answer: tuple[bool, Any]) -> Any:
        ok, value = answer
        if not ok:
            raise rebuilt_error(value)
        return value

    def shard_of(self, profile_id: str) -> int:
        return shard_of(profile_id, self.count)

    def unify_schema(self) -> Schema:
        """Declare on every shard the fields any shard has (a field inferred from one
        shard's data is then known to all); SchemaError when two shards disagree."""
        schemas = self.each("schema")
        merged = Schema.from_json(schemas[0])
        for index, found in enumerate(schemas[1:], 1):
            try:
                merged = merged.declare(found, source=f"shard {index}")
            except SchemaError as exc:
                raise SchemaError(f"the shards' schemas disagree ({exc}); declare the field "
                                  "in schema.json and load again") from None
        if any(Schema.from_json(s) != merged for s in schemas):
            self.each("declare", merged.to_json())
        return merged


def _first_line(exc: BaseException) -> str:
    """What Ray says happened, in one line: its first line, and the last (the cause,
    e.g. the store a restarted actor could not open) when they differ."""
    text = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()
            if line.strip()]
    if not text:
        return type(exc).__name__
    return text[0] if len(text) == 1 else f"{text[0]} ... {text[-1]}"


def import_ray() -> Any:
    """The ray module, or RayMissing saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise RayMissing("--shards N > 1 runs the shards on Ray, which is not installed: "
                         "pip install 'bitseg[shards]' (or pip install 'ray==2.*')") from None


def open_shards(db: str | Path, ray_address: str | None = None,
                ray_init: dict[str, Any] | None = None, expect: int | None = None) -> ShardSet:
    """The shards of the sharded store at db: in process for one shard (unless an address
    is given), Ray actors otherwise. `expect`: the number of shards the caller means."""
    from bitseg.server.shard_store import read_manifest

    manifest = read_manifest(db)
    if manifest is None:
        raise BitsegError(f"{db} is not a sharded store (no shards.json; load one with "
                          "`bitseg load DATASET --db DB --shards N`)")
    if expect is not None and expect != manifest.shards:
        raise BitsegError(f"{db} holds {manifest.shards} shards, not {expect}: serve it "
                          f"with --shards {manifest.shards}")
    paths = [str(p.resolve()) for p in manifest.paths(db)]
    missing = [p for p in paths if not (Path(p) / "data.mdb").exists()]
    if missing and ray_address is None:  # on a cluster a shard's store is on its node
        raise StoreError(f"{db}: no shard store at {', '.join(missing)}")
    if manifest.shards == 1 and ray_address is None:
        shards = ShardSet.embedded(paths)
    else:
        shards = ShardSet.on_ray(paths, ray_address, ray_init)
    try:
        from bitseg.server.shard_writes import recover

        recover(shards, db)  # the batches a crash left half-written: finished first
        shards.unify_schema()
    except ShardUnavailable as exc:  # an actor that cannot open its store never starts
        shards.close()
        raise StoreError(f"a shard did not start: {exc}") from None
    except BaseException:
        shards.close()
        raise
    return shards
