"""The peer: the same generated dataset in DuckDB, and the same rules written by hand as SQL.

`open_duckdb` loads profiles.jsonl, events.jsonl and orders.jsonl into DuckDB tables once
and keeps them in a DuckDB file next to the bitseg store (rebuilt when the dataset's files
change); orders keep their items as a list, and order_items has one row per item.
Every PAIRS entry is one audience twice: the bitseg rule (CONTRACT §2 JSON) and
the SQL that counts the same profiles, written by hand the way a DuckDB user would write
it, with the contract's semantics spelled out:

- a profile lacking a field is false for every op, and NOT around a condition is true
  for it: under NOT, a condition is wrapped in coalesce(..., false);
- timestamps are TIMESTAMP in UTC (read as TIMESTAMPTZ so an offset is honoured);
- {"last_days": n} is (as_of - n days, as_of]; {"next_days": n} is (as_of, as_of + n
  days]; no window is ts <= as_of; {"days_ago": n} on a timestamp is as_of - n days;
- a profile with no selected rows has count 0 (so "count eq 0" includes it).

Ids stay the strings the dataset has ('u42'): that is the table a DuckDB user gets.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson

# ------------------------------------------------------------------------- the rules
# The attribute rule of the targets: 5 leaves, one under NOT.
ATTR_NOT = {"and": [
    {"field": "country", "op": "in", "value": ["DE", "AT", "CH"]},
    {"field": "age", "op": "between", "value": [18, 40]},
    {"field": "created_at", "op": "gte", "value": {"days_ago": 365}},
    {"field": "subscribed", "op": "eq", "value": True},
    {"not": {"field": "tags", "op": "in", "value": ["churn_risk", "vip"]}},
]}
# 6 leaves: OR of ANDs, has_all, a float, ne, and a NOT.
ATTR_OR6 = {"or": [
    {"and": [{"field": "tags", "op": "has_all", "value": ["newsletter", "loyalty_member"]},
             {"field": "plan", "op": "in", "value": ["premium", "business"]}]},
    {"and": [{"field": "ltv", "op": "gt", "value": 500.5},
             {"field": "gender", "op": "ne", "value": "male"},
             {"not": {"field": "city", "op": "eq", "value": "Berlin"}}]},
    {"field": "birthday", "op": "between", "value": ["1990-11-01", "1990-11-30"]},
]}
ALL = {"all": True}
LTV_BETWEEN = {"field": "ltv", "op": "between", "value": [99.99, 250]}
POINTS_GTE = {"field": "points", "op": "gte", "value": 500}
BIRTHDAY_80S = {"field": "birthday", "op": "between", "value": ["1980-01-01", "1989-12-31"]}
SIGNED_UP_30 = {"field": "created_at", "op": "gt", "value": {"days_ago": 30}}
# The event rule of the targets: at least 3 popups in the last 30 days.
POPUP_3_IN_30 = {"event": "popup_opened", "window": {"last_days": 30},
                 "having": {"agg": "count", "op": "gte", "value": 3}}
NO_POPUP_30 = {"event": "popup_opened", "window": {"last_days": 30},
               "having": {"agg": "count", "op": "eq", "value": 0}}
DE_SALE_PAGE_2_IN_90 = {"and": [
    {"field": "country", "op": "eq", "value": "DE"},
    {"event": "page_view", "where": {"field": "page", "op": "eq", "value": "/sale"},
     "window": {"last_days": 90}, "having": {"agg": "count", "op": "gte", "value": 2}},
]}
POINTS_NEXT_7 = {"event": "points_accrued", "window": {"next_days": 7},
                 "having": {"agg": "sum", "of": "points", "op": "between", "value": [100, 500]}}
# The orders rule of the targets: paid or delivered orders with an acme item, summing to
# more than 300 in the last 180 days.
ACME_300_IN_180 = {
    "orders": {"and": [{"field": "status", "op": "in", "value": ["paid", "delivered"]},
                       {"field": "items.brand", "op": "eq", "value": "acme"}]},
    "window": {"last_days": 180},
    "having": {"agg": "sum", "of": "amount", "op": "gt", "value": 300}}
ORDERS_3_EVER = {"orders": {"all": True}, "having": {"agg": "count", "op": "gte", "value": 3}}
APP_AVG_150_IN_365 = {"orders": {"field": "channel", "op": "eq", "value": "app"},
                      "window": {"last_days": 365},
                      "having": {"agg": "avg", "of": "amount", "op": "gte", "value": 150}}


@dataclass(frozen=True)
class Pair:
    """One audience as a bitseg rule and as DuckDB SQL ({as_of}: a TIMESTAMP literal)."""

    name: str
    rule: dict[str, Any]
    sql: str
    target: str = ""  # the issue's target at 10M profiles, if any (for the report)

    def query(self, as_of: str) -> str:
        return self.sql.format(as_of=sql_timestamp(as_of))


PAIRS = (
    # ALL: every profile (checks that both sides loaded the same profiles).
    Pair("all", ALL, "SELECT count(*) FROM profiles"),
    # ATTR_NOT
    Pair("attr_5_leaves_not", ATTR_NOT, """
        SELECT count(*) FROM profiles
        WHERE country IN ('DE', 'AT', 'CH')
          AND age BETWEEN 18 AND 40
          AND created_at >= {as_of} - INTERVAL 365 DAY
          AND subscribed = true
          AND NOT coalesce(list_has_any(tags, ['churn_risk', 'vip']), false)""",
         "p50 <= 1 ms, >= 20x DuckDB"),
    # ATTR_OR6 (no NOT above the OR, so NULL reads as false there; the NOT is coalesced)
    Pair("attr_6_leaves_or", ATTR_OR6, """
        SELECT count(*) FROM profiles
        WHERE (list_has_all(tags, ['newsletter', 'loyalty_member'])
               AND plan IN ('premium', 'business'))
           OR (ltv > 500.5 AND gender <> 'male'
               AND NOT coalesce(city = 'Berlin', false))
           OR birthday BETWEEN DATE '1990-11-01' AND DATE '1990-11-30'"""),
    # LTV_BETWEEN (float: money, exact as DECIMAL(18,2))
    Pair("float_between", LTV_BETWEEN,
         "SELECT count(*) FROM profiles WHERE ltv BETWEEN 99.99 AND 250"),
    # POINTS_GTE (int)
    Pair("int_gte", POINTS_GTE, "SELECT count(*) FROM profiles WHERE points >= 500"),
    # BIRTHDAY_80S (date)
    Pair("date_between", BIRTHDAY_80S, """
        SELECT count(*) FROM profiles
        WHERE birthday BETWEEN DATE '1980-01-01' AND DATE '1989-12-31'"""),
    # SIGNED_UP_30 (timestamp, relative)
    Pair("timestamp_gt_days_ago", SIGNED_UP_30, """
        SELECT count(*) FROM profiles WHERE created_at > {as_of} - INTERVAL 30 DAY"""),
    # POPUP_3_IN_30
    Pair("event_popup_3_in_30", POPUP_3_IN_30, """
        SELECT count(*) FROM (
          SELECT profile FROM events
          WHERE event = 'popup_opened'
            AND ts > {as_of} - INTERVAL 30 DAY AND ts <= {as_of}
          GROUP BY profile HAVING count(*) >= 3)""",
         "<= 10 ms, >= 20x DuckDB"),
    # NO_POPUP_30: profiles without a row count 0, so they are in.
    Pair("event_no_popup_30", NO_POPUP_30, """
        SELECT count(*) FROM profiles p
        WHERE NOT EXISTS (
          SELECT 1 FROM events e
          WHERE e.profile = p.id AND e.event = 'popup_opened'
            AND e.ts > {as_of} - INTERVAL 30 DAY AND e.ts <= {as_of})"""),
    # DE_SALE_PAGE_2_IN_90
    Pair("de_and_event_where_90", DE_SALE_PAGE_2_IN_90, """
        SELECT count(*) FROM profiles
        WHERE country = 'DE'
          AND id IN (
            SELECT profile FROM events
            WHERE event = 'page_view' AND page = '/sale'
              AND ts > {as_of} - INTERVAL 90 DAY AND ts <= {as_of}
            GROUP BY profile HAVING count(*) >= 2)"""),
    # POINTS_NEXT_7 (future-dated rows; no rows is sum 0, outside [100, 500])
    Pair("event_sum_next_7", POINTS_NEXT_7, """
        SELECT count(*) FROM (
          SELECT profile FROM events
          WHERE event = 'points_accrued'
            AND ts > {as_of} AND ts <= {as_of} + INTERVAL 7 DAY
          GROUP BY profile HAVING sum(points) BETWEEN 100 AND 500)"""),
    # ACME_300_IN_180 (an item matches when ANY item of the order does)
    Pair("orders_acme_sum_300_in_180", ACME_300_IN_180, """
        SELECT count(*) FROM (
          SELECT o.profile FROM orders o
          WHERE o.status IN ('paid', 'delivered')
            AND o.ts > {as_of} - INTERVAL 180 DAY AND o.ts <= {as_of}
            AND o.id IN (SELECT order_id FROM order_items WHERE brand = 'acme')
          GROUP BY o.profile HAVING sum(o.amount) > 300)""",
         "<= 50 ms, >= 10x DuckDB"),
    # ORDERS_3_EVER (no window: every order with ts <= as_of)
    Pair("orders_count_3_ever", ORDERS_3_EVER, """
        SELECT count(*) FROM (
          SELECT profile FROM orders WHERE ts <= {as_of}
          GROUP BY profile HAVING count(*) >= 3)"""),
    # APP_AVG_150_IN_365 (avg compared exactly: sum >= 150 * count)
    Pair("orders_app_avg_150_in_365", APP_AVG_150_IN_365, """
        SELECT count(*) FROM (
          SELECT profile FROM orders
          WHERE channel = 'app' AND ts > {as_of} - INTERVAL 365 DAY AND ts <= {as_of}
          GROUP BY profile HAVING sum(amount) >= 150 * count(*))"""),
)


def sql_timestamp(as_of: str) -> str:
    """An ISO 8601 instant as a DuckDB TIMESTAMP literal in UTC."""
    moment = datetime.fromisoformat(as_of.replace("Z", "+00:00"))
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return f"TIMESTAMP '{moment.isoformat(sep=' ')}'"


# ------------------------------------------------------------------------- the tables
# Explicit columns for the generator's schema (loaders/gen.py SCHEMA); money is written
# in cents there, so DECIMAL(18,2) holds every amount and price exactly.
PROFILE_COLUMNS = {
    "id": "VARCHAR", "country": "VARCHAR", "city": "VARCHAR", "tags": "VARCHAR[]",
    "age": "BIGINT", "gender": "VARCHAR", "subscribed": "BOOLEAN", "birthday": "DATE",
    "created_at": "TIMESTAMPTZ", "plan": "VARCHAR", "points": "BIGINT",
    "ltv": "DECIMAL(18,2)"}
EVENT_COLUMNS = {
    "profile": "VARCHAR", "event": "VARCHAR", "ts": "TIMESTAMPTZ", "page": "VARCHAR",
    "popup": "VARCHAR", "campaign": "VARCHAR", "platform": "VARCHAR", "points": "BIGINT",
    "query": "VARCHAR", "sku": "VARCHAR", "category": "VARCHAR", "price": "DECIMAL(18,2)"}
ORDER_COLUMNS = {
    "id": "VARCHAR", "profile": "VARCHAR", "ts": "TIMESTAMPTZ", "status": "VARCHAR",
    "channel": "VARCHAR", "region": "VARCHAR", "source": "VARCHAR", "amount": "DECIMAL(18,2)",
    "currency": "VARCHAR",
    "items": "STRUCT(sku VARCHAR, category VARCHAR, brand VARCHAR, qty BIGINT, "
             "price DECIMAL(18,2))[]"}
# bitseg schema type -> the DuckDB column type above (TIMESTAMPTZ is read, TIMESTAMP kept)
SQL_TYPES = {"keyword": "VARCHAR", "keywords": "VARCHAR[]", "int": "BIGINT",
             "float": "DECIMAL(18,2)", "bool": "BOOLEAN", "date": "DATE",
             "timestamp": "TIMESTAMPTZ"}
FILES = ("profiles.jsonl", "events.jsonl", "orders.jsonl")


def _read_json(path: Path, columns: dict[str, str]) -> str:
    spec = ", ".join(f"{name}: '{type_}'" for name, type_ in columns.items())
    return (f"read_json('{path}', format = 'newline_delimited', columns = {{{spec}}}, "
            f"maximum_object_size = 16777216)")


def _select(columns: dict[str, str]) -> str:
    """The column list, TIMESTAMPTZ columns kept as TIMESTAMP (UTC: the session zone)."""
    return ", ".join(f"{c}::TIMESTAMP AS {c}" if t == "TIMESTAMPTZ" else c
                     for c, t in columns.items())


def check_schema(dataset: Path) -> None:
    """Fail when the dataset declares fields other than the columns written here."""
    declared = orjson.loads((dataset / "schema.json").read_bytes())
    wanted = {"profiles": PROFILE_COLUMNS, "events": EVENT_COLUMNS, "orders": ORDER_COLUMNS}
    for section, columns in wanted.items():
        for field, type_ in declared.get(section, {}).items():
            name = field.removeprefix("items.")
            if name != field:
                found = ORDER_COLUMNS["items"]
                ok = f"{name} {SQL_TYPES[type_]}" in found
            else:
                ok = columns.get(field) == SQL_TYPES[type_]
            if not ok:
                raise AssertionError(f"peers.py has no {SQL_TYPES[type_]} column for "
                                     f"{section}.{field} ({type_}); update its columns")


def _signature(dataset: Path) -> str:
    """What the DuckDB file was built from: each file's size and mtime."""
    parts = [f"{name}:{(dataset / name).stat().st_size}:{(dataset / name).stat().st_mtime_ns}"
             for name in FILES]
    return ";".join(parts)


