"""What the data holds: every field with its type and count, the top values of keyword
fields, min / max / quantiles of numbers and dates, the event types with their counts and
properties, the order and item fields; and the note Explain adds to a rule node that names
a value which never occurs ("no profile has country 'Germany'; did you mean 'DE'?").

Everything is read from one snapshot's indexes, without reading rows:
- a field's count is the cardinality of its `exists` bitmap (within the live profiles);
- top values are the cardinalities of the value bitmaps, highest first, ties by value
  (text order; for bool false before true);
- quantiles use the nearest-rank method: the q-quantile of n sorted values is the value at
  rank ceil(q * n) (rank 1 for q = 0), numpy's method="inverted_cdf". The k-th smallest
  value is found in the bit-sliced index by walking the slices from the top bit, keeping
  the half (bit 0 or bit 1) that holds rank k: two bitmap operations per slice;
- an event type's count is the sum of its monthly count indexes (sum over slices of
  2**i * |slice i ∩ live|), and the keyword/bool property values come from the streams
  kept per value (CONTRACT §2.3), so they are counted the same way. Numeric properties
  are found in the raw blocks' headers; their count is not computed (0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import numpy as np
import orjson
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.errors import BitsegError, NotFound
from bitseg.index.event_index import EventIndex
from bitseg.index.fields import RangeIndex, ValueIndex, bitmap_of, ids_of
from bitseg.index.keys import SEP_TEXT, stream_digested, stream_key
from bitseg.index.rules import And, Cond, EventCond, Not, Or, Rule
from bitseg.index.snapshot import Snapshot

DEFAULT_TOP = 20
MAX_TOP = 1000
MAX_VALUES = 100_000
QUANTILES = (("p25", 0.25), ("p50", 0.5), ("p75", 0.75), ("p90", 0.9), ("p99", 0.99))
SUGGESTIONS = 3  # at most this many "did you mean" values
MAX_CANDIDATES = 10_000  # values compared for a suggestion: the most common ones


@dataclass(frozen=True, slots=True)
class FieldInfo:
    """One field. Values are as a user sees them: str / bool for keywords and bools,
    int or Decimal (exact) for numbers, "YYYY-MM-DD" dates, ISO timestamps."""

    name: str
    type: str
    count: int  # profiles (orders, events) having a value
    distinct: int = 0  # value fields: how many different values
    top: tuple[tuple[Any, int], ...] = ()  # value fields: (value, count), highest first
    min: Any = None
    max: Any = None
    quantiles: tuple[tuple[str, Any], ...] = ()  # (("p25", value), ...)


@dataclass(frozen=True, slots=True)
class EventTypeInfo:
    name: str
    count: int  # events of live profiles
    profiles: int  # live profiles with at least one
    properties: tuple[FieldInfo, ...]


@dataclass(frozen=True, slots=True)
class Description:
    version: int
    profiles: int
    fields: tuple[FieldInfo, ...]
    events: tuple[EventTypeInfo, ...]
    orders: int
    order_fields: tuple[FieldInfo, ...]
    item_fields: tuple[FieldInfo, ...]


def describe(snap: Snapshot, top: int = DEFAULT_TOP) -> Description:
    """Everything the snapshot holds, by name."""
    fields = tuple(field_info(snap, name, top) for name in sorted(snap.schema.profiles))
    events = tuple(event_info(snap, name, top) for name in snap.events.types)
    order_fields, item_fields = _order_fields(snap, top)
    return Description(snap.version, len(snap.live), fields, events, len(snap.orders.live),
                       order_fields, item_fields)


def field_info(snap: Snapshot, name: str, top: int = DEFAULT_TOP) -> FieldInfo:
    """One profile field (KeyError for an unknown one)."""
    type_ = snap.schema.profiles[name]
    index = snap.field(name)
    if isinstance(index, ValueIndex):
        return _value_info(name, type_, index, snap.live, top)
    count = index.exists.intersection_cardinality(snap.live)
    if not count:
        return FieldInfo(name, type_, 0)
    ranks = [1, count] + [max(1, math.ceil(q * count)) for _, q in QUANTILES]
    low, high, *marks = (_shown(type_, index, kth_smallest(index, k)) for k in ranks)
    return FieldInfo(name, type_, count, min=low, max=high,
                     quantiles=tuple((label, v) for (label, _), v in zip(QUANTILES, marks,
                                                                         strict=True)))


def top_values(values: Mapping[Any, BitMap], live: BitMap | None, limit: int
               ) -> list[tuple[Any, int]]:
    """(value, count) of the `limit` most common values, highest count first, ties by
    value (text order; false before true)."""
    counted = [(v, b.intersection_cardinality(live) if live is not None else len(b))
               for v, b in values.items()]
    counted = [(v, n) for v, n in counted if n]
    counted.sort(key=lambda vn: (-vn[1], _order(vn[0])))
    return counted[:limit]


def kth_smallest(index: RangeIndex, k: int, within: BitMap | None = None) -> int:
    """The k-th smallest key (1-based, 1 <= k <= |exists ∩ within|) of a bit-sliced index,
    among the ids of `within` only if given: from the top slice down, keep the ids whose
    bit is 0 if at least k of them remain, else go to the ids whose bit is 1 and skip
    the ones passed."""
    candidates = index.exists if within is None else index.exists & within
    stored = 0
    for i in range(len(index.slices) - 1, -1, -1):
        ones = candidates & index.slices[i]
        zeros = len(candidates) - len(ones)
        if k <= zeros:
            candidates = candidates - ones
        else:
            k -= zeros
            candidates, stored = ones, stored | (1 << i)
    return index.base + stored * index.unit


# ---------------------------------------------------------------------- events
def event_info(snap: Snapshot, event: str, top: int = DEFAULT_TOP) -> EventTypeInfo:
    events, live = snap.events, snap.live
    count, profiles = _stream_total(events, stream_key(event), live)
    by_prop: dict[str, dict[Any, int]] = {}
    prefix = event + SEP_TEXT
    for stream in events.stream_months:
        if not stream.startswith(prefix):
            continue
        if stream_digested(stream):  # a value too long for a key, kept under its digest
            continue
        prop, _, text = stream[len(prefix):].partition(SEP_TEXT)
        n, _ = _stream_total(events, stream, live)
        if n:
            by_prop.setdefault(prop, {})[orjson.loads(text)] = n
    types = snap.schema.events
    props = []
    for prop in sorted(events.property_names(event) | set(by_prop)):
        type_ = types.get(prop, "")
        found = by_prop.get(prop)
        if found is None:
            props.append(FieldInfo(prop, type_, 0))
            continue
        ranked = sorted(found.items(), key=lambda vn: (-vn[1], _order(vn[0])))
        props.append(FieldInfo(prop, type_, sum(found.values()), len(found),
                               tuple(ranked[:top])))
    return EventTypeInfo(event, count, profiles, tuple(props))


def _stream_total(events: EventIndex, stream: str, live: BitMap) -> tuple[int, int]:
    """(events, profiles) of one stream over all its months, live profiles only."""
    total, who = 0, []
    for month in events.stream_months.get(stream, []):
        counts = events.bucket(b"m", stream, month)
        total += sum(s.intersection_cardinality(live) << i for i, s in enumerate(counts.slices))
        who.append(counts.exists)
    return total, (BitMap.union(*who).intersection_cardinality(live) if who else 0)


# ---------------------------------------------------------------------- orders
def _order_fields(snap: Snapshot, top: int) -> tuple[tuple[FieldInfo, ...],
                                                      tuple[FieldInfo, ...]]:
    orders = snap.orders
    live = orders.live
    live_ids = ids_of(live)
    plain, items = [], []
    for name, type_ in sorted(snap.schema.orders.items()):
        is_item = name.startswith("items.")
        values = orders.values.get(name)
        if type_ in T.VALUE_TYPES:
            info = _value_info(name, type_, values or ValueIndex(), live, top)
        elif is_item:
            info = FieldInfo(name, type_, _orders_with_item(snap, name, live))
        else:
            column = orders.column(name)
            count = 0 if column is None else int(np.count_nonzero(column[1][live_ids]))
            info = FieldInfo(name, type_, count)
        (items if is_item else plain).append(info)
    return tuple(plain), tuple(items)


def _orders_with_item(snap: Snapshot, name: str, live: BitMap) -> int:
    """Orders with at least one (current) item having a value of a numeric item field."""
    orders = snap.orders
    column = orders.item_column(name)
    if column is None:
        return 0
    owners = orders.item_owner[column[1]]
    owners = owners[owners < orders.count]  # replaced items have no owner
    return bitmap_of(owners).intersection_cardinality(live)  # a bitmap drops repeats


# ---------------------------------------------------------------------- values
def _value_info(name: str, type_: str, index: ValueIndex, live: BitMap, top: int) -> FieldInfo:
    ranked = top_values(index.values, live, len(index.values))
    return FieldInfo(name, type_, index.exists.intersection_cardinality(live), len(ranked),
                     tuple(ranked[:top]))


def _order(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (bool, int)) else (1, str(value))


def _shown(type_: str, index: RangeIndex, key: int) -> Any:
    """A range key as a user sees it (floats exactly, as a Decimal)."""
    if type_ == T.FLOAT:
        return Decimal(key).scaleb(-(index.digits or 0)).normalize()
    if type_ in T.TIME_TYPES:
        return T.display(type_, key)
    return key


# ---------------------------------------------------------------------- explain notes
def note(node: Rule, snap: Snapshot) -> str:
    """Why a node's count is 0 for a reason the user may not see: the keyword values,
    event type or event property values it names that never occur, with the closest
    existing ones. "" when there is nothing to say."""
    if isinstance(node, Cond) and node.type in (T.KEYWORD, T.KEYWORDS):
        values = snap.field(node.field)
        if not isinstance(values, ValueIndex):
            return ""
        return "; ".join(_missing(f"no profile has {node.field}", v, _counts(values.values))
                         for v in _named(node) if v not in values.values)
    if isinstance(node, EventCond):
        return _event_note(node, snap)
    return ""


def _event_note(node: EventCond, snap: Snapshot) -> str:
    events = snap.events
    known = events.types
    if node.event != "*" and node.event not in events.type_days:
        counts = {t: len(events.type_days[t]) for t in known}  # days with rows: a proxy
        return _missing("no profile has an event of type", node.event, counts)
    types = known if node.event == "*" else [node.event]
    notes = []
    for cond in _conditions(node.where):
        if cond.type != T.KEYWORD or cond.op not in ("eq", "ne", "in", "not_in"):
            continue
        for value in _named(cond):
            keys = [stream_key(t, cond.field, value) for t in types]
            digested = any(stream_digested(k) for k in keys)
            if digested or any(k in events.stream_months for k in keys):
                continue  # a digested name cannot be checked; a present one is fine
            what = "any event" if node.event == "*" else f"'{node.event}' event"
            notes.append(_missing(f"no {what} has {cond.field}", value,
                                  _property_values(events, types, cond.field)))
    return "; ".join(notes)


def _property_values(events: EventIndex, types: list[str], prop: str) -> dict[Any, int]:
    """The keyword values of one property (with the months they occur in, a proxy for
    how common they are), from the stream names."""
    found: dict[Any, int] = {}
    for event in types:
        prefix = f"{event}{SEP_TEXT}{prop}{SEP_TEXT}"
        for stream, months in events.stream_months.items():
            text = stream[len(prefix):]
            if stream.startswith(prefix) and not text.startswith("#"):
                value = orjson.loads(text)
                found[value] = found.get(value, 0) + len(months)
    return found


def _conditions(rule: Rule | None) -> Iterable[Cond]:
    """The conditions inside a `where` rule (and / or / not walked iteratively)."""
    stack = [rule] if rule is not None else []
    while stack:
        node = stack.pop()
        if isinstance(node, Cond):
            yield node
        elif isinstance(node, (And, Or)):
            stack.extend(reversed(node.children))
        elif isinstance(node, Not):
            stack.append(node.child)


def _named(cond: Cond) -> tuple:
    if cond.op in ("eq", "ne"):
        return (cond.value,)
    if cond.op in ("in", "not_in", "has_all"):
        return tuple(cond.value)
    return ()


def _counts(values: Mapping[Any, BitMap]) -> dict[Any, int]:
    return {v: len(b) for v, b in values.items()}


def _missing(subject: str, value: Any, existing: Mapping[Any, int]) -> str:
    text = f"{subject} {_quoted(value)}"
    close = closest(str(value), existing)
    if close:
        text += f"; did you mean {_or([_quoted(v) for v in close])}?"
    return text


def closest(word: str, existing: Mapping[Any, int], n: int = SUGGESTIONS) -> list[Any]:
    """The existing values nearest to `word` by Levenshtein distance, case-folded; only
    those at the smallest distance found, at most n, the more common first, then by
    value; none that share nothing with it (distance as large as the longer text)."""
    if not existing:
        return []
    common = sorted(existing, key=lambda v: (-existing[v], _order(v)))[:MAX_CANDIDATES]
    folded = word.casefold()
    scored = [(levenshtein(folded, str(v).casefold()), v) for v in common]
    best = min(d for d, _ in scored)
    return [v for d, v in scored
            if d == best and d < max(len(folded), len(str(v)))][:n]


def levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions) between two texts."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1,
                               previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _quoted(value: Any) -> str:
    return "'" + str(value).replace("'", "\\'") + "'"


def _or(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]


def values(snap: Snapshot, name: str, limit: int = DEFAULT_TOP) -> FieldInfo:
    """The `limit` most common values of a keyword, keywords or bool profile field."""
    type_ = snap.schema.profiles.get(name)
    if type_ is None:
        raise NotFound("field", name)
    if type_ not in T.VALUE_TYPES:
        raise BitsegError(f"field: {name!r} is a {type_} field; values lists keyword, "
                          "keywords and bool fields (describe shows min, max and quantiles "
                          "of the others)")
    return field_info(snap, name, limit)
