"""Hypothesis strategies for bitseg: schemas, profiles, upsert/delete histories, rules, as_of.

Value domains are small on purpose so that random rules actually select something:
4 keywords, ints in -5..20, floats with at most 2 decimals, dates in 2023–2024 with
the Feb 28/29 and Dec 31/Jan 1 edges, timestamps whose times include exact day
boundaries.  Rule values come from the same domains, plus values no profile has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st
from reference import OPS_BY_TYPE, TYPES, exact_number, parse_date, parse_timestamp

UTC = timezone.utc

# ----------------------------------------------------------------------------- domains

KEYWORDS = ["red", "green", "blue", "New York"]
KEYWORDS_ABSENT = ["violet", "Red"]  # no profile has these (keywords are case-sensitive)

INT_MIN, INT_MAX = -5, 20

FLOATS = [-1.5, 0.0, 0.1, 0.2, 0.3, 1.25, 2.5, 3.0, 10.01, 19.99]
FLOATS_ABSENT = [0.33, 99.5, -7.25]

DATE_FIRST, DATE_LAST = date(2023, 1, 1), date(2024, 12, 31)
EDGE_DATES = [
    date(2023, 1, 1), date(2023, 2, 28), date(2023, 3, 1), date(2023, 12, 31),
    date(2024, 1, 1), date(2024, 2, 28), date(2024, 2, 29), date(2024, 3, 1),
    date(2024, 12, 31),
    date(2020, 2, 29),  # an older leap-day birthday: anniversaries in 2023 fall on Feb 28
]
EDGE_TIMES = [time(0, 0, 0), time(23, 59, 59), time(0, 0, 1), time(12, 0, 0)]
OFFSETS = [timezone.utc, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30))]

# as_of spans the data window and a little after it (so every kind of anniversary wraps)
AS_OF_FIRST, AS_OF_LAST = date(2023, 1, 1), date(2025, 3, 31)
AS_OF_EDGE_DATES = EDGE_DATES[:-1] + [date(2025, 2, 28), date(2025, 3, 1), date(2025, 1, 1)]

DAYS_AGO = [0, 1, 2, 7, 30, 59, 365, 366, 730]
NEXT_DAYS = [1, 2, 3, 7, 30, 31, 365, 366, 400, 1000, 5000]

SHORT = {"keyword": "kw", "keywords": "tags", "bool": "flag", "int": "n", "float": "x",
         "date": "d", "timestamp": "ts"}

ID_POOL = ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8", "7", "42"]


# ----------------------------------------------------------------------------- schema

@st.composite
def schemas(draw) -> dict[str, str]:
    """Every one of the seven types, 1–2 fields each."""
    schema: dict[str, str] = {}
    for type_ in TYPES:
        for i in range(draw(st.integers(1, 2))):
            schema[f"{SHORT[type_]}{i}"] = type_
    return schema


# ----------------------------------------------------------------------------- data values

def dates() -> st.SearchStrategy[date]:
    return st.one_of(
        st.sampled_from(EDGE_DATES),
        st.dates(min_value=DATE_FIRST, max_value=DATE_LAST),
    )


def _datetimes(days: st.SearchStrategy[date]) -> st.SearchStrategy[datetime]:
    times = st.one_of(
        st.sampled_from(EDGE_TIMES),
        st.times().map(lambda t: t.replace(microsecond=0)),
    )
    return st.builds(lambda d, t: datetime.combine(d, t, tzinfo=UTC), days, times)


def format_timestamp(moment: datetime, style: int) -> str:
    """One UTC instant in one of three spellings: Z, no zone (UTC), or another offset."""
    if style == 0:
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if style == 1:
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return moment.astimezone(OFFSETS[style - 1]).isoformat()


def timestamps() -> st.SearchStrategy[str]:
    return st.builds(format_timestamp, _datetimes(dates()),
                     st.sampled_from([0, 0, 0, 1, 2, 3]))


def floats() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.sampled_from(FLOATS),
        st.integers(-500, 2000).map(lambda k: round(k / 100, 2)),  # <= 2 decimals
        st.integers(INT_MIN, INT_MAX),  # an int loaded into a float field
    )


def data_value(type_: str) -> st.SearchStrategy[Any]:
    """A JSON value that fits the type (never null)."""
    if type_ == "keyword":
        return st.sampled_from(KEYWORDS)
    if type_ == "keywords":
        return st.lists(st.sampled_from(KEYWORDS), min_size=1, max_size=4)  # dups allowed
    if type_ == "bool":
        return st.booleans()
    if type_ == "int":
        return st.integers(INT_MIN, INT_MAX)
    if type_ == "float":
        return floats()
    if type_ == "date":
        return dates().map(date.isoformat)
    if type_ == "timestamp":
        return timestamps()
    raise ValueError(type_)


# ----------------------------------------------------------------------------- histories

@dataclass
class Scenario:
    schema: dict[str, str]
    # ("upsert", records) | ("delete", ids), in order
    steps: list[tuple[str, list[Any]]] = field(default_factory=list)

    def live_after(self) -> list[str]:
        live: dict[str, None] = {}
        for kind, payload in self.steps:
            if kind == "upsert":
                for record in payload:
                    live.setdefault(str(record["id"]), None)
            else:
                for pid in payload:
                    live.pop(pid, None)
        return list(live)

    def values_seen(self) -> dict[str, list[Any]]:
        """Field -> every non-null value some record gave (rules draw from these)."""
        seen: dict[str, list[Any]] = {}
        for kind, payload in self.steps:
            if kind != "upsert":
                continue
            for record in payload:
                for key, value in record.items():
                    if key == "id" or value is None:
                        continue
                    items = value if isinstance(value, list) else [value]
                    seen.setdefault(key, []).extend(items)
        return seen


@st.composite
def records_for(draw, schema: dict[str, str], pid: str, first: bool) -> dict[str, Any]:
    """One upsert record: some fields, sometimes an explicit null, sometimes none at all."""
    raw_id: Any = pid
    if pid.isdigit() and draw(st.booleans()):
        raw_id = int(pid)  # an integer id is taken as its decimal string
    record: dict[str, Any] = {"id": raw_id}
    keep = 0.75 if first else 0.35
    for name, type_ in schema.items():
        roll = draw(st.floats(0, 1))
        if roll < keep:
            if draw(st.integers(0, 9)) == 0:
                record[name] = None  # explicit null: removes the value
            else:
                record[name] = draw(data_value(type_))
    return record


@st.composite
def scenarios(draw, schema: dict[str, str] | None = None, *, max_batches: int = 4,
              max_batch: int = 8, resurrect: bool = False, pool_size: int = 0) -> Scenario:
    """Several upsert batches (repeated ids, nulls) with occasional deletes in between.

    With resurrect=False a deleted id is never upserted again (that case is its own test).
    pool_size adds that many more ids to choose from (for bigger stores).
    """
    if schema is None:
        schema = draw(schemas())
    scenario = Scenario(schema=schema)
    id_pool = ID_POOL + [f"p{i}" for i in range(pool_size)]
    live: set[str] = set()
    deleted: set[str] = set()
    fresh = 0
    for _ in range(draw(st.integers(1, max_batches))):
        batch = []
        for _ in range(draw(st.integers(1, max_batch))):
            choices = [p for p in id_pool if resurrect or p not in deleted]
            if choices and draw(st.integers(0, 9)) > 0:
                pid = draw(st.sampled_from(choices))
            else:
                fresh += 1
                pid = f"fresh{fresh}"
            batch.append(draw(records_for(schema, pid, first=pid not in live)))
            live.add(pid)
            deleted.discard(pid)
        scenario.steps.append(("upsert", batch))
        if live and draw(st.integers(0, 2)) == 0:
            gone = draw(st.lists(st.sampled_from(sorted(live)), min_size=1, max_size=3,
                                 unique=True))
            scenario.steps.append(("delete", gone))
            live -= set(gone)
            deleted |= set(gone)
    return scenario


# ----------------------------------------------------------------------------- as_of

def as_ofs(seen: dict[str, list[Any]] | None = None,
           schema: dict[str, str] | None = None) -> st.SearchStrategy[datetime]:
    """Instants in (and a little after) the data window, in UTC or another zone.

    Given the values seen in the data, also instants exactly some days after one of them,
    so that {"days_ago": n} and anniversary windows land on boundaries.
    """
    days = st.one_of(st.sampled_from(AS_OF_EDGE_DATES),
                     st.dates(min_value=AS_OF_FIRST, max_value=AS_OF_LAST))
    moments = [_datetimes(days)]
    anchors: list[datetime] = []
    for name, values in sorted((seen or {}).items()):
        type_ = (schema or {}).get(name)
        if type_ in ("date", "timestamp"):
            anchors.extend(parse_timestamp(v) for v in values)
    if anchors:
        shift = st.one_of(st.sampled_from(DAYS_AGO), st.integers(-3, 3)).map(
            lambda n: timedelta(days=n))
        nudge = st.sampled_from([timedelta(0), timedelta(0), timedelta(seconds=1),
                                 timedelta(seconds=-1), timedelta(hours=12)])
        moments.append(st.builds(lambda a, s, n: a + s + n, st.sampled_from(sorted(anchors)),
                                 shift, nudge))
    # mostly UTC, sometimes the same instant expressed in another zone
    return st.builds(lambda m, tz: m.astimezone(tz), st.one_of(*moments),
                     st.sampled_from([UTC, UTC, UTC] + OFFSETS[1:]))


# ----------------------------------------------------------------------------- rules

def _relative() -> st.SearchStrategy[dict]:
    return st.one_of(st.sampled_from(DAYS_AGO), st.integers(0, 800)).map(
        lambda n: {"days_ago": n})


def rule_value(type_: str, seen: list[Any] | None = None) -> st.SearchStrategy[Any]:
    """One scalar rule value for a field of this type (may be one no profile has)."""
    if type_ in ("keyword", "keywords"):
        base = st.sampled_from(KEYWORDS + KEYWORDS_ABSENT)
    elif type_ == "bool":
        base = st.booleans()
    elif type_ == "int":
        base = st.integers(INT_MIN - 2, INT_MAX + 2)
    elif type_ == "float":
        base = st.one_of(floats(), st.sampled_from(FLOATS_ABSENT))
    elif type_ == "date":
        base = st.one_of(dates().map(date.isoformat), _relative())
    elif type_ == "timestamp":
        base = st.one_of(
            timestamps(),
            dates().map(date.isoformat),  # a plain date against a timestamp: midnight UTC
            _relative(),
        )
    else:
        raise ValueError(type_)
    if seen:
        return st.one_of(base, st.sampled_from(seen))
    return base


def _absolute_key(type_: str, value: Any) -> Any:
    if type_ in ("int", "float"):
        return exact_number(value)
    if type_ == "date":
        return parse_date(value)
    return parse_timestamp(value)


@st.composite
def _between(draw, type_: str, seen: list[Any] | None) -> list[Any]:
    """[lo, hi] with lo <= hi: both absolute (sorted) or both relative (older first)."""
    if type_ in ("date", "timestamp") and draw(st.integers(0, 2)) == 0:
        a, b = draw(_relative()), draw(_relative())
        return sorted([a, b], key=lambda v: -v["days_ago"])
    absolute = [v for v in (seen or []) if not isinstance(v, dict)]
    one = rule_value(type_, absolute).filter(lambda v: not isinstance(v, dict))
    a, b = draw(one), draw(one)
    return sorted([a, b], key=lambda v: _absolute_key(type_, v))


@st.composite
def conditions(draw, schema: dict[str, str], seen: dict[str, list[Any]] | None = None) -> dict:
    """One valid {"field", "op", "value"} node for a random field, with an op that fits."""
    name = draw(st.sampled_from(sorted(schema)))
    type_ = schema[name]
    op = draw(st.sampled_from(sorted(OPS_BY_TYPE[type_])))
    pool = (seen or {}).get(name)
    node: dict[str, Any] = {"field": name, "op": op}
    if op in ("exists", "not_exists"):
        return node
    if op in ("in", "not_in", "has_all"):
        node["value"] = draw(st.lists(rule_value(type_, pool), min_size=1, max_size=3))
    elif op == "between":
        node["value"] = draw(_between(type_, pool))
    elif op == "anniversary_in":
        node["value"] = {"next_days": draw(st.one_of(st.sampled_from(NEXT_DAYS),
                                                     st.integers(1, 400)))}
    else:
        node["value"] = draw(rule_value(type_, pool))
    return node


def rules(schema: dict[str, str], seen: dict[str, list[Any]] | None = None, *,
          max_depth: int = 4, segments: list[str] | None = None) -> st.SearchStrategy[dict]:
    """Random VALID rule trees of depth <= max_depth (a leaf alone has depth 1)."""
    leaves = [conditions(schema, seen), conditions(schema, seen), conditions(schema, seen),
              st.just({"all": True})]
    if segments:
        leaves.append(st.sampled_from(segments).map(lambda s: {"segment": s}))
    leaf = st.one_of(*leaves)

    @st.composite
    def node(draw, depth: int) -> dict:
        if depth >= max_depth or draw(st.integers(0, 2)) == 0:
            return draw(leaf)
        kind = draw(st.sampled_from(["and", "or", "not"]))
        if kind == "not":
            return {"not": draw(node(depth + 1))}
        children = draw(st.lists(node(depth + 1), min_size=1, max_size=3))
        return {kind: children}

    return node(1)


# ----------------------------------------------------------------------------- wide numbers

WIDE_SCHEMA = {"n": "int", "x": "float", "t": "timestamp"}


# README: an int field holds |x| < 2**62, a float field magnitudes below 4.6e10, exact to
# 8 decimal places.  Data stays inside those bounds; rule values may go beyond them.
INT_LIMIT = 2**62 - 1
FLOAT_LIMIT_CENTS = 45 * 10**11  # 4.5e10 in cents


def _wide_int() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(-(2**50), 2**50),
        st.integers(-INT_LIMIT, INT_LIMIT),
        st.sampled_from([0, -1, 1, 2**31 - 1, -(2**31), 2**32, -(2**32) - 1, 2**40, -(2**40),
                         10**15, INT_LIMIT, -INT_LIMIT]))


def _wide_float() -> st.SearchStrategy[float]:
    cents = st.integers(-FLOAT_LIMIT_CENTS, FLOAT_LIMIT_CENTS).map(lambda k: round(k / 100, 2))
    eighths = st.integers(-(10**9), 10**9).map(lambda k: k / 10**8)  # up to 8 decimals
    return st.one_of(cents, eighths, st.sampled_from(
        [0.01, -0.01, 0.1, 0.00000001, -0.00000001, 99999999.99, -1234567.89, 44999999999.99]))


def _wide_timestamp() -> st.SearchStrategy[str]:
    moment = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 12, 31))
    return moment.map(lambda m: m.replace(microsecond=m.microsecond // 1000 * 1000)
                      .strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


WIDE_VALUES = {"n": _wide_int, "x": _wide_float, "t": _wide_timestamp}


@st.composite
def wide_scenarios(draw) -> Scenario:
    """Numbers and instants spread far apart (stress for range indexes); same semantics."""
    scenario = Scenario(schema=dict(WIDE_SCHEMA))
    batch = []
    for i in range(draw(st.integers(1, 12))):
        record: dict[str, Any] = {"id": f"w{i}"}
        for name, make in WIDE_VALUES.items():
            if draw(st.integers(0, 4)) > 0:
                record[name] = draw(make())
        batch.append(record)
    scenario.steps.append(("upsert", batch))
    return scenario


@st.composite
def wide_conditions(draw, seen: dict[str, list[Any]]) -> dict:
    name = draw(st.sampled_from(sorted(WIDE_SCHEMA)))
    op = draw(st.sampled_from(["eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte",
                               "between"]))
    pool = seen.get(name) or []
    one = st.one_of(WIDE_VALUES[name](), st.sampled_from(pool)) if pool else WIDE_VALUES[name]()
    if name == "n":  # neighbours of loaded values (off-by-one at slice boundaries), huge ones
        if pool:
            one = st.one_of(one, st.builds(lambda v, d: v + d, st.sampled_from(pool),
                                           st.sampled_from([-1, 1])))
        one = st.one_of(one, st.sampled_from([10**30, -(10**30), 2**62, -(2**62)]))
    if name == "x":
        if pool:
            one = st.one_of(one, st.builds(
                lambda v, d: float(Decimal(repr(v)) + Decimal(d)), st.sampled_from(pool),
                st.sampled_from(["-0.01", "0.01", "-0.00000001", "0.00000001"])))
        one = st.one_of(one, st.sampled_from([1e15, -1e15, 0.000000005]))
    if op in ("in", "not_in"):
        value: Any = draw(st.lists(one, min_size=1, max_size=3))
    elif op == "between":
        value = sorted([draw(one), draw(one)], key=lambda v: _absolute_key(WIDE_SCHEMA[name], v))
    else:
        value = draw(one)
    return {"field": name, "op": op, "value": value}