def build_duckdb(dataset: Path, path: Path) -> dict[str, Any]:
    """Load the dataset into a new DuckDB file at path (atomically); what it loaded."""
    import duckdb

    check_schema(dataset)
    partial = path.with_name(path.name + ".partial")
    for stale in (partial, partial.with_name(partial.name + ".wal")):
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    con = duckdb.connect(str(partial))
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.execute(f"CREATE TABLE profiles AS SELECT {_select(PROFILE_COLUMNS)} "
                    f"FROM {_read_json(dataset / 'profiles.jsonl', PROFILE_COLUMNS)}")
        con.execute(f"CREATE TABLE events AS SELECT {_select(EVENT_COLUMNS)} "
                    f"FROM {_read_json(dataset / 'events.jsonl', EVENT_COLUMNS)}")
        con.execute(f"CREATE TABLE orders AS SELECT {_select(ORDER_COLUMNS)} "
                    f"FROM {_read_json(dataset / 'orders.jsonl', ORDER_COLUMNS)}")
        con.execute("CREATE TABLE order_items AS "
                    "SELECT id AS order_id, unnest(items, recursive := true) FROM orders")
        con.execute("CREATE TABLE meta AS SELECT ? AS signature", [_signature(dataset)])
        counts = {table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                  for table in ("profiles", "events", "orders", "order_items")}
        con.execute("CHECKPOINT")
    finally:
        con.close()
    os.replace(partial, path)
    return {**counts, "seconds": time.perf_counter() - started}


