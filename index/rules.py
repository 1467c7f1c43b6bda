"""The rule language: one typed, immutable tree, parsed once from the JSON form.

Parsing validates against the schema and raises RuleError naming the JSON path of the
offending node.  Values are normalised for the index: numbers become exact Fractions in
the field's key units (floats in hundred-millionths), dates days, timestamps microseconds; a
relative date ({"days_ago": n}) stays a DaysAgo until evaluation fixes as_of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from bitseg.index import types as T
from bitseg.index.errors import RuleError
from bitseg.index.schema import Schema


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
        """[lo, hi) in µs; lo None means from the beginning."""
        span = self.days * T.US_PER_DAY
        if self.kind == "last_days":
            return as_of_us - span + 1, as_of_us + 1
        if self.kind == "next_days":
            return as_of_us + 1, as_of_us + span + 1
        if self.kind == "range":
            return self.start, self.end
        return None, as_of_us + 1


@dataclass(frozen=True, slots=True)
class Having:
    """An aggregate condition over the selected rows; value(s) in the key units of `of`
    (count: plain numbers). value is a Fraction, or (lo, hi) for between."""

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


Rule = All | And | Or | Not | SegmentRef | Cond | EventCond | OrdersCond
RULE_TYPES = (All, And, Or, Not, SegmentRef, Cond, EventCond, OrdersCond)
ITEM_READINGS = {"items.qty_sum": T.INT, "items.distinct": T.INT}  # per-order derived
HAVING_OPS = {"eq", "ne", "gt", "gte", "lt", "lte", "between"}
AGGS = ("count", "sum", "avg", "min", "max")

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
NODE_KEYS = ("and", "or", "not", "all", "segment", "field", "event", "orders")
WHERE_KEYS = ("and", "or", "not", "all", "field")


def parse_rule(rule: Any, schema: Schema) -> Rule:
    """A rule in JSON form (dict, or JSON text) -> the typed tree."""
    if isinstance(rule, (str, bytes)):
        try:
            rule = orjson.loads(rule)
        except orjson.JSONDecodeError as exc:
            raise RuleError("$", f"not valid JSON: {exc}") from None
    return _Parser(schema).node(rule, "$")


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
        return SegmentRef(name, f"{path}.segment")

    def _event(self, obj: dict, path: str) -> Rule:
        _only(obj, {"event", "where", "window", "having"}, path)
        name = obj["event"]
        if not isinstance(name, str) or not name:
            raise RuleError(f"{path}.event", 'expected an event type name, or "*" for any')
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
                                    f"{value[key]!r}") from None
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
            raise RuleError(f"{here}.agg", f"expected one of {', '.join(AGGS)}, got {agg!r}")
        of, of_type = value.get("of"), None
        if agg == "count":
            if "of" in value:
                raise RuleError(f"{here}.of", "count takes no 'of'")
        else:
            of_type = numeric.get(of) if isinstance(of, str) else None
            if of_type not in (T.INT, T.FLOAT):
                known = ", ".join(sorted(k for k, t in numeric.items() if t in (T.INT, T.FLOAT)))
                raise RuleError(f"{here}.of", f"expected a numeric field to {agg}, got {of!r} "
                                f"(numeric fields: {known or 'none'})")
        op = value.get("op")
        if op not in HAVING_OPS:
            raise RuleError(f"{here}.op", f"expected one of {', '.join(sorted(HAVING_OPS))}, "
                            f"got {op!r}")
        checker = _Values(of_type or T.INT, f"{here}.value")
        if "value" not in value:
            raise RuleError(f"{here}.value", f"op {op!r} needs a value")
        if op == "between":
            number = checker.between(value["value"])
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
        raise RuleError(f"{path}.field", f"unknown field {name!r} (known fields: {known})")
    op = obj.get("op")
    if op not in ALL_OPS:
        raise RuleError(f"{path}.op", f"expected an op, one of {', '.join(sorted(ALL_OPS))}; "
                        f"got {op!r}")
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
                return value
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
                            f"got {value!r}") from None

    def items(self, value: Any) -> tuple:
        if not isinstance(value, list):
            raise RuleError(self.path, f"expected a list, got {_kind(value)}")
        if not value:
            raise RuleError(self.path, "expected a non-empty list")
        return tuple(self.scalar(v, f"{self.path}[{i}]") for i, v in enumerate(value))

    def between(self, value: Any) -> tuple:
        if not isinstance(value, list) or len(value) != 2:
            raise RuleError(self.path, f"expected a list [lo, hi], got {_kind(value)}")
        lo = self.scalar(value[0], f"{self.path}[0]")
        hi = self.scalar(value[1], f"{self.path}[1]")
        if _comparable(lo, hi) and lo > hi:
            raise RuleError(self.path, "expected lo <= hi in [lo, hi]")
        return (lo, hi)

    def anniversary(self, value: Any) -> int:
        n = value.get("next_days") if isinstance(value, dict) else None
        if (not isinstance(value, dict) or set(value) != {"next_days"}
                or isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise RuleError(self.path, 'expected {"next_days": n} with an integer n >= 1')
        return n


def _comparable(lo: Any, hi: Any) -> bool:
    return not isinstance(lo, DaysAgo) and not isinstance(hi, DaysAgo)


def _only(obj: dict, allowed: set[str], path: str) -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        raise RuleError(f"{path}.{extra[0]}", f"unexpected key {extra[0]!r} "
                        f"(expected only {', '.join(sorted(allowed))})")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__

