"""Computed traits (index/traits.py): every value equals a naive computation over the raw
events and orders, the fields appear in Describe and work in rules, and a refresh writes
only what changed."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bitseg.index import traits
from bitseg.index.describe import describe
from bitseg.index.engine import Engine
from bitseg.index.errors import BitsegError

UTC = timezone.utc
AS_OF = datetime(2026, 6, 1, 12, tzinfo=UTC)
TYPES_ = ["email_opened", "email_clicked", "page_view"]
CATS = ["shoes", "bags", "hats", "Zeta"]
STATUSES = ["paid", "delivered", "cancelled"]


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def make_data(seed: int, n: int = 40) -> tuple[list[dict], list[dict], list[dict]]:
    rng = random.Random(seed)
    profiles = [{"id": f"p{i}", "age": rng.randint(18, 80)} for i in range(n)]
    events, orders = [], []
    for _ in range(n * 6):
        hours = rng.choice([rng.uniform(0, 24 * 100), 24 * 90 + rng.choice([-1, 0, 1]) * 1e-6,
                            rng.uniform(-24, 0)])  # around the window's edge, in the future
        ts = AS_OF - timedelta(hours=hours)
        if rng.random() < 0.1:
            ts = ts.replace(minute=0, second=0, microsecond=0)  # on the hour
        events.append({"profile": f"p{rng.randrange(n)}", "event": rng.choice(TYPES_),
                       "ts": iso(ts)})
    for k in range(n * 3):
        days = rng.choice([rng.uniform(0, 400), 365.0, rng.uniform(-5, 0)])
        items = [{"category": rng.choice(CATS), "qty": rng.randint(1, 3),
                  "price": rng.choice([9.99, 10.0, 0.1, 25.5])}
                 for _ in range(rng.randint(0, 3))]
        if items and rng.random() < 0.1:
            del items[0]["category"]
        order: dict[str, Any] = {"id": f"o{k}", "profile": f"p{rng.randrange(n + 3)}",
                                 "ts": iso(AS_OF - timedelta(days=days)),
                                 "status": rng.choice(STATUSES), "items": items}
        if rng.random() < 0.9:
            order["amount"] = rng.choice([10.5, 20.0, 20.0, 99.99, 0.01])
        orders.append(order)
    return profiles, events, orders


def ts_of(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def naive(profiles: list[dict], events: list[dict], orders: list[dict], live: set[str],
          config: dict[str, dict[str, Any]], as_of: datetime) -> dict[str, dict[str, Any]]:
    """Per live profile, the trait values, by plain loops over the raw records."""
    out: dict[str, dict[str, Any]] = defaultdict(dict)
    if "best_send_hour" in config:
        p = config["best_send_hour"]
        hours: dict[str, Counter] = defaultdict(Counter)
        for e in events:
            ts = ts_of(e["ts"])
            if e["event"] in p["events"] and as_of - timedelta(days=p["last_days"]) < ts <= as_of:
                hours[e["profile"]][ts.hour] += 1
        for pid, counts in hours.items():
            if pid in live:
                out[pid]["best_send_hour"] = min(counts, key=lambda h: (-counts[h], h))

    def chosen(p: dict[str, Any]) -> list[dict]:
        return [o for o in orders if o["profile"] in live
                and as_of - timedelta(days=p["last_days"]) < ts_of(o["ts"]) <= as_of
                and (p["statuses"] is None or o["status"] in p["statuses"])]

    for name in traits.RFM:
        if name not in config:
            continue
        metric: dict[str, Any] = {}
        for o in chosen(config[name]):
            pid = o["profile"]
            if name == "rfm_recency":
                metric[pid] = max(metric.get(pid, ts_of(o["ts"])), ts_of(o["ts"]))
            elif name == "rfm_frequency":
                metric[pid] = metric.get(pid, 0) + 1
            else:
                metric[pid] = metric.get(pid, 0) + Decimal(repr(o.get("amount", 0)))
        values = list(metric.values())
        for pid, x in metric.items():
            below = sum(1 for y in values if y < x)
            out[pid][name] = 1 + (5 * below) // len(values)
    if "favourite_category" in config:
        spend: dict[str, Counter] = defaultdict(Counter)
        for o in chosen(config["favourite_category"]):
            for item in o["items"]:
                if "category" in item:
                    spend[o["profile"]][item["category"]] += Decimal(repr(item["price"])) * \
                        item["qty"]
        for pid, by_cat in spend.items():
            out[pid]["favourite_category"] = min(
                by_cat, key=lambda c: (-by_cat[c], c.encode()))
    return out


@pytest.fixture()
def data() -> tuple[list[dict], list[dict], list[dict]]:
    return make_data(5)


@pytest.fixture()
def engine(tmp_path: Path, data: Any) -> Iterator[Engine]:
    profiles, events, orders = data
    with Engine.open(tmp_path / "db") as eng:
        eng.declare_schema({"orders": {"amount": "float", "items.price": "float"}})
        eng.upsert_profiles(profiles)
        eng.track_events(events)
        eng.add_orders(orders)
        yield eng


def stored(engine: Engine) -> dict[str, dict[str, Any]]:
    found = {}
    for pid in engine.members({"all": True}):
        row = {k: v for k, v in engine.profile(pid).items() if k in traits.DEFAULTS}
        if row:
            found[pid] = row
    return found


CONFIGS = [None,
           {"best_send_hour": {"events": ["page_view"], "last_days": 3},
            "rfm_monetary": {"statuses": ["paid", "delivered"], "last_days": 30},
            "favourite_category": {"statuses": ["paid"]}},
           {"rfm_recency": {"last_days": 1000}, "rfm_frequency": {"last_days": 7}}]


@pytest.mark.parametrize("seed", [5, 6, 7])
@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_traits_equal_naive(tmp_path: Path, seed: int, config: int) -> None:
    profiles, events, orders = make_data(seed)
    declared = traits.parse_config(CONFIGS[config])
    with Engine.open(tmp_path / "db") as eng:
        eng.declare_schema({"orders": {"amount": "float", "items.price": "float"}})
        eng.upsert_profiles(profiles)
        eng.track_events(events)
        eng.add_orders(orders)
        eng.delete_profiles(["p3"])
        live = set(eng.members({"all": True}))
        report = traits.refresh(eng, CONFIGS[config], as_of=AS_OF)
        expected = {pid: row for pid, row in
                    naive(profiles, events, orders, live, declared, AS_OF).items() if row}
        assert stored(eng) == expected
        assert report.profiles == len(expected)
        assert report.holders == {name: sum(name in row for row in expected.values())
                                  for name in declared}
        # a second refresh at the same as_of writes nothing; a later one follows the data
        version = eng.snapshot.version
        assert traits.refresh(eng, CONFIGS[config], as_of=AS_OF).profiles == 0
        assert eng.snapshot.version == version  # no new version: result caches stay valid
        later = AS_OF + timedelta(days=40)
        traits.refresh(eng, CONFIGS[config], as_of=later)
        expected = {pid: row for pid, row in
                    naive(profiles, events, orders, live, declared, later).items() if row}
        assert stored(eng) == expected
        # the trait fields are held by their index: an upsert of other fields keeps them
        eng.upsert_profiles([{"id": pid, "age": 1} for pid in sorted(live)])
        assert stored(eng) == expected
        check_rules(eng, expected, declared)
    with Engine.open(tmp_path / "db") as again:  # the bitmaps were stored, not only published
        check_rules(again, expected, declared)


def check_rules(engine: Engine, expected: dict[str, dict[str, Any]], declared: Any) -> None:
    """Every trait value's rule finds exactly the profiles holding it."""
    for name in declared:
        holders = {pid for pid, row in expected.items() if name in row}
        assert set(engine.members({"field": name, "op": "exists"})) == holders
        for value in {row[name] for row in expected.values() if name in row}:
            found = set(engine.members({"field": name, "op": "eq", "value": value}))
            assert found == {pid for pid, row in expected.items() if row.get(name) == value}


