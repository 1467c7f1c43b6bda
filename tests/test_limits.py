"""Names, ids and values that are parts of LMDB keys (at most 511 bytes): long ones are
either refused with a clear error (names, ids) or stored by digest (keyword values)."""

from __future__ import annotations

import pytest

from bitseg.index.engine import Engine
from bitseg.index.errors import DataError

AS_OF = "2026-11-01T00:00:00Z"
LONG = "https://example.com/landing?" + "utm=x&" * 200  # ~1.2 kB, like a real URL can be


def test_a_long_keyword_value_is_indexed_and_survives_reopen(tmp_path):
    path = tmp_path / "store"
    with Engine.open(path) as engine:
        engine.upsert_profiles([{"id": "a", "ref": LONG, "tags": [LONG, "b"]},
                                {"id": "b", "ref": "short"}])
        engine.track_events([{"profile": "a", "event": "view", "ts": "2026-10-30T00:00:00Z",
                              "page": LONG},
                             {"profile": "b", "event": "view", "ts": "2026-10-30T00:00:00Z",
                              "page": LONG[:-1]}])
    with Engine.open(path) as engine:
        assert engine.members({"field": "ref", "op": "eq", "value": LONG}) == ["a"]
        assert engine.members({"field": "tags", "op": "in", "value": [LONG]}) == ["a"]
        assert engine.profile("a")["ref"] == LONG
        viewed = {"event": "view", "where": {"field": "page", "op": "eq", "value": LONG},
                  "window": {"last_days": 30}, "having": {"agg": "count", "op": "gte",
                                                          "value": 1}}
        assert engine.members(viewed, as_of=AS_OF) == ["a"]


@pytest.mark.parametrize("size", [400, 470, 485, 495, 500, 505, 520, 700])
def test_keyword_values_around_the_key_size_limit(tmp_path, size):
    value = "v" * size
    path = tmp_path / "store"
    with Engine.open(path) as engine:
        engine.upsert_profiles([{"id": "a", "ref": value}, {"id": "b", "ref": value[:-1]}])
        engine.track_events([{"profile": "a", "event": "view", "ts": "2026-10-30T00:00:00Z",
                              "page": value}])
    with Engine.open(path) as engine:
        assert engine.members({"field": "ref", "op": "eq", "value": value}) == ["a"]
        viewed = {"event": "view", "where": {"field": "page", "op": "eq", "value": value},
                  "window": {"last_days": 30}, "having": {"agg": "count", "op": "gte",
                                                          "value": 1}}
        assert engine.members(viewed, as_of=AS_OF) == ["a"]


@pytest.mark.parametrize("record, field", [
    ({"id": "x" * 401}, "id"),
    ({"id": "ok", "f" * 201: 1}, "f" * 100),
])
def test_too_long_ids_and_field_names_are_refused(tmp_path, record, field):
    with Engine.open(tmp_path / "store") as engine:
        with pytest.raises(DataError, match="at most") as caught:
            engine.upsert_profiles([{"id": "first"}, record])
        assert caught.value.field.startswith(field) and caught.value.line == 2
        assert engine.total() == 0


@pytest.mark.parametrize("event, field", [
    ({"profile": "p" * 401, "event": "e", "ts": AS_OF}, "profile"),
    ({"profile": "p", "event": "e" * 201, "ts": AS_OF}, "event"),
    ({"profile": "p", "event": "e", "ts": AS_OF, "k" * 201: "v"}, "k" * 100),
])
def test_too_long_event_names_and_ids_are_refused(tmp_path, event, field):
    with Engine.open(tmp_path / "store") as engine:
        with pytest.raises(DataError, match="at most") as caught:
            engine.track_events([event])
        assert caught.value.field.startswith(field)
        assert engine.total() == 0


def test_too_long_order_field_names_are_refused(tmp_path):
    with Engine.open(tmp_path / "store") as engine:
        with pytest.raises(DataError, match="at most"):
            engine.add_orders([{"id": "o1", "profile": "p", "ts": AS_OF, "f" * 201: 1}])
        with pytest.raises(DataError, match="at most"):
            engine.add_orders([{"id": "o1", "profile": "p" * 401, "ts": AS_OF}])
        assert engine.total() == 0
