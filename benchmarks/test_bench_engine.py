"""The engine in process: Count, Members, IsMember, range ops, event windows, orders
aggregates, reopen and bulk load (issue 6).

Every Count is checked against the size of the bitmap the same rule evaluates to, so a
wrong push-down fails the run instead of looking fast.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import AS_OF, PROFILES, fmt_seconds, median_of
from peers import ACME_300_IN_180, ATTR_NOT, ATTR_OR6, POPUP_3_IN_30

from bitseg.index.engine import Engine
from bitseg.index.fields import ids_of
from bitseg.index.segments import DYNAMIC, open_segments
from bitseg.loaders.dataset import load_dataset

TABLE = "bitseg in process"
SEGMENT = "bench-5-leaves"  # a dynamic segment over ATTR_NOT, kept in the cached store

ATTRIBUTE_RULES = {
    "eq_1_leaf": {"field": "country", "op": "eq", "value": "DE"},
    "not_in_1_leaf": {"not": {"field": "country", "op": "in", "value": ["DE", "US"]}},
    "has_all_3_leaves_not": {"and": [
        {"field": "tags", "op": "has_all", "value": ["newsletter", "app_user"]},
        {"field": "plan", "op": "ne", "value": "free"},
        {"not": {"field": "subscribed", "op": "eq", "value": False}}]},
    "5_leaves_not": ATTR_NOT,
    "6_leaves_or": ATTR_OR6,
}
RANGE_RULES = {
    "int_gt": {"field": "age", "op": "gt", "value": 65},
    "int_between": {"field": "age", "op": "between", "value": [25, 34]},
    "float_gt": {"field": "ltv", "op": "gt", "value": 1000.0},
    "float_between": {"field": "ltv", "op": "between", "value": [99.99, 250.0]},
    "date_gt": {"field": "birthday", "op": "gt", "value": "2000-01-01"},
    "date_between": {"field": "birthday", "op": "between",
                     "value": ["1980-01-01", "1989-12-31"]},
    "timestamp_gt": {"field": "created_at", "op": "gt", "value": {"days_ago": 30}},
    "timestamp_between": {"field": "created_at", "op": "between",
                          "value": ["2025-01-01T00:00:00Z", "2025-06-30T23:59:59Z"]},
    "date_anniversary_7": {"field": "birthday", "op": "anniversary_in",
                           "value": {"next_days": 7}},
}
# test_bench_events.py has more event rules (its own file, issue 3).
EVENT_RULES = {
    "popup_3_in_30": POPUP_3_IN_30,
    "page_view_last_7": {"event": "page_view", "window": {"last_days": 7}},
    "no_popup_30": {"event": "popup_opened", "window": {"last_days": 30},
                    "having": {"agg": "count", "op": "eq", "value": 0}},
    "email_from_to_2": {"event": "email_opened",
                        "window": {"from": "2026-06-01T00:00:00Z", "to": "2026-09-01T00:00:00Z"},
                        "having": {"agg": "count", "op": "gte", "value": 2}},
    "add_to_cart_ever": {"event": "add_to_cart"},
    "popup_where_in_180": {"event": "popup_opened",
                           "where": {"field": "popup", "op": "in",
                                     "value": ["black_friday", "halloween"]},
                           "window": {"last_days": 180}},
    "de_and_popup_3_in_30": {"and": [{"field": "country", "op": "eq", "value": "DE"},
                                      POPUP_3_IN_30]},
}
ORDER_RULES = {
    "acme_sum_300_in_180": ACME_300_IN_180,
    "count_3_ever": {"orders": {"all": True},
                     "having": {"agg": "count", "op": "gte", "value": 3}},
    "app_avg_150_in_365": {"orders": {"field": "channel", "op": "eq", "value": "app"},
                           "window": {"last_days": 365},
                           "having": {"agg": "avg", "of": "amount", "op": "gte", "value": 150}},
    "max_500_in_90": {"orders": {"all": True}, "window": {"last_days": 90},
                      "having": {"agg": "max", "of": "amount", "op": "gt", "value": 500}},
    "qty_sum_5_in_365": {"orders": {"field": "items.qty_sum", "op": "gte", "value": 5},
                         "window": {"last_days": 365}},
    "eu_shoes_in_30": {"orders": {"and": [
        {"field": "region", "op": "eq", "value": "EU"},
        {"field": "items.category", "op": "in", "value": ["shoes"]}]},
        "window": {"last_days": 30}},
}
BIG_RULE = {"not": {"field": "country", "op": "eq", "value": "DE"}}  # ~70% of profiles

# The load slice: the first lines of each file (events and orders of a chunk of the
# generator belong to its profiles, so these profiles own every sliced row).
LOAD_PROFILES, LOAD_EVENTS, LOAD_ORDERS = 200_000, 1_000_000, 100_000


def _count(benchmark, engine, rule, name: str, bench_report, target: str = "") -> int:
    def count() -> int:
        return engine.count(rule, as_of=AS_OF)

    result = benchmark(count)
    benchmark.extra_info["count"] = result
    bench_report.add(TABLE, what=f"Count {name}", median=fmt_seconds(median_of(benchmark, count)),
                     result=f"{result:,} profiles", **{"target (10M)": target})
    assert result == len(engine.evaluate(rule, as_of=AS_OF)), "Count != |evaluate|"
    return result


@pytest.mark.parametrize("name", ATTRIBUTE_RULES)
def test_count_attributes(benchmark, engine, bench_report, name):
    target = "p50 <= 1 ms" if name == "5_leaves_not" else ""
    assert _count(benchmark, engine, ATTRIBUTE_RULES[name], name, bench_report, target) > 0


@pytest.mark.parametrize("name", RANGE_RULES)
def test_count_range(benchmark, engine, bench_report, name):
    assert _count(benchmark, engine, RANGE_RULES[name], name, bench_report) > 0


@pytest.mark.parametrize("name", EVENT_RULES)
def test_count_events(benchmark, engine, bench_report, name):
    target = "<= 10 ms" if name == "popup_3_in_30" else ""
    assert _count(benchmark, engine, EVENT_RULES[name], name, bench_report, target) > 0


@pytest.mark.parametrize("name", ORDER_RULES)
def test_count_orders(benchmark, engine, bench_report, name):
    target = "<= 50 ms" if name == "acme_sum_300_in_180" else ""
    assert _count(benchmark, engine, ORDER_RULES[name], name, bench_report, target) > 0


# ------------------------------------------------------------------ Members
@pytest.mark.parametrize("name,rule,limit", [("5_leaves_not", ATTR_NOT, None),
                                             ("not_de", BIG_RULE, None),
                                             ("not_de_first_1000", BIG_RULE, 1000)],
                         ids=["5_leaves_not", "not_de", "not_de_first_1000"])
def test_members(benchmark, engine, bench_report, name, rule, limit):
    def members() -> list[str]:
        return engine.members(rule, as_of=AS_OF, limit=limit)

    ids = benchmark(members)
    expected = engine.count(rule, as_of=AS_OF)
    assert len(ids) == (expected if limit is None else min(limit, expected)) > 0
    median = median_of(benchmark, members)
    benchmark.extra_info.update(ids=len(ids), ids_per_s=len(ids) / median)
    bench_report.add(TABLE, what=f"Members {name}", median=fmt_seconds(median),
                     result=f"{len(ids):,} ids, {len(ids) / median:,.0f} ids/s")


# ------------------------------------------------------------------ IsMember
@pytest.fixture(scope="module")
def sample_ids(engine) -> list[str]:
    """512 members of ATTR_NOT interleaved with 512 profiles from across the id space."""
    def spread(bitmap, n: int) -> np.ndarray:
        dense = ids_of(bitmap)
        return dense[np.linspace(0, len(dense) - 1, n).astype(np.int64)]

    inside = engine.ids.externals(spread(engine.evaluate(ATTR_NOT, as_of=AS_OF), 512))
    anyone = engine.ids.externals(spread(engine.snapshot.live, 512))
    return [x for pair in zip(inside, anyone, strict=True) for x in pair]


@pytest.fixture(scope="module")
def dynamic_segment(engine) -> str:
    """SEGMENT, created (or brought up to date) in the cached store: idempotent."""
    segments = open_segments(engine)
    if SEGMENT not in segments.current:
        segments.create(SEGMENT, DYNAMIC, rule=ATTR_NOT)
    elif segments.current.get(SEGMENT).rule != ATTR_NOT:
        segments.update(SEGMENT, rule=ATTR_NOT)
    return SEGMENT


def _is_member(benchmark, engine, bench_report, sample_ids, rule, name, target=""):
    ids = itertools.cycle(sample_ids)

    def check() -> bool:
        return engine.is_member(next(ids), rule, as_of=AS_OF)

    benchmark(check)
    members = sum(engine.is_member(x, rule, as_of=AS_OF) for x in sample_ids)
    expected = engine.evaluate(ATTR_NOT, as_of=AS_OF)
    assert members == sum(engine.dense_id(x) in expected for x in sample_ids) >= 512
    benchmark.extra_info["members_in_sample"] = members
    bench_report.add(TABLE, what=f"IsMember {name}",
                     median=fmt_seconds(median_of(benchmark, check)),
                     result=f"{members} of {len(sample_ids)} sampled ids in",
                     **{"target (10M)": target})


def test_is_member_rule_json(benchmark, engine, bench_report, sample_ids):
    """The 5-leaf rule as JSON: parsing included, as a caller sends it."""
    _is_member(benchmark, engine, bench_report, sample_ids, ATTR_NOT, "5 leaves, JSON rule")


def test_is_member_rule_parsed(benchmark, engine, bench_report, sample_ids):
    _is_member(benchmark, engine, bench_report, sample_ids, engine.parse(ATTR_NOT),
               "5 leaves, parsed rule")


def test_is_member_dynamic_segment(benchmark, engine, bench_report, sample_ids,
                                   dynamic_segment):
    _is_member(benchmark, engine, bench_report, sample_ids, {"segment": dynamic_segment},
               "5-leaf dynamic segment", "p50 <= 20 µs")


def test_count_dynamic_segment(benchmark, engine, bench_report, dynamic_segment):
    result = _count(benchmark, engine, {"segment": dynamic_segment}, "5-leaf dynamic segment",
                    bench_report)
    assert result == engine.count(ATTR_NOT, as_of=AS_OF)


# ------------------------------------------------------------------ reopen
REOPEN = """
import json, resource, sys, time
from bitseg.index.engine import Engine


