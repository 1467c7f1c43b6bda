"""Caches of parsed rules and of results, so a repeated question costs a lookup.

Results belong to one snapshot: a write publishes a new snapshot, and the cache starts
afresh for it. A result is keyed by the typed rule and, only when the rule depends on
time (windows, relative dates, anniversaries, dynamic segments that do), by as_of.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import orjson
from pyroaring import BitMap

from bitseg.index.rules import (
    And,
    Cond,
    DaysAgo,
    EventCond,
    Not,
    Or,
    OrdersCond,
    Rule,
    SegmentRef,
)
from bitseg.index.snapshot import Snapshot


def canonical(rule: Any) -> bytes | None:
    """A rule in JSON form as canonical bytes (sorted keys), or None if it is not JSON."""
    if isinstance(rule, bytes):
        return rule
    if isinstance(rule, str):
        return rule.encode()
    try:
        return orjson.dumps(rule, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None


def depends_on_time(rule: Rule, snapshot: Snapshot, seen: frozenset[str] = frozenset()
                    ) -> bool:
    """Whether the rule's answer can change with as_of on the same data."""
    if isinstance(rule, (EventCond, OrdersCond)):
        return True
    if isinstance(rule, Cond):
        values = rule.value if isinstance(rule.value, tuple) else (rule.value,)
        return rule.op == "anniversary_in" or any(isinstance(v, DaysAgo) for v in values)
    if isinstance(rule, (And, Or)):
        return any(depends_on_time(c, snapshot, seen) for c in rule.children)
    if isinstance(rule, Not):
        return depends_on_time(rule.child, snapshot, seen)
    if isinstance(rule, SegmentRef):
        if rule.name in seen:
            return True  # a cycle: evaluation reports it
        try:
            found = snapshot.segments.resolve(rule.name)
        except Exception:  # unknown: evaluation reports it
            return True
        return not isinstance(found, BitMap) and depends_on_time(found, snapshot,
                                                                 seen | {rule.name})
    return False


class LRU:
    """A small thread-safe least-recently-used map."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: OrderedDict[Any, Any] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            found = self.items.get(key)
            if found is not None:
                self.items.move_to_end(key)
            return found

    def put(self, key: Any, value: Any) -> None:
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


class ResultCache:
    """Counts and member bitmaps of the current snapshot."""

    def __init__(self, counts: int = 4096, bitmaps: int = 32) -> None:
        self.snapshot: Snapshot | None = None
        self.counts = LRU(counts)
        self.bitmaps = LRU(bitmaps)
        self.lock = threading.Lock()

    def key(self, rule: Rule, snapshot: Snapshot, as_of_us: int) -> tuple:
        return (rule, as_of_us if depends_on_time(rule, snapshot) else None)

    def get(self, kind: str, snapshot: Snapshot, key: tuple) -> Any:
        if self.snapshot is not snapshot:
            return None
        return (self.counts if kind == "count" else self.bitmaps).get(key)

    def put(self, kind: str, snapshot: Snapshot, key: tuple, value: Any) -> None:
        with self.lock:
            if self.snapshot is not snapshot:
                self.snapshot = snapshot
                self.counts.clear()
                self.bitmaps.clear()
        (self.counts if kind == "count" else self.bitmaps).put(key, value)
