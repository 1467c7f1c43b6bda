"""Items as rows: the `items` rule (CONTRACT §2.4b), "spend on a brand".

{"items": R, "orders": O, "window": W, "having": H} selects the order item lines that
match R (a rule over item keys, named without "items.") and whose order matches O (any
order when absent) with its ts in W, and aggregates them per profile.

Layout (index/order_index.py keeps it): every item line has a dense item id; `item_owner`
maps it to its order (NONE once replaced), numeric / date keys are item columns
("items.F"), value-typed keys (keyword, keywords, bool) are ValueIndexes over item ids
(`OrderIndex.item_values`).  Evaluation is vectorised: R becomes a bitmap of item ids,
cut to the item ids of W's order id ranges when item ids follow order ids
(_window_lines); when that cut is exact and O does not depend on as_of, ANDed with the
kept item ids of O's orders (_order_lines), else O and W are a mask over order ids
(orders.select_orders) that each line's order is checked in.  The lines then go into
profile ids and are grouped per profile: `sum` over many rows by float64 np.bincounts
when that is exact (_dense_sum, in steps of CHUNK lines that stay in cache), anything
else by compare.Groups (sort + reduceat for few rows, bincount / ufunc.at for many).

Derived per index (snapshot), at first use, kept while the index lives: the profile id
of every item line and the most lines of one profile (4 bytes an item line), for a
`sum` of qty, price or spend the float64 value of every line (8 bytes a line for each
of the three that is summed), and the item ids of up to 16 orders rules (a bitmap each,
a few MB).  At 10M profiles and ~41M item lines: ~164 MB and ~328 MB for spend.

Aggregates: count = item lines (not units); sum / avg / min / max of qty, price or spend
(spend = price × qty of the line, as the exact integer product of the two columns' keys,
so at the scale of price's units times qty's units: never a float); first / last of the
order's ts.  Choices where the contract is silent: a line without the `of` value (for
spend: without price or without qty) counts for count (and first/last) only; a profile
whose lines all lack it has sum 0 and no avg / min / max, as for orders.
"""

from __future__ import annotations

import weakref
from fractions import Fraction
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index import orders as orders_module
from bitseg.index import types as T
from bitseg.index.compare import (
    DENSE_RATIO,
    I64_MAX,
    I64_MIN,
    Groups,
    compare,
    compare_avg,
    summable,
)
from bitseg.index.errors import RuleError
from bitseg.index.fields import EMPTY, ValueIndex, bitmap_of, ids_of
from bitseg.index.order_index import NO_IDS, NONE, OrderIndex
from bitseg.index.order_layout import KeptLines, OrderLayout, layout_of
from bitseg.index.orders import (
    _bits,
    _scaled,
    _Selector,
    select_orders,
    timeless,
)
from bitseg.index.rules import (
    WHERE_KEYS,
    All,
    And,
    Cond,
    DaysAgo,
    ItemsCond,
    Not,
    Or,
    OrdersCond,
    Rule,
    _only,
    _Parser,
    _short,
)

OFS = ("qty", "price", "spend")  # what sum / avg / min / max may be of
RECENCY = ("first", "last")


# ---------------------------------------------------------------------- parsing


class _ItemParser(_Parser):
    """A rule over item keys, which are written without the "items." prefix."""

    def _field(self, obj: dict, path: str) -> Rule:
        name = obj.get("field")
        if isinstance(name, str) and name.startswith("items.") and name[6:] in self.fields:
            raise RuleError(f"{path}.field", f"item keys are written without the 'items.' "
                            f"prefix in an items rule: use {_short(name[6:])}")
        return super()._field(obj, path)


def item_keys(schema: Any) -> dict[str, str]:
    """Item key -> type, from the orders schema's "items.F" entries."""
    return {name[6:]: type_ for name, type_ in schema.orders.items()
            if name.startswith("items.")}