def peak_kib():
    # VmHWM: this process's own peak (ru_maxrss after fork/exec can carry the parent's).
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    except OSError:
        scale = 1024 if sys.platform == "darwin" else 1
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // scale


def anon_kib():
    # RssAnon: memory of this process's own (the rest of RSS is LMDB's file pages, which
    # the kernel shares and can reclaim); 0 where /proc does not say
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


started = time.perf_counter()
engine = Engine.open(sys.argv[1], readonly=True)  # the session's engine holds the lock
opened = time.perf_counter() - started
rss_open = peak_kib()
counts, firsts = [], []  # a rule's first count reads the fields and orders it names
for rule in sys.argv[3:]:
    begun = time.perf_counter()
    counts.append(engine.count(json.loads(rule), as_of=sys.argv[2]))
    firsts.append(time.perf_counter() - begun)
rss = peak_kib()
anon = anon_kib()
engine.close()
print(json.dumps({"open_s": opened, "profiles": len(engine.snapshot.live), "counts": counts,
                  "first_s": firsts,
                  "rss_open_kib": rss_open, "rss_kib": rss, "anon_kib": anon}))
"""


def test_reopen(benchmark, engine, store, bench_report):
    """Engine.open on the cached store, in a fresh process (LMDB wants one environment per
    process, and the fresh process's peak RSS is bitseg's alone).  The page cache is warm."""
    rules = [ATTR_NOT, POPUP_3_IN_30, ACME_300_IN_180]
    command = [sys.executable, "-c", REOPEN, str(store), AS_OF,
               *(json.dumps(r) for r in rules)]
    runs: list[dict] = []

    def reopen() -> None:
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout))

    benchmark.pedantic(reopen, rounds=1, iterations=1)
    run = runs[-1]
    assert run["profiles"] == engine.total()
    assert run["counts"] == [engine.count(r, as_of=AS_OF) for r in rules]
    rss_open, rss = run["rss_open_kib"] / 1024, run["rss_kib"] / 1024
    anon = run["anon_kib"] / 1024
    firsts = ", ".join(fmt_seconds(s) for s in run["first_s"])
    benchmark.extra_info.update(open_s=run["open_s"], first_s=run["first_s"],
                                rss_open_mib=rss_open, rss_mib=rss, anon_mib=anon)
    bench_report.add(TABLE, what="reopen (Engine.open, fresh process)",
                     median=fmt_seconds(run["open_s"]),
                     result=f"first counts of the 5-leaf, popup and acme rules {firsts} "
                            f"(each reads what it names); peak RSS {rss_open:,.0f} MiB open, "
                            f"{rss:,.0f} MiB after them (own memory {anon:,.0f} MiB, the "
                            f"rest LMDB's mapped file)",
                     **{"target (10M)": "<= 10 s, RSS <= 4 GB"})


# ------------------------------------------------------------------ bulk load
class TimedEngine:
    """An Engine whose batch methods record how long each took (load_dataset drives it)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.seconds: dict[str, float] = {}

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def _timed(self, name: str, records, **kwargs):
        started = time.perf_counter()
        try:
            return getattr(self._engine, name)(records, **kwargs)
        finally:
            self.seconds[name] = time.perf_counter() - started

    def upsert_profiles(self, records, **kwargs):
        return self._timed("upsert_profiles", records, **kwargs)

    def track_events(self, records, **kwargs):
        return self._timed("track_events", records, **kwargs)

    def add_orders(self, records, **kwargs):
        return self._timed("add_orders", records, **kwargs)


