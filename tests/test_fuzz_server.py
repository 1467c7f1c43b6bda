"""A live server fed random, also malformed, rules and raw protobuf bytes never answers
INTERNAL (or UNKNOWN), and still answers a Count afterwards."""

from __future__ import annotations

import json

import grpc
import pytest
from conftest_grpc import ServerProcess
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bitseg.client import Client
from bitseg.v1 import bitseg_pb2 as pb

BROKEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
KEYS = ["and", "or", "not", "all", "field", "op", "value", "segment", "event", "where",
        "window", "having", "orders", "items", "sequence", "within_days", "then_not",
        "last_days", "next_days", "from", "to", "agg", "of", "days_ago", "salt", "percent",
        "top", "n", "by", "order", "sample"]
WORDS = ["country", "age", "tags", "ltv", "birthday", "seen", "subscribed", "view", "buy",
         "amount", "status", "items.qty", "items.brand", "eq", "ne", "in", "not_in",
         "has_all", "gt", "gte", "lt", "lte", "between", "exists", "not_exists",
         "anniversary_in", "count", "sum", "avg", "min", "max", "first", "last", "*", "DE",
         "seg", "2026-01-01", "2026-01-01T00:00:00Z", "0001-01-01", "9999-12-31T23:59:59Z"]
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

scalars = st.one_of(
    st.none(), st.booleans(), st.sampled_from(WORDS), st.text(max_size=8),
    st.integers(min_value=-(2**70), max_value=2**70),  # past 64 bits too: JSON allows them
    st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=25)
rules = st.recursive(  # mostly rule-shaped: known keys with plausible values
    st.one_of(st.just({"all": True}),
              st.fixed_dictionaries({"field": st.sampled_from(WORDS),
                                     "op": st.sampled_from(WORDS), "value": json_values}),
              st.fixed_dictionaries({"event": st.sampled_from(WORDS)},
                                    optional={"window": json_values, "having": json_values,
                                              "where": json_values}),
              st.dictionaries(st.sampled_from(KEYS), json_values, min_size=1, max_size=3)),
    lambda inner: st.one_of(st.fixed_dictionaries({"and": st.lists(inner, max_size=3)}),
                            st.fixed_dictionaries({"or": st.lists(inner, max_size=3)}),
                            st.fixed_dictionaries({"not": inner})),
    max_leaves=12)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("fuzz") / "s")
    try:
        with Client(proc.addr) as client:
            client.upsert_profiles([
                {"id": "a", "country": "DE", "age": 30, "tags": ["x"], "ltv": 1.5,
                 "birthday": "1990-02-28", "seen": "2026-01-02T00:00:00Z",
                 "subscribed": True},
                {"id": "b", "country": "FR", "age": 40}])
            client.track_events([{"profile": "a", "event": "view",
                                  "ts": "2026-01-01T00:00:00Z", "page": "home"}])
            client.add_orders([{"id": "o1", "profile": "a", "ts": "2026-01-01T00:00:00Z",
                                "status": "paid", "amount": 10.0,
                                "items": [{"sku": "s", "brand": "acme", "qty": 2}]}])
            client.create_segment("seg", "dynamic", rule={"field": "age", "op": "gt",
                                                          "value": 35})
        with grpc.insecure_channel(proc.addr) as channel:
            yield proc, channel
    finally:
        proc.stop()


def _call(channel: grpc.Channel, method: str, payload: bytes, streaming: bool = False
          ) -> grpc.StatusCode:
    """Send raw bytes as a request; the status code it ends with."""
    try:
        if streaming:
            for _ in channel.unary_stream(f"/bitseg.v1.Segments/{method}")(payload, timeout=10):
                pass
        else:
            channel.unary_unary(f"/bitseg.v1.Segments/{method}")(payload, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def _still_answers(channel: grpc.Channel) -> None:
    assert _call(channel, "Count", pb.CountRequest(rule_json='{"all": true}')
                 .SerializeToString()) is grpc.StatusCode.OK


@SETTINGS
@given(rule=rules, as_json_text=st.booleans())
def test_random_rules_never_get_internal(server, rule, as_json_text):
    _, channel = server
    text = json.dumps(rule)  # not orjson: it cannot write integers past 64 bits
    for method, message, streaming in (
            ("Count", pb.CountRequest, False), ("Explain", pb.ExplainRequest, False),
            ("Members", pb.MembersRequest, True)):
        code = _call(channel, method, message(rule_json=text).SerializeToString(), streaming)
        assert code not in BROKEN, (method, text)
    _still_answers(channel)


@SETTINGS
@given(text=st.one_of(st.text(max_size=40),
                      rules.map(lambda r: json.dumps(r)[:-1]),  # truncated
                      st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_malformed_rule_json_is_invalid_argument(server, text):
    _, channel = server
    code = _call(channel, "Count", pb.CountRequest(rule_json=text).SerializeToString())
    assert code not in BROKEN, text


UNARY = ["Count", "IsMember", "SegmentsOf", "Explain", "GetProfile", "Preview", "Metrics",
         "Overlap", "GetSegment", "ListSegments", "SegmentHistory", "UpdateSegment",
         "RefreshSegment", "RecordSegmentSize", "AddToSegment", "RemoveFromSegment"]


@SETTINGS
@given(method=st.sampled_from(UNARY + ["Members"]), payload=st.binary(max_size=64))
def test_random_bytes_as_a_request_never_get_internal(server, method, payload):
    _, channel = server
    code = _call(channel, method, payload, streaming=method == "Members")
    assert code not in BROKEN, (method, payload)
    _still_answers(channel)


def _field(number: int, wire: int, body: bytes) -> bytes:
    if wire == 0:
        return bytes([number << 3]) + body
    return bytes([(number << 3) | 2]) + _varint(len(body)) + body


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@pytest.mark.parametrize("depth", [90, 101, 200, 1000])
def test_a_protobuf_rule_too_deep_to_decode_is_invalid_argument(server, depth):
    _, channel = server
    rule = _field(4, 0, b"\x01")  # {"all": true}
    for _ in range(depth):
        rule = _field(3, 2, rule)  # {"not": ...}
    code = _call(channel, "Count", _field(1, 2, rule))
    assert code is not grpc.StatusCode.INTERNAL and code is not grpc.StatusCode.UNKNOWN
    if depth > 100:
        assert code is grpc.StatusCode.INVALID_ARGUMENT
    _still_answers(channel)


def test_invalid_utf8_in_a_string_field_is_invalid_argument_with_a_message(server):
    proc, channel = server
    for number in (2, 3):  # rule_json, segment
        try:
            channel.unary_unary("/bitseg.v1.Segments/Count")(_field(number, 2, b"\xff\xfe"),
                                                             timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid bitseg.v1.CountRequest" in exc.details()
        else:
            raise AssertionError("accepted invalid UTF-8")
    assert "Exception deserializing request" not in proc.stderr()


def test_random_bytes_in_an_ingest_stream_are_invalid_argument(server):
    _, channel = server
    upsert = channel.stream_unary("/bitseg.v1.Segments/UpsertProfiles")
    with pytest.raises(grpc.RpcError) as caught:
        upsert(iter([_field(1, 2, b"\xff\xfe")]), timeout=10)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    _still_answers(channel)