def parse_items(parser: _Parser, obj: dict, path: str) -> ItemsCond:
    """{"items": R, "orders": O?, "window": W?, "having": H?} -> ItemsCond."""
    _only(obj, {"items", "orders", "window", "having"}, path)
    keys = item_keys(parser.schema)
    sub = _ItemParser(parser.schema, keys, WHERE_KEYS, "an items rule")
    items = sub.node(obj["items"], f"{path}.items")
    orders: Rule = All()
    if "orders" in obj:  # parsed as an orders rule's own `orders` (same path)
        orders = parser._orders({"orders": obj["orders"]}, path).orders
    numeric = {k: keys[k] for k in ("qty", "price") if keys.get(k) in (T.INT, T.FLOAT)}
    scale = 1
    if len(numeric) == 2:
        for type_ in numeric.values():
            scale *= T.FLOAT_SCALE if type_ == T.FLOAT else 1
        numeric["spend"] = T.FLOAT
    return ItemsCond(items, orders, parser._window(obj, path),
                     parser._having(obj, path, numeric), scale)


# ---------------------------------------------------------------------- selecting

_ALIVE: weakref.WeakKeyDictionary[OrderIndex, BitMap] = weakref.WeakKeyDictionary()


def alive_items(index: OrderIndex) -> BitMap:
    """The item ids of current item lines (computed once per index)."""
    found = _ALIVE.get(index)
    if found is None:
        found = _ALIVE[index] = bitmap_of(np.flatnonzero(index.item_owner != NONE))
    return found


class _ItemSelector(_Selector):
    """The `items` part of a rule as a bitmap of item ids (the universe: alive items)."""

    def __init__(self, index: OrderIndex, as_of_us: int) -> None:
        super().__init__(index, as_of_us)
        self.live = alive_items(index)

    def _cond(self, cond: Cond) -> BitMap:
        name = "items." + cond.field
        if cond.type in T.VALUE_TYPES:
            return self._value(cond, self.index.item_values.get(name) or ValueIndex())
        col = self.index.item_column(name)
        if col is None:
            return self.live if cond.op == "not_exists" else EMPTY
        keys, valid = col
        if cond.op == "exists":
            return _bits(valid)
        if cond.op == "not_exists":
            return self.live - _bits(valid)
        return _bits(valid & self._holds(cond, keys))


def _item_mask(sel: _Selector, rule: Rule, iids: np.ndarray) -> np.ndarray:
    """The items rule for a few item ids (one profile's), without whole bitmaps."""
    if isinstance(rule, All):
        return np.ones(len(iids), dtype=bool)
    if isinstance(rule, Not):
        return ~_item_mask(sel, rule.child, iids)
    if isinstance(rule, (And, Or)):
        masks = [_item_mask(sel, c, iids) for c in rule.children]
        return np.logical_and.reduce(masks) if isinstance(rule, And) else \
            np.logical_or.reduce(masks)
    assert isinstance(rule, Cond)
    name, op = "items." + rule.field, rule.op
    if rule.type in T.VALUE_TYPES:
        index = sel.index.item_values.get(name) or ValueIndex()

        def within(bitmap: BitMap) -> np.ndarray:
            return np.array([int(i) in bitmap for i in iids], dtype=bool)

        has = within(index.exists)
        if op in ("exists", "not_exists"):
            return has if op == "exists" else ~has
        if op in ("eq", "ne"):
            hit = within(index.eq(rule.value))
        elif op == "has_all":
            hit = np.logical_and.reduce([within(index.eq(v)) for v in rule.value])
        else:
            hit = within(index.any_of(rule.value))
        return has & ~hit if op in ("ne", "not_in") else hit
    col = sel.index.item_column(name)
    if col is None:
        return np.full(len(iids), op == "not_exists")
    keys, valid = col[0][iids], col[1][iids]
    if op in ("exists", "not_exists"):
        return valid if op == "exists" else ~valid
    return valid & sel._holds(rule, keys)


