"""Insights and exports end to end: a real server, the client and the CLI; scheduled
exports written by the server and kept across a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

from conftest_grpc import ServerProcess, run_cli

from bitseg import Client

PROFILES = [{"id": f"p{i}", "country": ["DE", "FR", "US"][i % 3], "age": 20 + i % 50,
             **({"email": f"p{i}@x.org"} if i % 2 else {})} for i in range(120)]
EVENTS = [{"profile": f"p{i % 60}", "event": "open", "ts": "2026-11-25T10:00:00Z"}
          for i in range(90)]
ORDERS = [{"id": f"o{i}", "profile": f"p{i % 30}", "ts": "2026-11-01T10:00:00Z",
           "amount": 10.5} for i in range(45)]
AS_OF = "2026-11-29T00:00:00Z"
DE = '{"field": "country", "op": "eq", "value": "DE"}'


def test_insights_and_exports_through_server_and_cli(tmp_path: Path) -> None:
    db, out = tmp_path / "store", tmp_path / "scheduled"
    server = ServerProcess(db)
    try:
        with Client(server.addr) as client:
            client.upsert_profiles(PROFILES)
            client.track_events(EVENTS)
            client.add_orders(ORDERS)
            client.create_segment("de", "dynamic", rule=json.loads(DE))
            found = client.insights(segment="de", fields=["country", "age"], as_of=AS_OF)
            assert found["profiles"] == "40" and found["total_profiles"] == "120"
            country = found["fields"][0]
            assert country["values"][0]["value_json"] == '"DE"'
            assert country["values"][0]["lift"] == "3.000000"
            week = found["events"][0]["windows"][0]
            de_events = sum(1 for i in range(90) if (i % 60) % 3 == 0)
            assert (week["days"], int(week["events"])) == (7, de_events)
            assert found["orders"]["orders"] == str(sum(1 for i in range(45) if i % 30 % 3 == 0))
        shown = run_cli("insights", "--addr", server.addr, "--segment", "de", "--fields",
                        "country,age", "--as-of", AS_OF)
        assert shown.returncode == 0, shown.stderr
        assert "audience 40 of 120 profiles" in shown.stdout
        assert "DE" in shown.stdout and "3.00" in shown.stdout

        target = tmp_path / "de.jsonl"
        done = run_cli("export", "--addr", server.addr, "--rule", DE, "--fields", "email,age",
                       "--require", "email", "--format", "jsonl", "--out", str(target))
        assert done.returncode == 0, done.stderr
        wanted = [p for p in PROFILES if p["country"] == "DE" and "email" in p]
        assert done.stdout.strip() == f"{len(wanted)} of 40 members exported to {target}"
        rows = [json.loads(line) for line in target.read_text().splitlines()]
        assert rows == [{"id": p["id"], "email": p["email"], "age": p["age"]} for p in wanted]

        made = run_cli("export", "schedule", "de", "--addr", server.addr, "--every", "1",
                       "--fields", "email", "--require", "email", "--out", str(out), "--rotate")
        assert made.returncode == 0, made.stderr
        _wait_for(out / "de.csv")
    finally:
        server.stop()
    server = ServerProcess(db)  # the schedule survives the restart and keeps running
    try:
        listed = run_cli("export", "schedules", "--addr", server.addr, "--json")
        assert listed.returncode == 0, listed.stderr
        (schedule,) = json.loads(listed.stdout)
        assert schedule["segment"] == "de" and schedule["rotate"] is True
        runs = int(schedule["runs"])
        deadline = time.monotonic() + 10
        while int(json.loads(run_cli("export", "schedules", "--addr", server.addr,
                                     "--json").stdout)[0]["runs"]) <= runs:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        lines = (out / "de.csv").read_text().splitlines()
        assert lines == ["id,email"] + [f"{p['id']},{p['email']}" for p in wanted]
        gone = run_cli("export", "unschedule", str(schedule["id"]), "--addr", server.addr)
        assert gone.returncode == 0, gone.stderr
        assert json.loads(run_cli("export", "schedules", "--addr", server.addr,
                                  "--json").stdout) == []
    finally:
        server.stop()


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 10
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was not written"
        time.sleep(0.1)
