"""The Python client against a real `bitseg serve`: typed errors, dataclass results, and
what grpcurl shows of the replies (their JSON form, as json_format prints it)."""

from __future__ import annotations

import dataclasses
import json
import socket
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal

import grpc
import pytest
from conftest_grpc import ServerProcess
from google.protobuf import json_format

import bitseg
from bitseg import errors
from bitseg.client import (
    Client,
    CountResult,
    Explanation,
    MembershipChange,
    Metrics,
    Overlap,
    Page,
    Preview,
    Profile,
    RefreshResult,
    Segment,
    SizePoint,
)
from bitseg.v1 import bitseg_pb2 as pb
from bitseg.v1 import bitseg_pb2_grpc as pb_grpc

AS_OF = "2026-11-01T00:00:00Z"
PROFILES = [{"id": "u1", "country": "DE", "age": 34, "tags": ["vip", "news"], "ltv": 10.5},
            {"id": "u2", "country": "FR", "age": 51},
            {"id": "u3", "country": "DE", "age": 19, "tags": ["news"]}]
BAD_RULE = {"and": [{"all": True}, {"field": "country", "op": "gt", "value": "A"}]}
READ, WRITE = "read-5a1", "write-9c2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("client")
    (tmp / "tokens").write_text(f"read {READ}\nwrite {WRITE}\n")
    server = ServerProcess(tmp / "db", ["--tokens", str(tmp / "tokens")])
    try:
        with Client(server.addr, token=WRITE) as client:
            client.upsert_profiles(PROFILES)
            client.add_orders([{"id": "o1", "profile": "u1", "ts": "2026-10-01T00:00:00Z",
                                "amount": 12.5}])
            client.create_segment("de", "static", profile_ids=["u1", "u3"])
            client.create_segment("old", "materialized",
                                  rule={"field": "age", "op": "gte", "value": 30}, as_of=AS_OF)
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.addr, token=WRITE) as client:
        yield client


@pytest.fixture
def stub(server: ServerProcess) -> Iterator[pb_grpc.SegmentsStub]:
    """The raw API, as grpcurl sees it."""
    with grpc.insecure_channel(server.addr) as channel:
        yield pb_grpc.SegmentsStub(channel)


def raw(call: str, request: object, stub: pb_grpc.SegmentsStub) -> dict:
    """A raw reply's JSON form, as grpcurl prints it (without -emit-defaults)."""
    reply = getattr(stub, call)(request, timeout=10,
                                metadata=(("authorization", f"Bearer {WRITE}"),))
    return json.loads(json_format.MessageToJson(reply))


# ---------------------------------------------------------------------- typed errors
def _raised(call: object) -> errors.BitsegError:
    with pytest.raises(errors.BitsegError) as info:
        call()  # type: ignore[operator]
    return info.value


def test_errors_are_typed_by_status_and_keep_code_and_message(client: Client) -> None:
    missing = _raised(lambda: client.profile("nobody"))
    assert type(missing) is errors.NotFoundError
    assert (missing.code, missing.message) == ("NOT_FOUND", "profile 'nobody' not found")
    assert type(_raised(lambda: client.get_segment("zz"))) is errors.NotFoundError
    taken = _raised(lambda: client.create_segment("de", "static"))
    assert type(taken) is errors.AlreadyExistsError and taken.code == "ALREADY_EXISTS"
    bad_cursor = _raised(lambda: list(client.members({"all": True}, cursor="nope")))
    assert type(bad_cursor) is errors.InvalidArgumentError
    assert bad_cursor.code == "INVALID_ARGUMENT" and "cursor" in bad_cursor.message
    local = _raised(lambda: client.count({"all": True}, as_of="yesterday"))
    assert type(local) is errors.InvalidArgumentError  # found before sending


@pytest.mark.parametrize("rule, path", [
    (BAD_RULE, "$.and[1].op"),
    ({"and": []}, "$.and"),
    ({"not": {"field": "nope", "op": "exists"}}, "$.not.field"),
])
def test_a_bad_rule_is_an_invalid_rule_error_with_its_path(client: Client, rule: dict,
                                                           path: str) -> None:
    for call in (lambda: client.count(rule), lambda: list(client.members(rule)),
                 lambda: client.is_member("u1", rule), lambda: client.explain(rule)):
        error = _raised(call)
        assert isinstance(error, errors.InvalidRuleError)
        assert isinstance(error, errors.InvalidArgumentError)
        assert error.path == path and error.message.startswith(f"invalid rule: {path}: ")