def _selected(cond: ItemsCond, index: OrderIndex, as_of_us: int
              ) -> tuple[np.ndarray, np.ndarray | None]:
    """(the item ids matching the items rule, cut to the window when it can be, sorted
    uint32; the ids of the orders matching O and W, sorted uint32, or None when that is
    every order id).  A line is selected when it is among the first and its order among
    the second."""
    items = _ItemSelector(index, as_of_us).bitmap(cond.items)
    if not items:
        return NO_IDS, None
    window = _window_lines(index, *cond.window.bounds(as_of_us))
    if window is not None:
        items = items & window  # a new bitmap: `items` may be an index's own
        ordered = _order_lines(index, cond.orders)
        if ordered is not None:  # each line's order is in the window: and matches O
            return ids_of(items & ordered), None
    if not items:
        return NO_IDS, None
    orders = select_orders(OrdersCond(cond.orders, cond.window, cond.having), index, as_of_us)
    return ids_of(items), None if len(orders) == index.count else orders


def _rows(lines: np.ndarray, orders: np.ndarray | None, index: OrderIndex) -> np.ndarray:
    """The item ids (intp, sorted) of the selected item lines (see _selected).

    Indexing with intp ids (take, compress) rather than uint32 ids and a boolean mask:
    numpy converts uint32 indexes to intp on every fancy index, and a masked copy is
    several times slower than np.compress (measured at 1M: 2 to 4× on each step)."""
    iids = lines.astype(np.intp)
    if orders is not None and len(iids):
        wanted = np.zeros(index.count, dtype=bool)
        wanted[orders.astype(np.intp)] = True
        iids = np.compress(wanted.take(index.item_owner_buf.take(iids)), iids)
    return iids


WINDOW_RUNS = 1024  # at most this many runs of orders in the window: cut items to them


def _in_window(items: BitMap, index: OrderIndex, lo: int | None, hi: int) -> BitMap:
    """The item ids whose order's ts may be in [lo, hi): `items` cut to the item ids of
    the window's order id ranges (_window_lines) when it can be; else `items`.  At 1M,
    180 days of 18 months: 1.6M acme lines become ~0.9M."""
    lines = _window_lines(index, lo, hi)
    return items if lines is None else items & lines


def _window_lines(index: OrderIndex, lo: int | None, hi: int) -> BitMap | None:
    """The item ids of exactly the orders (live or not) with lo <= ts < hi, when item ids
    follow order ids (each order's lines in order id order) and the window meets at most
    WINDOW_RUNS runs of orders in ts order: a range of order ids in each run (a search in
    its sorted ts) is a range of item ids.  Else None."""
    runs = index.runs
    if runs is None or not len(runs) or not _lines_follow_orders(index):
        return None
    ts = index.ts
    ends = np.append(runs[1:], len(ts))
    first, last = ts[runs], ts[ends - 1]
    low = I64_MIN if lo is None else lo
    meeting = np.flatnonzero((last >= low) & (first < hi))
    if len(meeting) > WINDOW_RUNS:
        return None
    starts, stops = [], []
    for r in meeting.tolist():
        a, b = int(runs[r]), int(ends[r])
        starts.append(a + int(np.searchsorted(ts[a:b], low, "left")))
        stops.append(a + int(np.searchsorted(ts[a:b], hi, "left")))
    bounds = np.searchsorted(index.item_owner, np.array(starts + stops, dtype=np.uint32), "left")
    lines = BitMap()
    for a, b in zip(bounds[:len(starts)].tolist(), bounds[len(starts):].tolist(), strict=True):
        if a < b:
            lines.add_range(a, b)
    return lines


ORDER_LINE_RULES = 16  # orders rules whose item ids a snapshot keeps (_order_lines)
_ORDER_LINES: weakref.WeakKeyDictionary[OrderIndex, dict[Rule, BitMap]] = \
    weakref.WeakKeyDictionary()


def _order_lines(index: OrderIndex, rule: Rule) -> BitMap | None:
    """The item ids of the live orders matching an orders rule that does not depend on
    as_of (no days_ago, no anniversary), kept per index for the last ORDER_LINE_RULES
    such rules; None for another rule.  Made once from a mask over order ids taken
    through item_owner (at 10M, paid or delivered: 33M of 41M lines, ~0.4 s; a few MB as
    a bitmap); then an items rule's lines of those orders are one bitmap AND, where
    each line's order was gathered and checked per call."""
    if ORDER_LINE_RULES <= 0 or not timeless(rule):
        return None
    kept = _ORDER_LINES.setdefault(index, {})
    found = kept.get(rule)
    if found is None:
        orders = _Selector(index, 0).bitmap(rule)
        wanted = np.zeros(index.count, dtype=bool)
        wanted[ids_of(orders).astype(np.intp)] = True
        found = bitmap_of(np.flatnonzero(wanted.take(index.item_owner.astype(np.intp))))
        while len(kept) >= ORDER_LINE_RULES:
            kept.pop(next(iter(kept)))
        kept[rule] = found
    return found


