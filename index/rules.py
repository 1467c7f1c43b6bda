"""The rule language: one typed, immutable tree, parsed once from the JSON form.

Parsing validates against the schema and raises RuleError naming the JSON path of the
offending node.  Values are normalised for the index: numbers become exact Fractions in
the field's key units (floats in millionths), dates days, timestamps microseconds; a
relative date ({"days_ago": n}) stays a DaysAgo until evaluation fixes as_of.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

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


Rule = Union[All, And, Or, Not, SegmentRef, Cond]
RULE_TYPES = (All, And, Or, Not, SegmentRef, Cond)

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


def parse_rule(rule: Any, schema: Schema) -> Rule:
    """A rule in JSON form (dict, or JSON text) -> the typed tree."""
    if isinstance(rule, (str, bytes)):
        try:
            rule = orjson.loads(rule)
        except orjson.JSONDecodeError as exc:
            raise RuleError("$", f"not valid JSON: {exc}") from None
    return _Parser(schema).node(rule, "$")


class _Parser:
    def __init__(self, schema: Schema) -> None:
        self.schema = schema

    def node(self, obj: Any, path: str) -> Rule:
        if not isinstance(obj, dict):
            raise RuleError(path, f"expected a rule object, got {_kind(obj)}")
        keys = [k for k in NODE_KEYS if k in obj]
        if not keys:
            raise RuleError(path, "expected one of the keys " + ", ".join(NODE_KEYS))
        if len(keys) > 1:
            raise RuleError(path, f"expected exactly one of {', '.join(NODE_KEYS)}, "
                            f"got {' and '.join(keys)}")
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
        raise RuleError(f"{path}.event", "event rules are not supported by this version yet")

    def _orders(self, obj: dict, path: str) -> Rule:
        raise RuleError(f"{path}.orders", "order rules are not supported by this version yet")

    def _field(self, obj: dict, path: str) -> Rule:
        _only(obj, {"field", "op", "value"}, path)
        return parse_condition(obj, self.schema.profiles, path)


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
            exact = T.exact(value)
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