def test_traits_in_rules_and_describe(engine: Engine) -> None:
    traits.refresh(engine, as_of=AS_OF)
    names = {f.name: f.type for f in describe(engine.snapshot).fields}
    assert {k: names[k] for k in traits.TYPES} == traits.TYPES
    rows = stored(engine)
    champions = {pid for pid, row in rows.items()
                 if row.get("rfm_recency", 0) >= 4 and row.get("rfm_frequency", 0) >= 4}
    rule = {"and": [{"field": "rfm_recency", "op": "gte", "value": 4},
                    {"field": "rfm_frequency", "op": "gte", "value": 4}]}
    assert set(engine.members(rule)) == champions and champions
    shoes = {pid for pid, row in rows.items() if row.get("favourite_category") == "shoes"}
    assert set(engine.members({"field": "favourite_category", "op": "eq",
                               "value": "shoes"})) == shoes
    morning = {pid for pid, row in rows.items() if row.get("best_send_hour", 99) < 12}
    assert set(engine.members({"field": "best_send_hour", "op": "lt", "value": 12})) == morning


def test_quintiles_share_ties() -> None:
    import numpy as np
    scores = traits.quintiles(np.array([5, 1, 1, 1, 9, 7, 7, 3, 2, 10]))
    assert scores.tolist() == [3, 1, 1, 1, 5, 4, 4, 3, 2, 5]
    assert traits.quintiles(np.array([4, 4, 4])).tolist() == [1, 1, 1]
    assert traits.quintiles(np.array([8])).tolist() == [1]


