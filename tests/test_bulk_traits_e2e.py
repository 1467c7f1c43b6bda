"""Bulk actions and computed traits end to end: a real `bitseg serve`, the Client, the
CLI, and the roles of the new RPCs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from conftest_grpc import ServerProcess, run_cli
from conftest_grpc import cli_ok as cli

from bitseg.client import Client
from bitseg.errors import InvalidArgumentError, NotFoundError
from bitseg.server.gate import SERVICE_PREFIX, required_role

PROFILES = [{"id": f"u{i}", "plan": ["free", "premium", "basic"][i % 3], "n": i,
             "tags": ["a"] if i % 2 else []} for i in range(30)]
EVENTS = [{"profile": f"u{i}", "event": "email_opened", "ts": f"2026-05-2{i % 9}T0{i % 7}:10:00Z"}
          for i in range(30)]
ORDERS = [{"id": f"o{i}", "profile": f"u{i % 12}", "ts": f"2026-0{1 + i % 5}-10T10:00:00Z",
           "amount": 10.0 * (i % 4 + 1),
           "items": [{"category": ["shoes", "bags"][i % 2], "qty": 1, "price": 10.0 * (i % 4 + 1)}]}
          for i in range(24)]
AS_OF = "2026-06-01T00:00:00Z"


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    proc = ServerProcess(tmp_path / "db")
    try:
        with Client(proc.addr) as client:
            client.upsert_profiles([{k: v for k, v in p.items() if v != []} for p in PROFILES])
            client.track_events(EVENTS)
            client.add_orders(ORDERS)
        yield proc
    finally:
        proc.stop()


def test_bulk_actions_through_the_client(server: ServerProcess) -> None:
    premium = {"field": "plan", "op": "eq", "value": "premium"}
    with Client(server.addr) as client:
        dry = client.bulk_action("add", "tags", "vip", rule=premium, dry_run=True)
        assert dry == {"members": 10, "changed": 10, "dry_run": True, "entry": None}
        assert client.count({"field": "tags", "op": "eq", "value": "vip"}) == 0
        done = client.bulk_action("add", "tags", "vip", rule=premium)
        assert (done["members"], done["changed"], done["entry"]["id"]) == (10, 10, 1)
        assert client.count({"field": "tags", "op": "eq", "value": "vip"}) == 10
        assert client.bulk_action("add", "tags", "vip", rule=premium)["changed"] == 0
        client.create_segment("low", "static", rule={"field": "n", "op": "lt", "value": 5})
        assert client.bulk_action("unset", "plan", segment="low")["changed"] == 5
        assert client.count({"field": "plan", "op": "exists"}) == 25
        entries = client.actions()
        assert [e["id"] for e in entries] == [3, 2, 1]
        assert entries[0]["segment"] == "low" and entries[2]["rule"] == premium
        assert client.actions(limit=1) == entries[:1]
        with pytest.raises(InvalidArgumentError, match="keywords"):
            client.bulk_action("add", "plan", "x", rule={"all": True})
        with pytest.raises(NotFoundError):
            client.bulk_action("set", "plan", "x", segment="ghost")


def test_bulk_and_traits_through_the_cli(server: ServerProcess) -> None:
    out = cli(server, "bulk", "set", "plan", "gold", "--rule",
              '{"field": "n", "op": "gte", "value": 20}', "--dry-run")
    assert out == "dry run: set plan = \"gold\" would change 10 of 10 members (nothing changed)\n"
    out = cli(server, "bulk", "set", "plan", "gold", "--rule",
              '{"field": "n", "op": "gte", "value": 20}')
    assert out == "set plan = \"gold\": changed 10 of 10 members (action 1)\n"
    out = cli(server, "bulk", "set", "score", "7", "--rule", '{"all": true}', "--json")
    assert orjson.loads(out)["changed"] == 30
    listed = cli(server, "actions")
    assert "set score 7  on rule {\"all\":true}: 30 of 30 changed" in listed
    assert len(listed.splitlines()) == 2
    bad = run_cli("bulk", "unset", "plan", "x", "--rule", '{"all": true}', "--addr", server.addr)
    assert bad.returncode == 2 and "no VALUE" in bad.stderr

    out = cli(server, "traits", "refresh", "--as-of", AS_OF)
    assert out.startswith(f"traits as of {AS_OF}: 30 profiles written\n")
    assert "best_send_hour" in out and "favourite_category" in out
    with Client(server.addr) as client:
        described = {f.name: f.type for f in client.describe().fields}
        assert described["rfm_monetary"] == "int" and described["favourite_category"] == "keyword"
        assert client.count({"field": "best_send_hour", "op": "exists"}) == 30
        assert client.count({"field": "rfm_frequency", "op": "between", "value": [1, 5]}) == 12
        again = client.refresh_traits(as_of=AS_OF)
        assert again["profiles"] == 0 and again["holders"]["rfm_recency"] == 12
        only = client.refresh_traits(as_of=AS_OF, config={"rfm_frequency": {"last_days": 30}})
        assert set(only["holders"]) == {"rfm_frequency"}
        with pytest.raises(InvalidArgumentError, match="unknown trait"):
            client.refresh_traits(config={"nope": {}})


def test_roles_of_the_new_rpcs() -> None:
    assert required_role(SERVICE_PREFIX + "ListActions") == "read"
    assert required_role(SERVICE_PREFIX + "BulkAction") == "write"
    assert required_role(SERVICE_PREFIX + "RefreshTraits") == "write"
