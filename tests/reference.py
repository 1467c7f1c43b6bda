"""A deliberately naive reference evaluator for the rule language (CONTRACT §1, §2.1–2.3).

This is the test oracle: it shares nothing with index/ except the error classes.
Profiles are plain dicts; a rule is evaluated by walking the JSON tree once per
profile, in plain Python, with exact arithmetic.  Slow on purpose and obvious on
purpose: every line should be checkable against the contract by reading it.

Interpretation choices (where the contract leaves room) are marked "CHOICE".
"""

from __future__ import annotations

import calendar
import json
import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

from bitseg.index.errors import NotFound, RuleError

UTC = timezone.utc

TYPES = ("keyword", "keywords", "bool", "int", "float", "date", "timestamp")
LOGIC_KEYS = ("and", "or", "not", "all", "segment")
NODE_KEYS = LOGIC_KEYS + ("field",)

_COMPARE = {"gt", "gte", "lt", "lte"}
_NUMERIC_OPS = {"eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "between",
                "exists", "not_exists"}
OPS_BY_TYPE: dict[str, frozenset[str]] = {
    "keyword": frozenset({"eq", "ne", "in", "not_in", "exists", "not_exists"}),
    "keywords": frozenset({"eq", "ne", "in", "not_in", "has_all", "exists", "not_exists"}),
    "bool": frozenset({"eq", "ne", "exists", "not_exists"}),
    "int": frozenset(_NUMERIC_OPS),
    "float": frozenset(_NUMERIC_OPS),
    "date": frozenset(_NUMERIC_OPS | {"anniversary_in"}),
    "timestamp": frozenset(_NUMERIC_OPS | {"anniversary_in"}),
}
ALL_OPS = frozenset().union(*OPS_BY_TYPE.values())
SCALAR_OPS = {"eq", "ne", "gt", "gte", "lt", "lte"}
LIST_OPS = {"in", "not_in", "has_all"}
NO_VALUE_OPS = {"exists", "not_exists"}

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TS_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:?\d{2})?$"
)


# --------------------------------------------------------------------------- values

def parse_date(text: Any) -> date:
    """'YYYY-MM-DD' -> date; ValueError otherwise."""
    if not isinstance(text, str) or not _DATE_RE.match(text):
        raise ValueError(f"expected a date YYYY-MM-DD, got {text!r}")
    try:
        return date.fromisoformat(text)
    except ValueError:  # 2024-13-45
        raise ValueError(f"expected a date YYYY-MM-DD, got {text!r}") from None


def parse_timestamp(text: Any) -> datetime:
    """ISO 8601 -> aware UTC datetime.  No zone = UTC; a bare date = midnight UTC."""
    if isinstance(text, str) and _DATE_RE.match(text):
        return datetime.combine(parse_date(text), datetime.min.time(), tzinfo=UTC)
    if not isinstance(text, str) or not _TS_RE.match(text):
        raise ValueError(f"expected an ISO 8601 timestamp, got {text!r}")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"expected an ISO 8601 timestamp, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def exact_number(value: Any) -> Fraction:
    """The exact rational a JSON number stands for: 0.1 is 1/10, not the nearest double."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, float):
        return Fraction(Decimal(repr(value)))
    return Fraction(value)


def normalize_as_of(as_of: Any) -> datetime:
    if as_of is None:
        return datetime.now(UTC)
    if isinstance(as_of, str):
        return parse_timestamp(as_of)
    if isinstance(as_of, datetime):
        if as_of.tzinfo is None:
            as_of = as_of.replace(tzinfo=UTC)
        return as_of.astimezone(UTC)
    raise TypeError(f"as_of must be a datetime or ISO string, got {as_of!r}")


def infer_type(value: Any) -> str:
    """CONTRACT §1 inference from the first non-null value."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        if _DATE_RE.match(value):
            return "date"
        if _TS_RE.match(value):
            return "timestamp"
        return "keyword"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "keywords"
    raise ValueError(f"cannot infer a type for {value!r}")


def check_data_value(type_: str, value: Any) -> None:
    """Raise ValueError when a (non-null) loaded value does not fit its type."""
    if type_ == "keyword":
        ok = isinstance(value, str)
    elif type_ == "keywords":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif type_ == "bool":
        ok = isinstance(value, bool)
    elif type_ == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif type_ == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif type_ == "date":
        parse_date(value)
        ok = True
    elif type_ == "timestamp":
        parse_timestamp(value)
        ok = True
    else:
        raise ValueError(f"unknown type {type_!r}")
    if not ok:
        raise ValueError(f"{value!r} is not a {type_}")


