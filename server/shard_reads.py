"""Reads over shards that are more than a sum: top rules, Describe, Values, size history.

Top (docs/rules.md, "Top N"). A profile in the top N of the whole store is in the top N of its
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
import functools
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.errors import BitsegError
from bitseg.index.fields import RangeIndex, bitmap_of, ids_of
from bitseg.index.rules import And, Not, Or, Rule, SegmentRef
from bitseg.index.top import Top, TopSets, TopsUnresolved, chosen_set, top_members

Candidate = tuple[int | Fraction, str, int]  # (exact value, external id, dense id)
# a top node's set chosen over the shards, for one shard: [top_key of the node, its dense
# ids on that shard]; a shard's chosen sets are a list of these, in target_tops order
Chosen = list[list[Any]]
# the reads that evaluate a rule: the rule is their first argument, then as_of
RULE_READS = frozenset({"count", "page", "preview", "explain", "metrics", "insights_part",
                        "insights_at_most"})
# what a shard may be asked with top sets in place (do_with_tops): see read_target
READS = RULE_READS | {"is_member", "is_member_many", "get_segment", "list_segments",
                      "segments_of", "segments_of_many", "overlap", "export_part"}
WRITES = frozenset({"record_size", "retag_segment"})  # which also count a segment


# ---------------------------------------------------------------------- top, on a shard
def tops_of(rule: Rule, segments: Any = None) -> list[Top]:
    """The distinct top nodes of a typed rule, each after the tops inside its `of`; with
    `segments` (a SegmentSet), also those of the dynamic segments it names, through the
    segments those name, each where it is named (stored members need none)."""
    found: list[Top] = []
    seen: set[str] = set()

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
        elif isinstance(node, SegmentRef) and segments is not None and node.name not in seen:
            seen.add(node.name)
            try:
                inside = segments.resolve(node.name)
            except BitsegError:  # unknown or unusable: the evaluation says so
                return
            if not isinstance(inside, BitMap):
                walk(inside)

    walk(rule)
    return found


def read_target(method: str, args: Sequence[Any]) -> tuple[Any, Any]:
    """What one of the READS or WRITES evaluates, for its top sets: (a rule, or None for
    every segment; its as_of, None for now)."""
    if method in RULE_READS:
        return args[0], args[1]
    if method in ("is_member", "is_member_many"):
        return args[1], args[2]
    if method in ("get_segment", "record_size"):
        return {"segment": args[0]}, args[1]
    if method == "overlap":
        return ({"or": [{"segment": name} for name in args[0]]} if args[0] else None), args[1]
    if method == "list_segments":
        return None, args[0]
    if method in ("segments_of", "segments_of_many"):
        return None, args[1]
    if method in ("retag_segment", "export_part"):
        return {"segment": args[0]}, None
    raise BitsegError(f"{method} does not take top sets chosen over the shards")


def target_tops(engine: Any, snap: Any, target: Any) -> list[Top]:
    """The top nodes an evaluation of `target` meets (read_target), in tops_of order."""
    from bitseg.index.segments import SegmentSet

    segments = snap.segments if isinstance(snap.segments, SegmentSet) else None
    if target is not None:
        return tops_of(engine.parse(target, snap), segments)
    if segments is None or not segments.segments:
        return []
    return tops_of(Or(tuple(SegmentRef(s.name, "$") for s in segments)), segments)


class ChosenTops(TopSets):
    """The top sets chosen over every shard, for one evaluation on one shard: each top
    node answers its chosen members here, never a top of this shard alone."""

    def __init__(self, sets: dict[Top, BitMap]) -> None:
        super().__init__()
        self.sets = sets

    def get(self, snapshot: Any, key: tuple) -> BitMap | None:
        return chosen_set(self.sets, key[0])  # never a shard's own top N

    def put(self, snapshot: Any, key: tuple, members: BitMap) -> None:
        """Nothing is kept: the sets are this evaluation's."""


def top_key(top: Top) -> str:
    """What a shard checks of each top set it is given against the node it takes it
    for, so that a segment changed since the choice is refused, not answered wrongly."""
    return f"{top.n} {top.order} {top.by}"


