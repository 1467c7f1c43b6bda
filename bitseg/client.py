"""A Python client for a bitseg server.

    from bitseg import Client

    with Client("127.0.0.1:50051") as client:
        n = client.count({"field": "country", "op": "eq", "value": "DE"})
        for profile_id in client.members(segment="vip", limit=100):
            ...

A rule is a dict (the CONTRACT §2 JSON form), its JSON text, or a bitseg_pb2.Rule.
`as_of` is a datetime (naive is UTC), an ISO 8601 string, or None for now.
Every failure, local or remote, raises ClientError(code, message), code being the gRPC
status name ("INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", ...).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bitseg.index.errors import BitsegError
from bitseg.server import convert
from bitseg.v1 import bitseg_pb2 as pb
from bitseg.v1 import bitseg_pb2_grpc as pb_grpc

DEFAULT_ADDR = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
DEFAULT_BATCH = 1000
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SEGMENT_KINDS = {"static": pb.SEGMENT_KIND_STATIC, "dynamic": pb.SEGMENT_KIND_DYNAMIC,
                 "materialized": pb.SEGMENT_KIND_MATERIALIZED}


class ClientError(Exception):
    """A call failed; `code` is the gRPC status name, `message` the server's words."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class CountResult:
    count: int
    eval_micros: int
    as_of: datetime


@dataclass(frozen=True)
class Page:
    """One page of Members: pass `cursor` back to continue after it."""

    ids: list[str]
    cursor: str
    done: bool
    total: int
    eval_micros: int
    as_of: datetime
    rows: list[dict[str, Any]] = field(default_factory=list)  # when fields were asked


@dataclass(frozen=True)
class UpsertResult:
    batches: int
    created: int
    updated: int
    version: int


@contextmanager
def _errors() -> Iterator[None]:
    """gRPC and local conversion errors -> ClientError."""
    try:
        yield
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        raise ClientError(code.name, " ".join((details or "").split())) from None
    except (BitsegError, ValueError, TypeError) as exc:
        raise ClientError("INVALID_ARGUMENT", str(exc)) from None