def display_value(type_: str, value: Any) -> Any:
    """How ENGINE_API says engine.profile() shows a stored value."""
    if type_ == "keywords":
        return sorted(set(value))
    if type_ == "date":
        return parse_date(value).isoformat()
    if type_ == "timestamp":
        moment = parse_timestamp(value)
        text = moment.strftime("%Y-%m-%dT%H:%M:%S")
        if moment.microsecond:
            text += f".{moment.microsecond:06d}".rstrip("0")
        return text + "Z"
    return value


def anniversary_matches(d: date, start: date, n: int) -> bool:
    """Does d's month-day fall on one of the n days start, start+1, ..., start+n-1?

    A Feb 29 date counts as Feb 28 in a non-leap year (the year of the day checked).
    Naive loop over every day of the window.  (Any 366 consecutive days contain every
    anniversary, so looping past 800 days can never change the answer.)
    """
    for k in range(min(n, 800)):
        day = start + timedelta(days=k)
        month, dom = d.month, d.day
        if (month, dom) == (2, 29) and not calendar.isleap(day.year):
            dom = 28
        if (day.month, day.day) == (month, dom):
            return True
    return False


# --------------------------------------------------------------------------- reference

class Reference:
    """Profiles as plain dicts: external id -> {field: value as loaded (never None)}."""

    def __init__(self, schema: Mapping[str, str] | None = None) -> None:
        self.schema: dict[str, str] = dict(schema or {})
        for field, type_ in self.schema.items():
            if type_ not in TYPES:
                raise ValueError(f"field {field!r}: unknown type {type_!r}")
        # dict insertion order is load order (first creation; a resurrected id goes last)
        self.profiles: dict[str, dict[str, Any]] = {}

    # ---- writes

    def upsert(self, records: Iterable[Mapping[str, Any]]) -> None:
        """CONTRACT §1: given keys replace, omitted keys are kept, null removes the value.

        A batch is all-or-nothing: everything is checked before anything is applied.
        CHOICE: a deleted id that is upserted again is a new profile (old values gone).
        """
        staged = {pid: dict(fields) for pid, fields in self.profiles.items()}
        schema = dict(self.schema)
        for record in records:
            if "id" not in record:
                raise ValueError(f"record without id: {record!r}")
            raw_id = record["id"]
            if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
                raise ValueError(f"bad id {raw_id!r}")
            pid = str(raw_id)
            profile = staged.setdefault(pid, {})
            for key, value in record.items():
                if key == "id":
                    continue
                if value is None:
                    profile.pop(key, None)
                    continue
                if key not in schema:
                    schema[key] = infer_type(value)
                check_data_value(schema[key], value)
                if schema[key] == "keywords":
                    value = sorted(set(value))
                profile[key] = value
        self.profiles = staged
        self.schema = schema

    def delete(self, ids: Iterable[str]) -> None:
        ids = [str(i) for i in ids]
        unknown = [i for i in ids if i not in self.profiles]
        if unknown:
            raise KeyError(unknown[0])
        for pid in ids:
            self.profiles.pop(pid, None)

    # ---- reads

    def live(self) -> set[str]:
        return set(self.profiles)

    def total(self) -> int:
        return len(self.profiles)

    def in_load_order(self, ids: Iterable[str]) -> list[str]:
        wanted = set(ids)
        return [pid for pid in self.profiles if pid in wanted]

    def display(self, pid: str) -> dict[str, Any]:
        shown: dict[str, Any] = {"id": pid}
        for field, value in self.profiles[pid].items():
            shown[field] = display_value(self.schema[field], value)
        return shown

    def members(
        self, rule: Any, as_of: Any, segments: Mapping[str, set[str]] | None = None,
    ) -> set[str]:
        """Every live profile id for which the rule is true at as_of."""
        if isinstance(rule, (str, bytes)):
            try:
                rule = json.loads(rule)
            except ValueError as exc:
                raise RuleError("$", f"invalid JSON: {exc}") from None
        as_of = normalize_as_of(as_of)
        segments = segments or {}
        self.check(rule, as_of, segments)
        result = set()
        for pid, profile in self.profiles.items():
            if self._holds(rule, pid, profile, as_of, segments):
                result.add(pid)
        return result

    def count(self, rule: Any, as_of: Any, segments: Mapping[str, set[str]] | None = None) -> int:
        return len(self.members(rule, as_of, segments))

    # ---- validation: raise RuleError(path of the offending node, what was expected)

    def check(self, node: Any, as_of: datetime, segments: Mapping[str, set[str]],
              path: str = "$") -> None:
        if not isinstance(node, dict):
            raise RuleError(path, f"expected a rule object, got {_kind(node)}")
        keys = [k for k in NODE_KEYS if k in node]
        if not keys:
            raise RuleError(path, "expected a rule object with one of the keys "
                                  "and, or, not, all, segment, field")
        if len(keys) > 1:
            raise RuleError(path, f"expected exactly one of and/or/not/all/segment/field, "
                                  f"got both {keys[0]!r} and {keys[1]!r}")
        key = keys[0]
        if key in ("and", "or"):
            children = node[key]
            if not isinstance(children, list):
                raise RuleError(f"{path}.{key}", f"expected a non-empty list of rules, "
                                                 f"got {_kind(children)}")
            if not children:
                raise RuleError(f"{path}.{key}", "expected a non-empty list of rules, "
                                                 "got an empty list")
            for i, child in enumerate(children):
                self.check(child, as_of, segments, f"{path}.{key}[{i}]")
        elif key == "not":
            child = node["not"]
            if not isinstance(child, dict):
                raise RuleError(f"{path}.not", f"expected a single rule object, "
                                               f"got {_kind(child)}")
            self.check(child, as_of, segments, f"{path}.not")
        elif key == "all":
            if node["all"] is not True:
                raise RuleError(f"{path}.all", f"expected true, got {node['all']!r}")
        elif key == "segment":
            name = node["segment"]
            if not isinstance(name, str):
                raise RuleError(f"{path}.segment", f"expected a segment name, got {_kind(name)}")
            if name not in segments:
                raise NotFound("segment", name)
        else:
            self._check_condition(node, as_of, path)

    def _check_condition(self, node: dict, as_of: datetime, path: str) -> None:
        field = node["field"]
        if not isinstance(field, str):
            raise RuleError(f"{path}.field", f"expected a field name, got {_kind(field)}")
        if field not in self.schema:
            raise RuleError(f"{path}.field", f"unknown field {field!r}; expected one of "
                                             f"{sorted(self.schema)}")
        type_ = self.schema[field]
        if "op" not in node:
            raise RuleError(f"{path}.op", "missing op; expected one of "
                                          f"{sorted(OPS_BY_TYPE[type_])}")
        op = node["op"]
        if not isinstance(op, str) or op not in ALL_OPS:
            raise RuleError(f"{path}.op", f"unknown op {op!r}; expected one of "
                                          f"{sorted(OPS_BY_TYPE[type_])}")
        if op not in OPS_BY_TYPE[type_]:
            raise RuleError(f"{path}.op", f"op {op!r} does not apply to {type_} field "
                                          f"{field!r}; expected one of "
                                          f"{sorted(OPS_BY_TYPE[type_])}")
        vpath = f"{path}.value"
        if op in NO_VALUE_OPS:
            return  # CHOICE: a stray value on exists/not_exists is ignored
        if "value" not in node:
            raise RuleError(vpath, f"missing value; op {op!r} expects a value")
        value = node["value"]
        if op in SCALAR_OPS:
            self._resolve(type_, value, as_of, vpath)
        elif op in LIST_OPS:
            if not isinstance(value, list):
                raise RuleError(vpath, f"expected a list of values for {op!r}, got {_kind(value)}")
            if not value:  # CHOICE (README): an empty list is an error, like an empty and/or
                raise RuleError(vpath, f"expected a non-empty list of values for {op!r}")
            for i, item in enumerate(value):
                self._resolve(type_, item, as_of, f"{vpath}[{i}]")
        elif op == "between":
            if not isinstance(value, list) or len(value) != 2:
                raise RuleError(vpath, f"expected a list [lo, hi] of two values, "
                                       f"got {_kind(value)}")
            lo = self._resolve(type_, value[0], as_of, f"{vpath}[0]")
            hi = self._resolve(type_, value[1], as_of, f"{vpath}[1]")
            if lo > hi:
                raise RuleError(vpath, f"expected lo <= hi in [lo, hi], but lo {value[0]!r} "
                                       f"is greater than hi {value[1]!r}")
        elif op == "anniversary_in":
            if not isinstance(value, dict) or "next_days" not in value:
                raise RuleError(vpath, f'expected {{"next_days": n}}, got {_kind(value)}')
            n = value["next_days"]
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise RuleError(vpath, f'expected {{"next_days": n}} with an integer n >= 1, '
                                       f"got {n!r}")

    # ---- evaluation

    def _resolve(self, type_: str, value: Any, as_of: datetime, path: str) -> Any:
        """A rule value -> something comparable with the profile's value (see _own)."""
        if type_ in ("keyword", "keywords"):
            if not isinstance(value, str):
                raise RuleError(path, f"expected a string, got {_kind(value)}")
            return value
        if type_ == "bool":
            if not isinstance(value, bool):
                raise RuleError(path, f"expected true or false, got {_kind(value)}")
            return value
        if type_ in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RuleError(path, f"expected a number, got {_kind(value)}")
            return exact_number(value)
        # date / timestamp
        if isinstance(value, dict):
            if set(value) != {"days_ago"}:
                raise RuleError(path, f'expected a {type_} string or {{"days_ago": n}}, '
                                      f"got {_kind(value)}")
            n = value["days_ago"]
            if isinstance(n, bool) or not isinstance(n, int):
                raise RuleError(path, f'expected {{"days_ago": n}} with an integer n, '
                                      f"got {n!r}")
            moment = as_of - timedelta(days=n)
            # date field: the UTC calendar date of as_of - n days; timestamp: exactly that
            return moment.date() if type_ == "date" else moment
        try:
            return parse_date(value) if type_ == "date" else parse_timestamp(value)
        except ValueError as exc:
            raise RuleError(path, str(exc)) from None

    def _own(self, type_: str, value: Any) -> Any:
        """A stored profile value in the same comparable form as _resolve."""
        if type_ in ("int", "float"):
            return exact_number(value)
        if type_ == "date":
            return parse_date(value)
        if type_ == "timestamp":
            return parse_timestamp(value)
        return value

    def _holds(self, node: dict, pid: str, profile: dict, as_of: datetime,
               segments: Mapping[str, set[str]]) -> bool:
        if "and" in node:
            return all(self._holds(c, pid, profile, as_of, segments) for c in node["and"])
        if "or" in node:
            return any(self._holds(c, pid, profile, as_of, segments) for c in node["or"])
        if "not" in node:
            return not self._holds(node["not"], pid, profile, as_of, segments)
        if "all" in node:
            return True
        if "segment" in node:
            return pid in segments[node["segment"]]
        return self._condition(node, profile, as_of)

    def _condition(self, node: dict, profile: dict, as_of: datetime) -> bool:
        field, op = node["field"], node["op"]
        type_ = self.schema[field]
        has = field in profile
        if op == "exists":
            return has
        if op == "not_exists":
            return not has
        if not has:
            return False  # a profile lacking the field is false for every other op
        stored = profile[field]
        value = node["value"]

        if type_ in ("keyword", "keywords"):
            mine = set(stored) if type_ == "keywords" else {stored}
            if op == "eq":
                return value in mine
            if op == "ne":
                return value not in mine
            if op == "in":
                return any(v in mine for v in value)
            if op == "not_in":
                return all(v not in mine for v in value)
            if op == "has_all":
                return all(v in mine for v in value)
            raise AssertionError(op)

        if type_ == "bool":
            if op == "eq":
                return stored == value
            if op == "ne":
                return stored != value
            raise AssertionError(op)

        mine = self._own(type_, stored)

        def resolve(v: Any) -> Any:
            return self._resolve(type_, v, as_of, "$")

        if op == "eq":
            return mine == resolve(value)
        if op == "ne":
            return mine != resolve(value)
        if op == "in":
            return any(mine == resolve(v) for v in value)
        if op == "not_in":
            return all(mine != resolve(v) for v in value)
        if op == "gt":
            return mine > resolve(value)
        if op == "gte":
            return mine >= resolve(value)
        if op == "lt":
            return mine < resolve(value)
        if op == "lte":
            return mine <= resolve(value)
        if op == "between":
            return resolve(value[0]) <= mine <= resolve(value[1])
        if op == "anniversary_in":
            day = mine if type_ == "date" else mine.date()  # timestamps: their UTC date
            return anniversary_matches(day, as_of.date(), value["next_days"])
        raise AssertionError(op)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return f"object {json.dumps(value)[:60]}"
    return type(value).__name__