def chosen_tops(engine: Any, target: Any, chosen: Chosen, partial: bool = False
                ) -> ChosenTops:
    """The target's top nodes (target_tops order) as these dense ids of this shard;
    TopsUnresolved when the target has other tops than were chosen (a segment changed
    since), unless `partial` (the first len(chosen) of them)."""
    snap = engine.snapshot
    tops = target_tops(engine, snap, target)
    if len(tops) < len(chosen) or (len(tops) > len(chosen) and not partial) \
            or any(key != top_key(top) for top, (key, _) in zip(tops, chosen, strict=False)):
        raise TopsUnresolved(f"the {len(chosen)} top sets chosen over the shards are not "
                             f"those of the rule's {len(tops)} top nodes (a segment changed "
                             "meanwhile?); try again")
    return ChosenTops({top: bitmap_of(np.asarray(ids, dtype=np.uint32))
                       for top, (_, ids) in zip(tops, chosen, strict=False)})


def with_tops(engine: Any, target: Any, chosen: Chosen, partial: bool = False) -> Any:
    """A read-only view of `engine` whose evaluations take the target's top nodes as
    these dense ids of this shard (chosen_tops)."""
    tops = chosen_tops(engine, target, chosen, partial)
    return engine.reading(replace(engine.snapshot, tops=tops))


def top_candidates(engine: Any, target: Any, as_of: datetime, chosen: Chosen
                   ) -> tuple[int, str, list[Candidate], str] | None:
    """The next unresolved top node of the target (read_target; the tops before it
    chosen): its n and order, this shard's top n by it with their values, and its
    top_key; None when all are chosen."""
    from bitseg.index.engine import as_of_micros
    from bitseg.index.evaluate import Evaluator

    view = with_tops(engine, target, chosen, partial=True)
    snap = view.snapshot
    tops = target_tops(view, snap, target)
    if len(chosen) >= len(tops):
        return None
    top = tops[len(chosen)]
    pool = Evaluator(snap, as_of_micros(as_of)).bitmap(top.of) & snap.live
    index = snap.field(top.by)
    assert isinstance(index, RangeIndex)  # the parser allows only range fields
    mine = ids_of(top_members(top, index, pool, engine.ids.externals))
    values = exact_values(index, mine)
    return top.n, top.order, list(zip(values, engine.ids.externals(mine), mine.tolist(),
                                      strict=True)), top_key(top)


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


def shard_view(shard: Any, chosen: Chosen, method: str,
               args: Sequence[Any]) -> Any:
    """A copy of the Shard whose engine and segments evaluate with the chosen top sets,
    for one of the READS or WRITES with these args (a write through the shard's own
    engine, its segments counting with the sets)."""
    from bitseg.index.segments import Segments

    if method not in READS | WRITES:
        raise BitsegError(f"{method} does not take top sets chosen over the shards")
    target, _ = read_target(method, args)
    view = copy.copy(shard)
    if method in WRITES:
        view.segments = shard.segments.with_tops(chosen_tops(shard.engine, target, chosen))
        return view
    view.engine = with_tops(shard.engine, target, chosen)
    view.segments = Segments(view.engine)
    return view


