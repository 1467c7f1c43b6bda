"""Segments (CONTRACT §3): named, stored audiences, bound to one Engine.

- static: a stored set of profiles, filled from ids and/or a one-time snapshot of a
  rule, changed only by adding and removing ids; never recounted.
- dynamic: a stored rule, evaluated on the data as it is at call time.
- materialized: a stored rule plus its stored membership, refreshed on request or every
  `refresh_every` seconds.

Every change of a static or materialized membership records `segment_entered` /
`segment_exited` events (property `segment` = the name, CONTRACT §2.5) and a point of
the segment's size history, in the same LMDB transaction as the membership itself:
the change is computed inside Engine.track_events (its records are a function of the
snapshot the batch is built on, called under the engine's write lock) and written by
its `also` callback, which returns the new SegmentSet for the engine to publish with
the batch.  Segment writes are serialised by the manager's own lock.

Chains: a dynamic segment's rule is evaluated in place wherever {"segment": name} names
it, so a rule with the rules of the dynamic segments it uses written in place (its
chain) must stay within MAX_CHAIN_DEPTH levels. Creates and updates that would make any
chain deeper are refused; a chain stored too deep by an older version is listed, but
evaluating it is refused with the reason (as is a stored rule that no longer parses).

Persistence, the LMDB db "segments" (keys.py lays out its keys): each segment's
definition (JSON), its stored membership in chunks of 2**18 ids, and its history points
{"size": n, "cause": ..., "recorded_at": µs}, keyed by as_of and the order they were
recorded in (history is listed by that order).
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import orjson
from pyroaring import BitMap

from bitseg.index import keys as K
from bitseg.index import types as T
from bitseg.index.errors import (
    AlreadyExists,
    BitsegError,
    NotFound,
    PartUnavailable,
    RuleError,
    StoreError,
)
from bitseg.index.evaluate import Evaluator
from bitseg.index.fields import ids_of
from bitseg.index.rules import (
    And,
    EventCond,
    ItemsCond,
    Not,
    Or,
    OrdersCond,
    Rule,
    SegmentRef,
    SequenceCond,
    parse_rule,
)
from bitseg.index.snapshot import Snapshot
from bitseg.index.sqlrule import with_fresh_sources
from bitseg.index.store import Store, Txn, chunks_of
from bitseg.index.tags import check_tag, check_tags, retagged
from bitseg.index.ticker import Ticker
from bitseg.index.top import Top, TopSets

if TYPE_CHECKING:
    from bitseg.index.engine import Engine

log = logging.getLogger("bitseg.segments")

STATIC, DYNAMIC, MATERIALIZED = "static", "dynamic", "materialized"
KINDS = (STATIC, DYNAMIC, MATERIALIZED)
ENTERED, EXITED = "segment_entered", "segment_exited"
NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
DB = "segments"
FORMAT = 1
US = 1_000_000
# Levels of a rule with the rules of the dynamic segments it uses written in place.
# Each segment's rule travels and is stored on its own, so MAX_RULE_DEPTH's reasons (the
# protobuf decoder, orjson's nesting) do not bound a chain; evaluation does, recursing
# per level.  Measured on Python 3.11 (default limit 1000 frames): an AND chain alone
# failed at ~247 levels; a count, member bitmap, is_member and explain of a 99-level rule
# of ANDs naming a 128-level AND chain need fewer than 700 frames.
# tests/test_segment_chains.py checks a MAX_RULE_DEPTH rule naming a chain at the limit.
MAX_CHAIN_DEPTH = 128


class SegmentInUse(BitsegError):
    """A segment that other segments' rules refer to cannot be deleted."""

    def __init__(self, name: str, users: Sequence[str]) -> None:
        super().__init__(f"segment {name!r} is used by the rules of {', '.join(map(repr, users))};"
                         f" delete or change those first")
        self.name = name
        self.users = tuple(users)


class SegmentUnusable(BitsegError):
    """A stored segment that cannot be evaluated: its rule no longer parses, or its chain
    is deeper than MAX_CHAIN_DEPTH (stored so by an older version)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"segment {name!r} cannot be evaluated: {reason}; "
                         f"update its rule or delete it")
        self.name = name
        self.reason = reason


# ---------------------------------------------------------------------- the values
@dataclass(frozen=True, slots=True)
class Segment:
    """One segment's definition, and its stored membership (static, materialized)."""

    name: str
    kind: str
    rule: Any = None  # JSON form: dynamic and materialized rule, or a static's source rule
    typed: Rule | None = None  # the parsed rule of a dynamic or materialized segment
    members: BitMap | None = None  # static, materialized; may hold since-deleted ids
    created_at: int = 0  # µs
    refreshed_at: int | None = None  # µs: the as_of of the last membership change
    refresh_every: int | None = None  # seconds (materialized only)
    points: int = 0  # history points recorded so far (the next point's sequence number)
    refreshed_wall: int | None = None  # µs: the wall-clock moment of that change
    problem: str | None = None  # why a stored rule cannot be evaluated (not stored)
    tags: tuple[str, ...] = ()  # sorted, valid (index/tags.py)

    def definition(self) -> dict[str, Any]:
        return {"format": FORMAT, "kind": self.kind, "rule": self.rule,
                "created_at": self.created_at, "refreshed_at": self.refreshed_at,
                "refresh_every": self.refresh_every, "points": self.points,
                "refreshed_wall": self.refreshed_wall, "tags": list(self.tags)}

    def uses(self) -> set[str]:
        """The segments this one's rule refers to directly."""
        if self.typed is not None:
            return {ref.name for ref in segment_refs(self.typed)}
        return _json_refs(self.rule) if self.kind != STATIC else set()

    def last_wall(self) -> int | None:
        """When the membership last changed by the clock (older stores: its as_of)."""
        return self.refreshed_wall if self.refreshed_wall is not None else self.refreshed_at


