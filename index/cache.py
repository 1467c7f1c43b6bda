"""Caches of parsed rules and of results, so a repeated question costs a lookup.

Results belong to one snapshot: a write publishes a new snapshot, and the cache starts
afresh for it. A result is keyed by the typed rule and, only when the rule depends on
time (windows, relative dates, anniversaries, dynamic segments that do), by as_of.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson
from pyroaring import AbstractBitMap, BitMap

from bitseg.index.rules import (
    And,
    Cond,
    DaysAgo,
    EventCond,
    ItemsCond,
    Not,
    Or,
    OrdersCond,
    Rule,
    SegmentRef,
    SequenceCond,
)
from bitseg.index.snapshot import Snapshot
from bitseg.index.sqlrule import SqlRule
from bitseg.index.top import Top


def canonical(rule: Any) -> bytes | None:
    """A rule in JSON form as canonical bytes (sorted keys), or None if it is not JSON."""
    if isinstance(rule, bytes):
        return rule
    if isinstance(rule, str):
        return rule.encode()
    try:
        text = orjson.dumps(rule, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
    # orjson's bytes can keep ~20x their length allocated (4 MB for 200 KB measured):
    # a key the cache keeps is copied to its own size.
    return bytes(memoryview(text))


def depends_on_time(rule: Rule, snapshot: Snapshot, seen: frozenset[str] = frozenset()
                    ) -> bool:
    """Whether the rule's answer can change with as_of on the same data."""
    if isinstance(rule, (EventCond, OrdersCond, SequenceCond, ItemsCond)):
        return True
    if isinstance(rule, Cond):
        values = rule.value if isinstance(rule.value, tuple) else (rule.value,)
        return rule.op == "anniversary_in" or any(isinstance(v, DaysAgo) for v in values)
    if isinstance(rule, (And, Or)):
        return any(depends_on_time(c, snapshot, seen) for c in rule.children)
    if isinstance(rule, Not):
        return depends_on_time(rule.child, snapshot, seen)
    if isinstance(rule, Top):
        return depends_on_time(rule.of, snapshot, seen)
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


def uses_sources(rule: Rule, snapshot: Snapshot, seen: frozenset[str] = frozenset()) -> bool:
    """Whether the rule asks an external source (a sql node, itself or through a dynamic
    segment): its answer changes without a write, so results keep it only for its ttl."""
    if isinstance(rule, SqlRule):
        return True
    if isinstance(rule, (And, Or)):
        return any(uses_sources(c, snapshot, seen) for c in rule.children)
    if isinstance(rule, Not):
        return uses_sources(rule.child, snapshot, seen)
    if isinstance(rule, Top):
        return uses_sources(rule.of, snapshot, seen)
    if isinstance(rule, SegmentRef) and rule.name not in seen:
        try:
            found = snapshot.segments.resolve(rule.name)
        except Exception:  # unknown: evaluation reports it
            return False
        return not isinstance(found, BitMap) and uses_sources(found, snapshot,
                                                              seen | {rule.name})
    return False


# Bounds of the caches, in estimated bytes (see `estimate_size`): a parsed rule with a
# long `in` list, or a member bitmap of many profiles, can weigh tens of MB, so a bound
# by entries alone lets a few distinct large rules keep gigabytes resident.
PARSE_BYTES = 64 * 1024 * 1024
RESULT_BYTES = 256 * 1024 * 1024
RESULT_ENTRIES = 4096
_SCALARS = (int, float, bool, str, bytes, type(None))


