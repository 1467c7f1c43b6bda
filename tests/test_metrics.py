"""`bitseg serve --metrics-port 0`: a real server, some calls of known RPCs and status
codes, then its /metrics page scraped and read with prometheus_client's own parser."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest_grpc import ServerProcess
from prometheus_client.parser import text_string_to_metric_families

from bitseg.client import Client

SERVICE = "bitseg.v1.Segments"
N = 300
EVENTS = [{"profile": f"p{i % 50}", "event": "open" if i % 3 else "click",
           "ts": f"2026-{9 + i % 3:02d}-{1 + i % 28:02d}T10:00:00Z", "popup": f"k{i % 4}"}
          for i in range(700)]  # two types over three months, with keyword streams
ORDERS = [{"id": f"o{i}", "profile": f"p{i % 40}", "ts": "2026-10-03T09:30:00Z",
           "amount": 10.5} for i in range(120)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    db = tmp_path_factory.mktemp("metrics") / "store"
    server = ServerProcess(db, ["--metrics-port", "0"])
    try:
        found = re.search(r"bitseg metrics on (http://\S+/metrics)", server.stderr())
        assert found, server.stderr()
        with Client(server.addr) as client:
            client.upsert_profiles([{"id": f"p{i}", "n": i} for i in range(N)])
            client.track_events(EVENTS)
            client.add_orders(ORDERS)
        yield server, found.group(1)
    finally:
        server.stop()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the page: (name, sorted labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as page:
        text = page.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def calls(samples: dict, method: str, code: str, name: str = "bitseg_rpc_requests_total"
          ) -> float:
    key = (name, (("code", code), ("method", method), ("service", SERVICE)))
    return samples.get(key, 0.0)


def gauge(samples: dict, name: str) -> float:
    return samples[(name, ())]


def test_calls_are_counted_and_timed_by_rpc_and_code(served: tuple[ServerProcess, str]
                                                     ) -> None:
    server, url = served
    rule = {"field": "n", "op": "lt", "value": 100}
    with Client(server.addr) as client:
        before = scrape(url)
        assert client.count(rule) == 100
        assert client.count(rule) == 100  # the second one from the result cache
        with pytest.raises(Exception, match="unknown field"):
            client.count({"field": "nope", "op": "eq", "value": 1})
        with pytest.raises(Exception, match="segment"):
            client.get_segment("no-such-segment")
        assert len(list(client.members(rule))) == 100
    after = scrape(url)

    for method, code, made in (("Count", "OK", 2), ("Count", "INVALID_ARGUMENT", 1),
                               ("GetSegment", "NOT_FOUND", 1), ("Members", "OK", 1)):
        for name in ("bitseg_rpc_requests_total", "bitseg_rpc_duration_seconds_count"):
            assert calls(after, method, code, name) - calls(before, method, code, name) \
                == made, (method, code, name)
    for method in ("UpsertProfiles", "TrackEvents", "AddOrders"):  # client streams
        assert calls(before, method, "OK") == 1
    count_le_inf = after[("bitseg_rpc_duration_seconds_bucket",
                          (("code", "OK"), ("le", "+Inf"), ("method", "Count"),
                           ("service", SERVICE)))]
    assert count_le_inf == calls(after, "Count", "OK")
    # only evaluating replies carry eval_micros: two Counts, one Members stream
    assert after[("bitseg_evaluation_seconds_count", (("method", "Count"),))] == 2
    assert after[("bitseg_evaluation_seconds_count", (("method", "Members"),))] == 1
    assert ("bitseg_evaluation_seconds_count", (("method", "GetSegment"),)) not in after

    assert gauge(after, "bitseg_result_cache_hits_total") \
        - gauge(before, "bitseg_result_cache_hits_total") >= 1
    assert gauge(after, "bitseg_result_cache_misses_total") \
        > gauge(before, "bitseg_result_cache_misses_total")


def test_the_store_is_described_at_scrape_time(served: tuple[ServerProcess, str]) -> None:
    server, url = served
    with Client(server.addr) as client:
        first = scrape(url)
        client.upsert_profiles([{"id": "extra"}])
        second = scrape(url)
    assert gauge(first, "bitseg_profiles") == N
    assert gauge(first, "bitseg_events") == len(EVENTS)
    assert gauge(first, "bitseg_orders") == len(ORDERS)
    assert gauge(second, "bitseg_profiles") == N + 1
    assert gauge(second, "bitseg_snapshot_version") == gauge(first, "bitseg_snapshot_version") + 1
    used = gauge(second, "bitseg_store_used_bytes")
    data = Path(server.db) / "data.mdb"
    assert 0 < used <= data.stat().st_size and used % 4096 == 0