@dataclass(frozen=True)
class SegmentSet:
    """Immutable: every segment by name. The SegmentLookup the engine evaluates with."""

    segments: Mapping[str, Segment] = field(default_factory=lambda: MappingProxyType({}))

    def resolve(self, name: str) -> BitMap | Rule:
        segment = self.get(name)
        if segment.members is not None:
            return segment.members
        return self.rule_of(segment)

    def rule_of(self, segment: Segment) -> Rule:
        """The rule a dynamic or materialized segment is evaluated by; SegmentUnusable
        when it cannot be (a rule that no longer parses, a chain too deep)."""
        if segment.typed is None:
            raise SegmentUnusable(segment.name, segment.problem or "it has no rule")
        chain = self.chains.get(segment.name)
        if chain is not None and chain.depth > MAX_CHAIN_DEPTH:
            raise SegmentUnusable(segment.name, chain.too_deep())
        return segment.typed

    @cached_property
    def chains(self) -> dict[str, Chain]:
        """The chain of every dynamic and materialized segment (computed once per set)."""
        return chain_depths(self.segments)

    def get(self, name: str) -> Segment:
        segment = self.segments.get(name)
        if segment is None:
            raise NotFound("segment", name)
        return segment

    def __contains__(self, name: str) -> bool:
        return name in self.segments

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments[name] for name in sorted(self.segments))

    def with_segment(self, segment: Segment) -> SegmentSet:
        found = SegmentSet(MappingProxyType({**self.segments, segment.name: segment}))
        old = self.segments.get(segment.name)
        if old is not None and old.typed is segment.typed and old.kind == segment.kind \
                and "chains" in self.__dict__:  # a membership change: the chains hold
            found.__dict__["chains"] = self.__dict__["chains"]
        return found

    def without(self, name: str) -> SegmentSet:
        return SegmentSet(MappingProxyType({k: v for k, v in self.segments.items()
                                            if k != name}))


@dataclass(frozen=True)
class SegmentInfo:
    """A segment as callers see it: its definition and current size."""

    name: str
    kind: str
    rule: Any
    size: int
    created_at: int
    refreshed_at: int | None
    refresh_every: int | None
    problem: str | None = None  # why it cannot be evaluated now (then size is 0)
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Change:
    """What one membership change did."""

    size: int
    entered: int
    exited: int
    as_of: int  # µs
    unknown: tuple[str, ...] = ()  # ids given that are not live profiles (nothing done)


@dataclass(frozen=True)
class Point:
    """One point of a segment's size history."""

    at: int  # µs: the as_of the size is for
    size: int
    cause: str  # create, refresh, add, remove, update, record
    recorded_at: int | None = None  # µs, wall clock; None for points of older stores


@dataclass(frozen=True)
class Overlap:
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    matrix: tuple[tuple[int, ...], ...]  # matrix[i][j] = |segment i ∩ segment j|


@dataclass(frozen=True)
class Metrics:
    """What loyalty platforms show per segment; money is exact (Fractions of decimals)."""

    profiles: int
    total_profiles: int
    orders: int
    customers: int  # profiles of the segment with at least one order
    revenue: Fraction  # total order amount of the segment's profiles
    total_revenue: Fraction  # the same over every live profile

    @property
    def share_of_profiles(self) -> Fraction | None:
        return Fraction(self.profiles, self.total_profiles) if self.total_profiles else None

    @property
    def share_of_revenue(self) -> Fraction | None:
        return self.revenue / self.total_revenue if self.total_revenue else None

    @property
    def average_order_value(self) -> Fraction | None:
        return self.revenue / self.orders if self.orders else None


def check_name(name: Any) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise BitsegError(f"segment name: expected 1-128 characters of letters, digits, "
                          f"_ - . : ; got {name!r}")
    return name


def _children(node: Rule) -> tuple[Rule, ...]:
    """The sub-rules of a node, evaluated in the same stack as the node itself."""
    if isinstance(node, (And, Or)):
        return node.children
    if isinstance(node, Not):
        return (node.child,)
    if isinstance(node, EventCond):
        return () if node.where is None else (node.where,)
    if isinstance(node, OrdersCond):
        return (node.orders,)
    if isinstance(node, ItemsCond):
        return (node.items, node.orders)
    if isinstance(node, SequenceCond):  # the steps are nodes, as in the JSON form
        return node.steps if node.then_not is None else (*node.steps, node.then_not)
    if isinstance(node, Top):  # its `of` may name segments too
        return (node.of,)
    return ()