_FOLLOW: weakref.WeakKeyDictionary[OrderIndex, bool] = weakref.WeakKeyDictionary()


def _lines_follow_orders(index: OrderIndex) -> bool:
    """Whether item_owner never decreases over the item ids: every line current and each
    order's lines after those of lower order ids (a bulk load; a replaced line's NONE
    owner breaks it).  Checked once per index."""
    found = _FOLLOW.get(index)
    if found is None:
        owner = index.item_owner
        found = _FOLLOW[index] = bool((owner[1:] >= owner[:-1]).all()) and \
            not (len(owner) and owner[-1] == NONE)
    return found


# ---------------------------------------------------------------------- aggregating


def _line_values(index: OrderIndex, of: str, iids: np.ndarray, spend_scale: int
                 ) -> tuple[np.ndarray, np.ndarray, int, Fraction]:
    """(values, valid, bound, units per rule-value unit) of `of` for these lines."""
    if of == "spend":
        q, p = index.item_columns.get("items.qty"), index.item_columns.get("items.price")
        if q is None or p is None:
            return np.zeros(len(iids), dtype=np.int64), np.zeros(len(iids), bool), 0, \
                Fraction(1)
        qk, pk = q.keys[iids], p.keys[iids]
        bound = q.bound * p.bound
        if bound >= 2**63:  # the product could overflow int64: exact Python integers
            qk, pk = qk.astype(object), pk.astype(object)
        if q.complete and p.complete:  # every line has both: no validity to gather
            return qk * pk, np.ones(len(iids), bool), bound, \
                Fraction(spend_scale, T.FLOAT_SCALE)
        valid = q.valid[iids] & p.valid[iids]
        return np.where(valid, qk * pk, 0), valid, bound, Fraction(spend_scale, T.FLOAT_SCALE)
    col = index.item_columns.get("items." + of)
    if col is None:
        return np.zeros(len(iids), dtype=np.int64), np.zeros(len(iids), bool), 0, Fraction(1)
    if col.complete:
        return col.keys[iids], np.ones(len(iids), bool), col.bound, Fraction(1)
    valid = col.valid[iids]
    return np.where(valid, col.keys[iids], 0), valid, col.bound, Fraction(1)


def _judge(cond: ItemsCond, index: OrderIndex, iids: np.ndarray, oids: np.ndarray,
           groups: Groups, as_of_us: int) -> np.ndarray:
    """Per group: whether the having condition holds (groups with rows)."""
    having = cond.having
    op, agg = having.op, having.agg
    if agg == "count":
        return compare(groups.counts, op, having.value)
    if agg in RECENCY:
        ts = index.ts_buf[oids]
        ufunc = np.minimum if agg == "first" else np.maximum
        fill = I64_MAX if agg == "first" else I64_MIN
        return compare(groups.reduce(ufunc, ts, fill), op, _moment(having.value, as_of_us))
    values, valid, bound, factor = _line_values(index, having.of, iids, cond.spend_scale)
    value = _scaled(having.value, factor)
    if agg in ("sum", "avg"):
        values = summable(values, bound, int(groups.counts.max(initial=0)))
    if agg == "sum":
        return compare(groups.reduce(np.add, values, 0), op, value)
    n = groups.reduce(np.add, valid.astype(np.int64), 0)
    if agg == "avg":
        return (n > 0) & compare_avg(groups.reduce(np.add, values, 0), n, op, value)
    fill: Any = I64_MAX if agg == "min" else I64_MIN
    if values.dtype == object:
        fill = int(fill) * (1 << 64)  # beyond any product of two int64 keys
    ufunc = np.minimum if agg == "min" else np.maximum
    extreme = groups.reduce(ufunc, np.where(valid, values, fill), fill)
    return (n > 0) & compare(extreme, op, value)


