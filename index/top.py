"""Top N (CONTRACT §2.4e): the N profiles with the highest (or lowest) value of a field.

A numeric, date or timestamp profile field is a bit-sliced index (fields.RangeIndex):
each profile's value is stored as a non-negative offset from the field's smallest key,
in units that keep the order of the values (negative numbers, float scales and dates
included).  The N-th value is found the classic BSI way, walking the slices from the top
bit with a candidate set: at each bit, the candidates with a 1 there (for the highest;
a 0 for the lowest) either suffice to reach N together with those already taken — then
the threshold has that bit, and the others drop out — or are all taken.  That leaves the
profiles strictly beyond the threshold, and the tied profiles at it; only among those
tied are external ids read, and the smallest ids (UTF-8 byte order) fill the rest.

Top is not monotone: `not top` is the live profiles minus the top set; inside and/or it
is a leaf.  Results are cached per snapshot (TopSets), so IsMember on one profile costs
one evaluation per snapshot and as_of, then a lookup.
"""

from __future__ import annotations

import heapq
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.errors import BitsegError, RuleError
from bitseg.index.fields import EMPTY, RangeIndex, bitmap_of, ids_of
from bitseg.index.ids import IdMap

MAX_TOP = 1_000_000  # the largest N a top rule takes
TOP_TYPES = (T.INT, T.FLOAT, T.DATE, T.TIMESTAMP)
ORDERS = ("desc", "asc")
CACHED_TOPS = 64  # top sets kept for the current snapshot
_SHAPE = '{"n": N, "by": FIELD, "order": "desc" | "asc", "of": RULE}'


class TopsUnresolved(BitsegError):
    """A shard of several met a top node whose set was not chosen over every shard (its
    own top N is not the store's): the front chooses them and asks again."""


@dataclass(frozen=True, slots=True)
class Top:
    """The n live profiles matching `of` with the highest (desc) / lowest (asc) `by`."""

    n: int
    by: str
    type: str
    order: str  # "desc" | "asc"
    of: Any  # a rule (rules.All when absent)


def parse_top(parser: Any, params: Any, path: str) -> Top:
    """The value of a {"top": ...} node (at `path`), checked against the profile fields;
    `parser` (rules._Parser) parses `of`."""
    from bitseg.index.rules import All  # rules imports this module

    if not isinstance(params, dict):
        raise RuleError(path, f"expected {_SHAPE}")
    extra = sorted(set(params) - {"n", "by", "order", "of"})
    if extra:
        raise RuleError(f"{path}.{extra[0]}", f"unexpected key {T.show(extra[0])} "
                        "(expected only by, n, of, order)")
    n = params.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_TOP:
        raise RuleError(f"{path}.n", f"expected a whole number from 1 to {MAX_TOP:,}, got "
                        f"{T.show(n) if 'n' in params else 'nothing'}")
    by = params.get("by")
    fields = parser.schema.profiles
    if not isinstance(by, str):
        raise RuleError(f"{path}.by", "expected the name of an int, float, date or timestamp "
                        f"profile field, got {T.show(by) if 'by' in params else 'nothing'}")
    type_ = fields.get(by)
    if type_ not in TOP_TYPES:
        usable = ", ".join(sorted(k for k, t in fields.items() if t in TOP_TYPES)) or "none"
        said = "an unknown field" if type_ is None else f"a {type_} field"
        name = repr(by) if len(by) <= 80 else repr(by[:60]) + f"... ({len(by):,} chars)"
        raise RuleError(f"{path}.by", f"top ranks by an int, float, date or timestamp "
                        f"profile field; {name} is {said} (usable: {usable})")
    order = params.get("order", "desc")
    if order not in ORDERS:
        raise RuleError(f"{path}.order", f'expected "desc" or "asc", got {T.show(order)}')
    of = parser.node(params["of"], f"{path}.of") if "of" in params else All()
    return Top(n, by, type_, order, of)


# ---------------------------------------------------------------------- evaluation
def top_members(top: Top, index: RangeIndex, candidates: BitMap,
                names: Callable[[np.ndarray], list[str]]) -> BitMap:
    """The top set among `candidates` (live profiles matching `of`); `names` gives the
    external ids of sorted dense ids, read for the tied profiles only."""
    pool = index.exists & candidates
    if len(pool) <= top.n:
        return pool
    above, tied = split_at_nth(index.slices, pool, top.n, top.order == "desc")
    need = top.n - len(above)
    if not need:
        return above
    return above | smallest_ids(tied, need, names)