def test_is_member_of_an_unknown_profile_is_not_found(client: Client) -> None:
    assert client.is_member("u1", segment="de") is True
    assert client.is_member("u2", segment="de") is False
    assert type(_raised(lambda: client.is_member("ghost", {"all": True}))) \
        is errors.NotFoundError


def test_unauthenticated_and_permission_denied(server: ServerProcess) -> None:
    for token in (None, "nope"):
        with Client(server.addr, token=token) as client:
            error = _raised(lambda c=client: c.count({"all": True}))
            assert type(error) is errors.UnauthenticatedError
    with Client(server.addr, token=READ) as client:
        assert client.count({"all": True}) == 3
        error = _raised(lambda: client.upsert_profiles([{"id": "x"}]))
        assert type(error) is errors.PermissionDeniedError and error.code == "PERMISSION_DENIED"


def test_an_unreachable_server_is_unavailable() -> None:
    with socket.socket() as sock:  # a port nobody listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Client(f"127.0.0.1:{port}", timeout=5) as client:
        error = _raised(lambda: client.count({"all": True}))
    assert type(error) is errors.UnavailableError and error.code == "UNAVAILABLE"


def test_one_base_exported_from_bitseg_and_the_old_name() -> None:
    assert bitseg.BitsegError is errors.BitsegError is bitseg.ClientError
    for name in ("NotFoundError", "InvalidRuleError", "AlreadyExistsError",
                 "UnavailableError", "UnauthenticatedError", "PermissionDeniedError",
                 "ResourceExhaustedError", "DeadlineExceededError"):
        assert issubclass(getattr(bitseg, name), bitseg.BitsegError)
    from bitseg.index.errors import BitsegError as EngineError
    assert not issubclass(bitseg.BitsegError, EngineError)  # the client's own class


def test_error_of_reads_the_rule_path_and_falls_back_to_the_base() -> None:
    error = errors.error_of("INVALID_ARGUMENT", "invalid rule: $.and[1].having.op: expected "
                            "one of eq, ne")
    assert type(error) is errors.InvalidRuleError and error.path == "$.and[1].having.op"
    assert type(errors.error_of("INVALID_ARGUMENT", "invalid data: batch 1")) \
        is errors.InvalidArgumentError
    other = errors.error_of("DATA_LOSS", "gone")
    assert type(other) is errors.BitsegError and str(other) == "DATA_LOSS: gone"


# ---------------------------------------------------------------------- dataclass results
def _frozen(result: object) -> None:
    assert dataclasses.is_dataclass(result)
    field = dataclasses.fields(result)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(result, field, None)


def test_every_result_is_a_frozen_dataclass(client: Client) -> None:
    de = {"field": "country", "op": "eq", "value": "DE"}
    counted = client.count_result(de, as_of=AS_OF)
    assert isinstance(counted, CountResult) and counted.count == 2
    page = next(client.pages(de, fields=["age"]))
    assert isinstance(page, Page) and page.ids == ["u1", "u3"]
    assert page.rows == [Profile("u1", {"age": 34}), Profile("u3", {"age": 19})]
    assert list(client.rows(["tags", "ltv"], segment="de")) == [
        Profile("u1", {"tags": ["news", "vip"], "ltv": 10.5}),
        Profile("u3", {"tags": ["news"], "ltv": None})]

    profile = client.profile("u1")
    assert profile == Profile("u1", {"country": "DE", "age": 34, "tags": ["news", "vip"],
                                     "ltv": 10.5})
    assert type(profile.fields["age"]) is int  # a Struct number, back as the int it was
    assert profile.as_dict()["id"] == "u1"
    preview = client.preview(de, limit=1)
    assert isinstance(preview, Preview) and (preview.total, preview.profiles) == (2, [profile])

    segment = client.get_segment("de")
    assert isinstance(segment, Segment)
    assert (segment.name, segment.kind, segment.size, segment.rule) == ("de", "static", 2, None)
    assert isinstance(segment.created_at, datetime)
    assert [s.name for s in client.list_segments()] == ["de", "old"]
    added = client.add_to_segment("de", ["u2", "ghost"])
    assert added == MembershipChange(changed=1, size=3, unknown_ids=["ghost"])
    assert client.remove_from_segment("de", ["u2"]) == MembershipChange(1, 2, [])
    history = client.segment_history("de")
    assert all(isinstance(p, SizePoint) for p in history)
    assert [(p.cause, p.size) for p in history] == [("create", 2), ("add", 3), ("remove", 2)]
    refreshed = client.refresh_segment("old", as_of=AS_OF)
    assert isinstance(refreshed, RefreshResult) and refreshed.size == 2

    overlap = client.overlap(["de", "old"], as_of=AS_OF)
    assert isinstance(overlap, Overlap) and overlap.matrix == [[2, 1], [1, 2]]
    metrics = client.metrics(segment="de", as_of=AS_OF)
    assert isinstance(metrics, Metrics) and metrics.revenue == Decimal("12.5")
    explained = client.explain(de, as_of=AS_OF)
    assert isinstance(explained, Explanation) and explained.root.count == 2
    for result in (counted, page, profile, preview, segment, added, history[0], refreshed,
                   overlap, metrics, explained, explained.root):
        _frozen(result)