@pytest.mark.parametrize("config, message", [
    ({"rfm_tenure": {}}, r"\$.rfm_tenure: unknown trait"),
    ({"rfm_recency": {"window": 3}}, r"\$.rfm_recency.window: unknown parameter"),
    ({"rfm_recency": {"last_days": 0}}, r"last_days: expected a whole number"),
    ({"best_send_hour": {"events": []}}, r"events: expected a non-empty list"),
    ({}, "expected an object of traits"),
    ("{nope", "not JSON"),
])
def test_bad_configs_change_nothing(engine: Engine, config: Any, message: str) -> None:
    version = engine.snapshot.version
    with pytest.raises(BitsegError, match=message):
        traits.refresh(engine, config, as_of=AS_OF)
    assert engine.snapshot.version == version and stored(engine) == {}


def test_a_field_of_another_type_is_refused(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "db") as eng:
        eng.upsert_profiles([{"id": "a", "best_send_hour": "noon"}])
        with pytest.raises(BitsegError, match="best_send_hour"):
            traits.refresh(eng, as_of=AS_OF)
        assert eng.profile("a")["best_send_hour"] == "noon"


@pytest.mark.parametrize("seed", [5, 8])
def test_a_table_too_big_is_replaced_by_sorting(tmp_path: Path, seed: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Profiles x labels over MAX_SLOTS take the sorting path: the same values."""
    monkeypatch.setattr(traits, "MAX_SLOTS", 2)
    profiles, events, orders = make_data(seed)
    config = {"favourite_category": {}, "best_send_hour": {}}
    with Engine.open(tmp_path / "db") as eng:
        eng.declare_schema({"orders": {"amount": "float", "items.price": "float"}})
        eng.upsert_profiles(profiles)
        eng.track_events(events)
        eng.add_orders(orders)
        live = set(eng.members({"all": True}))
        traits.refresh(eng, config, as_of=AS_OF)
        expected = {pid: row for pid, row in naive(profiles, events, orders, live,
                                                   traits.parse_config(config), AS_OF).items()
                    if row}
        assert stored(eng) == expected