def split_at_nth(slices: tuple[BitMap, ...], pool: BitMap, n: int, highest: bool
                 ) -> tuple[BitMap, BitMap]:
    """(beyond, tied): the profiles of `pool` whose value is strictly beyond the n-th
    value (higher for `highest`, else lower), and those equal to it; len(beyond) < n
    <= len(beyond) + len(tied).  Requires len(pool) > n."""
    beyond, tied = BitMap(), pool
    for s in reversed(slices):
        side = tied & s if highest else tied - s  # the candidates on the wanted side
        taken = len(beyond) + len(side)
        if taken >= n:
            tied = side  # the threshold is on that side: the rest fall below it
        else:
            beyond |= side
            tied = tied - side
        if len(beyond) + len(tied) == n:  # exactly enough: every candidate is in
            return beyond | tied, EMPTY
    return beyond, tied


def smallest_ids(tied: BitMap, need: int, names: Callable[[np.ndarray], list[str]]) -> BitMap:
    """The `need` profiles of `tied` with the smallest external ids in UTF-8 byte order
    (Python orders str by code point, which is UTF-8 byte order)."""
    dense = ids_of(tied)
    chosen = heapq.nsmallest(need, zip(names(dense), dense.tolist(), strict=True))
    return bitmap_of(np.array([d for _, d in chosen], dtype=np.uint32))


class TopSets:
    """Top sets of the current snapshot, keyed by (rule, as_of when it matters), and the
    id map to break ties with (`names` gives the engine's current one, which covers every
    id of every published snapshot).  Thread-safe; evaluation happens outside the lock."""

    def __init__(self, names: Callable[[], IdMap] | None = None) -> None:
        self._names = names
        self._lock = threading.Lock()
        self._snapshot: Any = None
        self._sets: OrderedDict[tuple, BitMap] = OrderedDict()
        self._own = True  # whether a top set may be this store's own (see refuse_own)
        self._chosen = threading.local()  # .sets: those in force on this thread

    def refuse_own(self) -> None:
        """One shard of several: a top set is never computed here, only taken from those
        chosen over every shard (`chosen`); without them, TopsUnresolved."""
        self._own = False

    @contextmanager
    def chosen(self, sets: Mapping[Top, BitMap]) -> Iterator[None]:
        """These top sets in force on this thread (a shard's write that evaluates a rule:
        a segment change, a bulk action), each in place of its node's own."""
        before = getattr(self._chosen, "sets", None)
        self._chosen.sets = sets
        try:
            yield
        finally:
            self._chosen.sets = before

    def externals(self, dense: np.ndarray) -> list[str]:
        if self._names is None:
            raise BitsegError("top rules need the id map of an engine")
        return self._names().externals(dense)

    def get(self, snapshot: Any, key: tuple) -> BitMap | None:
        sets = getattr(self._chosen, "sets", None)
        if sets is not None or not self._own:
            return chosen_set(sets or {}, key[0])
        with self._lock:
            if self._snapshot is not snapshot:
                return None
            found = self._sets.get(key)
            if found is not None:
                self._sets.move_to_end(key)
            return found

    def put(self, snapshot: Any, key: tuple, members: BitMap) -> None:
        with self._lock:
            if self._snapshot is not snapshot:
                self._snapshot = snapshot
                self._sets.clear()
            self._sets[key] = members
            while len(self._sets) > CACHED_TOPS:
                self._sets.popitem(last=False)


def chosen_set(sets: Mapping[Top, BitMap], top: Top) -> BitMap:
    """The set chosen over every shard for this top node; TopsUnresolved when there is
    none (a shard never takes its own top N for the store's)."""
    found = sets.get(top)
    if found is None:
        raise TopsUnresolved(f"the top set of {top.n} by {top.by!r} was not chosen over "
                             "the shards (a segment changed meanwhile?); try again")
    return found


def evaluate_top(top: Top, snapshot: Any, as_of_us: int,
                 matching: Callable[[Any], BitMap]) -> BitMap:
    """The top set on a snapshot (cached per snapshot); `matching` evaluates `of`."""
    from bitseg.index.cache import depends_on_time, uses_sources  # cache imports snapshot

    key = (top, as_of_us if depends_on_time(top.of, snapshot) else None)
    tops: TopSets = snapshot.tops
    found = tops.get(snapshot, key)
    if found is None:
        index = snapshot.field(top.by)
        candidates = matching(top.of) & snapshot.live
        found = top_members(top, index, candidates, tops.externals)
        if not uses_sources(top.of, snapshot):  # an sql answer changes without a write
            tops.put(snapshot, key, found)
    return found