class Client:
    """A connection to one bitseg server; use as a context manager, or call close().

    `timeout` (seconds, None for none) bounds each unary call; streaming calls
    (members, upsert_profiles) have no deadline unless given one.
    """

    def __init__(self, addr: str = DEFAULT_ADDR, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        self.addr = addr
        self.timeout = timeout
        self._channel = grpc.insecure_channel(  # connects lazily, on the first call
            addr, options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                           ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self._stub = pb_grpc.SegmentsStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.addr!r})"

    # ------------------------------------------------------------------ evaluation
    def count(self, rule: Any = None, segment: str | None = None,
              as_of: datetime | str | None = None) -> int:
        """How many live profiles satisfy the rule (or are in the segment)."""
        return self.count_result(rule, segment, as_of).count

    def count_result(self, rule: Any = None, segment: str | None = None,
                     as_of: datetime | str | None = None) -> CountResult:
        """count() with the evaluation time and the as_of it used."""
        with _errors():
            reply = self._stub.Count(pb.CountRequest(**_query(rule, segment, as_of)),
                                     timeout=self.timeout)
        return CountResult(reply.count, reply.eval_micros, convert.to_datetime(reply.as_of))

    def members(self, rule: Any = None, segment: str | None = None,
                as_of: datetime | str | None = None, limit: int | None = None,
                page_size: int | None = None, cursor: str | None = None,
                timeout: float | None = None) -> Iterator[str]:
        """The ids of the profiles that satisfy the rule, in load order, streamed."""
        for page in self.pages(rule, segment, as_of, limit, page_size, cursor, timeout):
            yield from page.ids

    def pages(self, rule: Any = None, segment: str | None = None,
              as_of: datetime | str | None = None, limit: int | None = None,
              page_size: int | None = None, cursor: str | None = None,
              timeout: float | None = None, fields: Iterable[str] = ()) -> Iterator[Page]:
        """members() page by page, each with the cursor that resumes after it (and, when
        `fields` are named, each member's values of them in `rows`)."""
        with _errors():
            request = pb.MembersRequest(**_query(rule, segment, as_of), cursor=cursor or "",
                                        page_size=page_size or 0, limit=limit or 0,
                                        fields=list(fields))
            stream = self._stub.Members(request, timeout=timeout)
            try:
                for reply in stream:
                    yield Page(list(reply.ids), reply.cursor, reply.done, reply.total,
                               reply.eval_micros, convert.to_datetime(reply.as_of),
                               [orjson.loads(r) for r in reply.rows_json])
            finally:
                stream.cancel()  # a consumer that stops early frees the server's worker

    def rows(self, fields: Iterable[str], rule: Any = None, segment: str | None = None,
             as_of: datetime | str | None = None, limit: int | None = None,
             page_size: int | None = None, timeout: float | None = None
             ) -> Iterator[dict[str, Any]]:
        """The members with the named profile fields: {"id": ..., field: value or None}."""
        for page in self.pages(rule, segment, as_of, limit, page_size, None, timeout,
                               fields=list(fields)):
            yield from page.rows

    def preview(self, rule: Any = None, segment: str | None = None,
                as_of: datetime | str | None = None, limit: int = 10) -> dict[str, Any]:
        """{"total": N, "profiles": [the first `limit` profiles with all their fields]}."""
        with _errors():
            request = pb.PreviewRequest(**_query(rule, segment, as_of), limit=limit)
            reply = self._stub.Preview(request, timeout=self.timeout)
        return {"total": reply.total,
                "profiles": [orjson.loads(p.profile_json) for p in reply.profiles],
                "eval_micros": reply.eval_micros, "as_of": convert.to_datetime(reply.as_of)}

    def metrics(self, rule: Any = None, segment: str | None = None,
                as_of: datetime | str | None = None, amount_field: str = "amount"
                ) -> dict[str, Any]:
        """Profiles, share of profiles, orders, customers, revenue, share of revenue and
        average order value of a rule's or segment's profiles; decimals as Decimal."""
        with _errors():
            request = pb.MetricsRequest(**_query(rule, segment, as_of),
                                        amount_field=amount_field)
            return convert.metrics_dict(self._stub.Metrics(request, timeout=self.timeout))

    def overlap(self, segments: Iterable[str],
                as_of: datetime | str | None = None) -> dict[str, Any]:
        """{"segments", "sizes", "matrix": [[|a ∩ b|, ...], ...]} for the named segments."""
        with _errors():
            request = pb.OverlapRequest(segments=list(segments),
                                        as_of=convert.to_timestamp(as_of))
            return convert.overlap_dict(self._stub.Overlap(request, timeout=self.timeout))

    def is_member(self, profile_id: str, rule: Any = None, segment: str | None = None,
                  as_of: datetime | str | None = None) -> bool:
        """Whether the profile satisfies the rule; NOT_FOUND for an unknown profile."""
        with _errors():
            request = pb.IsMemberRequest(profile_id=profile_id, **_query(rule, segment, as_of))
            return self._stub.IsMember(request, timeout=self.timeout).member

    def segments_of(self, profile_id: str, as_of: datetime | str | None = None) -> list[str]:
        with _errors():
            request = pb.SegmentsOfRequest(profile_id=profile_id,
                                           as_of=convert.to_timestamp(as_of))
            return list(self._stub.SegmentsOf(request, timeout=self.timeout).segments)

    def explain(self, rule: Any = None, segment: str | None = None,
                as_of: datetime | str | None = None) -> dict[str, Any]:
        """{"sentence", "text", "root": {path, text, count, children}, "eval_micros",
        "as_of"}: the rule in plain words, and its tree with the count at every node."""
        with _errors():
            reply = self._stub.Explain(pb.ExplainRequest(**_query(rule, segment, as_of)),
                                       timeout=self.timeout)
        return {"sentence": reply.sentence, "text": reply.text,
                "root": convert.explain_dict(reply.root),
                "eval_micros": reply.eval_micros, "as_of": convert.to_datetime(reply.as_of)}

    def profile(self, profile_id: str) -> dict[str, Any]:
        """A profile's current values; NOT_FOUND for an unknown profile."""
        with _errors():
            reply = self._stub.GetProfile(pb.GetProfileRequest(profile_id=profile_id),
                                          timeout=self.timeout)
        return orjson.loads(reply.profile_json)

    # ------------------------------------------------------------------ ingestion
    def upsert_profiles(self, profiles: Iterable[Any], batch_size: int = DEFAULT_BATCH,
                        timeout: float | None = None) -> UpsertResult:
        """Upsert profiles (dicts, sent batch_size at a time) or batches (lists of dicts).

        Each batch commits whole or not at all; on a bad batch the ones before it stay.
        """
        reply = self._stream(self._stub.UpsertProfiles, pb.ProfileBatch, "profiles_json",
                             profiles, batch_size, timeout)
        return UpsertResult(reply.batches, reply.created, reply.updated, reply.version)

    def track_events(self, events: Iterable[Any], batch_size: int = DEFAULT_BATCH,
                     timeout: float | None = None) -> int:
        """Append events (dicts like events.jsonl lines, or batches of them); how many."""
        return self._stream(self._stub.TrackEvents, pb.EventBatch, "events_json",
                            events, batch_size, timeout).events

    def add_orders(self, orders: Iterable[Any], batch_size: int = DEFAULT_BATCH,
                   timeout: float | None = None) -> int:
        """Append orders (dicts like orders.jsonl lines, or batches of them); how many."""
        return self._stream(self._stub.AddOrders, pb.OrderBatch, "orders_json",
                            orders, batch_size, timeout).orders

    def _stream(self, call: Any, message: Any, field: str, items: Iterable[Any],
                batch_size: int, timeout: float | None) -> Any:
        """Stream items to a client-streaming ingest call, one message per batch."""
        failed: list[Exception] = []

        def requests() -> Iterator[Any]:
            # gRPC consumes this on its own thread: a failure here ends the stream (the
            # batches sent so far commit) and is raised below, in the caller's thread.
            try:
                for batch in _batches(items, batch_size):
                    yield message(**{field: [orjson.dumps(r).decode() for r in batch]})
            except Exception as exc:
                failed.append(exc)

        with _errors():
            reply = call(requests(), timeout=timeout)
        if failed:
            raise ClientError("INVALID_ARGUMENT", f"batch {reply.batches + 1} (the "
                              f"{reply.batches} before it committed): {failed[0]}")
        return reply

    def delete_profiles(self, profile_ids: Iterable[str]) -> int:
        """Delete profiles by id, all or none; NOT_FOUND names an unknown id."""
        with _errors():
            request = pb.DeleteProfilesRequest(profile_ids=list(profile_ids))
            return self._stub.DeleteProfiles(request, timeout=self.timeout).deleted

    # ------------------------------------------------------------------ segments
    def create_segment(self, name: str, kind: str, rule: Any = None,
                       profile_ids: Iterable[str] = (),
                       as_of: datetime | str | None = None,
                       refresh_every: int | None = None) -> dict[str, Any]:
        """kind: "static", "dynamic" or "materialized". A static segment takes profile_ids
        and/or a rule (its members at as_of); `refresh_every` (seconds) schedules a
        materialized one. The reply has "entered" and the "unknown_ids" ignored."""
        with _errors():
            if kind not in SEGMENT_KINDS:
                raise ValueError(f"kind: expected one of {', '.join(SEGMENT_KINDS)}, got {kind!r}")
            source = {} if rule is None else convert.rule_target(rule)
            request = pb.CreateSegmentRequest(name=name, kind=SEGMENT_KINDS[kind], **source,
                                              profile_ids=list(profile_ids),
                                              as_of=convert.to_timestamp(as_of),
                                              refresh_every_seconds=refresh_every or 0)
            return convert.segment_dict(self._stub.CreateSegment(request, timeout=self.timeout))

    def update_segment(self, name: str, rule: Any = None, refresh_every: int | None = None,
                       as_of: datetime | str | None = None) -> dict[str, Any]:
        """Change a segment's rule and/or refresh interval (0 removes the schedule)."""
        with _errors():
            source = {} if rule is None else convert.rule_target(rule)
            request = pb.UpdateSegmentRequest(name=name, **source,
                                              as_of=convert.to_timestamp(as_of))
            if refresh_every is not None:
                request.refresh_every_seconds = refresh_every
            return convert.segment_dict(self._stub.UpdateSegment(request, timeout=self.timeout))

    def get_segment(self, name: str) -> dict[str, Any]:
        with _errors():
            reply = self._stub.GetSegment(pb.GetSegmentRequest(name=name), timeout=self.timeout)
        return convert.segment_dict(reply)

    def list_segments(self) -> list[dict[str, Any]]:
        with _errors():
            reply = self._stub.ListSegments(pb.ListSegmentsRequest(), timeout=self.timeout)
        return [convert.segment_dict(s) for s in reply.segments]

    def delete_segment(self, name: str) -> None:
        with _errors():
            self._stub.DeleteSegment(pb.DeleteSegmentRequest(name=name), timeout=self.timeout)

    def add_to_segment(self, name: str, profile_ids: Iterable[str]) -> dict[str, Any]:
        """{"changed": profiles that entered, "size", "unknown_ids": ignored ids}."""
        with _errors():
            request = pb.AddToSegmentRequest(name=name, profile_ids=list(profile_ids))
            reply = self._stub.AddToSegment(request, timeout=self.timeout)
        return {"changed": reply.changed, "size": reply.size,
                "unknown_ids": list(reply.unknown_ids)}

    def remove_from_segment(self, name: str, profile_ids: Iterable[str]) -> dict[str, Any]:
        """{"changed": profiles that left, "size", "unknown_ids": ignored ids}."""
        with _errors():
            request = pb.RemoveFromSegmentRequest(name=name, profile_ids=list(profile_ids))
            reply = self._stub.RemoveFromSegment(request, timeout=self.timeout)
        return {"changed": reply.changed, "size": reply.size,
                "unknown_ids": list(reply.unknown_ids)}

    def refresh_segment(self, name: str,
                        as_of: datetime | str | None = None) -> dict[str, Any]:
        with _errors():
            request = pb.RefreshSegmentRequest(name=name, as_of=convert.to_timestamp(as_of))
            reply = self._stub.RefreshSegment(request, timeout=self.timeout)
        return {"size": reply.size, "entered": reply.entered, "exited": reply.exited,
                "eval_micros": reply.eval_micros, "as_of": convert.to_datetime(reply.as_of)}

    def segment_history(self, name: str) -> list[dict[str, Any]]:
        """[{"time", "size", "cause"}, ...], oldest first."""
        with _errors():
            reply = self._stub.SegmentHistory(pb.SegmentHistoryRequest(name=name),
                                              timeout=self.timeout)
        return [convert.point_dict(p) for p in reply.points]

    def record_segment_size(self, name: str,
                            as_of: datetime | str | None = None) -> dict[str, Any]:
        """Record a history point of the segment's size (at as_of) now; the point."""
        with _errors():
            request = pb.RecordSegmentSizeRequest(name=name, as_of=convert.to_timestamp(as_of))
            return convert.point_dict(self._stub.RecordSegmentSize(request,
                                                                   timeout=self.timeout))

    # ------------------------------------------------------------------ health
    def health(self, service: str = "") -> str:
        """The server's health status name: "SERVING", "NOT_SERVING", ..."""
        with _errors():
            stub = health_pb2_grpc.HealthStub(self._channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service),
                               timeout=self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def _query(rule: Any, segment: str | None, as_of: datetime | str | None) -> dict[str, Any]:
    """The target and as_of fields of an evaluating request."""
    return {**convert.rule_target(rule, segment), "as_of": convert.to_timestamp(as_of)}


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Dicts grouped `size` at a time; a list (or tuple) item is a batch of its own."""
    batch: list[Any] = []
    for item in items:
        if isinstance(item, Mapping):
            batch.append(item)
            if len(batch) >= size:
                yield batch
                batch = []
            continue
        if batch:
            yield batch
            batch = []
        yield list(item)
    if batch:
        yield batch
