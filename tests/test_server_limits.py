"""The server's edges under pressure: bounded caches, deadlines, stream limits and idle
timeouts, and shutdown within the grace period."""

from __future__ import annotations

import tracemalloc

import orjson
import pytest

from bitseg.index import cache
from bitseg.index.engine import Engine

MB = 1024 * 1024


def _big_in(tag: int, n: int = 20_000) -> dict:
    return {"field": "country", "op": "in", "value": [f"v{tag}-{j}" for j in range(n)]}


@pytest.mark.parametrize("budget", [2 * MB])
def test_distinct_large_rules_stay_within_the_cache_bounds(tmp_path, monkeypatch, budget):
    monkeypatch.setattr(cache, "PARSE_BYTES", budget)
    monkeypatch.setattr(cache, "RESULT_BYTES", budget)
    with Engine.open(tmp_path / "s") as engine:
        engine.upsert_profiles([{"id": str(i), "country": "DE"} for i in range(100)])
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for tag in range(12):  # each rule holds ~1.4 MB once parsed
                assert engine.count(_big_in(tag)) == 0
                assert engine.members(_big_in(tag)) == []
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
    assert grown < 3 * budget, f"{grown / MB:.1f} MB still held by the caches"


def test_the_size_estimate_of_a_parsed_rule_is_close_to_what_it_holds(tmp_path):
    with Engine.open(tmp_path / "s") as engine:
        engine.upsert_profiles([{"id": "a", "country": "DE"}])
        rule = orjson.dumps(_big_in(1)).decode()  # as the server gets it: text
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            typed = engine.parse(rule)
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        estimate = cache.estimate_size(typed)
    assert held / 2 < estimate < held * 2, (estimate, held)


def test_an_lru_drops_the_oldest_entries_beyond_its_bytes_and_skips_a_giant():
    lru = cache.LRU(100, max_bytes=1000, weigh=lambda key, value: value)
    for key in range(5):
        lru.put(key, 300)
    assert sorted(lru.items) == [2, 3, 4] and lru.bytes == 900
    lru.put("giant", 5000)
    assert lru.get("giant") is None and lru.bytes == 900