def open_duckdb(dataset: Path, path: Path) -> Any:
    """A read-only connection to the dataset's DuckDB file, building it when missing/stale."""
    import duckdb

    if path.exists():
        con = duckdb.connect(str(path), read_only=True)
        found = con.execute("SELECT signature FROM meta").fetchone()[0]
        if found == _signature(dataset):
            con.execute("SET TimeZone = 'UTC'")
            return con
        con.close()
        path.unlink()
    report = build_duckdb(dataset, path)
    print(f"\nloaded into DuckDB {report}")
    con = duckdb.connect(str(path), read_only=True)
    con.execute("SET TimeZone = 'UTC'")
    return con


def median_seconds(fn: Callable[[], object], *, min_rounds: int = 5, max_rounds: int = 200,
                   budget: float = 1.0) -> tuple[float, int]:
    """The median time of fn over at least min_rounds calls (after one warm-up), stopping
    once `budget` seconds are spent; (median, rounds)."""
    fn()
    times: list[float] = []
    spent = 0.0
    while len(times) < min_rounds or (spent < budget and len(times) < max_rounds):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        spent += elapsed
    times.sort()
    mid = len(times) // 2
    median = times[mid] if len(times) % 2 else (times[mid - 1] + times[mid]) / 2
    return median, len(times)


