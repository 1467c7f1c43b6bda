"""Reads over shards that are more than a sum: top rules, Describe, Values, size history.

Top (CONTRACT §2.4e). A profile in the top N of the whole store is in the top N of its
own shard (fewer than N profiles of the store rank above it, so fewer than N of its
shard do), so the store's top N is the best N of the shards' top N. Each shard gives
its candidates with their exact value and external id; the front ranks them by (value,
then id ascending in UTF-8 byte order) and sends each shard back the dense ids it
chose there. The shard then evaluates the rule on its snapshot with those top sets in
place of its own (`ChosenTops`, through Engine.reading). The top nodes of a rule are
resolved innermost first (a top's `of` may hold another top), one round each.

A sample (§2.4d) is a function of the profile's external id alone: it needs nothing of
this, every shard answers its own profiles as one engine would.
"""

from __future__ import annotations

import copy
import heapq
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from fractions import Fraction
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index.errors import BitsegError
from bitseg.index.fields import RangeIndex, bitmap_of, ids_of
from bitseg.index.rules import And, Not, Or, Rule
from bitseg.index.top import Top, TopSets, top_members

Candidate = tuple[int | Fraction, str, int]  # (exact value, external id, dense id)
# what a shard may be asked with top sets in place: the reads that evaluate a rule
READS = frozenset({"count", "page", "preview", "explain", "metrics", "is_member",
                   "is_member_many"})


# ---------------------------------------------------------------------- top, on a shard
def tops_of(rule: Rule) -> list[Top]:
    """The distinct top nodes of a typed rule, each after the tops inside its `of`."""
    found: list[Top] = []

    def walk(node: Rule) -> None:
        if isinstance(node, (And, Or)):
            for child in node.children:
                walk(child)
        elif isinstance(node, Not):
            walk(node.child)
        elif isinstance(node, Top):
            walk(node.of)
            if node not in found:
                found.append(node)

    walk(rule)
    return found


class ChosenTops(TopSets):
    """The top sets chosen over every shard, for one evaluation on one shard: each top
    node answers its chosen members here, never a top of this shard alone."""

    def __init__(self, sets: dict[Top, BitMap]) -> None:
        super().__init__()
        self._chosen = sets

    def get(self, snapshot: Any, key: tuple) -> BitMap | None:
        found = self._chosen.get(key[0])
        if found is None:  # a top the front did not see (never a shard's own top N)
            raise BitsegError("a top rule reached a shard unresolved; it is not "
                              "supported there with --shards N > 1")
        return found

    def put(self, snapshot: Any, key: tuple, members: BitMap) -> None:
        """Nothing is kept: the sets are this evaluation's."""


def with_tops(engine: Any, rule: Any, chosen: Sequence[Sequence[int]]) -> Any:
    """A read-only view of `engine` whose evaluations take the rule's first len(chosen)
    top nodes (tops_of order) as these dense ids of this shard."""
    snap = engine.snapshot
    tops = tops_of(engine.parse(rule, snap))
    sets = {top: bitmap_of(np.asarray(ids, dtype=np.uint32))
            for top, ids in zip(tops, chosen, strict=False)}
    return engine.reading(replace(snap, tops=ChosenTops(sets)))


def top_candidates(engine: Any, rule: Any, as_of: datetime,
                   chosen: Sequence[Sequence[int]]) -> tuple[int, str, list[Candidate]] | None:
    """The next unresolved top node of the rule (the tops before it chosen): its n and
    order, and this shard's top n by it with their values; None when all are chosen."""
    from bitseg.index.engine import as_of_micros
    from bitseg.index.evaluate import Evaluator

    view = with_tops(engine, rule, chosen)
    snap = view.snapshot
    tops = tops_of(view.parse(rule, snap))
    if len(chosen) >= len(tops):
        return None
    top = tops[len(chosen)]
    pool = Evaluator(snap, as_of_micros(as_of)).bitmap(top.of) & snap.live
    index = snap.field(top.by)
    assert isinstance(index, RangeIndex)  # the parser allows only range fields
    mine = ids_of(top_members(top, index, pool, engine.ids.externals))
    values = exact_values(index, mine)
    return top.n, top.order, list(zip(values, engine.ids.externals(mine), mine.tolist(),
                                      strict=True))


