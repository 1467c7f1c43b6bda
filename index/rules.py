"""The rule language: one typed, immutable tree, parsed once from the JSON form.

Parsing validates against the schema and raises RuleError naming the JSON path of the
offending node.  Values are normalised for the index: numbers become exact Fractions in
the field's key units (floats in hundred-millionths), dates days, timestamps microseconds; a
relative date ({"days_ago": n}) stays a DaysAgo until evaluation fixes as_of.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from bitseg.index import types as T
from bitseg.index.errors import RuleError
from bitseg.index.sample import Sample, parse_sample
from bitseg.index.schema import Schema
from bitseg.index.sqlrule import SqlRule, parse_sql
from bitseg.index.top import Top, parse_top


@dataclass(frozen=True, slots=True)
class All:
    pass


@dataclass(frozen=True, slots=True)
class And:
    children: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class Or:
    children: tuple[Rule, ...]


@dataclass(frozen=True, slots=True)
class Not:
    child: Rule


@dataclass(frozen=True, slots=True)
class SegmentRef:
    name: str
    path: str


@dataclass(frozen=True, slots=True)
class DaysAgo:
    """A date relative to as_of; resolved at evaluation."""

    days: int


@dataclass(frozen=True, slots=True)
class Cond:
    """A condition on one profile field.

    value by op: eq/ne/gt/gte/lt/lte -> scalar; in/not_in/has_all -> tuple;
    between -> (lo, hi); anniversary_in -> days (int); exists/not_exists -> None.
    Range scalars are Fraction (numbers) or int | DaysAgo (dates, timestamps).
    """

    field: str
    type: str
    op: str
    value: Any


@dataclass(frozen=True, slots=True)
class Window:
    """Which rows by time. kind: "last_days" (as_of - days, as_of], "next_days"
    (as_of, as_of + days], "range" [start, end), "all" (everything up to as_of)."""

    kind: str
    days: int = 0
    start: int = 0
    end: int = 0

    def bounds(self, as_of_us: int) -> tuple[int | None, int]:
        """[lo, hi) in µs; lo None means from the beginning.

        Edges are clamped to the instants a row can have (years 0001-9999 UTC), so a
        window reaching before year 1 starts with the first row and one reaching past
        9999 ends with the last: a huge last_days is simply every row up to as_of.
        """
        span = self.days * T.US_PER_DAY
        if self.kind == "last_days":
            lo, hi = as_of_us - span + 1, as_of_us + 1
        elif self.kind == "next_days":
            lo, hi = as_of_us + 1, as_of_us + span + 1
        elif self.kind == "range":
            return self.start, self.end
        else:
            return None, _clamp(as_of_us + 1)
        hi = _clamp(hi)
        return min(_clamp(lo), hi), hi


def _clamp(micros: int) -> int:
    """An edge of a [lo, hi) window, within [first instant, last instant + 1]."""
    return min(max(micros, T.MIN_US), T.MAX_US + 1)


@dataclass(frozen=True, slots=True)
class Having:
    """An aggregate condition over the selected rows; value(s) in the key units of `of`
    (count: plain numbers). value is a Fraction, (lo, hi) for between, or a tuple of
    distinct Fractions for in / not_in."""

    agg: str
    of: str | None
    of_type: str | None
    op: str
    value: Any

    def holds_for_no_rows(self) -> bool:
        """Profiles with no selected rows have count 0 and sum 0; avg/min/max are false."""
        if self.agg not in ("count", "sum"):
            return False
        return _compare(self.op, 0, self.value)


def _compare(op: str, x: Any, value: Any) -> bool:
    if op == "between":
        return value[0] <= x <= value[1]
    if op in ("in", "not_in"):
        return (x in value) == (op == "in")
    return {"eq": x == value, "ne": x != value, "gt": x > value, "gte": x >= value,
            "lt": x < value, "lte": x <= value}[op]


@dataclass(frozen=True, slots=True)
class EventCond:
    event: str  # a type name, or "*" for any
    where: Rule | None  # over the event's properties
    window: Window
    having: Having


@dataclass(frozen=True, slots=True)
class OrdersCond:
    orders: Rule  # over the order's fields and items.*
    window: Window
    having: Having


@dataclass(frozen=True, slots=True)
class ItemsCond:
    """Order item lines as rows (CONTRACT §2.4b); see index/items.py."""

    items: Rule  # over item keys, named without "items."
    orders: Rule  # over the order's fields (All when absent)
    window: Window
    having: Having
    spend_scale: int = 1  # key units of price × qty per unit of spend


@dataclass(frozen=True, slots=True)
class SequenceCond:
    """Rows of the steps in strictly increasing time (CONTRACT §2.4c); index/sequence.py.
    Each step is held as the leaf "has such a row in the window" (count >= 1, the
    sequence's window); then_not's window is everything (its rows may lie outside)."""

    steps: tuple[EventCond | OrdersCond, ...]
    window: Window
    within_days: int | None
    then_not: EventCond | OrdersCond | None


Rule = (All | And | Or | Not | SegmentRef | Cond | EventCond | OrdersCond | ItemsCond | Sample
        | Top | SequenceCond | SqlRule)
RULE_TYPES = (All, And, Or, Not, SegmentRef, Cond, EventCond, OrdersCond, ItemsCond, Sample, Top,
              SequenceCond, SqlRule)
ITEM_READINGS = {"items.qty_sum": T.INT, "items.distinct": T.INT}  # per-order derived
HAVING_OPS = {"eq", "ne", "gt", "gte", "lt", "lte", "between", "in", "not_in"}
AGGS = ("count", "sum", "avg", "min", "max", "first", "last")
RECENCY_AGGS = ("first", "last")  # of the rows' ts (CONTRACT §2.4a); index/recency.py

SCALAR_OPS = {"eq", "ne"}
LIST_OPS = {"in", "not_in"}
COMPARE_OPS = {"gt", "gte", "lt", "lte"}
PRESENCE_OPS = {"exists", "not_exists"}
OPS_BY_TYPE = {
    T.KEYWORD: SCALAR_OPS | LIST_OPS | PRESENCE_OPS,
    T.KEYWORDS: SCALAR_OPS | LIST_OPS | PRESENCE_OPS | {"has_all"},
    T.BOOL: SCALAR_OPS | PRESENCE_OPS,
    T.INT: SCALAR_OPS | LIST_OPS | COMPARE_OPS | PRESENCE_OPS | {"between"},
    T.FLOAT: SCALAR_OPS | LIST_OPS | COMPARE_OPS | PRESENCE_OPS | {"between"},
    T.DATE: SCALAR_OPS | LIST_OPS | COMPARE_OPS | PRESENCE_OPS | {"between", "anniversary_in"},
    T.TIMESTAMP: SCALAR_OPS | LIST_OPS | COMPARE_OPS | PRESENCE_OPS
    | {"between", "anniversary_in"},
}
ALL_OPS = set().union(*OPS_BY_TYPE.values())
NODE_KEYS = ("and", "or", "not", "all", "segment", "field", "event", "orders", "items",
             "sample", "top", "sequence", "sql")
WHERE_KEYS = ("and", "or", "not", "all", "field")


# ---------------------------------------------------------------------- limits
MAX_RULE_DEPTH = 32
"""Rule nodes on the longest path from the root ({"all": true} alone is depth 1; the
nodes of an event's `where` and of an `orders` rule count too).  The tightest of what
must hold such a rule is the protobuf decoder (at most 100 nested messages; an and/or
level takes two, a request and a leaf's value up to six more): 32 levels is 70.  It is
also far inside Python's stack for parsing, evaluation and explain (about five frames a
level) and orjson's 254 nested containers when a rule is written as JSON (two a level).
A segment reference counts as one node here; what the segment holds is its own rule."""
MAX_LIST_VALUES = 100_000  # values of an in / not_in / has_all list
MAX_JSON_DEPTH = 1024  # the deepest JSON text orjson reads
RULE_LISTS = ("and", "or", "sequence")  # keys whose list holds child rules (or steps)
RULE_CHILDREN = ("not", "where", "orders", "items", "then_not")  # keys whose value is one


def parse_rule(rule: Any, schema: Schema) -> Rule:
    """A rule in JSON form (dict, or JSON text) -> the typed tree."""
    if isinstance(rule, (str, bytes)):
        try:
            rule = orjson.loads(rule)
        except orjson.JSONDecodeError as exc:
            too_deep = deep_text_error(rule)
            if too_deep is not None:
                raise too_deep from None
            raise RuleError("$", f"not valid JSON: {exc}") from None
    check_depth(rule)
    return _Parser(schema).node(rule, "$")


def _too_deep(path: str) -> RuleError:
    return RuleError(path, f"rule nested too deep: at most {MAX_RULE_DEPTH} levels of "
                     "rules are allowed")


def check_depth(rule: Any) -> None:
    """RuleError naming the first node nested deeper than MAX_RULE_DEPTH.

    Iterative (the parser and evaluator recurse per level, so this must not), and
    paths are built only for the node reported: a 100,000-deep rule costs O(nodes).
    """
    stack: list[tuple[Any, int, Any, str]] = [(rule, 1, None, "$")]
    while stack:
        entry = stack.pop()
        node, depth = entry[0], entry[1]
        if not isinstance(node, dict):
            continue
        if depth > MAX_RULE_DEPTH:
            raise _too_deep(_path_of(entry))
        for key in RULE_LISTS:
            children = node.get(key)
            if isinstance(children, list):
                stack.extend((children[i], depth + 1, entry, f".{key}[{i}]")
                             for i in reversed(range(len(children))))  # first on top
        for key in RULE_CHILDREN:
            if key in node:
                stack.append((node[key], depth + 1, entry, f".{key}"))
        params = node.get("top")  # a top's `of` is its child
        if isinstance(params, dict) and "of" in params:
            stack.append((params["of"], depth + 1, entry, ".top.of"))


def _path_of(entry: tuple[Any, int, Any, str]) -> str:
    parts = []
    while entry is not None:
        parts.append(entry[3])
        entry = entry[2]
    return "".join(reversed(parts))


_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\],:]')


def deep_text_error(text: str | bytes) -> RuleError | None:
    """For JSON text the reader refused: a RuleError if it nests too deep (rules past
    MAX_RULE_DEPTH, or containers past MAX_JSON_DEPTH), with the path to the first
    such node; None when it is not that (then it is just not valid JSON).

    Scans tokens with one regular expression and a stack, no recursion."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    # one frame per open container: [path part, rule depth (0: not a rule), is_object,
    #                                key (objects) or index (arrays), holds rules]
    frames: list[list[Any]] = []
    expect_key = False
    for match in _TOKEN.finditer(text):
        token = match.group()
        parent = frames[-1] if frames else None
        if token in "{[":
            part, depth, listed, top_params = "$", 0, False, False
            if parent is None:
                depth = 1 if token == "{" else 0
            elif parent[2]:
                part = f".{parent[3]}"
                if parent[1] and token == "{" and parent[3] in RULE_CHILDREN:
                    depth = parent[1] + 1
                elif parent[1] and token == "{" and parent[3] == "top":
                    depth, top_params = parent[1], True  # the same node's parameters
                elif parent[1] and token == "{" and parent[3] == "of" and parent[4] == "top":
                    depth = parent[1] + 1  # a top's `of`: its child
                listed = bool(parent[1]) and token == "[" and parent[3] in RULE_LISTS
            else:
                part = f"[{parent[3]}]"
                if parent[4] and token == "{":
                    depth = parent[4] + 1
            if depth > MAX_RULE_DEPTH:
                return _too_deep("".join(f[0] for f in frames) + part)
            if len(frames) >= MAX_JSON_DEPTH:
                return RuleError("".join(f[0] for f in frames) + part,
                                 f"JSON nested deeper than {MAX_JSON_DEPTH} levels (rules "
                                 f"may nest at most {MAX_RULE_DEPTH})")
            holds: Any = parent[1] if listed and parent is not None else 0
            if top_params:
                holds = "top"
            frames.append([part, depth, token == "{", None if token == "{" else 0, holds])
            expect_key = token == "{"
        elif token in "}]":
            if frames:
                frames.pop()
            expect_key = False
        elif token == ",":
            if parent is not None:
                if parent[2]:
                    expect_key = True
                else:
                    parent[3] += 1
        elif token == ":":
            expect_key = False
        elif expect_key and parent is not None and parent[2]:  # a key
            try:
                parent[3] = orjson.loads(token)
            except orjson.JSONDecodeError:
                parent[3] = token.strip('"')
            expect_key = False
    return None


class _Parser:
    """Parses the profile-level rule language; sub-parsers restrict it for `where`/`orders`."""

    def __init__(self, schema: Schema, fields: Any = None, allowed: tuple = NODE_KEYS,
                 what: str = "rule") -> None:
        self.schema = schema
        self.fields = schema.profiles if fields is None else fields
        self.allowed = allowed
        self.what = what

    def node(self, obj: Any, path: str) -> Rule:
        if not isinstance(obj, dict):
            raise RuleError(path, f"expected a rule object, got {_kind(obj)}")
        keys = [k for k in NODE_KEYS if k in obj]
        if "items" in keys:  # an items node's "orders" is its own part
            keys = [k for k in keys if k != "orders"]
        if not keys:
            raise RuleError(path, "expected one of the keys " + ", ".join(self.allowed))
        if len(keys) > 1:
            raise RuleError(path, f"expected exactly one of {', '.join(self.allowed)}, "
                            f"got {' and '.join(keys)}")
        if keys[0] not in self.allowed:
            raise RuleError(f"{path}.{keys[0]}", f"{keys[0]!r} is not allowed in {self.what} "
                            f"(expected one of {', '.join(self.allowed)})")
        return getattr(self, "_" + keys[0])(obj, path)

    def _and(self, obj: dict, path: str) -> Rule:
        return And(self._children(obj, "and", path))

    def _or(self, obj: dict, path: str) -> Rule:
        return Or(self._children(obj, "or", path))

    def _children(self, obj: dict, key: str, path: str) -> tuple[Rule, ...]:
        _only(obj, {key}, path)
        items = obj[key]
        here = f"{path}.{key}"
        if not isinstance(items, list):
            raise RuleError(here, f"expected a list of rules, got {_kind(items)}")
        if not items:
            raise RuleError(here, "expected a non-empty list of rules")
        return tuple(self.node(child, f"{here}[{i}]") for i, child in enumerate(items))

    def _not(self, obj: dict, path: str) -> Rule:
        _only(obj, {"not"}, path)
        return Not(self.node(obj["not"], f"{path}.not"))

    def _all(self, obj: dict, path: str) -> Rule:
        _only(obj, {"all"}, path)
        if obj["all"] is not True:
            raise RuleError(f"{path}.all", "expected true")
        return All()

    def _segment(self, obj: dict, path: str) -> Rule:
        _only(obj, {"segment"}, path)
        name = obj["segment"]
        if not isinstance(name, str) or not name:
            raise RuleError(f"{path}.segment", "expected a segment name (a non-empty string)")
        return SegmentRef(_text(name, f"{path}.segment"), f"{path}.segment")

    def _event(self, obj: dict, path: str) -> Rule:
        _only(obj, {"event", "where", "window", "having"}, path)
        name = obj["event"]
        if not isinstance(name, str) or not name:
            raise RuleError(f"{path}.event", 'expected an event type name, or "*" for any')
        _text(name, f"{path}.event")
        where = None
        if "where" in obj:
            sub = _Parser(self.schema, self.schema.events, WHERE_KEYS, "an event's where")
            where = sub.node(obj["where"], f"{path}.where")
        return EventCond(name, where, self._window(obj, path),
                         self._having(obj, path, self.schema.events))

    def _orders(self, obj: dict, path: str) -> Rule:
        _only(obj, {"orders", "window", "having"}, path)
        fields = {**self.schema.orders, "ts": T.TIMESTAMP}
        for name, type_ in ITEM_READINGS.items():
            fields[name] = type_
        if fields.get("items.qty") in (T.INT, T.FLOAT):
            fields["items.qty_each"] = fields["items.qty"]
        sub = _Parser(self.schema, fields, WHERE_KEYS, "an orders rule")
        selected = sub.node(obj["orders"], f"{path}.orders")
        aggregable = {k: v for k, v in self.schema.orders.items() if not k.startswith("items.")}
        return OrdersCond(selected, self._window(obj, path),
                          self._having(obj, path, {**aggregable, **ITEM_READINGS}))

    def _items(self, obj: dict, path: str) -> Rule:
        from bitseg.index.items import parse_items
        return parse_items(self, obj, path)

    def _sample(self, obj: dict, path: str) -> Rule:
        return parse_sample(obj, path)

    def _top(self, obj: dict, path: str) -> Rule:
        _only(obj, {"top"}, path)
        return parse_top(self, obj["top"], f"{path}.top")

    def _sql(self, obj: dict, path: str) -> Rule:
        return parse_sql(obj, path)  # index/sqlrule.py

    def _sequence(self, obj: dict, path: str) -> Rule:
        from bitseg.index.sequence import parse_sequence
        return parse_sequence(self, obj, path)

    def _window(self, obj: dict, path: str) -> Window:
        if "window" not in obj:
            return Window("all")
        value, here = obj["window"], f"{path}.window"
        if not isinstance(value, dict):
            raise RuleError(here, 'expected {"last_days": n}, {"next_days": n} or '
                            '{"from": T1, "to": T2}')
        if set(value) in ({"last_days"}, {"next_days"}):
            kind = next(iter(value))
            days = value[kind]
            if isinstance(days, bool) or not isinstance(days, int) or days < 1:
                raise RuleError(f"{here}.{kind}", "expected a whole number of days >= 1")
            return Window(kind, days=days)
        if set(value) == {"from", "to"}:
            bounds = []
            for key in ("from", "to"):
                try:
                    bounds.append(T.parse_timestamp(value[key]))
                except ValueError:
                    raise RuleError(f"{here}.{key}", f"expected an ISO 8601 timestamp, got "
                                    f"{_said(value[key])}") from None
            if bounds[0] > bounds[1]:
                raise RuleError(here, "expected from <= to")
            return Window("range", start=bounds[0], end=bounds[1])
        raise RuleError(here, 'expected exactly one of {"last_days": n}, {"next_days": n}, '
                        '{"from": T1, "to": T2}')

    def _having(self, obj: dict, path: str, numeric: Any) -> Having:
        if "having" not in obj:
            return Having("count", None, None, "gte", 1)
        value, here = obj["having"], f"{path}.having"
        if not isinstance(value, dict):
            raise RuleError(here, 'expected {"agg": A, "op": OP, "value": V}')
        _only(value, {"agg", "of", "op", "value"}, here)
        agg = value.get("agg")
        if agg not in AGGS:
            raise RuleError(f"{here}.agg", f"expected one of {', '.join(AGGS)}, got {_said(agg)}")
        of, of_type = value.get("of"), None
        if agg == "count" or agg in RECENCY_AGGS:
            if "of" in value:
                raise RuleError(f"{here}.of", f"{agg} takes no 'of'"
                                + (" (it is always of the rows' ts)" if agg != "count" else ""))
        else:
            of_type = numeric.get(of) if isinstance(of, str) else None
            if of_type not in (T.INT, T.FLOAT):
                known = ", ".join(sorted(k for k, t in numeric.items() if t in (T.INT, T.FLOAT)))
                raise RuleError(f"{here}.of", f"expected a numeric field to {agg}, got {_said(of)} "
                                f"(numeric fields: {known or 'none'})")
        op = value.get("op")
        if op not in HAVING_OPS:
            raise RuleError(f"{here}.op", f"expected one of {', '.join(sorted(HAVING_OPS))}, "
                            f"got {_said(op)}")
        checker = _Values(of_type or T.INT, f"{here}.value")
        if "value" not in value:
            raise RuleError(f"{here}.value", f"op {op!r} needs a value")
        if agg in RECENCY_AGGS:
            checker = _Values(T.TIMESTAMP, f"{here}.value")
            _no_bare_dates(value["value"], f"{here}.value")
        if op == "between":
            number = checker.between(value["value"])
        elif op in LIST_OPS:
            number = tuple(dict.fromkeys(checker.items(value["value"])))
        else:
            number = checker.scalar(value["value"], f"{here}.value")
        return Having(agg, of, of_type, op, number)

    def _field(self, obj: dict, path: str) -> Rule:
        _only(obj, {"field", "op", "value"}, path)
        return parse_condition(obj, self.fields, path)


def parse_condition(obj: dict, fields: Any, path: str) -> Cond:
    """A {"field", "op", "value"} node against the given field types."""
    name = obj["field"]
    if not isinstance(name, str):
        raise RuleError(f"{path}.field", f"expected a field name, got {_kind(name)}")
    type_ = fields.get(name)
    if type_ is None:
        known = ", ".join(sorted(fields)) or "none"
        raise RuleError(f"{path}.field", f"unknown field {_short(name)} (known fields: {known})")
    op = obj.get("op")
    if op not in ALL_OPS:
        raise RuleError(f"{path}.op", f"expected an op, one of {', '.join(sorted(ALL_OPS))}; "
                        f"got {_said(op)}")
    if op not in OPS_BY_TYPE[type_]:
        allowed = ", ".join(sorted(OPS_BY_TYPE[type_]))
        raise RuleError(f"{path}.op", f"op {op!r} does not apply to {type_} field {name!r} "
                        f"(expected one of {allowed})")
    value = _Values(type_, f"{path}.value").of(op, obj)
    return Cond(name, type_, op, value)


class _Values:
    """Checks and normalises the value of a condition for one field type."""

    def __init__(self, type_: str, path: str) -> None:
        self.type = type_
        self.path = path

    def of(self, op: str, obj: dict) -> Any:
        if op in PRESENCE_OPS:
            if "value" in obj:
                raise RuleError(self.path, f"op {op!r} takes no value")
            return None
        if "value" not in obj:
            raise RuleError(self.path, f"op {op!r} needs a value")
        value = obj["value"]
        if op in SCALAR_OPS or op in COMPARE_OPS:
            return self.scalar(value, self.path)
        if op in LIST_OPS or op == "has_all":
            return self.items(value)
        if op == "between":
            return self.between(value)
        return self.anniversary(value)

    def scalar(self, value: Any, path: str) -> Any:
        t = self.type
        if t in (T.KEYWORD, T.KEYWORDS):
            if isinstance(value, str):
                return _text(value, path)
            raise RuleError(path, f"expected a string, got {_kind(value)}")
        if t == T.BOOL:
            if isinstance(value, bool):
                return value
            raise RuleError(path, f"expected true or false, got {_kind(value)}")
        if t in (T.INT, T.FLOAT):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RuleError(path, f"expected a number, got {_kind(value)}")
            exact = T.exact(value)  # float ranges convert it to their own scale
            return exact * T.FLOAT_SCALE if t == T.FLOAT else exact
        return self.moment(value, path)

    def moment(self, value: Any, path: str) -> int | DaysAgo:
        if isinstance(value, dict):
            days = value.get("days_ago")
            if set(value) != {"days_ago"} or isinstance(days, bool) or not isinstance(days, int):
                raise RuleError(path, 'expected {"days_ago": <integer>}')
            return DaysAgo(days)
        try:
            if self.type == T.DATE:
                return T.parse_date(value)
            return T.parse_timestamp(value)
        except ValueError:
            expected = "a date YYYY-MM-DD" if self.type == T.DATE else "an ISO 8601 timestamp"
            raise RuleError(path, f"expected {expected} or {{\"days_ago\": n}}, "
                            f"got {_said(value)}") from None

    def items(self, value: Any) -> tuple:
        if not isinstance(value, list):
            raise RuleError(self.path, f"expected a list, got {_kind(value)}")
        if not value:
            raise RuleError(self.path, "expected a non-empty list")
        if len(value) > MAX_LIST_VALUES:
            raise RuleError(self.path, f"a list of {len(value):,} values; at most "
                            f"{MAX_LIST_VALUES:,} are allowed")
        if self.type in (T.KEYWORD, T.KEYWORDS) and all(type(v) is str for v in value):
            for i, v in enumerate(value):  # the common case, without a call per value
                if len(v) * 4 > T.MAX_VALUE_BYTES:
                    self.scalar(v, f"{self.path}[{i}]")
            return tuple(value)
        return tuple(self.scalar(v, f"{self.path}[{i}]") for i, v in enumerate(value))

    def between(self, value: Any) -> tuple:
        if not isinstance(value, list) or len(value) != 2:
            raise RuleError(self.path, f"expected a list [lo, hi], got {_kind(value)}")
        lo = self.scalar(value[0], f"{self.path}[0]")
        hi = self.scalar(value[1], f"{self.path}[1]")
        if _later(lo, hi):
            raise RuleError(self.path, "expected lo <= hi in [lo, hi]")
        return (lo, hi)

    def anniversary(self, value: Any) -> int:
        n = value.get("next_days") if isinstance(value, dict) else None
        if (not isinstance(value, dict) or set(value) != {"next_days"}
                or isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise RuleError(self.path, 'expected {"next_days": n} with an integer n >= 1')
        return n


_BARE_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _no_bare_dates(value: Any, path: str) -> None:
    """first/last compare instants: a date alone is refused (which instant of it?)."""
    items = value if isinstance(value, list) else [value]
    for i, item in enumerate(items):
        if isinstance(item, str) and _BARE_DATE.fullmatch(item):
            where = f"{path}[{i}]" if isinstance(value, list) else path
            raise RuleError(where, f"expected a timestamp with a time (or {{\"days_ago\": n}}), "
                            f"got the date {_short(item)}: write {_short(item + 'T00:00:00Z')} "
                            "for its first instant")


def _later(lo: Any, hi: Any) -> bool:
    """lo > hi, where both are known without as_of: two constants, or two days_ago (the
    one fewer days ago is the later). A constant against a days_ago depends on as_of."""
    if isinstance(lo, DaysAgo) and isinstance(hi, DaysAgo):
        return lo.days < hi.days
    return not isinstance(lo, DaysAgo) and not isinstance(hi, DaysAgo) and lo > hi


def _only(obj: dict, allowed: set[str], path: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise RuleError(f"{path}.{extra[0]}", f"unexpected key {_said(extra[0])} "
                        f"(expected only {', '.join(sorted(allowed))})")


def _text(value: str, path: str) -> str:
    """A string of a rule, refused when longer than any stored value can be."""
    problem = T.text_problem(value)
    if problem is not None:
        raise RuleError(path, problem)
    return value


def _short(text: str) -> str:
    """A string for a message: quoted, and cut in the middle when long."""
    return repr(text) if len(text) <= 80 else repr(text[:60]) + f"... ({len(text):,} chars)"


def _said(value: Any) -> str:
    """Any JSON value for a message: short, and safe for deeply nested ones."""
    return _short(value) if isinstance(value, str) else T.show(value)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return f"number {_short(repr(value))[1:-1]}"
    if isinstance(value, str):
        return f"string {_short(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__