def _moment(value: Any, as_of_us: int) -> Any:
    if isinstance(value, tuple):
        return tuple(_moment(v, as_of_us) for v in value)
    if isinstance(value, DaysAgo):
        return as_of_us - value.days * T.US_PER_DAY
    return value


def holds_for_no_rows(cond: ItemsCond) -> bool:
    return cond.having.agg not in RECENCY and cond.having.holds_for_no_rows()


def evaluate_items(cond: ItemsCond, index: OrderIndex, live: BitMap, as_of_us: int
                   ) -> BitMap:
    """The live profiles for which the items rule holds."""
    if index.count >= orders_module.LAYOUT_MIN_ORDERS and \
            cond.having.agg in ("count", "sum", "avg") and \
            timeless(cond.items) and timeless(cond.orders):
        wait = index.count < orders_module.LAYOUT_BACKGROUND
        layout = layout_of(index, wait=wait)
        found = None if layout is None else _by_profile(cond, layout, live, as_of_us, wait)
        if found is not None:
            return found
    lines, orders = _selected(cond, index, as_of_us)
    empty = holds_for_no_rows(cond)
    ok = _dense_sum(cond, index, lines, orders) if len(lines) else None
    if ok is not None:  # one entry per profile id; a profile without rows has sum 0
        return live - _bits(~ok) if empty else _bits(ok) & live
    iids = _rows(lines, orders, index)
    if not len(iids):
        return live if empty else EMPTY
    groups = Groups(line_owners(index).take(iids))
    ok = _judge(cond, index, iids, index.item_owner_buf.take(iids), groups, as_of_us)
    if empty:
        return live - groups.profiles(groups.has & ~ok)
    return groups.profiles(groups.has & ok) & live


def _by_profile(cond: ItemsCond, layout: OrderLayout, live: BitMap, as_of_us: int,
                wait: bool) -> BitMap | None:
    """count / sum / avg of an items rule whose items and orders rules do not depend on
    as_of, by the profile layout (index/order_layout.py): the rule's lines kept in
    layout order (KeptLines: by profile, then time), the window a stretch of each
    profile's run, each aggregate a difference of cumulative sums (orders._Runs).  None
    when the lines are not kept yet (made on a thread as `wait` is false) or a sum could
    overflow int64 (the caller answers from rows)."""
    index = layout.index

    def select() -> KeptLines:
        items = _ItemSelector(index, as_of_us).bitmap(cond.items)
        return layout.lines(ids_of(items), _Selector(index, as_of_us).bitmap(cond.orders))

    kept = layout.kept(("items", cond.items, cond.orders), select, wait)
    if kept is None:
        return None
    runs = orders_module._Runs(kept, *cond.window.bounds(as_of_us))
    having = cond.having
    if having.agg == "count":
        ok = compare(runs.counts, having.op, having.value)
    else:
        sums = runs.sums(having.of)
        factor = Fraction(cond.spend_scale, T.FLOAT_SCALE) if having.of == "spend" else 1
        value = _scaled(having.value, factor)
        if sums is None:
            return None
        if having.agg == "sum":
            ok = compare(sums, having.op, value)
        else:
            n = runs.sums("n:" + having.of)
            if n is None:
                return None
            ok = (n > 0) & compare_avg(sums, n, having.op, value)
    if holds_for_no_rows(cond):  # the groups are the profiles with lines in the window
        return live - runs.profiles(~ok)
    return runs.profiles(ok) & live


EXACT = 2**53  # float64 adds integers exactly while every partial sum stays below this
CHUNK = 1 << 16  # item lines summed per step in _dense_sum: a step's arrays stay in cache
SPAN = 16  # a step's profile ids (or order ids) may span SPAN × CHUNK ids for a local array