# ------------------------------------------------------------------------- issue 15's table
# The rules of issue 15's side-by-side table that PAIRS above does not have (its suite,
# test_bench_floor.py, also takes attr_5_leaves_not, the popup, acme and float rows from
# PAIRS); kept out of PAIRS so test_bench_duckdb.py measures what it always did.
# 4 leaves: keyword in, int between, keywords eq, bool.
ATTR_4_LEAVES = {"and": [
    {"field": "country", "op": "in", "value": ["DE", "AT", "CH"]},
    {"field": "age", "op": "between", "value": [25, 44]},
    {"field": "tags", "op": "eq", "value": "newsletter"},
    {"field": "subscribed", "op": "eq", "value": True},
]}
# 4 negations, one over an OR with an int between.
ATTR_4_NEGATIONS = {"and": [
    {"not": {"field": "country", "op": "eq", "value": "US"}},
    {"not": {"field": "plan", "op": "eq", "value": "free"}},
    {"not": {"field": "tags", "op": "in", "value": ["churn_risk"]}},
    {"not": {"or": [{"field": "gender", "op": "eq", "value": "male"},
                    {"field": "age", "op": "between", "value": [20, 29]}]}},
]}
# Fewer than 3 page views in the last 7 days: a profile without one counts 0, so is in.
PAGE_VIEWS_LT_3_IN_7 = {"event": "page_view", "window": {"last_days": 7},
                        "having": {"agg": "count", "op": "lt", "value": 3}}
