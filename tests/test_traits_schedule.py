"""Computed traits on a schedule (index/traits_schedule.py, `serve --traits-every`): the
scheduler fills the trait fields, writes nothing when nothing is new, logs each run and
a failure once, backs off; a real server refreshes them by itself."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest_grpc import ServerProcess, run_cli

from bitseg.client import Client
from bitseg.index import traits, traits_schedule
from bitseg.index.describe import describe
from bitseg.index.engine import Engine, as_of_micros
from bitseg.index.errors import BitsegError
from bitseg.index.traits_schedule import TraitsScheduler, load_config

NOW = datetime(2026, 6, 1, 12, tzinfo=timezone.utc)
NOW_US = as_of_micros(NOW)
US = 1_000_000


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def fill(engine: Engine, now: datetime) -> None:
    """Six profiles; opens at 09:xx for p0-p2; orders for p0-p3 in the last year."""
    engine.upsert_profiles([{"id": f"p{i}"} for i in range(6)])
    engine.track_events([{"profile": f"p{i}", "event": "email_opened",
                          "ts": iso((now - timedelta(days=i + 1)).replace(hour=9, minute=i))}
                         for i in range(3)])
    engine.add_orders([{"id": f"o{i}", "profile": f"p{i % 4}",
                        "ts": iso(now - timedelta(days=10 * i + 1)), "amount": 10 + i,
                        "items": [{"category": "shoes", "qty": 1, "price": 5}]}
                       for i in range(6)])


def values(engine: Engine, name: str) -> dict[str, object]:
    return {pid: engine.profile(pid).get(name) for pid in engine.members({"all": True})
            if name in engine.profile(pid)}


def test_a_tick_fills_the_traits_and_a_second_writes_nothing(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    with Engine.open(tmp_path / "db") as engine:
        fill(engine, NOW)
        scheduler = TraitsScheduler(engine, every=0.01)
        with caplog.at_level(logging.INFO, logger="bitseg.traits"):
            first = scheduler.run_once(NOW_US)
        assert first is not None and first.profiles == 4
        fields = {f.name for f in describe(engine.snapshot).fields}
        assert set(traits.TYPES) <= fields
        assert values(engine, "best_send_hour") == {"p0": 9, "p1": 9, "p2": 9}
        assert values(engine, "favourite_category") == {f"p{i}": "shoes" for i in range(4)}
        assert set(engine.members({"field": "rfm_frequency", "op": "exists"})) == \
            {"p0", "p1", "p2", "p3"}
        line = [r.getMessage() for r in caplog.records if r.name == "bitseg.traits"]
        assert len(line) == 1 and "4 profiles written" in line[0] and \
            "best_send_hour 3" in line[0] and " s: " in line[0]

        rows = {pid: engine.profile(pid) for pid in engine.members({"all": True})}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="bitseg.traits"):
            second = scheduler.run_once(NOW_US + 1)
        assert second is not None and second.profiles == 0
        assert set(second.changed.values()) == {0}
        assert {pid: engine.profile(pid) for pid in engine.members({"all": True})} == rows
        assert "nothing changed" in caplog.records[-1].getMessage()


def test_the_thread_runs_on_its_own_and_stops(tmp_path: Path) -> None:
    with Engine.open(tmp_path / "db") as engine:
        fill(engine, datetime.now(timezone.utc))
        scheduler = TraitsScheduler(engine, {"best_send_hour": {}}, every=0.02).start()
        try:
            deadline = time.monotonic() + 5
            while not values(engine, "best_send_hour") and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            scheduler.stop()
        assert values(engine, "best_send_hour") == {"p0": 9, "p1": 9, "p2": 9}
        assert "rfm_recency" not in {f.name for f in describe(engine.snapshot).fields}
        assert not any(t.name == "bitseg-traits" for t in threading.enumerate())


def test_a_failure_is_logged_once_and_backs_off(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with Engine.open(tmp_path / "db") as engine:
        fill(engine, NOW)
        scheduler = TraitsScheduler(engine, every=10, max_pause=35)
        calls, broken = [], [True]
        real = traits_schedule.refresh

        def flaky(*args: Any, **kwargs: Any) -> traits.RefreshReport:
            calls.append(kwargs["as_of"])
            if broken:
                raise BitsegError("traits: profiles.best_send_hour: the disk is on fire")
            return real(*args, **kwargs)

        monkeypatch.setattr(traits_schedule, "refresh", flaky)
        with caplog.at_level(logging.INFO, logger="bitseg.traits"):
            assert scheduler.run_once(NOW_US) is None  # fails: pause 20 s
            assert scheduler.run_once(NOW_US + 19 * US) is None  # skipped
            assert scheduler.attempts == 1
            assert scheduler.run_once(NOW_US + 20 * US) is None  # fails: pause 35 s (cap)
            assert scheduler.attempts == 2
            assert scheduler.run_once(NOW_US + 54 * US) is None and scheduler.attempts == 2
            assert calls == [NOW_US, NOW_US + 20 * US]
            broken.clear()
        said = [r for r in caplog.records if r.name == "bitseg.traits"]
        assert len(said) == 1 and said[0].levelno == logging.WARNING
        assert "best_send_hour" in said[0].getMessage()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="bitseg.traits"):
            report = scheduler.run_once(NOW_US + 55 * US)
        assert report is not None and scheduler.attempts == 0
        assert "works again" in caplog.records[0].getMessage()


def test_a_bad_config_fails_before_any_thread(tmp_path: Path) -> None:
    bad = tmp_path / "traits.json"
    bad.write_text('{"rfm_tenure": {}}')
    with pytest.raises(BitsegError, match=f"{bad}: \\$.rfm_tenure: unknown trait"):
        load_config(str(bad))
    with pytest.raises(BitsegError, match="cannot read"):
        load_config(str(tmp_path / "missing.json"))


def test_serve_refreshes_traits_on_its_schedule(tmp_path: Path) -> None:
    config = tmp_path / "traits.json"
    config.write_text('{"best_send_hour": {}, "favourite_category": {}}')
    proc = ServerProcess(tmp_path / "db", ["--traits-every", "1", "--traits", str(config)])
    try:
        with Client(proc.addr) as client:
            client.upsert_profiles([{"id": f"p{i}"} for i in range(3)])
            now = datetime.now(timezone.utc)
            client.track_events([{"profile": "p1", "event": "email_clicked",
                                  "ts": iso((now - timedelta(days=2)).replace(hour=7))}])
            deadline = time.monotonic() + 10
            while "best_send_hour" not in {f.name for f in client.describe().fields} \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
            names = {f.name for f in client.describe().fields}
            assert {"best_send_hour", "favourite_category"} <= names
            assert "rfm_recency" not in names  # only what the --traits file declares
            hour = {"field": "best_send_hour", "op": "eq", "value": 7}
            while client.count(hour) == 0 and time.monotonic() < deadline:
                time.sleep(0.1)  # the field may be declared a moment before it is filled
            assert client.count(hour) == 1
    finally:
        assert proc.stop() == 0
    assert "traits refreshed as of" in proc.stderr()


def test_serve_refuses_a_bad_traits_file(tmp_path: Path) -> None:
    bad = tmp_path / "traits.json"
    bad.write_text("{nope")
    done = run_cli("serve", "--db", str(tmp_path / "db"), "--create", "--port", "0",
                   "--traits-every", "1", "--traits", str(bad))
    assert done.returncode == 2
    assert str(bad) in done.stderr and "not JSON" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