def _head(source: Path, target: Path, lines: int) -> int:
    """Copy the first `lines` lines of source to target; how many there were."""
    with source.open("rb") as src, target.open("wb") as out:
        n = 0
        for line in itertools.islice(src, lines):
            out.write(line)
            n += 1
    return n


def test_load_throughput(benchmark, dataset, tmp_path, bench_report):
    """load_dataset on a slice: the first 200k profiles, 1M events, 100k orders."""
    folder = tmp_path / "slice"
    folder.mkdir()
    shutil.copy(dataset / "schema.json", folder / "schema.json")
    rows = {"profiles": _head(dataset / "profiles.jsonl", folder / "profiles.jsonl",
                              LOAD_PROFILES),
            "events": _head(dataset / "events.jsonl", folder / "events.jsonl", LOAD_EVENTS),
            "orders": _head(dataset / "orders.jsonl", folder / "orders.jsonl", LOAD_ORDERS)}
    timed: list[tuple[TimedEngine, object]] = []

    def load() -> None:
        with Engine.open(tmp_path / "store") as engine:
            proxy = TimedEngine(engine)
            report = load_dataset(folder, proxy)
            assert engine.total() == rows["profiles"], "sliced rows created profiles"
            timed.append((proxy, report))

    try:
        benchmark.pedantic(load, rounds=1, iterations=1)
    finally:  # pytest keeps recent tmp dirs; these are large at 1M
        shutil.rmtree(tmp_path / "store", ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
    proxy, report = timed[-1]
    assert (report.profiles_created, report.events, report.orders) == \
        (rows["profiles"], rows["events"], rows["orders"])
    rates = {"profiles": rows["profiles"] / proxy.seconds["upsert_profiles"],
             "events": rows["events"] / proxy.seconds["track_events"],
             "orders": rows["orders"] / proxy.seconds["add_orders"]}
    benchmark.extra_info.update(rows=rows, seconds=proxy.seconds,
                                **{f"{k}_per_s": v for k, v in rates.items()})
    targets = {"profiles": ">= 100k/s", "events": ">= 500k/s", "orders": ""}
    for kind, rate in rates.items():
        bench_report.add(TABLE, what=f"load {kind} (slice of {rows[kind]:,})",
                         median=fmt_seconds(rows[kind] / rate), result=f"{rate:,.0f} {kind}/s",
                         **{"target (10M)": targets[kind]})
    if PROFILES > LOAD_PROFILES:
        assert rows["profiles"] == LOAD_PROFILES