# ---------------------------------------------------------------------- top, at the front
def merge_top(found: Sequence[Sequence[Candidate]], n: int, order: str) -> list[list[int]]:
    """The store's top n of the shards' candidates, as each shard's chosen dense ids:
    the highest (desc) or lowest values, ties by external id ascending."""
    sign = -1 if order == "desc" else 1
    # compared as whole numbers at one scale: exact, and in C (Fractions compare in
    # Python: ~1 s for 20,000 candidates of a float field, against ~10 ms so)
    scale = math.lcm(*{value.denominator for rows in found for value, _, _ in rows})
    ranked = heapq.nsmallest(n, ((sign * value.numerator * (scale // value.denominator),
                                  external, shard, dense)
                                 for shard, rows in enumerate(found)
                                 for value, external, dense in rows))
    picks: list[list[int]] = [[] for _ in found]
    for _, _, shard, dense in ranked:
        picks[shard].append(dense)
    return [sorted(p) for p in picks]


def resolve_tops(shards: Any, rule: Any, as_of: datetime) -> list[Chosen]:
    """Every top node of the rule (a read_target) chosen over the shards: per shard, per
    top node (in target_tops order), [its top_key, the dense ids of that shard in the
    store's top set]."""
    chosen: list[Chosen] = [[] for _ in range(shards.count)]
    while True:
        found = shards.each("top_candidates",
                            per_shard=[(rule, as_of, chosen[i]) for i in range(shards.count)])
        if found[0] is None and not any(found):
            return chosen
        if found[0] is None or any(f is None or f[3] != found[0][3] for f in found):
            raise TopsUnresolved("the shards name other top nodes for the same rule (a "
                                 "segment changed meanwhile?); try again")
        n, order, key = found[0][0], found[0][1], found[0][3]
        for mine, picked in zip(chosen, merge_top([f[2] for f in found], n, order),
                                strict=True):
            mine.append([key, picked])


# A shard of several refuses to evaluate a top node whose set the front did not choose
# (TopsUnresolved): a rule naming a dynamic segment with a top rule, or a read of such a
# segment (its size, SegmentsOf, Overlap, an export). ShardSet's call, each and outcomes
# then choose the sets the read needs (read_target) over every shard and ask again with
# them, once: reads that meet no such segment cost nothing more.
CHANGE_UNCHOSEN = ("a segment the change names got a `top` rule after its top sets were "
                   "chosen (a segment changed meanwhile?); try again")


def asked_again(shards: Any, indices: Sequence[int], method: str,
                per_shard: Sequence[Sequence[Any]]) -> list[Any]:
    """The answers of the shards `indices` to a read refused for want of top sets, asked
    again with those sets chosen over every shard."""
    method, per_shard = _unwrapped(method, per_shard)
    chosen = resolve_tops(shards, *_target_now(method, per_shard[0]))
    return shards.these(indices, "with_tops", [(chosen[i], method, *args)
                                               for i, args in zip(indices, per_shard,
                                                                  strict=True)])


def call_on_refusal(call: Callable[..., Any]) -> Callable[..., Any]:
    """ShardSet.call(index, method, *args), asked again with top sets when refused."""
    @functools.wraps(call)
    def asking(shards: Any, index: int, method: str, *args: Any) -> Any:
        try:
            return call(shards, index, method, *args)
        except TopsUnresolved:
            if method == "segment_change":  # the front chose the change's sets first:
                raise TopsUnresolved(CHANGE_UNCHOSEN) from None  # what it names changed
            if not _retried(method):
                raise
            return asked_again(shards, [index], method, [args])[0]
    return asking


def each_on_refusal(each: Callable[..., list[Any]]) -> Callable[..., list[Any]]:
    """ShardSet.each(method, *args, per_shard=None), asked again with top sets when a
    shard refused."""
    @functools.wraps(each)
    def asking(shards: Any, method: str, *args: Any,
               per_shard: Sequence[tuple] | None = None) -> list[Any]:
        try:
            return each(shards, method, *args, per_shard=per_shard)
        except TopsUnresolved:
            if not _retried(method):
                raise
            return asked_again(shards, range(shards.count), method,
                               per_shard if per_shard is not None else [args] * shards.count)
    return asking


def outcomes_on_refusal(outcomes: Callable[..., list[tuple[bool, Any]]]
                        ) -> Callable[..., list[tuple[bool, Any]]]:
    """ShardSet.outcomes(method, per_shard, indices=None): the shards that refused for
    want of top sets asked again with them, each outcome in its place."""
    @functools.wraps(outcomes)
    def asking(shards: Any, method: str, per_shard: Sequence[tuple],
               indices: Sequence[int] | None = None) -> list[tuple[bool, Any]]:
        found = outcomes(shards, method, per_shard, indices)
        refused = [k for k, (ok, value) in enumerate(found)
                   if not ok and isinstance(value, TopsUnresolved)]
        if not refused or not _retried(method):
            return found
        which = list(range(shards.count)) if indices is None else list(indices)
        plain, args = _unwrapped(method, [per_shard[k] for k in refused])
        try:
            chosen = resolve_tops(shards, *_target_now(plain, args[0]))
        except Exception as exc:  # noqa: BLE001 -- the refused shards' outcome, as data
            return [(False, exc) if k in refused else o for k, o in enumerate(found)]
        again = outcomes(shards, "with_tops", [(chosen[which[k]], plain, *a)
                                               for k, a in zip(refused, args, strict=True)],
                         [which[k] for k in refused])
        for k, outcome in zip(refused, again, strict=True):
            found[k] = outcome
        return found
    return asking


def _retried(method: str) -> bool:
    return method in READS or method in WRITES or method == "with_tops"


def _unwrapped(method: str, per_shard: Sequence[Sequence[Any]]
               ) -> tuple[str, list[Sequence[Any]]]:
    """A read and its args; with_tops' (chosen before a segment changed): its read's."""
    if method == "with_tops":
        return per_shard[0][1], [args[2:] for args in per_shard]
    return method, list(per_shard)


def _target_now(method: str, args: Sequence[Any]) -> tuple[Any, datetime]:
    target, as_of = read_target(method, args)
    return target, as_of or datetime.now(timezone.utc)


class ResolvedShards:
    """The shards as the evaluation RPCs use them, each read carrying the top sets chosen
    over all of them (the same calls as a ShardSet's)."""

    def __init__(self, shards: Any, chosen: list[Chosen]) -> None:
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



# ---------------------------------------------------------------------- Describe, Values
# A shard lists every value with its count (the store's top values can be any shard's
# 21st), and for a number, date or timestamp profile field its count and smallest and
# largest key; the front sums the counts, ranks the values again and finds the
# quantiles by a binary search over the keys, asking every shard how many values are at
# most a bound (one fan-out per halving: ~log2(max - min) of them, all fields at once).
EVERY = 2**62  # "every value" as a top or limit


def describe_part(snap: Any) -> tuple[Any, dict[str, tuple[int, int | None, int, int]]]:
    """This shard's Description with every value listed, and per profile range field
    with values (count, digits, smallest key, largest key)."""
    from bitseg.index.describe import describe, kth_smallest

    ranges = {}
    for name in sorted(snap.schema.profiles):
        index = snap.field(name)
        if isinstance(index, RangeIndex):
            count = index.exists.intersection_cardinality(snap.live)
            if count:
                ranges[name] = (count, index.digits, kth_smallest(index, 1),
                                kth_smallest(index, count))
    return describe(snap, EVERY), ranges


def at_most(snap: Any, bounds: dict[str, list[Fraction]]) -> dict[str, list[int]]:
    """Per field, how many of its values are at most each bound (an exact value)."""
    found = {}
    for name, wanted in bounds.items():
        index = snap.field(name)
        assert isinstance(index, RangeIndex)
        scale = 10 ** (index.digits or 0)
        found[name] = [len(index.interval(None, math.floor(b * scale), index.exists))
                       for b in wanted]
    return found


def merge_description(shards: Any, parts: list[tuple[Any, dict]], top: int) -> Any:
    """The shards' Describe parts as one store's Description, top values per field."""
    from bitseg.index.describe import Description

    descs = [d for d, _ in parts]
    ranged = _ranged_fields(shards, [r for _, r in parts], descs[0].fields)
    fields = tuple(ranged.get(group[0].name) or merge_field(group, top)
                   for group in zip(*(d.fields for d in descs), strict=True))
    return Description(sum(d.version for d in descs), sum(d.profiles for d in descs), fields,
                       merge_events([d.events for d in descs], top),
                       sum(d.orders for d in descs),
                       tuple(merge_field(g, top)
                             for g in zip(*(d.order_fields for d in descs), strict=True)),
                       tuple(merge_field(g, top)
                             for g in zip(*(d.item_fields for d in descs), strict=True)))


def merge_field(infos: Sequence[Any], top: int) -> Any:
    """One field's infos (the same field on every shard) as one: counts summed, values
    counted over all and ranked again (highest count first, ties by value)."""
    from bitseg.index.describe import FieldInfo

    counts: dict[Any, int] = {}
    for info in infos:
        for value, n in info.top:
            counts[value] = counts.get(value, 0) + n
    ranked = sorted(counts.items(), key=lambda vn: (-vn[1], _value_order(vn[0])))
    return FieldInfo(infos[0].name, infos[0].type, sum(i.count for i in infos), len(ranked),
                     tuple(ranked[:top]))


def merge_events(lists: Sequence[Sequence[Any]], top: int) -> tuple[Any, ...]:
    """Event types over the shards, by name: counts and profiles summed, properties
    merged as fields."""
    from bitseg.index.describe import EventTypeInfo

    by_type: dict[str, list[Any]] = {}
    for events in lists:
        for info in events:
            by_type.setdefault(info.name, []).append(info)
    merged = []
    for name in sorted(by_type):
        infos = by_type[name]
        props: dict[str, list[Any]] = {}
        for info in infos:
            for prop in info.properties:
                props.setdefault(prop.name, []).append(prop)
        merged.append(EventTypeInfo(
            name, sum(i.count for i in infos), sum(i.profiles for i in infos),
            tuple(merge_field(props[p], top) for p in sorted(props))))
    return tuple(merged)


def _value_order(value: Any) -> tuple[int, Any]:
    """Values of equal count: numbers and bools first (false before true), then text."""
    return (0, value) if isinstance(value, (bool, int)) else (1, str(value))


def _ranged_fields(shards: Any, ranges: list[dict], fields: Sequence[Any]) -> dict[str, Any]:
    """The range fields' infos over all shards: count, min, max and the nearest-rank
    quantiles (describe.QUANTILES) of the values of every shard together."""
    from bitseg.index.describe import QUANTILES, FieldInfo

    types = {f.name: f.type for f in fields}
    wanted: dict[str, tuple[int, list[int], int, int]] = {}  # scale, ranks, lo, hi
    for name in sorted({n for r in ranges for n in r}):
        mine = [r[name] for r in ranges if name in r]
        digits = max((d or 0) for _, d, _, _ in mine)
        count = sum(c for c, _, _, _ in mine)
        lo = min(k * 10 ** (digits - (d or 0)) for _, d, k, _ in mine)
        hi = max(k * 10 ** (digits - (d or 0)) for _, d, _, k in mine)
        ranks = [max(1, math.ceil(q * count)) for _, q in QUANTILES]
        wanted[name] = (digits, ranks, lo, hi)
    marks = _kth_keys(lambda bounds: _summed(shards.each("at_most", bounds)), wanted)
    found = {}
    for name, (digits, _, lo, hi) in wanted.items():
        type_ = types[name]
        count = sum(r[name][0] for r in ranges if name in r)
        found[name] = FieldInfo(name, type_, count, min=_shown(type_, digits, lo),
                                max=_shown(type_, digits, hi),
                                quantiles=tuple((label, _shown(type_, digits, k))
                                                for (label, _), k in zip(QUANTILES,
                                                                         marks[name],
                                                                         strict=True)))
    return found


def _kth_keys(count: Callable[[dict[str, list[Fraction]]], dict[str, list[int]]],
              wanted: dict[str, tuple[int, list[int], int, int]]) -> dict[str, list[int]]:
    """Per field, for each rank k the smallest key (at the field's scale) with at least
    k values at most it, over every shard (`count`: per field, how many values of every
    shard are at most each bound): binary searches between the smallest and largest key,
    all in step, one fan-out per step."""
    low = {n: [lo] * len(ranks) for n, (_, ranks, lo, _) in wanted.items()}
    high = {n: [hi] * len(ranks) for n, (_, ranks, _, hi) in wanted.items()}
    while True:
        asking = {n: [(a + b) // 2 for a, b in zip(low[n], high[n], strict=True)]
                  for n in wanted}
        open_ = {n: [i for i, (a, b) in enumerate(zip(low[n], high[n], strict=True)) if a < b]
                 for n in wanted}
        if not any(open_.values()):
            return low
        bounds = {n: [Fraction(asking[n][i], 10 ** wanted[n][0]) for i in open_[n]]
                  for n in wanted if open_[n]}
        counted = count(bounds)
        for n, which in open_.items():
            for j, i in enumerate(which):
                total = counted[n][j]
                if total >= wanted[n][1][i]:
                    high[n][i] = asking[n][i]
                else:
                    low[n][i] = asking[n][i] + 1


def _shown(type_: str, digits: int, key: int) -> Any:
    """A key at scale 10**digits as a user sees it (describe's way: floats as Decimal)."""
    if type_ == T.FLOAT:
        return Decimal(key).scaleb(-digits).normalize()
    if type_ in T.TIME_TYPES:
        return T.display(type_, key)
    return key


def merge_values(infos: Sequence[Any], limit: int) -> Any:
    """Values of one keyword, keywords or bool field over the shards (every value each
    shard has), the `limit` most common."""
    return merge_field(infos, limit)


# ---------------------------------------------------------------------- size history
WALL_CAUSES = frozenset({"add", "remove"})  # points at each shard's own clock, and only
# on the shards the edit changed; every other point is at the as_of the front gave all


def merge_history(lists: Sequence[Sequence[Any]]) -> list[Any]:
    """The shards' size histories of one segment as one: the points in the order they
    were recorded, one point per change of every shard (the same cause, and the same
    as_of unless an edit by id), its size the sum of every shard's latest size; an
    edit's point is at the latest of its shards' times."""
    from bitseg.index.segments import Point

    stream = heapq.merge(*[[(p.recorded_at or p.at, shard, i, p) for i, p in enumerate(ps)]
                           for shard, ps in enumerate(lists)])
    sizes = [0] * len(lists)
    merged: list[Any] = []
    group: dict[int, Any] = {}

    def close() -> None:
        if not group:
            return
        points = list(group.values())
        for shard, point in group.items():
            sizes[shard] = point.size
        first = points[0]
        at = max(p.at for p in points) if first.cause in WALL_CAUSES else first.at
        merged.append(Point(at, sum(sizes), first.cause,
                            max((p.recorded_at or 0 for p in points), default=None) or None))
        group.clear()

    for _, shard, _, point in stream:
        if group:
            first = next(iter(group.values()))
            if (point.cause != first.cause or shard in group
                    or (point.cause not in WALL_CAUSES and point.at != first.at)):
                close()
        group[shard] = point
    close()
    return merged


# ---------------------------------------------------------------------- Insights
# Exactly mergeable: the audience's and the base's sizes, a keyword, keywords or bool
# field's counts per value (every shard lists every value it has, with its audience and
# base counts; the front ranks the summed counts), event activity and orders (sums).
# A number, date or timestamp field's histogram is cut as one store cuts it (n buckets
# of equal width between the base's smallest and largest key, the width a whole number
# of the field index's key units: the gcd of the keys it was built from since its last
# rebuild). Each shard says its index's key grid (base, unit, float digits) and its live
# base's smallest and largest key; every shard's keys lie on the grid of the gcd of the
# shards' units and of the differences of their bases, which is the one store's unit
# when it holds the same keys. The front cuts the edges there and asks every shard how
# many of its base and of its audience are below each edge (one fan-out); the
# audience's min, max and quantiles are found as Describe's (a binary search, one
# fan-out per step, each shard counting its audience's values at most a bound).


def insights_part(engine: Any, rule: Any, as_of: datetime, fields: list[str], top: int,
                  buckets: int, amount_field: str
                  ) -> tuple[Any, dict[str, list], dict[str, tuple]]:
    """This shard's Insights of the rule's profiles; per keyword, keywords or bool field
    every value with (audience count, base count); per number, date or timestamp field
    holding a key (digits, base, unit, live smallest key, live largest key), the last
    two None when no live profile has one, the unit 0 when every key is the base (an
    index built from one distinct key has unit 1, which says nothing of the grid)."""
    from bitseg.index.describe import kth_smallest
    from bitseg.index.engine import as_of_micros
    from bitseg.index.evaluate import Evaluator
    from bitseg.index.fields import ValueIndex
    from bitseg.index.insights import insights

    snap = engine.snapshot
    as_of_us = as_of_micros(as_of)
    audience = Evaluator(snap, as_of_us).bitmap(engine.parse(rule, snap))
    found = insights(snap, audience, as_of_us, fields, top, buckets, amount_field)
    audience = audience & snap.live
    counted, ranges = {}, {}
    for info in found.fields:
        index = snap.field(info.name)
        if isinstance(index, RangeIndex):
            if index.exists:
                n = info.base_count
                ranges[info.name] = (index.digits or 0, index.base,
                                     index.unit if index.slices else 0,  # 0: one key
                                     kth_smallest(index, 1, snap.live) if n else None,
                                     kth_smallest(index, n, snap.live) if n else None)
        elif isinstance(index, ValueIndex):
            counted[info.name] = [(v, b.intersection_cardinality(audience),
                                   b.intersection_cardinality(snap.live))
                                  for v, b in index.values.items()]
    return found, counted, ranges


def insights_at_most(engine: Any, rule: Any, as_of: datetime,
                     bounds: dict[str, tuple[list[Fraction], list[Fraction]]]
                     ) -> dict[str, tuple[list[int], list[int]]]:
    """Per range field, how many live profiles, and how many of the rule's, have a value
    at most each bound (exact values): (base counts, audience counts). The rule's
    members come from the engine's result cache after the first step of a search."""
    snap = engine.snapshot
    audience = None
    if any(asked for _, asked in bounds.values()):
        audience = engine.bitmap(rule, as_of=as_of) & snap.live
    found = {}
    for name, (in_base, in_audience) in bounds.items():
        index = snap.field(name)
        assert isinstance(index, RangeIndex)
        scale = 10 ** (index.digits or 0)
        found[name] = tuple([len(index.interval(None, math.floor(b * scale), within))
                             for b in wanted]
                            for wanted, within in ((in_base, snap.live),
                                                   (in_audience, audience)))
    return found


def ranged_insights(shards: Any, rule: Any, as_of: datetime, parts: Sequence[tuple],
                    buckets: int) -> dict[str, Any]:
    """The number, date and timestamp fields' insights over every shard, as one store's
    (insights.field_insight): buckets, and the audience's min, max and quantiles."""
    from bitseg.index.describe import QUANTILES
    from bitseg.index.insights import Bucket, FieldInsight

    cuts: dict[str, tuple] = {}  # name: (type, digits, edges, highest, count, base count)
    for infos in zip(*(f.fields for f, _, _ in parts), strict=True):
        name, type_ = infos[0].name, infos[0].type
        grids = [p[2][name] for p in parts if name in p[2]]
        if type_ not in T.RANGE_TYPES:
            continue
        count, base_count = sum(i.count for i in infos), sum(i.base_count for i in infos)
        if not base_count:
            cuts[name] = (type_, 0, (), 0, 0, 0)
            continue
        digits = max(d for d, _, _, _, _ in grids)
        scaled = [(base * 10 ** (digits - d), unit * 10 ** (digits - d),
                   None if lo is None else lo * 10 ** (digits - d),
                   None if hi is None else hi * 10 ** (digits - d))
                  for d, base, unit, lo, hi in grids]
        unit = 0
        for base, step, _, _ in scaled:
            unit = math.gcd(unit, step, base - scaled[0][0])
        unit = unit or 1
        lowest = min(lo for _, _, lo, _ in scaled if lo is not None)
        highest = max(hi for _, _, _, hi in scaled if hi is not None)
        width = max(1, -(-((highest - lowest) // unit + 1) // buckets)) * unit
        edges = (*range(lowest, highest + 1, width), highest + unit)
        cuts[name] = (type_, digits, edges, highest, count, base_count)
    asked = {n: ([Fraction(e - 1, 10 ** c[1]) for e in c[2][1:-1]],) * 2
             for n, c in cuts.items() if c[5]}
    below = _summed(shards.each("insights_at_most", rule, as_of, asked)) if asked else {}
    wanted = {n: (c[1], [1, c[4]] + [max(1, math.ceil(q * c[4])) for _, q in QUANTILES],
                  c[2][0], c[3])
              for n, c in cuts.items() if c[4]}
    marks = _kth_keys(lambda bounds: {n: a for n, (_, a) in _summed(shards.each(
        "insights_at_most", rule, as_of, {k: ([], b) for k, b in bounds.items()})).items()},
        wanted)
    found = {}
    for name, (type_, digits, edges, highest, count, base_count) in cuts.items():
        if not base_count:
            found[name] = FieldInsight(name, type_, 0, 0)
            continue
        in_base, in_audience = below[name]
        cum_b, cum_a = [0, *in_base, base_count], [0, *in_audience, count]
        hist = tuple(Bucket(_shown(type_, digits, edges[i]),
                            _shown(type_, digits, edges[i + 1] if i + 2 < len(edges)
                                   else highest),
                            cum_a[i + 1] - cum_a[i], cum_b[i + 1] - cum_b[i])
                     for i in range(len(edges) - 1))
        if not count:
            found[name] = FieldInsight(name, type_, 0, base_count, buckets=hist)
            continue
        low, high, *rest = (_shown(type_, digits, k) for k in marks[name])
        found[name] = FieldInsight(name, type_, count, base_count, buckets=hist, min=low,
                                   max=high, quantiles=tuple(
                                       (label, v) for (label, _), v
                                       in zip(QUANTILES, rest, strict=True)))
    return found


def _summed(counted: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The shards' per-field count lists (or tuples of them) summed element by element."""
    def add(a: Any, b: Any) -> Any:
        if isinstance(a, int):
            return a + b
        return type(a)(add(x, y) for x, y in zip(a, b, strict=True))

    total = dict(counted[0])
    for more in counted[1:]:
        total = {n: add(total[n], more[n]) for n in total}
    return total


def merge_insights(parts: Sequence[tuple[Any, dict[str, list], dict[str, tuple]]], top: int,
                   ranged: dict[str, Any] | None = None) -> Any:
    """The shards' Insights parts as one store's; the range fields' are `ranged`
    (ranged_insights)."""
    from bitseg.index.insights import Activity, EventInsight, FieldInsight, Insights

    found = [f for f, _, _ in parts]
    if len(found) == 1:
        return found[0]
    size, total = sum(f.profiles for f in found), sum(f.total_profiles for f in found)
    fields = []
    for infos in zip(*(f.fields for f in found), strict=True):
        name = infos[0].name
        if ranged is not None and name in ranged:
            fields.append(ranged[name])
            continue
        counts: dict[Any, list[int]] = {}
        for _, counted, _ in parts:
            for value, n, base in counted[name]:
                summed = counts.setdefault(value, [0, 0])
                summed[0] += n
                summed[1] += base
        ranked = sorted(((v, n, b) for v, (n, b) in counts.items() if n),
                        key=lambda vnb: (-vnb[1], _value_order(vnb[0])))
        fields.append(FieldInsight(name, infos[0].type, sum(i.count for i in infos),
                                   sum(i.base_count for i in infos),
                                   tuple(_share(v, n, b, size, total)
                                         for v, n, b in ranked[:top]), len(ranked)))
    by_event: dict[str, list[Any]] = {}
    for f in found:
        for event in f.events:
            by_event.setdefault(event.event, []).append(event)
    events = tuple(EventInsight(name, tuple(
        Activity(ws[0].days, *(sum(getattr(w, k) for w in ws)
                               for k in ("events", "profiles", "base_events",
                                         "base_profiles")))
        for ws in zip(*(e.windows for e in by_event[name]), strict=True)))
        for name in sorted(by_event))
    return Insights(size, total, tuple(fields), events, summed_metrics([f.orders
                                                                         for f in found]))


def _share(value: Any, n: int, base: int, size: int, total: int) -> Any:
    from bitseg.index.insights import ValueShare

    share = Fraction(n, size) if size else None
    base_share = Fraction(base, total) if total else None
    lift = share / base_share if share is not None and base_share else None
    return ValueShare(value, n, base, share, base_share, lift)


def summed_metrics(found: Sequence[Any]) -> Any:
    """The shards' Metrics summed (shares and averages follow from the sums)."""
    return replace(found[0], **{key: sum((getattr(m, key) for m in found[1:]),
                                         getattr(found[0], key))
                                for key in ("profiles", "total_profiles", "orders",
                                            "customers", "revenue", "total_revenue")})


# ---------------------------------------------------------------------- export schedules
class ShardExports:
    """Scheduled exports of a sharded store (index/exports.Exports' calls, which the
    servicer and ExportScheduler use): the schedules are kept in shard 0's store; a run
    writes one file, shard 0's members first, then shard 1's, … (each in its dense id
    order, as Members), asking one shard at a time, so the front holds one shard's part."""

    def __init__(self, shards: Any) -> None:
        self.shards = shards

    def create(self, segment: str, every: int, fields: Sequence[str], require: Sequence[str],
               fmt: str, out: str, rotate: bool = False) -> Any:
        return self.shards.call(0, "export_create", segment, every, list(fields),
                                list(require), fmt, out, rotate)

    def list(self) -> list[Any]:
        return self.shards.call(0, "export_list")

    def delete(self, schedule_id: int) -> None:
        self.shards.call(0, "export_delete", schedule_id)

    def run(self, schedule: Any, now_us: int) -> Any:
        """Write the schedule's next file and record the run (or its failure)."""
        from pathlib import Path

        from bitseg.index.exports import write_atomically

        path = schedule.file_for(schedule.runs + 1)
        rows = [0]

        def parts() -> Any:
            # a dynamic segment's top sets, chosen once for every shard's part
            chosen = resolve_tops(self.shards, {"segment": schedule.segment},
                                  datetime.now(timezone.utc)) if self.shards.count > 1 \
                else None
            for shard in range(self.shards.count):
                asked = ("export_part", schedule.segment, list(schedule.fields),
                         list(schedule.require), schedule.format, shard == 0)
                data, kept = self.shards.call(shard, *asked) if chosen is None \
                    else self.shards.call(shard, "with_tops", chosen[shard], *asked)
                rows[0] += kept
                yield data

        try:
            Path(schedule.out).mkdir(parents=True, exist_ok=True)
            write_atomically(path, parts())
            after = replace(schedule, runs=schedule.runs + 1, last_file=str(path),
                            last_rows=rows[0], last_error="", last_run=now_us)
        except (BitsegError, OSError) as exc:
            after = replace(schedule, last_error=str(exc), last_run=now_us)
        self.shards.call(0, "export_record", after)
        return after


def export_part(engine: Any, segment: str, fields: list[str], require: list[str], fmt: str,
                header: bool) -> tuple[bytes, int]:
    """This shard's members of the segment having every required field, encoded as the
    export file's lines (with the CSV header when `header`), and how many."""
    from bitseg.index.exports import encode_columns, with_required

    snap = engine.snapshot
    kept = with_required(snap, engine.bitmap({"segment": segment}), require)
    chunks = list(encode_columns(engine, ids_of(kept), fields, fmt, snap))
    if fmt == "csv" and not header:
        chunks = chunks[1:]
    return b"".join(chunks), len(kept)


def export_scheduler(shards: Any, tick: float = 1.0) -> Any:
    """The server's ExportScheduler over the shards (not started). A shard that does not
    answer (its actor restarting) skips that tick, not every later one."""
    import logging

    from bitseg.index.exports import ExportScheduler
    from bitseg.server.service import ShardUnavailable

    class Scheduler(ExportScheduler):
        def run_once(self, now_us: int | None = None) -> list[int]:
            try:
                return super().run_once(now_us)
            except ShardUnavailable as exc:
                logging.getLogger("bitseg.exports").warning("scheduled exports: %s", exc)
                return []

    return Scheduler(ShardExports(shards), tick)
