"""Segment changes over shards: `top` rules materialized as one store would, and the
schedule of materialized segments' refreshes, both run by the front.

Top. A `top` node ranks the whole store (docs/rules.md, "Top N"), so no shard can
materialize a segment with one by itself: its own top N is not the store's. The front
first chooses the top sets over every shard (shard_reads.resolve_tops, as the reads do),
then every shard counts its part of the segment with those sets in place of its own
(Segments.with_tops), inside the write batch that records its entries and exits; the
sizes, entries and exits are summed. Creates, updates, splits and refreshes of a static
or materialized segment with a top node take this way. While the shards count, the
front's writes wait (ShardWrites' lock), so the top sets are those of the data counted;
and the front's segment changes go one at a time, as one store's do, so a refresh never
counts a rule other than the one whose top sets were chosen.

A dynamic segment's top nodes are chosen where it is evaluated: a shard of several never
takes its own top N (index/top.TopsUnresolved), so a read that meets one, through a rule
naming the segment or a read of the segment itself (its size, SegmentsOf, Overlap, an
export), has its top sets chosen over every shard and is asked again (shard_reads,
"asked again"). A change whose rule names a segment, which may be such a dynamic one
or name one, chooses the top sets it meets first, as for a top node of its own.

The schedule. `ShardSchedule` answers what a RefreshScheduler asks of one store's
Segments: which materialized segments are due (on any shard: a refresh that failed on
one shard leaves it due there), and their refresh, through the front, so top rules are
chosen over every shard at each tick too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Any

import orjson

from bitseg.index import types as T
from bitseg.index.errors import BitsegError
from bitseg.index.segments import (
    MATERIALIZED,
    Change,
    RefreshScheduler,
    Segment,
    Segments,
    SegmentSet,
)
from bitseg.index.split import split_segment
from bitseg.server.service import ShardUnavailable
from bitseg.server.shard_reads import Chosen, chosen_tops, resolve_tops
from bitseg.server.shard_writes import writes_for

log = logging.getLogger("bitseg.segments")
CHANGES = ("create", "update", "refresh", "refresh_scheduled")  # and "split"


def has_top(rule: Any, keys: tuple[str, ...] = ("top",)) -> bool:
    """Whether a rule (JSON text or value) has a `top` node (a node of one of `keys`)
    anywhere."""
    if isinstance(rule, (str, bytes)):
        try:
            rule = orjson.loads(rule)
        except orjson.JSONDecodeError:
            return False  # the shards say what is wrong with it
    return _names(rule, keys)


def _names(value: Any, keys: tuple[str, ...]) -> bool:
    """Whether a parsed rule has a node of one of `keys` anywhere (its strings are
    values, never rules: parsing each as JSON cost a Count ~0.1 ms of errors)."""
    if isinstance(value, dict):
        return any(k in value for k in keys) or any(_names(v, keys) for v in value.values())
    if isinstance(value, list):
        return any(_names(v, keys) for v in value)
    return False


def may_meet_top(rule: Any) -> bool:
    """Whether evaluating a rule may meet a top node: its own, or a dynamic segment's
    that it names (which only the shards know)."""
    return has_top(rule, ("top", "segment"))


# ---------------------------------------------------------------------- on a shard
def change_on_shard(shard: Any, change: str, kwargs: dict[str, Any], rule: Any,
                    chosen: list[Chosen] | None) -> Any:
    """Segments.<change>(**kwargs) (split: index.split.split_segment) on this shard;
    with `chosen` (every shard's top sets of `rule`), counted with this shard's."""
    segments: Segments = shard.segments
    if chosen is not None:  # the rule's top sets, this shard's ids
        segments = segments.with_tops(chosen_tops(shard.engine, rule, chosen[shard.index]))
    if change == "split":
        return split_segment(segments, **kwargs)
    if change not in CHANGES:
        raise BitsegError(f"{change!r} is not a segment change")
    return getattr(segments, change)(**kwargs)


def scheduled(segments: Segments, now_us: int) -> list[tuple[str, Any, bool]]:
    """(name, rule, due at now_us) of each materialized segment with a refresh_every."""
    due = set(segments.due(now_us))
    return [(s.name, s.rule, s.name in due) for s in segments.current
            if s.kind == MATERIALIZED and s.refresh_every]


# ---------------------------------------------------------------------- at the front
class SegmentChanges:
    """The front's segment changes, one at a time; those of a top rule with their top
    sets chosen over every shard first."""

    def __init__(self, shards: Any) -> None:
        self.shards = shards
        self.lock = threading.RLock()  # held from reading a segment to changing it

    @contextmanager
    def changing(self, rules: Sequence[Any], as_of: datetime, kind: str | None = None
                 ) -> Iterator[list[list[Chosen] | None]]:
        """Hold the front's segment changes while one is made; yield each rule's top sets
        over every shard (None for a rule that meets no top node, or with one shard).
        While any has them, no batch is written (ShardWrites' lock). A dynamic segment
        (`kind`) stores no members: its sets serve the size the change answers."""
        with self.lock:
            topped = [self.shards.count > 1 and r is not None and may_meet_top(r)
                      for r in rules]
            if not any(topped):
                yield [None] * len(rules)
                return
            with writes_for(self.shards).held():
                yield [resolve_tops(self.shards, r, as_of) if t else None
                       for r, t in zip(rules, topped, strict=True)]

    def refresh(self, name: str, as_of: datetime, wall_us: int | None = None) -> Change:
        """Refresh a materialized segment on every shard (at wall_us by the schedule); the
        change summed. The rule is read and counted in one hold of the changes."""
        if wall_us is None:
            change, kwargs = "refresh", {"name": name, "as_of": as_of}
        else:
            change, kwargs = "refresh_scheduled", {"name": name, "now_us": wall_us}
        with self.lock:
            info = self.shards.call(0, "get_segment", name, as_of)  # NotFound first
            rule = info.rule if info.kind == MATERIALIZED else None  # others: shards refuse
            with self.changing([rule], as_of) as (chosen,):
                return summed(self.shards.each("segment_change", change, kwargs, rule,
                                               chosen))


def summed(changes: list[Change]) -> Change:
    """The shards' changes of one segment as one store's (unknown ids: shard 0's)."""
    return replace(changes[0], size=sum(c.size for c in changes),
                   entered=sum(c.entered for c in changes),
                   exited=sum(c.exited for c in changes))


_MADE = threading.Lock()


def changes_for(shards: Any) -> SegmentChanges:
    """The one SegmentChanges of a ShardSet (the gRPC servicer, the console's and the
    schedule share it, so their changes go one at a time)."""
    with _MADE:
        found = getattr(shards, "segment_changes", None)
        if found is None:
            found = shards.segment_changes = SegmentChanges(shards)
        return found


class ShardSchedule:
    """What a RefreshScheduler asks of one store's Segments, answered over the shards:
    `due`, `refresh_scheduled`, and `current` (the scheduled segments as last seen)."""

    def __init__(self, shards: Any) -> None:
        self.shards = shards
        self.current = SegmentSet()

    def due(self, now_us: int) -> list[str]:
        """The segments due on any shard; none at a tick when a shard does not answer
        (its actor restarting), so the schedule goes on at the next tick."""
        try:
            found = self.shards.each("scheduled_segments", now_us)
        except ShardUnavailable as exc:
            log.warning("scheduled refreshes skip a tick: %s", exc)
            return []
        self.current = SegmentSet(MappingProxyType({
            name: Segment(name, MATERIALIZED, rule) for rows in found for name, rule, _ in rows}))
        return sorted({name for rows in found for name, _, due in rows if due})

    def refresh_scheduled(self, name: str, now_us: int) -> Change:
        as_of = T.EPOCH + timedelta(microseconds=now_us)
        return changes_for(self.shards).refresh(name, as_of, now_us)


def refresh_scheduler(shards: Any, tick: float) -> RefreshScheduler:
    """One store's RefreshScheduler (not started), over the shards through the front."""
    return RefreshScheduler(ShardSchedule(shards), tick)  # type: ignore[arg-type]  # duck