def estimate_size(obj: Any) -> int:
    """An estimate of the bytes `obj` keeps alive: containers, slotted rule nodes and
    bitmaps (from their container statistics) are walked, shared parts counted once."""
    total, seen, stack = 0, set(), [obj]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, _SCALARS):
            total += sys.getsizeof(item)
        elif isinstance(item, AbstractBitMap):
            stats = item.get_statistics()
            total += 64 + 16 * stats["n_containers"] + sum(
                v for k, v in stats.items() if k.startswith("n_bytes_"))
        elif isinstance(item, dict):
            total += sys.getsizeof(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (tuple, list, set, frozenset)):
            total += sys.getsizeof(item)
            for child in item:
                if type(child) in _SCALARS:  # the common case, without a stack round trip
                    if id(child) not in seen:
                        seen.add(id(child))
                        total += sys.getsizeof(child)
                else:
                    stack.append(child)
        elif dataclasses.is_dataclass(item):
            total += sys.getsizeof(item)
            stack.extend(getattr(item, f.name) for f in dataclasses.fields(item))
        else:
            total += sys.getsizeof(item)
    return total


class LRU:
    """A thread-safe least-recently-used map, bounded by entries and by estimated bytes.

    `weigh(key, value)` estimates an entry (default: `estimate_size` of both); an entry
    heavier than the whole bound is not kept.
    """

    def __init__(self, size: int, max_bytes: int | None = None,
                 weigh: Callable[[Any, Any], int] | None = None) -> None:
        self.size = size
        self.max_bytes = PARSE_BYTES if max_bytes is None else max_bytes
        self.weigh = weigh or (lambda key, value: estimate_size((key, value)))
        self.items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self.lock:
            found = self.items.get(key)
            if found is None:
                return None
            self.items.move_to_end(key)
            return found[0]

    def put(self, key: Any, value: Any) -> None:
        weight = self.weigh(key, value)  # outside the lock: it walks the entry
        with self.lock:
            old = self.items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if weight > self.max_bytes:
                return
            self.items[key] = (value, weight)
            self.bytes += weight
            while len(self.items) > self.size or self.bytes > self.max_bytes:
                _, (_, dropped) = self.items.popitem(last=False)
                self.bytes -= dropped

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.bytes = 0


def parsed_weight(text: bytes, value: tuple[Any, Any]) -> int:
    """A parse cache entry (canonical JSON -> (schema, typed rule)): the schema is shared
    by every entry, so only the text and the typed rule count."""
    return sys.getsizeof(text) + estimate_size(value[1])


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """What a result cache has done since the engine opened, and what it holds now."""

    hits: int
    misses: int
    entries: int
    bytes: int


class ResultCache:
    """Counts and member bitmaps of the current snapshot, in one LRU bounded by
    RESULT_ENTRIES and RESULT_BYTES (the key's typed rule counts too)."""

    def __init__(self, entries: int | None = None, max_bytes: int | None = None) -> None:
        self.snapshot: Snapshot | None = None
        self.results = LRU(RESULT_ENTRIES if entries is None else entries,
                           RESULT_BYTES if max_bytes is None else max_bytes)
        self.lock = threading.Lock()
        self.hits = self.misses = 0  # lookups, counted under `lock`

    def stats(self) -> CacheStats:
        with self.lock:
            hits, misses = self.hits, self.misses
        with self.results.lock:
            return CacheStats(hits, misses, len(self.results.items), self.results.bytes)

    def key(self, rule: Rule, snapshot: Snapshot, as_of_us: int) -> tuple | None:
        """The result's key; None for a rule that asks an external source (not kept
        here: its sources cache the query's ids for their ttl)."""
        if uses_sources(rule, snapshot):
            return None
        return (rule, as_of_us if depends_on_time(rule, snapshot) else None)

    def get(self, kind: str, snapshot: Snapshot, key: tuple | None) -> Any:
        found = None
        if key is not None and self.snapshot is snapshot:
            found = self.results.get((kind, key))
        with self.lock:
            if found is None:
                self.misses += 1
            else:
                self.hits += 1
        return found

    def put(self, kind: str, snapshot: Snapshot, key: tuple | None, value: Any) -> None:
        if key is None:
            return
        with self.lock:
            if self.snapshot is not snapshot:
                self.snapshot = snapshot
                self.results.clear()
        self.results.put((kind, key), value)