# ---------------------------------------------------------------------- grpcurl's view
def test_is_member_false_shows_without_emit_defaults(stub: pb_grpc.SegmentsStub) -> None:
    no = raw("IsMember", pb.IsMemberRequest(profile_id="u2", segment="de"), stub)
    yes = raw("IsMember", pb.IsMemberRequest(profile_id="u1", segment="de"), stub)
    assert (no["member"], yes["member"]) == (False, True)


def test_profiles_are_json_objects_not_escaped_text(stub: pb_grpc.SegmentsStub) -> None:
    shown = raw("GetProfile", pb.GetProfileRequest(profile_id="u1"), stub)
    assert shown == {"id": "u1", "fields": {"country": "DE", "age": 34.0,
                                            "tags": ["news", "vip"], "ltv": 10.5}}
    preview = raw("Preview", pb.PreviewRequest(segment="de", limit=1), stub)
    assert preview["profiles"] == [shown]


def test_overlap_has_one_row_per_segment(stub: pb_grpc.SegmentsStub) -> None:
    shown = raw("Overlap", pb.OverlapRequest(segments=["de", "old"], as_of=None), stub)
    assert shown["rows"] == [{"segment": "de", "counts": ["2", "1"]},
                             {"segment": "old", "counts": ["1", "2"]}]  # uint64: strings


@pytest.mark.parametrize("given", [
    {"rule_json": '{"all": true}', "segment": "de"},
    {"rule": pb.Rule(all=True), "segment": "de"},
    {"rule": pb.Rule(all=True), "rule_json": '{"all": true}'},
])
def test_two_targets_are_refused_naming_both(stub: pb_grpc.SegmentsStub, given: dict) -> None:
    names = list(given)
    auth = (("authorization", f"Bearer {WRITE}"),)
    for call in (lambda: stub.Count(pb.CountRequest(**given), metadata=auth),
                 lambda: list(stub.Members(pb.MembersRequest(**given), metadata=auth)),
                 lambda: stub.IsMember(pb.IsMemberRequest(profile_id="u1", **given),
                                       metadata=auth)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert f"both {names[0]} and {names[1]} are set" in info.value.details()


def test_no_target_is_still_an_invalid_rule(stub: pb_grpc.SegmentsStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        raw("Count", pb.CountRequest(), stub)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "set one of rule, rule_json or segment" in info.value.details()



def test_json_texts_are_sent_as_they_are(client: Client) -> None:
    """Lines of a JSON Lines file (bytes) and JSON texts (str) are records, one each."""
    lines = [b'{"id": "t1", "n": 1}\n', '{"id": "t2", "n": 2}', {"id": "t3", "n": 3}]
    result = client.upsert_profiles(lines, batch_size=2)
    assert (result.batches, result.created) == (2, 3)
    assert [client.profile(p).fields["n"] for p in ("t1", "t2", "t3")] == [1, 2, 3]