# The all-time spend band over paid orders (no window: every order with ts <= as_of).
SPEND_BAND_PAID = {"orders": {"field": "status", "op": "eq", "value": "paid"},
                   "having": {"agg": "sum", "of": "amount", "op": "between",
                              "value": [200, 1000]}}

ISSUE_15_PAIRS = (
    # ATTR_4_LEAVES (a profile without tags or age is out: NULL reads as false in WHERE)
    Pair("attr_4_leaves", ATTR_4_LEAVES, """
        SELECT count(*) FROM profiles
        WHERE country IN ('DE', 'AT', 'CH')
          AND age BETWEEN 25 AND 44
          AND list_contains(tags, 'newsletter')
          AND subscribed = true"""),
    # ATTR_4_NEGATIONS (each negated condition coalesced: NOT is true for a missing field)
    Pair("attr_4_negations_or", ATTR_4_NEGATIONS, """
        SELECT count(*) FROM profiles
        WHERE NOT coalesce(country = 'US', false)
          AND NOT coalesce(plan = 'free', false)
          AND NOT coalesce(list_has_any(tags, ['churn_risk']), false)
          AND NOT coalesce(gender = 'male' OR age BETWEEN 20 AND 29, false)"""),
    # PAGE_VIEWS_LT_3_IN_7 (profiles without a page view in the window have count 0)
    Pair("event_page_views_lt_3_in_7", PAGE_VIEWS_LT_3_IN_7, """
        SELECT count(*) FROM profiles p
        LEFT JOIN (
          SELECT profile, count(*) AS n FROM events
          WHERE event = 'page_view'
            AND ts > {as_of} - INTERVAL 7 DAY AND ts <= {as_of}
          GROUP BY profile) e ON e.profile = p.id
        WHERE coalesce(e.n, 0) < 3"""),
    # SPEND_BAND_PAID (a profile without paid orders sums 0: outside the band)
    Pair("orders_paid_spend_band_ever", SPEND_BAND_PAID, """
        SELECT count(*) FROM (
          SELECT profile FROM orders WHERE status = 'paid' AND ts <= {as_of}
          GROUP BY profile HAVING sum(amount) BETWEEN 200 AND 1000)"""),
)