def _shape(rule: Rule) -> tuple[int, list[tuple[int, SegmentRef]]]:
    """(levels of the rule's own tree, each segment reference with its level; root = 1),
    walked without recursion."""
    deepest, refs = 0, []
    stack = [(rule, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(node, SegmentRef):
            refs.append((level, node))
        stack.extend((child, level + 1) for child in reversed(_children(node)))
    return deepest, refs


def segment_refs(rule: Rule) -> list[SegmentRef]:
    """Every {"segment": ...} node of a rule tree, in the order written."""
    return [ref for _, ref in _shape(rule)[1]]


def _json_refs(rule: Any) -> set[str]:
    """The segment names a stored JSON rule names (for a rule that no longer parses)."""
    found, stack = set(), [rule]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("segment"), str):
                found.add(node["segment"])
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


def check_references(name: str, rule: Rule, segments: SegmentSet) -> None:
    """Every segment the rule refers to exists, and none leads back to `name` through
    the rules of dynamic and materialized segments (RuleError naming the path)."""
    for ref in segment_refs(rule):
        if ref.name != name:
            segments.get(ref.name)  # NotFound for an unknown one
        trail = _path_to(name, ref.name, segments)
        if trail is not None:
            cycle = " -> ".join([name, *trail])
            raise RuleError(ref.path, f"segments refer to each other in a cycle: {cycle}")


def _path_to(target: str, start: str, segments: SegmentSet) -> list[str] | None:
    """The segment names from `start` to `target` along the rules of dynamic and
    materialized segments, if `target` is reachable (searched without recursion)."""
    came_from: dict[str, str | None] = {start: None}
    stack = [start]
    while stack:
        here = stack.pop()
        if here == target:
            trail = [here]
            while (before := came_from[trail[-1]]) is not None:
                trail.append(before)
            return trail[::-1]
        segment = segments.segments.get(here)
        for used in sorted(segment.uses()) if segment is not None else ():
            if used not in came_from:
                came_from[used] = here
                stack.append(used)
    return None


@dataclass(frozen=True)
class Chain:
    """How deep a segment's rule is with the dynamic segments it uses written in place."""

    depth: int  # levels
    names: tuple[str, ...]  # the deepest way down: this segment, then those it inlines
    path: str  # where that way leaves this segment's rule ("$" if it stays inside)

    def shown(self) -> str:
        names = list(self.names)
        if len(names) > 8:
            names = [*names[:4], f"... ({len(names) - 6} more)", *names[-2:]]
        return " -> ".join(names)

    def too_deep(self) -> str:
        return (f"it is {self.depth} levels deep with the rules of the dynamic segments it "
                f"uses written in place ({self.shown()}); the limit is {MAX_CHAIN_DEPTH}")


def _chain_of(name: str, rule: Rule, segments: Mapping[str, Segment],
              known: Mapping[str, Chain]) -> Chain:
    """A rule's chain, given the chains of the dynamic segments it uses."""
    own, refs = _shape(rule)
    best = Chain(own, (name,), "$")
    for level, ref in refs:
        inner = known.get(ref.name) if _inlined(segments, ref.name) else None
        if inner is not None and level + inner.depth > best.depth:
            best = Chain(level + inner.depth, (name, *inner.names), ref.path)
    return best


def _inlined(segments: Mapping[str, Segment], name: str) -> bool:
    """Whether {"segment": name} is evaluated by evaluating that segment's rule."""
    segment = segments.get(name)
    return segment is not None and segment.kind == DYNAMIC and segment.typed is not None


def chain_depths(segments: Mapping[str, Segment]) -> dict[str, Chain]:
    """The chain of every segment with a rule, each computed once and without recursion
    (a cycle, which only a damaged store could hold, is cut where it closes)."""
    done: dict[str, Chain] = {}
    for start in segments:
        stack, opened = [start], set()
        while stack:
            name = stack[-1]
            segment = segments[name]
            if name in done or segment.typed is None:
                stack.pop()
                continue
            waiting = [ref.name for ref in segment_refs(segment.typed)
                       if _inlined(segments, ref.name) and ref.name not in done
                       and ref.name not in opened]
            if waiting and name not in opened:
                opened.add(name)
                stack.extend(waiting)
                continue
            done[name] = _chain_of(name, segment.typed, segments, done)
            opened.discard(name)
            stack.pop()
    return done


def check_chains(name: str, before: SegmentSet, after: SegmentSet) -> None:
    """RuleError when a change to segment `name` makes its chain, or the chain of a
    segment that uses it, deeper than MAX_CHAIN_DEPTH (chains that were already deeper
    in an older store and do not grow are left for their owners to repair)."""
    old, new = before.chains, after.chains
    over = [chain for other, chain in new.items() if chain.depth > MAX_CHAIN_DEPTH
            and (other == name or chain.depth > (old[other].depth if other in old else 0))]
    if not over:
        return
    own = new.get(name)
    if own is not None and own in over:
        raise RuleError(own.path, f"segment {name!r} would be {own.depth} levels deep with "
                        f"the rules of the dynamic segments it uses written in place "
                        f"({own.shown()}); the limit is {MAX_CHAIN_DEPTH}")
    worst = max(over, key=lambda chain: chain.depth)
    path = own.path if own is not None else "$"
    raise RuleError(path, f"this rule would make segment {worst.names[0]!r}, which uses "
                    f"{name!r}, {worst.depth} levels deep with the rules of the dynamic "
                    f"segments it uses written in place ({worst.shown()}); the limit is "
                    f"{MAX_CHAIN_DEPTH}")


# ---------------------------------------------------------------------- persistence
def _put_point(store: Store, txn: Txn, segment: Segment, at: int, size: int,
               cause: str) -> Segment:
    """Record a history point; the segment with its point counter advanced."""
    key = K.history_key(segment.name, at, segment.points)
    store.put(txn, DB, key, orjson.dumps({"size": size, "cause": cause,
                                          "recorded_at": _wall()}))
    return replace(segment, points=segment.points + 1)


def _delete_segment(store: Store, txn: Txn, name: str) -> None:
    store.delete(txn, DB, K.segment_key(name))
    store.delete_prefix(txn, DB, K.members_prefix(name))
    store.delete_prefix(txn, DB, K.history_prefix(name))


def load_segments(store: Store, txn: Txn, snapshot: Snapshot) -> SegmentSet:
    """Every stored segment; rules are parsed against the snapshot's schema. A segment
    whose rule cannot be evaluated any more is kept, with the reason (logged once)."""
    found: dict[str, Segment] = {}
    definitions = K.segment_key("")
    for key, raw in store.items(txn, DB, definitions):
        name = bytes(key[len(definitions):]).decode()
        data = orjson.loads(raw)
        members = None
        if data["kind"] != DYNAMIC:
            parts = [BitMap.deserialize(bytes(v))
                     for _, v in store.items(txn, DB, K.members_prefix(name))]
            members = BitMap.union(*parts) if parts else BitMap()
        typed, problem = None, None
        if data["kind"] not in KINDS:
            raise StoreError(f"segment {name!r}: unknown kind {data['kind']!r}")
        if data["kind"] != STATIC:
            try:
                typed = parse_rule(data["rule"], snapshot.schema)
            except (RuleError, RecursionError) as exc:
                problem = f"its stored rule is no longer valid: {_reason(exc)}"
        found[name] = Segment(name, data["kind"], data["rule"], typed, members,
                              data["created_at"], data.get("refreshed_at"),
                              data.get("refresh_every"), data.get("points", 0),
                              data.get("refreshed_wall"), problem,
                              tuple(data.get("tags", ())))  # older stores: no tags
    segments = SegmentSet(MappingProxyType(found))
    for segment in segments:
        try:
            segments.rule_of(segment) if segment.kind != STATIC else None
        except SegmentUnusable as exc:
            log.warning("%s (it is listed, and evaluating it is refused)", exc)
    return segments


def _reason(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply to read"
    return str(exc)


def open_segments(engine: Engine) -> Segments:
    """Load the engine's stored segments, publish them on it, and manage them."""
    if "segment" not in engine.schema.events:  # so entered/exited rules parse from the start
        engine.declare_schema({"events": {"segment": T.KEYWORD}}, source="segments")
    with engine.store.read() as txn:
        segments = load_segments(engine.store, txn, engine.snapshot)
    engine.set_segments(segments)
    return Segments(engine)


# ---------------------------------------------------------------------- a change
@dataclass
class _Plan:
    """A membership change, computed on the snapshot the write batch is built on."""

    old: Segment | None
    new: Segment | None  # None: the segment is deleted
    entered: BitMap = field(default_factory=BitMap)  # live profiles that enter
    exited: BitMap = field(default_factory=BitMap)  # profiles that leave (events: live ones)
    at: int = 0  # µs: the events' time and the history point's
    cause: str | None = None  # a history point to record, if any
    size: int = 0
    unknown: tuple[str, ...] = ()
    lookup: SegmentSet = field(default_factory=SegmentSet)

    def records(self, engine: Engine, live: BitMap) -> Iterator[dict[str, Any]]:
        name = (self.new or self.old).name  # type: ignore[union-attr]
        ts = T.format_timestamp(self.at)
        for event, ids in ((ENTERED, self.entered), (EXITED, self.exited & live)):
            for external in engine.ids.externals(ids_of(ids)):
                yield {"profile": external, "event": event, "ts": ts, "segment": name}

    def write(self, store: Store, txn: Txn) -> None:
        if self.new is None:
            assert self.old is not None
            _delete_segment(store, txn, self.old.name)
            return
        new = self.new
        if new.members is not None:
            whole = self.old is None or self.old.members is None
            chunks = None if whole else chunks_of(self.entered | self.exited)
            store.put_chunks(txn, DB, K.members_prefix(new.name), new.members, chunks)
        store.put(txn, DB, K.segment_key(new.name), orjson.dumps(new.definition()))


# ---------------------------------------------------------------------- the manager
class Segments:
    """Creates, changes and answers questions about the segments of one Engine.

    The published SegmentSet lives in the engine's snapshot; writes go one at a time.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.RLock()
        self._tops: TopSets | None = None  # see with_tops

    def with_tops(self, tops: TopSets) -> Segments:
        """This manager (its lock too) computing its changes with these top sets in place
        of the snapshot's own: a sharded store's, chosen over every shard."""
        view = copy.copy(self)
        view._tops = tops
        return view

    def _evaluated_on(self, snap: Snapshot) -> Snapshot:
        return snap if self._tops is None else replace(snap, tops=self._tops)

    @property
    def current(self) -> SegmentSet:
        found = self.engine.snapshot.segments
        return found if isinstance(found, SegmentSet) else SegmentSet()

    # ------------------------------------------------------------------ reading
    def get(self, name: str, as_of: Any = None) -> SegmentInfo:
        snap = self._evaluated_on(self.engine.snapshot)
        return self._info(snap, _segments_of(snap).get(name), as_of)

    def list(self, as_of: Any = None, tag: str | None = None) -> list[SegmentInfo]:
        """Every segment by name; with `tag`, only those carrying it."""
        snap = self._evaluated_on(self.engine.snapshot)
        if tag is not None:
            check_tag(tag)
        return [self._info(snap, s, as_of) for s in _segments_of(snap)
                if tag is None or tag in s.tags]

    def _info(self, snap: Snapshot, segment: Segment, as_of: Any) -> SegmentInfo:
        """A segment's definition and size; one that cannot be evaluated is still
        described (size 0, with the reason), so a listing never fails because of it."""
        problem = None
        try:
            size = _size(snap, segment, _micros(as_of))
        except SegmentUnusable as exc:
            size, problem = 0, exc.reason
        except RecursionError:
            size, problem = 0, "its rule is nested too deeply to evaluate"
        return SegmentInfo(segment.name, segment.kind, segment.rule, size,
                           segment.created_at, segment.refreshed_at, segment.refresh_every,
                           problem, segment.tags)

    def segments_of(self, profile_id: str, as_of: Any = None) -> list[str]:
        """The names of the segments a live profile is in (NotFound for an unknown one);
        segments that cannot be evaluated are left out."""
        snap = self.engine.snapshot
        dense = self.engine.dense_id(profile_id, snap)
        evaluator = Evaluator(snap, _micros(as_of))
        found = []
        for segment in _segments_of(snap):
            try:
                if evaluator.contains(SegmentRef(segment.name, "$"), dense):
                    found.append(segment.name)
            except (SegmentUnusable, RecursionError):
                continue
        return found

    def history(self, name: str) -> list[Point]:
        """The segment's size history in the order it was recorded (not by as_of)."""
        self.current.get(name)
        prefix = K.history_prefix(name)
        store = self.engine.store
        points = []
        with store.read() as txn:
            for key, raw in store.items(txn, DB, prefix):
                at, seq = K.history_point(bytes(key), prefix)
                data = orjson.loads(raw)
                points.append((seq, Point(at, data["size"], data["cause"],
                                          data.get("recorded_at"))))
        points.sort(key=lambda found: found[0])  # stable: older stores' equal seqs by as_of
        return [point for _, point in points]

    def overlap(self, names: Sequence[str], as_of: Any = None) -> Overlap:
        """Each segment's size, and the size of every pairwise intersection."""
        snap = self.engine.snapshot
        evaluator = Evaluator(snap, _micros(as_of))
        segments = _segments_of(snap)
        for name in names:
            segments.get(name)
        bitmaps = [evaluator.bitmap(SegmentRef(n, "$")) for n in names]
        n = len(bitmaps)
        matrix = [[0] * n for _ in range(n)]
        for i in range(n):
            matrix[i][i] = len(bitmaps[i])
            for j in range(i + 1, n):
                matrix[i][j] = matrix[j][i] = bitmaps[i].intersection_cardinality(bitmaps[j])
        return Overlap(tuple(names), tuple(len(b) for b in bitmaps),
                       tuple(tuple(row) for row in matrix))

    def metrics(self, rule: Any, as_of: Any = None, amount_field: str = "amount") -> Metrics:
        """Profiles, orders and revenue of a rule's (or {"segment": S}'s) profiles."""
        from bitseg.index.insights import base_total
        from bitseg.index.orders import order_totals

        snap = self.engine.snapshot
        as_of_us = _micros(as_of)
        found = Evaluator(snap, as_of_us).bitmap(self.engine.parse(rule, snap))
        amount_type = snap.schema.orders.get(amount_field)
        if amount_type is None and amount_field != "amount":  # no orders have it (yet)
            raise BitsegError(f"amount_field: unknown order field {amount_field!r}")
        if amount_type not in (None, T.INT, T.FLOAT):
            raise BitsegError(f"amount_field: {amount_field!r} is a {amount_type} field, "
                              f"not a number")
        kind = amount_type or T.FLOAT
        orders, customers, revenue = order_totals(snap.orders, found, as_of_us, amount_field,
                                                  kind)
        total = base_total(snap, as_of_us, amount_field, kind)  # kept per snapshot
        return Metrics(len(found), len(snap.live), orders, customers, Fraction(revenue),
                       Fraction(total))

    # ------------------------------------------------------------------ writing
    def create(self, name: str, kind: str, *, rule: Any = None, ids: Iterable[str] = (),
               as_of: Any = None, refresh_every: int | None = None,
               tags: Iterable[str] = ()) -> tuple[SegmentInfo, Change]:
        """A new segment; static from ids and/or a rule's members at as_of, materialized
        counted at as_of. The Change says who entered and which ids were unknown."""
        check_name(name)
        tags = check_tags(tags)
        if kind not in KINDS:
            raise BitsegError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        ids = list(ids)
        if kind != STATIC and rule is None:
            raise BitsegError(f"a {kind} segment needs a rule")
        if kind != STATIC and ids:
            raise BitsegError(f"profile ids are for static segments; a {kind} segment's "
                              f"members come from its rule")
        _check_every(kind, refresh_every)
        as_of_us = _micros(as_of)
        with self._lock:
            if name in self.current:
                raise AlreadyExists("segment", name)
            snap = self.engine.snapshot
            typed = self.engine.parse(rule, snap) if rule is not None else None
            rule_json = _json(rule)
            current = _segments_of(snap)
            if typed is not None:
                if kind == STATIC:
                    for ref in segment_refs(typed):
                        current.get(ref.name)
                else:
                    check_references(name, typed, current)
                # a static's rule is evaluated once, here: its chain is checked all the same
                checked = Segment(name, MATERIALIZED if kind == STATIC else kind, rule_json,
                                  typed)
                check_chains(name, current, current.with_segment(checked))
            segment = Segment(name, kind, rule_json, None if kind == STATIC else typed,
                              None, _wall(), None, refresh_every, tags=tags)
            if kind == DYNAMIC:
                self._write_definition(segment)
                return self.get(name, as_of_us), Change(0, 0, 0, as_of_us)

            def plan(snap: Snapshot) -> _Plan:
                members, unknown = BitMap(), []
                if typed is not None:
                    members = BitMap(Evaluator(snap, as_of_us).bitmap(typed))
                if ids:
                    found, unknown = self._resolve(ids, snap)
                    members |= found
                new = replace(segment, members=members, refreshed_at=as_of_us,
                              refreshed_wall=_wall())
                return _Plan(None, new, members, BitMap(), as_of_us, "create", len(members),
                             tuple(unknown))

            done = self._commit(plan)
        return self.get(name, as_of_us), _change(done)

    def update(self, name: str, *, rule: Any = None, refresh_every: int | None = None,
               clear_refresh_every: bool = False, as_of: Any = None) -> tuple[SegmentInfo, Change]:
        """Change a dynamic or materialized segment's rule (a materialized one is recounted
        at as_of at once) and/or a materialized segment's refresh interval."""
        as_of_us = _micros(as_of)
        with self._lock:
            snap = self.engine.snapshot
            segment = _segments_of(snap).get(name)
            if segment.kind == STATIC:
                raise BitsegError(f"segment {name!r} is static: its members change only by "
                                  f"adding and removing ids")
            if refresh_every is not None or clear_refresh_every:
                _check_every(segment.kind, refresh_every)
                segment = replace(segment, refresh_every=refresh_every)
            if rule is None:
                self._write_definition(segment)
                return self.get(name, as_of_us), Change(
                    _size(self._evaluated_on(snap), segment, as_of_us), 0, 0, as_of_us)
            typed = self.engine.parse(rule, snap)
            current = _segments_of(snap)
            check_references(name, typed, current)
            segment = replace(segment, rule=_json(rule), typed=typed, problem=None)
            check_chains(name, current, current.with_segment(segment))
            if segment.kind == DYNAMIC:
                self._write_definition(segment)
                return self.get(name, as_of_us), Change(0, 0, 0, as_of_us)
            done = self._commit(lambda snap: _recount(snap, segment, as_of_us, "update"))
        return self.get(name, as_of_us), _change(done)

    def retag(self, name: str, add: Iterable[str] = (), remove: Iterable[str] = ()
              ) -> SegmentInfo:
        """Add and/or remove tags of a segment (its members do not move)."""
        with self._lock:
            segment = self.current.get(name)
            tags = retagged(segment.tags, add, remove)
            if tags != segment.tags:
                self._write_definition(replace(segment, tags=tags))
        return self.get(name)

    def refresh(self, name: str, as_of: Any = None) -> Change:
        """Recount a materialized segment at as_of, recording entries, exits and a point.
        The schedule counts from now, the wall-clock moment of this refresh, whatever
        its as_of: a refresh at an earlier or later as_of holds until the next due time."""
        return self._refresh(name, _micros(as_of))

    def refresh_scheduled(self, name: str, now_us: int) -> Change:
        """The scheduler's refresh: at its tick's time, which is also the wall clock."""
        return self._refresh(name, now_us, now_us)

    def _refresh(self, name: str, as_of_us: int, wall_us: int | None = None) -> Change:
        with self._lock:
            segment = self.current.get(name)
            if segment.kind != MATERIALIZED:
                raise BitsegError(f"segment {name!r} is {segment.kind}: only materialized "
                                  f"segments are refreshed")
            done = self._commit(lambda snap: _recount(snap, _segments_of(snap).get(name),
                                                      as_of_us, "refresh", wall_us))
        return _change(done)

    def add(self, name: str, ids: Iterable[str]) -> Change:
        """Add live profiles by id to a static segment; unknown ids are reported back."""
        return self._edit(name, list(ids), adding=True)

    def remove(self, name: str, ids: Iterable[str]) -> Change:
        """Remove profiles by id from a static segment; unknown ids are reported back."""
        return self._edit(name, list(ids), adding=False)

    def _edit(self, name: str, ids: list[str], adding: bool) -> Change:
        with self._lock:
            kind = self.current.get(name).kind
            if kind != STATIC:
                raise BitsegError(f"segment {name!r} is {kind}: only static segments take "
                                  f"profiles by id")

            def plan(snap: Snapshot) -> _Plan:
                at = _wall()  # taken under the write lock, so points come in time order
                old = _segments_of(snap).get(name)
                assert old.members is not None
                given, unknown = self._resolve(ids, snap)
                if adding:
                    entered, exited = given - old.members, BitMap()
                    members = old.members | entered
                else:
                    entered, exited = BitMap(), given & old.members
                    members = old.members - exited
                new = replace(old, members=members, refreshed_at=at, refreshed_wall=at)
                changed = bool(entered or exited)
                return _Plan(old, new if changed else old, entered, exited, at,
                             ("add" if adding else "remove") if changed else None,
                             members.intersection_cardinality(snap.live), tuple(unknown))

            done = self._commit(plan)
        return _change(done)

    def delete(self, name: str) -> None:
        """Delete a segment, its members (who exit, recorded as events) and its history."""
        with self._lock:
            segments = self.current
            segment = segments.get(name)
            users = [s.name for s in segments if s.name != name and name in s.uses()]
            if users:
                raise SegmentInUse(name, users)
            if segment.kind == DYNAMIC:
                with self.engine.store.write() as txn:
                    _delete_segment(self.engine.store, txn, name)
                self.engine.set_segments(segments.without(name))
                return

            def plan(snap: Snapshot) -> _Plan:
                old = _segments_of(snap).get(name)
                return _Plan(old, None, BitMap(), BitMap(old.members), _wall())

            self._commit(plan)

    def record_size(self, name: str, as_of: Any = None) -> Point:
        """Record a point of any segment's size history now (its size at as_of)."""
        as_of_us = _micros(as_of)
        with self._lock:
            snap = self.engine.snapshot
            segment = _segments_of(snap).get(name)
            size = _size(self._evaluated_on(snap), segment, as_of_us)
            store = self.engine.store
            with store.write() as txn:
                segment = _put_point(store, txn, segment, as_of_us, size, "record")
                store.put(txn, DB, K.segment_key(name), orjson.dumps(segment.definition()))
            self.engine.set_segments(self.current.with_segment(segment))
        return Point(as_of_us, size, "record")

    def due(self, now_us: int) -> list[str]:
        """The materialized segments whose refresh interval has passed since their last
        refresh by the wall clock (not since its as_of)."""
        found = []
        for s in self.current:
            last = s.last_wall()
            if s.kind == MATERIALIZED and s.refresh_every \
                    and (last is None or now_us - last >= s.refresh_every * US):
                found.append(s.name)
        return found

    # ------------------------------------------------------------------ helpers
    def _resolve(self, ids: list[str], snap: Snapshot) -> tuple[BitMap, list[str]]:
        """(dense ids of the live profiles among ids, the others in the order given)."""
        found, unknown = BitMap(), []
        lookup = self.engine.ids.lookup
        for external in ids:  # through the snapshot's reader: the ids of its version
            dense = lookup(external, reader=snap.reader) if isinstance(external, str) else None
            if dense is None or dense not in snap.live:
                unknown.append(external)
            else:
                found.add(dense)
        return found, unknown

    def _write_definition(self, segment: Segment) -> None:
        """Store and publish a definition change that moves no profile."""
        with self.engine.store.write() as txn:
            self.engine.store.put(txn, DB, K.segment_key(segment.name),
                                  orjson.dumps(segment.definition()))
        self.engine.set_segments(self.current.with_segment(segment))

    def _commit(self, plan: Callable[[Snapshot], _Plan]) -> _Plan:
        """Compute a change on the snapshot the write batch builds on, and commit it with
        its events and history point in that batch's transaction."""
        engine = self.engine
        made: list[_Plan] = []

        def records(snap: Snapshot) -> Iterator[dict[str, Any]]:
            made.append(plan(self._evaluated_on(snap)))  # the batch's base, under its lock
            return made[0].records(engine, snap.live)

        def also(txn: Txn, snap: Snapshot) -> dict[str, Any]:
            done = made[0]
            segments = _segments_of(snap)
            if done.new is None:
                done.lookup = segments.without(done.old.name)  # type: ignore[union-attr]
            else:
                if done.cause is not None:
                    done.new = _put_point(engine.store, txn, done.new, done.at, done.size,
                                          done.cause)
                done.lookup = segments.with_segment(done.new)
            done.write(engine.store, txn)
            return {"segments": done.lookup}

        engine.track_events(records, also=also, server_events=True)
        return made[0]

    def create_statics(self, pieces: Sequence[tuple[str, Any]], as_of: Any = None
                       ) -> list[tuple[SegmentInfo, Change]]:
        """Several static segments, each its rule's members at as_of, in one transaction
        with their entries: all are created or none (a name taken: AlreadyExists)."""
        as_of_us = _micros(as_of)
        with self._lock:
            snap = self.engine.snapshot
            current = _segments_of(snap)
            wanted: list[tuple[str, Any, Rule]] = []
            for name, rule in pieces:
                check_name(name)
                if name in current or any(name == w[0] for w in wanted):
                    raise AlreadyExists("segment", name)
                typed = self.engine.parse(rule, snap)
                for ref in segment_refs(typed):
                    current.get(ref.name)
                check_chains(name, current, current.with_segment(
                    Segment(name, MATERIALIZED, _json(rule), typed)))
                wanted.append((name, _json(rule), typed))

            def plans(snap: Snapshot) -> list[_Plan]:
                evaluator, out = Evaluator(snap, as_of_us), []
                for name, rule_json, typed in wanted:
                    members = BitMap(evaluator.bitmap(typed))
                    new = Segment(name, STATIC, rule_json, None, members, _wall(), as_of_us,
                                  refreshed_wall=_wall())
                    out.append(_Plan(None, new, members, BitMap(), as_of_us, "create",
                                     len(members)))
                return out

            done = self._commit_all(plans)
        return [(self.get(p.new.name, as_of_us), _change(p)) for p in done]  # type: ignore

    def _commit_all(self, plan: Callable[[Snapshot], list[_Plan]]) -> list[_Plan]:
        """_commit for several new segments at once: one batch, one transaction."""
        engine = self.engine
        made: list[list[_Plan]] = []

        def records(snap: Snapshot) -> Iterator[dict[str, Any]]:
            made.append(plan(self._evaluated_on(snap)))
            for done in made[0]:
                yield from done.records(engine, snap.live)

        def also(txn: Txn, snap: Snapshot) -> dict[str, Any]:
            segments = _segments_of(snap)
            for done in made[0]:
                assert done.new is not None and done.cause is not None
                done.new = _put_point(engine.store, txn, done.new, done.at, done.size,
                                      done.cause)
                segments = segments.with_segment(done.new)
                done.write(engine.store, txn)
            for done in made[0]:
                done.lookup = segments
            return {"segments": segments}

        engine.track_events(records, also=also, server_events=True)
        return made[0]


def _recount(snap: Snapshot, segment: Segment, as_of_us: int, cause: str,
             wall_us: int | None = None) -> _Plan:
    """A materialized segment counted afresh: who entered and who exited."""
    segments = _segments_of(snap)
    old = segments.get(segment.name)
    assert segment.members is not None and old.members is not None
    rule = segments.with_segment(segment).rule_of(segment) if segment is not old \
        else segments.rule_of(segment)
    fresh = with_fresh_sources(snap)  # a refresh re-runs its sql queries (no cached ids)
    members = BitMap(Evaluator(fresh, as_of_us).bitmap(rule))
    entered = members - old.members
    exited = old.members - members
    new = replace(segment, members=members, refreshed_at=as_of_us,
                  refreshed_wall=_wall() if wall_us is None else wall_us)
    return _Plan(old, new, entered, exited, as_of_us, cause, len(members))


def _segments_of(snap: Snapshot) -> SegmentSet:
    found = snap.segments
    return found if isinstance(found, SegmentSet) else SegmentSet()


def _size(snap: Snapshot, segment: Segment, as_of_us: int) -> int:
    if segment.members is not None:
        return segment.members.intersection_cardinality(snap.live) if segment.members else 0
    return Evaluator(snap, as_of_us).count(SegmentRef(segment.name, "$"))


def _change(plan: _Plan) -> Change:
    return Change(plan.size, len(plan.entered), len(plan.exited), plan.at, plan.unknown)


def _check_every(kind: str, every: int | None) -> None:
    if every is None:
        return
    if kind != MATERIALIZED:
        raise BitsegError(f"refresh_every: only materialized segments are refreshed, "
                          f"not {kind} ones")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise BitsegError(f"refresh_every: expected a whole number of seconds >= 1, "
                          f"got {every!r}")


def _json(rule: Any) -> Any:
    """A rule's JSON form as stored (text is parsed; the engine has validated it)."""
    if rule is None or isinstance(rule, dict):
        return rule
    return orjson.loads(rule)


def _micros(as_of: Any) -> int:
    from bitseg.index.engine import as_of_micros

    return as_of_micros(as_of)


def _wall() -> int:
    return time.time_ns() // 1000


# ---------------------------------------------------------------------- the schedule
@dataclass
class _Failing:
    """A segment whose scheduled refreshes fail: how often, and when to try again."""

    rule: Any  # its rule when it failed: a changed rule is tried at once
    attempts: int
    retry_at: int  # µs


class RefreshScheduler(Ticker):
    """A daemon thread that refreshes due materialized segments every `tick` seconds.

    A segment whose refresh fails is logged once (a traceback only for an unexpected
    error), then tried again after tick × 2, 4, 8, … seconds, at most `max_pause`
    apart, until it works again (logged) or is refreshed on request or changed.
    """

    def __init__(self, segments: Segments, tick: float = 1.0,
                 max_pause: float = 3600.0) -> None:
        super().__init__(tick, "bitseg-refresh")
        self.segments = segments
        self.max_pause = max_pause
        self._failing: dict[str, _Failing] = {}

    def run_once(self, now_us: int | None = None) -> list[str]:
        """Refresh every due segment that is not pausing after failures; the names
        refreshed. One failure never stops the others."""
        now_us = _wall() if now_us is None else now_us
        due = self.segments.due(now_us)
        self._forget_recovered(set(due))
        done = []
        for name in due:
            failing = self._failing.get(name)
            if failing is not None and now_us < failing.retry_at \
                    and failing.rule == self._rule(name):
                continue
            try:
                self.segments.refresh_scheduled(name, now_us)
            except NotFound:
                continue  # deleted meanwhile
            except Exception as exc:  # one segment must not stop the others
                self._failed(name, now_us, exc)
                continue
            done.append(name)
            if self._failing.pop(name, None) is not None:
                log.info("scheduled refresh of segment %r works again", name)
        return done

    def _failed(self, name: str, now_us: int, exc: Exception) -> None:
        failing = self._failing.get(name)
        attempts = 1 if failing is None else failing.attempts + 1
        pause = min(self.interval * 2 ** attempts, self.max_pause)
        self._failing[name] = _Failing(self._rule(name), attempts,
                                       now_us + int(pause * US))
        if failing is not None:
            return  # said once already
        if isinstance(exc, (BitsegError, PartUnavailable)):
            log.warning("scheduled refresh of segment %r failed: %s; trying again after "
                        "growing pauses (at most %.0f s), and saying so when it works",
                        name, exc, self.max_pause)
        else:
            log.error("scheduled refresh of segment %r failed unexpectedly; trying again "
                      "after growing pauses (at most %.0f s)", name, self.max_pause,
                      exc_info=exc)

    def _forget_recovered(self, due: set[str]) -> None:
        """Segments no longer due were refreshed on request, or deleted, meanwhile."""
        for name in [n for n in self._failing if n not in due]:
            del self._failing[name]
            if name in self.segments.current:
                log.info("segment %r was refreshed on request or rescheduled meanwhile; "
                         "its failed scheduled refreshes are forgotten", name)

    def _rule(self, name: str) -> Any:
        segment = self.segments.current.segments.get(name)
        return None if segment is None else segment.rule