def exact_values(index: RangeIndex, dense: np.ndarray) -> list[int | Fraction]:
    """The values of these profiles (sorted dense ids, each with a value) as exact
    numbers comparable across shards: a key, or for floats key / 10**digits."""
    stored = np.zeros(len(dense), dtype=np.int64)
    within = bitmap_of(dense)
    for bit, part in enumerate(index.slices):
        hits = ids_of(part & within)
        stored[np.searchsorted(dense, hits)] += np.int64(1) << bit
    keys = [index.base + int(s) * index.unit for s in stored.tolist()]
    if index.digits is None:
        return keys  # type: ignore[return-value]
    scale = 10 ** index.digits
    return [Fraction(k, scale) for k in keys]


def shard_view(shard: Any, chosen: Sequence[Sequence[int]], method: str,
               args: Sequence[Any]) -> Any:
    """A copy of the Shard whose engine and segments evaluate with the chosen top sets,
    for one of the READS with these args."""
    from bitseg.index.segments import Segments

    if method not in READS:
        raise BitsegError(f"{method} does not take top sets chosen over the shards")
    rule = args[1] if method.startswith("is_member") else args[0]  # after the id(s)
    view = copy.copy(shard)
    view.engine = with_tops(shard.engine, rule, chosen)
    view.segments = Segments(view.engine)
    return view


# ---------------------------------------------------------------------- top, at the front
def merge_top(found: Sequence[Sequence[Candidate]], n: int, order: str) -> list[list[int]]:
    """The store's top n of the shards' candidates, as each shard's chosen dense ids:
    the highest (desc) or lowest values, ties by external id ascending."""
    sign = -1 if order == "desc" else 1
    ranked = heapq.nsmallest(n, ((sign * value, external, shard, dense)
                                 for shard, rows in enumerate(found)
                                 for value, external, dense in rows))
    picks: list[list[int]] = [[] for _ in found]
    for _, _, shard, dense in ranked:
        picks[shard].append(dense)
    return [sorted(p) for p in picks]


def resolve_tops(shards: Any, rule: Any, as_of: datetime) -> list[list[list[int]]]:
    """Every top node of the rule chosen over the shards: per shard, per top node (in
    tops_of order), the dense ids of that shard in the store's top set."""
    chosen: list[list[list[int]]] = [[] for _ in range(shards.count)]
    while True:
        found = shards.each("top_candidates",
                            per_shard=[(rule, as_of, chosen[i]) for i in range(shards.count)])
        if found[0] is None:
            return chosen
        n, order = found[0][0], found[0][1]
        for mine, picked in zip(chosen, merge_top([f[2] for f in found], n, order),
                                strict=True):
            mine.append(picked)


class ResolvedShards:
    """The shards as the evaluation RPCs use them, each read carrying the top sets chosen
    over all of them (the same calls as a ShardSet's)."""

    def __init__(self, shards: Any, chosen: list[list[list[int]]]) -> None:
        self.shards = shards
        self.count = shards.count
        self.chosen = chosen

    def call(self, index: int, method: str, *args: Any) -> Any:
        return self.shards.call(index, "with_tops", self.chosen[index], method, *args)

    def each(self, method: str, *args: Any, per_shard: Sequence[tuple] | None = None
             ) -> list[Any]:
        argument = per_shard if per_shard is not None else [args] * self.count
        return self.shards.each("with_tops", per_shard=[
            (self.chosen[i], method, *argument[i]) for i in range(self.count)])

    def shard_of(self, profile_id: str) -> int:
        return self.shards.shard_of(profile_id)