def _dense_sum(cond: ItemsCond, index: OrderIndex, lines: np.ndarray,
               orders: np.ndarray | None) -> np.ndarray | None:
    """`having: sum` per profile id (0 … the largest owner of a line) by np.bincount, or
    None when another path must answer: another aggregate, few lines (sorted groups are
    cheaper), or a sum that float64 might not hold exactly.

    bincount adds float64 weights; the line values are integer keys, so every partial
    sum is exact while |value| × lines of one profile < 2**53.  The bound per line is
    the column's (spend: qty's × price's) and the lines of one profile are at most
    `most_lines` (per snapshot), so when their product is below EXACT the float sums
    are the exact integer sums, in any order of adding.

    The lines go CHUNK at a time, in item id order: their orders checked against a
    mask over the step's order id range, their profile ids and values gathered and
    bincounted into the step's profile id range, added to the sums there.  After a bulk
    load a step's lines belong to a few neighbouring orders and profiles, so every array
    of a step stays in cache (at 10M, 9M lines: 2× faster than one gather of all).  A
    step whose profile ids spread wider is added by one bincount over all at the end."""
    having = cond.having
    size = profile_span(index)
    if having.agg != "sum" or len(lines) * DENSE_RATIO < size:
        return None
    found = _float_values(index, having.of)
    if found is None:
        return None
    values, bound = found
    if bound * most_lines(index) >= EXACT:
        return None
    owner, profiles = index.item_owner_buf, line_owners(index)
    keep = None if orders is None else _OrderMask(orders, index.count)
    sums = np.zeros(size)
    wide: list[tuple[np.ndarray, np.ndarray]] = []
    for start in range(0, len(lines), CHUNK):
        part = lines[start:start + CHUNK].astype(np.intp)
        if keep is not None:
            part = np.compress(keep(owner.take(part)), part)
            if not len(part):
                continue
        who, weights = profiles.take(part), values.take(part)
        lo, hi = int(who.min()), int(who.max()) + 1
        if hi - lo > SPAN * CHUNK:
            wide.append((who, weights))
            continue
        who -= lo
        sums[lo:hi] += np.bincount(who, weights=weights, minlength=hi - lo)
    if wide:
        sums += np.bincount(np.concatenate([w for w, _ in wide]),
                            weights=np.concatenate([v for _, v in wide]), minlength=size)
    factor = Fraction(cond.spend_scale, T.FLOAT_SCALE) if having.of == "spend" else 1
    # compared as floats: each sum is an integer below 2**53, exact in float64, and so
    # is an integer threshold up to 2**53; one beyond is rounded but stays beyond them
    return compare(sums, having.op, _scaled(having.value, factor))


class _OrderMask:
    """Whether each of some order ids is among `orders` (sorted uint32 ids), for one step
    of lines at a time: a mask over the step's order id range, made from the slice of
    `orders` in it; or, for a step whose order ids spread wider, one mask over every
    order id, made the first time it is needed."""

    def __init__(self, orders: np.ndarray, count: int) -> None:
        self.orders, self.count = orders, count
        self.whole: np.ndarray | None = None

    def __call__(self, oids: np.ndarray) -> np.ndarray:
        lo, hi = int(oids.min()), int(oids.max()) + 1
        if hi - lo > SPAN * CHUNK:
            if self.whole is None:
                self.whole = np.zeros(self.count, dtype=bool)
                self.whole[self.orders.astype(np.intp)] = True
            return self.whole.take(oids)
        a, b = np.searchsorted(self.orders, np.array([lo, hi], dtype=np.uint32))
        mask = np.zeros(hi - lo, dtype=bool)
        mask[self.orders[a:b].astype(np.intp) - lo] = True
        oids -= lo
        return mask.take(oids)


_FLOATS: weakref.WeakKeyDictionary[OrderIndex, dict[str, tuple[np.ndarray, int] | None]] = \
    weakref.WeakKeyDictionary()


def _float_values(index: OrderIndex, of: str) -> tuple[np.ndarray, int] | None:
    """(the `of` value of every item id as float64, 0 where it has none; the bound of
    |value|), made once per index and kept (8 bytes an item line), or None when a value
    could be beyond EXACT (then float64 would not hold it exactly)."""
    cached = _FLOATS.setdefault(index, {})
    if of not in cached:
        n = index.item_count
        names = ("items.qty", "items.price") if of == "spend" else ("items." + of,)
        cols = [index.item_columns.get(name) for name in names]
        if any(col is None for col in cols):  # no line has the value
            cached[of] = np.zeros(n), 0
            return cached[of]
        bound = int(np.prod([col.bound for col in cols], dtype=object))
        if bound >= EXACT:
            cached[of] = None
            return None
        values = cols[0].keys[:n] if len(cols) == 1 else cols[0].keys[:n] * cols[1].keys[:n]
        values = values.astype(np.float64)
        for col in cols:
            if not col.complete:
                values[~col.valid[:n]] = 0
        cached[of] = values, bound
    return cached[of]


_OWNERS: weakref.WeakKeyDictionary[OrderIndex, tuple[np.ndarray, int, int]] = \
    weakref.WeakKeyDictionary()


def _owners(index: OrderIndex) -> tuple[np.ndarray, int, int]:
    """(the profile id of every item id's order, 0 for a replaced line; the most current
    item lines any one profile has; the largest such profile id + 1), made once per
    index: 4 bytes an item line."""
    found = _OWNERS.get(index)
    if found is None:
        owner = index.item_owner
        alive = owner != NONE
        profiles = index.owner_buf.take(np.where(alive, owner, 0))
        counts = np.bincount(profiles[alive]) if alive.any() else np.zeros(0, np.intp)
        found = _OWNERS[index] = profiles, int(counts.max(initial=0)), len(counts)
    return found


def line_owners(index: OrderIndex) -> np.ndarray:
    """The profile id of each item id (per index; replaced lines: 0, never selected)."""
    return _owners(index)[0]


def most_lines(index: OrderIndex) -> int:
    """The most current item lines any one profile has (per index)."""
    return _owners(index)[1]


def profile_span(index: OrderIndex) -> int:
    """1 + the largest profile id with a current item line, 0 without lines (per index)."""
    return _owners(index)[2]


def contains_items(cond: ItemsCond, index: OrderIndex, pid: int, as_of_us: int) -> bool:
    """The items rule for one profile: its orders' item lines only."""
    mine = np.flatnonzero(index.owner == pid).astype(np.uint32)
    if len(mine):
        if not isinstance(cond.orders, All):
            chosen = select_orders(OrdersCond(cond.orders, cond.window, cond.having), index,
                                   as_of_us)
            mine = mine[np.isin(mine, chosen)]
        else:
            lo, hi = cond.window.bounds(as_of_us)
            t = index.ts_buf[mine]
            live = np.array([int(o) in index.live for o in mine], dtype=bool)
            mine = mine[live & (t < hi) & (True if lo is None else t >= lo)]
    iids = _items_of(index, mine)
    if len(iids):
        iids = iids[_item_mask(_Selector(index, as_of_us), cond.items, iids)]
    if not len(iids):
        return holds_for_no_rows(cond)
    oids = index.item_owner[iids]
    groups = Groups(np.zeros(len(iids), dtype=np.uint32))
    return bool(_judge(cond, index, iids, oids, groups, as_of_us)[0])


_FIRST: weakref.WeakKeyDictionary[OrderIndex, tuple[np.ndarray, np.ndarray]] = \
    weakref.WeakKeyDictionary()


def _items_of(index: OrderIndex, orders: np.ndarray) -> np.ndarray:
    """The current item ids of these orders (an order's items are consecutive ids)."""
    if not len(orders):
        return np.zeros(0, dtype=np.uint32)
    found = _FIRST.get(index)
    if found is None:
        alive = np.flatnonzero(index.item_owner != NONE)
        owner = index.item_owner[alive]
        starts = np.flatnonzero(np.concatenate(([True], owner[1:] != owner[:-1]))) \
            if len(owner) else np.zeros(0, dtype=np.intp)
        first = np.zeros(index.count, dtype=np.int64)
        n = np.zeros(index.count, dtype=np.int64)
        first[owner[starts]] = alive[starts]
        n[owner[starts]] = np.diff(np.append(starts, len(owner)))
        found = _FIRST[index] = (first, n)
    first, n = found
    parts = [np.arange(first[o], first[o] + n[o]) for o in orders.tolist() if n[o]]
    return np.concatenate(parts).astype(np.uint32) if parts else np.zeros(0, np.uint32)
