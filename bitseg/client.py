"""A Python client for a bitseg server.

    from bitseg import Client

    with Client("127.0.0.1:50051") as client:
        n = client.count({"field": "country", "op": "eq", "value": "DE"})
        for profile_id in client.members(segment="vip", limit=100):
            ...

A rule is a dict (the canonical JSON form), its JSON text, or a bitseg_pb2.Rule.
`as_of` is a datetime (naive is UTC), an ISO 8601 string, or None for now.
Every result is a frozen dataclass (below). Every failure, local or remote, raises a
subclass of bitseg.errors.BitsegError (NotFoundError, InvalidRuleError, ...), each with
`code`, the gRPC status name ("INVALID_ARGUMENT", "NOT_FOUND", ...), and `message`.

bitseg.aio.Client has the same methods, async; both build their requests and read their
replies with the functions at the end of this module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import orjson
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bitseg.errors import BitsegError, ClientError, InvalidArgumentError, error_of
from bitseg.index.errors import BitsegError as EngineError
from bitseg.server import convert
from bitseg.v1 import bitseg_pb2 as pb
from bitseg.v1 import bitseg_pb2_grpc as pb_grpc

__all__ = ["BatchMembership", "BatchSegments", "BitsegError", "Client", "ClientError",
           "CountResult", "Description", "EventTypeInfo", "ExplainNode", "Explanation",
           "FieldInfo", "MembershipChange", "Metrics", "Overlap", "Page", "Preview",
           "Profile", "RefreshResult", "Segment", "SizePoint", "UpsertResult"]

DEFAULT_ADDR = "127.0.0.1:50051"
DEFAULT_TIMEOUT = 30.0
DEFAULT_BATCH = 1000
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SEGMENT_KINDS = {"static": pb.SEGMENT_KIND_STATIC, "dynamic": pb.SEGMENT_KIND_DYNAMIC,
                 "materialized": pb.SEGMENT_KIND_MATERIALIZED}
_KIND_NAMES = {kind: name for name, kind in SEGMENT_KINDS.items()}
EXACT_DOUBLE = 2**53  # doubles hold every integer up to this exactly


# ====================================================================== results
@dataclass(frozen=True, slots=True)
class CountResult:
    count: int
    eval_micros: int  # the server's evaluation time
    as_of: datetime   # the evaluation time used


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """An external SQL source of the server (serve --sources): never its password."""

    name: str
    host: str
    database: str
    answers: bool
    error: str  # why it does not answer ("" when it does)
    statement_timeout: float  # seconds
    row_limit: int
    ttl: float  # seconds an answer is cached


@dataclass(frozen=True, slots=True)
class Profile:
    """A profile's id and values by field name (a field it lacks is absent, or None in
    Members rows)."""

    id: str
    fields: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """{"id": ..., field: value, ...}: the profiles.jsonl form."""
        return {"id": self.id, **self.fields}


@dataclass(frozen=True, slots=True)
class Page:
    """One page of Members: pass `cursor` back to continue after it."""

    ids: list[str]
    cursor: str
    done: bool         # the last page of the whole result
    total: int         # the whole result's size, before cursor and limit
    eval_micros: int
    as_of: datetime
    rows: list[Profile] = field(default_factory=list)  # when fields were asked


@dataclass(frozen=True, slots=True)
class Preview:
    total: int
    profiles: list[Profile]  # the first ones, with all their fields
    eval_micros: int
    as_of: datetime


@dataclass(frozen=True, slots=True)
class Metrics:
    """Decimals are exact (totals) or rounded half-even to 6 places (shares in percent,
    averages); None where undefined (a division by zero)."""

    profiles: int
    total_profiles: int
    share_of_profiles_pct: Decimal | None
    orders: int
    customers: int
    revenue: Decimal | None
    total_revenue: Decimal | None
    share_of_revenue_pct: Decimal | None
    average_order_value: Decimal | None
    eval_micros: int
    as_of: datetime


@dataclass(frozen=True, slots=True)
class Overlap:
    segments: list[str]
    sizes: list[int]
    matrix: list[list[int]]  # matrix[i][j] = |segments[i] ∩ segments[j]|
    eval_micros: int
    as_of: datetime


@dataclass(frozen=True, slots=True)
class ExplainNode:
    path: str   # the node's JSON path: $, $.and[0], ...
    text: str   # the node in plain words
    count: int
    children: list[ExplainNode]
    note: str = ""  # set when the node names a value that never occurs


@dataclass(frozen=True, slots=True)
class FieldInfo:
    """A field as Describe / Values show it. Values are text: keywords as they are,
    bools "true"/"false", numbers exact in decimal, dates and timestamps in ISO 8601."""

    name: str
    type: str
    count: int      # profiles (orders; events for event properties) having a value
    distinct: int   # keyword, keywords, bool: how many different values
    top: list[tuple[str, int]]  # (value, count), highest count first, ties by value
    min: str | None = None      # int, float, date, timestamp
    max: str | None = None
    quantiles: dict[str, str] = field(default_factory=dict)  # "p25" ... "p99", nearest rank


@dataclass(frozen=True, slots=True)
class EventTypeInfo:
    name: str
    count: int      # events of this type (of live profiles)
    profiles: int   # live profiles with at least one
    properties: list[FieldInfo]


@dataclass(frozen=True, slots=True)
class Description:
    profiles: int
    fields: list[FieldInfo]
    events: list[EventTypeInfo]
    orders: int
    order_fields: list[FieldInfo]
    item_fields: list[FieldInfo]   # "items.brand": count is orders with an item having it
    version: int                   # the snapshot described
    eval_micros: int


@dataclass(frozen=True, slots=True)
class BatchMembership:
    """is_member_many: `member` by id (false for unknown ids, also listed in `unknown`);
    `answers` one per requested id, in order (duplicates included)."""

    member: dict[str, bool]
    unknown: list[str]
    as_of: datetime
    answers: list[bool]


@dataclass(frozen=True, slots=True)
class BatchSegments:
    """segments_of_many: the segment names by id (empty for unknown ids, also listed
    in `unknown`)."""

    segments: dict[str, list[str]]
    unknown: list[str]
    as_of: datetime


@dataclass(frozen=True, slots=True)
class Explanation:
    sentence: str      # the whole rule as one sentence
    text: str          # the tree, one node per line, indented
    root: ExplainNode
    eval_micros: int
    as_of: datetime


@dataclass(frozen=True, slots=True)
class Segment:
    name: str
    kind: str                        # "static", "dynamic" or "materialized"
    rule: Any                        # its rule (JSON form), or None
    size: int
    created_at: datetime | None
    refreshed_at: datetime | None    # the as_of of the last membership change
    refresh_every: int | None        # seconds, for a scheduled materialized segment
    # create_segment, update_segment: who entered and left with that call, and the
    # profile ids given that are no live profile (ignored)
    entered: int = 0
    exited: int = 0
    unknown_ids: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)  # sorted


@dataclass(frozen=True, slots=True)
class TemplateParam:
    name: str
    type: str                        # int, number, string, strings, bool
    default: Any
    description: str
    min: float | None = None


@dataclass(frozen=True, slots=True)
class Template:
    """A segment template: create_segment(..., template=name, params={...})."""

    name: str
    description: str
    params: list[TemplateParam]
    rule: Any                        # with {"$param": NAME} where a parameter goes
    builtin: bool


@dataclass(frozen=True, slots=True)
class MembershipChange:
    changed: int  # profiles that entered (add) or left (remove)
    size: int     # members afterwards
    unknown_ids: list[str]  # ids that are no live profile: ignored


@dataclass(frozen=True, slots=True)
class RefreshResult:
    size: int
    entered: int
    exited: int
    eval_micros: int
    as_of: datetime


@dataclass(frozen=True, slots=True)
class SizePoint:
    time: datetime
    size: int
    cause: str  # create, refresh, update, add, remove, record


@dataclass(frozen=True, slots=True)
class UpsertResult:
    batches: int
    created: int
    updated: int
    version: int  # the store version after the last batch


@contextmanager
def _errors() -> Iterator[None]:
    """gRPC and local conversion errors -> the BitsegError subclass of their code."""
    try:
        yield
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        raise error_of(code.name, " ".join((details or "").split())) from None
    except (EngineError, ValueError, TypeError) as exc:
        raise InvalidArgumentError("INVALID_ARGUMENT", str(exc)) from None


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
              grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer TOKEN` to every call (with or without TLS)."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        return _CallDetails(details.method, details.timeout,
                            [*(details.metadata or ()), self.header], details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


class Client:
    """A connection to one bitseg server; use as a context manager, or call close().

    `timeout` (seconds, None for none) bounds each unary call; streaming calls
    (members, upsert_profiles) have no deadline unless given one. `tls_ca` (a PEM file,
    or its bytes) connects with TLS trusting that CA or self-signed certificate;
    `token` is sent as `authorization: Bearer TOKEN` on every call.
    """

    def __init__(self, addr: str = DEFAULT_ADDR, timeout: float | None = DEFAULT_TIMEOUT,
                 *, tls_ca: str | Path | bytes | None = None, token: str | None = None
                 ) -> None:
        self.addr = addr
        self.timeout = timeout
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if tls_ca is None:  # channels connect lazily, on the first call
            channel = grpc.insecure_channel(addr, options=options)
        else:
            pem = tls_ca if isinstance(tls_ca, bytes) else Path(tls_ca).read_bytes()
            channel = grpc.secure_channel(
                addr, grpc.ssl_channel_credentials(root_certificates=pem), options=options)
        self._channel = channel if token is None else grpc.intercept_channel(
            channel, _Bearer(token))
        self._raw_channel = channel
        self._stub = pb_grpc.SegmentsStub(self._channel)

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.addr!r})"

    def _call(self, build: Callable[..., _Unary], *args: Any) -> Any:
        """Make the request with `build`, send it, and read the reply."""
        with _errors():
            call = build(*args)
            reply = getattr(self._stub, call.method)(call.request, timeout=self.timeout)
        return call.result(reply)

    # ------------------------------------------------------------------ evaluation
    def count(self, rule: Any = None, segment: str | None = None,
              as_of: datetime | str | None = None) -> int:
        """How many live profiles satisfy the rule (or are in the segment)."""
        return self._call(count_call, rule, segment, as_of)

    def count_result(self, rule: Any = None, segment: str | None = None,
                     as_of: datetime | str | None = None) -> CountResult:
        """count() with the evaluation time and the as_of it used."""
        return self._call(count_result_call, rule, segment, as_of)

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
            request = members_request(rule, segment, as_of, limit, page_size, cursor, fields)
            stream = self._stub.Members(request, timeout=timeout)
            try:
                for reply in stream:
                    yield page_of(reply)
            finally:
                stream.cancel()  # a consumer that stops early frees the server's worker

    def rows(self, fields: Iterable[str], rule: Any = None, segment: str | None = None,
             as_of: datetime | str | None = None, limit: int | None = None,
             page_size: int | None = None, timeout: float | None = None
             ) -> Iterator[Profile]:
        """The members with the named profile fields (None for a value they lack)."""
        for page in self.pages(rule, segment, as_of, limit, page_size, None, timeout,
                               fields=list(fields)):
            yield from page.rows

    def preview(self, rule: Any = None, segment: str | None = None,
                as_of: datetime | str | None = None, limit: int = 10) -> Preview:
        """The total, and the first `limit` profiles with all their fields."""
        return self._call(preview_call, rule, segment, as_of, limit)

    def metrics(self, rule: Any = None, segment: str | None = None,
                as_of: datetime | str | None = None, amount_field: str = "amount"
                ) -> Metrics:
        """Profiles, share of profiles, orders, customers, revenue, share of revenue and
        average order value of a rule's or segment's profiles."""
        return self._call(metrics_call, rule, segment, as_of, amount_field)

    def insights(self, rule: Any = None, segment: str | None = None,
                 fields: Iterable[str] = (), as_of: datetime | str | None = None,
                 top: int = 0, buckets: int = 0) -> dict[str, Any]:
        """Field distributions of a rule's or segment's profiles next to the whole base,
        their event activity in the last 7, 30 and 90 days and their orders, as the
        InsightsReply in dict form (field names as in the proto)."""
        return self._call(insights_call, rule, segment, fields, as_of, top, buckets)

    def create_export_schedule(self, segment: str, every_seconds: int, fields: Iterable[str],
                               out: str, require: Iterable[str] = (), format: str = "csv",
                               rotate: bool = False) -> dict[str, Any]:
        """Export a segment's members every `every_seconds` to files in `out`, a directory
        on the server machine; the schedule as a dict."""
        return self._call(create_export_schedule_call, segment, every_seconds, fields, out,
                          require, format, rotate)

    def export_schedules(self) -> list[dict[str, Any]]:
        return self._call(export_schedules_call)

    def delete_export_schedule(self, schedule_id: int) -> None:
        self._call(delete_export_schedule_call, schedule_id)

    def bulk_action(self, action: str, field: str, value: Any = None, rule: Any = None,
                    segment: str | None = None, dry_run: bool = False,
                    as_of: datetime | str | None = None) -> dict[str, Any]:
        """Set / unset / add / remove (a keyword) a field on every member of a rule or
        segment, in one transaction: {"members", "changed", "dry_run", "entry"} (entry:
        the stored audit entry, None on a dry run)."""
        return self._call(bulk_action_call, action, field, value, rule, segment, dry_run,
                          as_of)

    def actions(self, limit: int = 0) -> list[dict[str, Any]]:
        """The audit entries of bulk actions, newest first (limit 0: all)."""
        return self._call(actions_call, limit)

    def refresh_traits(self, as_of: datetime | str | None = None,
                       config: Any = None) -> dict[str, Any]:
        """Recompute the computed traits (config: a traits config, dict or JSON text;
        None: the built-in one); {"as_of", "profiles", "changed", "holders"}."""
        return self._call(refresh_traits_call, as_of, config)

    def overlap(self, segments: Iterable[str],
                as_of: datetime | str | None = None) -> Overlap:
        """Each named segment's size and every pairwise intersection."""
        return self._call(overlap_call, segments, as_of)

    def is_member(self, profile_id: str, rule: Any = None, segment: str | None = None,
                  as_of: datetime | str | None = None) -> bool:
        """Whether the profile satisfies the rule; NotFoundError for an unknown profile."""
        return self._call(is_member_call, profile_id, rule, segment, as_of)

    def segments_of(self, profile_id: str, as_of: datetime | str | None = None) -> list[str]:
        """The names of the segments the profile is in."""
        return self._call(segments_of_call, profile_id, as_of)

    def explain(self, rule: Any = None, segment: str | None = None,
                as_of: datetime | str | None = None) -> Explanation:
        """The rule in plain words, and its tree with the count at every node."""
        return self._call(explain_call, rule, segment, as_of)

    def profile(self, profile_id: str) -> Profile:
        """A profile's current values; NotFoundError for an unknown profile."""
        return self._call(profile_call, profile_id)

    # ------------------------------------------------------------------ describe, batches
    def describe(self, top: int = 20) -> Description:
        """Every profile field, event type and order field, with counts, the `top` most
        common values of keyword fields, and min, max and quantiles of the others."""
        return self._call(describe_call, top)

    def sources(self) -> list[SourceInfo]:
        """The server's SQL sources, each with whether it answers now."""
        return self._call(sources_call)

    def values(self, field: str, limit: int = 20) -> FieldInfo:
        """The `limit` most common values of a keyword, keywords or bool profile field
        (FieldInfo.top), highest count first, ties by value."""
        return self._call(values_call, field, limit)

    def is_member_many(self, profile_ids: Iterable[str], rule: Any = None,
                       segment: str | None = None,
                       as_of: datetime | str | None = None) -> BatchMembership:
        """is_member for up to 10,000 profiles in one call; unknown ids are listed."""
        return self._call(is_member_many_call, profile_ids, rule, segment, as_of)

    def segments_of_many(self, profile_ids: Iterable[str],
                         as_of: datetime | str | None = None) -> BatchSegments:
        """segments_of for up to 10,000 profiles in one call; unknown ids are listed."""
        return self._call(segments_of_many_call, profile_ids, as_of)

    # ------------------------------------------------------------------ ingestion
    def upsert_profiles(self, profiles: Iterable[Any], batch_size: int = DEFAULT_BATCH,
                        timeout: float | None = None) -> UpsertResult:
        """Upsert profiles (dicts, or their JSON texts as str/bytes, e.g. the lines of a
        profiles.jsonl, sent batch_size at a time) or batches (lists of them).

        Each batch commits whole or not at all; on a bad batch the ones before it stay.
        """
        return self._upload(upsert_upload(profiles, batch_size), timeout)

    def track_events(self, events: Iterable[Any], batch_size: int = DEFAULT_BATCH,
                     timeout: float | None = None) -> int:
        """Append events (dicts like events.jsonl lines, or batches of them); how many."""
        return self._upload(events_upload(events, batch_size), timeout)

    def add_orders(self, orders: Iterable[Any], batch_size: int = DEFAULT_BATCH,
                   timeout: float | None = None) -> int:
        """Append orders (dicts like orders.jsonl lines, or batches of them); how many."""
        return self._upload(orders_upload(orders, batch_size), timeout)

    def _upload(self, upload: _Upload, timeout: float | None) -> Any:
        with _errors():
            reply = getattr(self._stub, upload.method)(iter(upload), timeout=timeout)
        return upload.result(reply)

    def delete_profiles(self, profile_ids: Iterable[str]) -> int:
        """Delete profiles by id, all or none; NotFoundError names an unknown id."""
        return self._call(delete_profiles_call, profile_ids)

    # ------------------------------------------------------------------ segments
    def create_segment(self, name: str, kind: str, rule: Any = None,
                       profile_ids: Iterable[str] = (),
                       as_of: datetime | str | None = None,
                       refresh_every: int | None = None, tags: Iterable[str] = (),
                       template: str | None = None,
                       params: Mapping[str, Any] | None = None) -> Segment:
        """kind: "static", "dynamic" or "materialized". A static segment takes profile_ids
        and/or a rule (its members at as_of); `refresh_every` (seconds) schedules a
        materialized one. The result has `entered` and the `unknown_ids` ignored.
        Instead of a rule: a `template` (see templates()) with `params` by name; the
        segment then also carries the tag "template:NAME"."""
        return self._call(create_segment_call, name, kind, rule, profile_ids, as_of,
                          refresh_every, tags, template, params)

    def update_segment(self, name: str, rule: Any = None, refresh_every: int | None = None,
                       as_of: datetime | str | None = None) -> Segment:
        """Change a segment's rule and/or refresh interval (0 removes the schedule)."""
        return self._call(update_segment_call, name, rule, refresh_every, as_of)

    def split_segment(self, name: str, salt: str, into: Mapping[str, float] | Iterable[Any],
                      rule: Any = None, prefix: str | None = None,
                      as_of: datetime | str | None = None) -> list[Segment]:
        """Split segment `name` (or `rule`) by sample buckets of `salt` into static
        segments named (prefix or name)-label, all created or none: into={"a": 45,
        "b": 45, "control": 10} (or [(label, percent), ...]) gives a = buckets 0-45 %,
        b = 45-90 %, control = 90-100 %.  The new segments in that order."""
        return self._call(split_segment_call, name, salt, into, rule, prefix, as_of)

    def get_segment(self, name: str) -> Segment:
        return self._call(get_segment_call, name)

    def list_segments(self, tag: str | None = None) -> list[Segment]:
        """Every segment by name; with `tag`, only those carrying it."""
        return self._call(list_segments_call, tag)

    def add_tags(self, name: str, tags: Iterable[str]) -> Segment:
        """Tag a segment (at most 32 tags in all); the segment."""
        return self._call(tags_call, "AddTags", name, tags)

    def remove_tags(self, name: str, tags: Iterable[str]) -> Segment:
        """Remove tags of a segment (those it lacks are ignored); the segment."""
        return self._call(tags_call, "RemoveTags", name, tags)

    def templates(self) -> list[Template]:
        """The server's segment templates: the built-in ones, then the user's."""
        return self._call(templates_call)

    def delete_segment(self, name: str) -> None:
        self._call(delete_segment_call, name)

    def add_to_segment(self, name: str, profile_ids: Iterable[str]) -> MembershipChange:
        """Add profiles to a static segment; `changed` counts those that entered."""
        return self._call(add_to_segment_call, name, profile_ids)

    def remove_from_segment(self, name: str, profile_ids: Iterable[str]) -> MembershipChange:
        """Remove profiles from a static segment; `changed` counts those that left."""
        return self._call(remove_from_segment_call, name, profile_ids)

    def refresh_segment(self, name: str,
                        as_of: datetime | str | None = None) -> RefreshResult:
        """Recount a materialized segment now (at as_of), recording entries and exits."""
        return self._call(refresh_segment_call, name, as_of)

    def segment_history(self, name: str) -> list[SizePoint]:
        """The segment's size history, oldest first."""
        return self._call(segment_history_call, name)

    def record_segment_size(self, name: str,
                            as_of: datetime | str | None = None) -> SizePoint:
        """Record a history point of the segment's size (at as_of) now; the point."""
        return self._call(record_segment_size_call, name, as_of)

    # ------------------------------------------------------------------ health
    def health(self, service: str = "") -> str:
        """The server's health status name: "SERVING", "NOT_SERVING", ..."""
        with _errors():
            stub = health_pb2_grpc.HealthStub(self._channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service),
                               timeout=self.timeout)
        return health_status(reply)


# ====================================================================== shared by both clients
# Each *_call function builds one unary request and says how to read its reply; each
# *_upload one client-streaming ingest call. Client and aio.Client only send them.
@dataclass(frozen=True)
class _Unary:
    method: str                    # the Segments stub's method
    request: Any
    result: Callable[[Any], Any]   # reply -> what the client method returns


def count_call(rule: Any, segment: str | None, as_of: datetime | str | None) -> _Unary:
    return _Unary("Count", pb.CountRequest(**_query(rule, segment, as_of)),
                  lambda reply: reply.count)


def count_result_call(rule: Any, segment: str | None,
                      as_of: datetime | str | None) -> _Unary:
    return _Unary("Count", pb.CountRequest(**_query(rule, segment, as_of)),
                  lambda reply: CountResult(reply.count, reply.eval_micros,
                                            convert.to_datetime(reply.as_of)))


def members_request(rule: Any, segment: str | None, as_of: datetime | str | None,
                    limit: int | None, page_size: int | None, cursor: str | None,
                    fields: Iterable[str]) -> pb.MembersRequest:
    return pb.MembersRequest(**_query(rule, segment, as_of), cursor=cursor or "",
                             page_size=page_size or 0, limit=limit or 0, fields=list(fields))


def page_of(reply: pb.MembersPage) -> Page:
    rows = [orjson.loads(text) for text in reply.rows_json]
    return Page(list(reply.ids), reply.cursor, reply.done, reply.total, reply.eval_micros,
                convert.to_datetime(reply.as_of), [Profile(row.pop("id"), row) for row in rows])


def preview_call(rule: Any, segment: str | None, as_of: datetime | str | None,
                 limit: int) -> _Unary:
    request = pb.PreviewRequest(**_query(rule, segment, as_of), limit=limit)
    return _Unary("Preview", request, lambda reply: Preview(
        reply.total, [profile_of(p) for p in reply.profiles], reply.eval_micros,
        convert.to_datetime(reply.as_of)))


def metrics_call(rule: Any, segment: str | None, as_of: datetime | str | None,
                 amount_field: str) -> _Unary:
    request = pb.MetricsRequest(**_query(rule, segment, as_of), amount_field=amount_field)
    return _Unary("Metrics", request, metrics_of)


def metrics_of(reply: pb.MetricsReply) -> Metrics:
    def dec(text: str) -> Decimal | None:
        return Decimal(text) if text else None

    return Metrics(reply.profiles, reply.total_profiles, dec(reply.share_of_profiles_pct),
                   reply.orders, reply.customers, dec(reply.revenue),
                   dec(reply.total_revenue), dec(reply.share_of_revenue_pct),
                   dec(reply.average_order_value), reply.eval_micros,
                   convert.to_datetime(reply.as_of))


def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def insights_call(rule: Any, segment: str | None, fields: Iterable[str],
                  as_of: datetime | str | None, top: int, buckets: int) -> _Unary:
    request = pb.InsightsRequest(**_query(rule, segment, as_of), fields=list(fields), top=top,
                                 buckets=buckets)
    return _Unary("Insights", request, _as_dict)


def create_export_schedule_call(segment: str, every_seconds: int, fields: Iterable[str],
                                out: str, require: Iterable[str], format: str,
                                rotate: bool) -> _Unary:
    request = pb.CreateExportScheduleRequest(
        segment=segment, every_seconds=every_seconds, fields=list(fields),
        require=list(require), format=format, out=out, rotate=rotate)
    return _Unary("CreateExportSchedule", request, _as_dict)


def export_schedules_call() -> _Unary:
    return _Unary("ListExportSchedules", pb.ListExportSchedulesRequest(),
                  lambda reply: [_as_dict(s) for s in reply.schedules])


def delete_export_schedule_call(schedule_id: int) -> _Unary:
    return _Unary("DeleteExportSchedule", pb.DeleteExportScheduleRequest(id=schedule_id),
                  lambda reply: None)


def bulk_action_call(action: str, field: str, value: Any, rule: Any, segment: str | None,
                     dry_run: bool, as_of: datetime | str | None) -> _Unary:
    request = pb.BulkActionRequest(
        **_query(rule, segment, as_of), action=action, field=field, dry_run=dry_run,
        value_json="" if value is None else orjson.dumps(value).decode())
    return _Unary("BulkAction", request, lambda reply: {
        "members": reply.members, "changed": reply.changed, "dry_run": reply.dry_run,
        "entry": orjson.loads(reply.entry_json) if reply.entry_json else None})


def actions_call(limit: int) -> _Unary:
    return _Unary("ListActions", pb.ListActionsRequest(limit=limit),
                  lambda reply: [orjson.loads(e) for e in reply.entries_json])


def refresh_traits_call(as_of: datetime | str | None, config: Any) -> _Unary:
    if config is not None and not isinstance(config, str):
        config = orjson.dumps(config).decode()
    request = pb.RefreshTraitsRequest(as_of=convert.to_timestamp(as_of), config_json=config or "")
    return _Unary("RefreshTraits", request, lambda reply: {
        "as_of": convert.to_datetime(reply.as_of), "profiles": reply.profiles,
        "changed": dict(reply.changed), "holders": dict(reply.holders)})


def overlap_call(segments: Iterable[str], as_of: datetime | str | None) -> _Unary:
    request = pb.OverlapRequest(segments=list(segments), as_of=convert.to_timestamp(as_of))
    return _Unary("Overlap", request, lambda reply: Overlap(
        list(reply.segments), list(reply.sizes), [list(row.counts) for row in reply.rows],
        reply.eval_micros, convert.to_datetime(reply.as_of)))


def is_member_call(profile_id: str, rule: Any, segment: str | None,
                   as_of: datetime | str | None) -> _Unary:
    request = pb.IsMemberRequest(profile_id=profile_id, **_query(rule, segment, as_of))
    return _Unary("IsMember", request, lambda reply: reply.member)


def segments_of_call(profile_id: str, as_of: datetime | str | None) -> _Unary:
    request = pb.SegmentsOfRequest(profile_id=profile_id, as_of=convert.to_timestamp(as_of))
    return _Unary("SegmentsOf", request, lambda reply: list(reply.segments))


def explain_call(rule: Any, segment: str | None, as_of: datetime | str | None) -> _Unary:
    return _Unary("Explain", pb.ExplainRequest(**_query(rule, segment, as_of)),
                  lambda reply: Explanation(reply.sentence, reply.text,
                                            explain_node_of(reply.root), reply.eval_micros,
                                            convert.to_datetime(reply.as_of)))


def explain_node_of(node: pb.ExplainNode) -> ExplainNode:
    return ExplainNode(node.path, node.text, node.count,
                       [explain_node_of(c) for c in node.children], node.note)


def sources_call() -> _Unary:
    return _Unary("ListSources", pb.ListSourcesRequest(), lambda reply: [
        SourceInfo(s.name, s.host, s.database, s.answers, s.error, s.statement_timeout,
                   s.row_limit, s.ttl) for s in reply.sources])


def describe_call(top: int) -> _Unary:
    return _Unary("Describe", pb.DescribeRequest(top=top), description_of)


def description_of(reply: pb.DescribeReply) -> Description:
    return Description(
        reply.profiles, [field_info_of(f) for f in reply.fields],
        [EventTypeInfo(e.name, e.count, e.profiles, [field_info_of(p) for p in e.properties])
         for e in reply.events],
        reply.orders, [field_info_of(f) for f in reply.order_fields],
        [field_info_of(f) for f in reply.item_fields], reply.version, reply.eval_micros)


def field_info_of(info: pb.FieldInfo) -> FieldInfo:
    return FieldInfo(info.name, info.type, info.count, info.distinct,
                     [(v.value, v.count) for v in info.top],
                     info.min if info.HasField("min") else None,
                     info.max if info.HasField("max") else None,
                     {q.name: q.value for q in info.quantiles})


def values_call(field_name: str, limit: int) -> _Unary:
    return _Unary("Values", pb.ValuesRequest(field=field_name, limit=limit),
                  lambda reply: FieldInfo(reply.field, reply.type, reply.count,
                                          reply.distinct,
                                          [(v.value, v.count) for v in reply.values]))


def is_member_many_call(profile_ids: Iterable[str], rule: Any, segment: str | None,
                        as_of: datetime | str | None) -> _Unary:
    ids = list(profile_ids)
    request = pb.IsMemberBatchRequest(profile_ids=ids, **_query(rule, segment, as_of))
    return _Unary("IsMemberBatch", request, lambda reply: BatchMembership(
        dict(zip(ids, reply.member, strict=True)), list(reply.unknown_ids),
        convert.to_datetime(reply.as_of), list(reply.member)))


def segments_of_many_call(profile_ids: Iterable[str], as_of: datetime | str | None) -> _Unary:
    request = pb.SegmentsOfBatchRequest(profile_ids=list(profile_ids),
                                        as_of=convert.to_timestamp(as_of))
    return _Unary("SegmentsOfBatch", request, lambda reply: BatchSegments(
        {p.profile_id: list(p.segments) for p in reply.profiles}, list(reply.unknown_ids),
        convert.to_datetime(reply.as_of)))


def profile_call(profile_id: str) -> _Unary:
    return _Unary("GetProfile", pb.GetProfileRequest(profile_id=profile_id), profile_of)


def profile_of(reply: pb.Profile) -> Profile:
    """A Profile reply; its Struct's integral numbers (doubles on the wire) as ints."""
    return Profile(reply.id, {k: _number(v) for k, v in
                              json_format.MessageToDict(reply.fields).items()})


def _number(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() \
            and abs(value) <= EXACT_DOUBLE:
        return int(value)
    if isinstance(value, list):
        return [_number(v) for v in value]
    return value


def delete_profiles_call(profile_ids: Iterable[str]) -> _Unary:
    return _Unary("DeleteProfiles", pb.DeleteProfilesRequest(profile_ids=list(profile_ids)),
                  lambda reply: reply.deleted)


def create_segment_call(name: str, kind: str, rule: Any, profile_ids: Iterable[str],
                        as_of: datetime | str | None, refresh_every: int | None,
                        tags: Iterable[str] = (), template: str | None = None,
                        params: Mapping[str, Any] | None = None) -> _Unary:
    if kind not in SEGMENT_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(SEGMENT_KINDS)}, got {kind!r}")
    source = {} if rule is None else convert.rule_target(rule)
    request = pb.CreateSegmentRequest(
        name=name, kind=SEGMENT_KINDS[kind], **source, profile_ids=list(profile_ids),
        as_of=convert.to_timestamp(as_of), refresh_every_seconds=refresh_every or 0,
        tags=list(tags), template=template or "",
        params={k: param_text(v) for k, v in (params or {}).items()})
    return _Unary("CreateSegment", request, segment_of)


def param_text(value: Any) -> str:
    """A template parameter's value as the text the server reads by its type."""
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()  # numbers, true/false, lists as JSON


def tags_call(method: str, name: str, tags: Iterable[str]) -> _Unary:
    request = pb.SegmentTagsRequest(name=name, tags=list(tags))
    return _Unary(method, request, segment_of)


def templates_call() -> _Unary:
    return _Unary("ListTemplates", pb.ListTemplatesRequest(),
                  lambda reply: [template_of(t) for t in reply.templates])


def template_of(template: pb.Template) -> Template:
    return Template(template.name, template.description,
                    [TemplateParam(p.name, p.type, orjson.loads(p.default_json), p.description,
                                   p.min if p.HasField("min") else None)
                     for p in template.params],
                    orjson.loads(template.rule_json), template.builtin)


def update_segment_call(name: str, rule: Any, refresh_every: int | None,
                        as_of: datetime | str | None) -> _Unary:
    source = {} if rule is None else convert.rule_target(rule)
    request = pb.UpdateSegmentRequest(name=name, **source, as_of=convert.to_timestamp(as_of))
    if refresh_every is not None:
        request.refresh_every_seconds = refresh_every
    return _Unary("UpdateSegment", request, segment_of)


def split_segment_call(name: str, salt: str, into: Mapping[str, float] | Iterable[Any],
                       rule: Any, prefix: str | None, as_of: datetime | str | None) -> _Unary:
    pairs = list(into.items()) if isinstance(into, Mapping) else list(into)
    source = {} if rule is None else convert.rule_target(rule)
    request = pb.SplitSegmentRequest(
        name=name, salt=salt, **source, prefix=prefix or "", as_of=convert.to_timestamp(as_of),
        into=[pb.SplitPart(label=label, percent=percent) for label, percent in pairs])
    return _Unary("SplitSegment", request,
                  lambda reply: [segment_of(s) for s in reply.segments])


def get_segment_call(name: str) -> _Unary:
    return _Unary("GetSegment", pb.GetSegmentRequest(name=name), segment_of)


def list_segments_call(tag: str | None = None) -> _Unary:
    return _Unary("ListSegments", pb.ListSegmentsRequest(tag=tag or ""),
                  lambda reply: [segment_of(s) for s in reply.segments])


def delete_segment_call(name: str) -> _Unary:
    return _Unary("DeleteSegment", pb.DeleteSegmentRequest(name=name), lambda reply: None)


def segment_of(segment: pb.Segment) -> Segment:
    def moment(name: str) -> datetime | None:
        return convert.to_datetime(getattr(segment, name)) if segment.HasField(name) else None

    return Segment(segment.name, _KIND_NAMES.get(segment.kind, "unspecified"),
                   orjson.loads(segment.rule_json) if segment.rule_json else None,
                   segment.size, moment("created_at"), moment("refreshed_at"),
                   segment.refresh_every_seconds or None, segment.entered, segment.exited,
                   list(segment.unknown_ids), list(segment.tags))


def add_to_segment_call(name: str, profile_ids: Iterable[str]) -> _Unary:
    request = pb.AddToSegmentRequest(name=name, profile_ids=list(profile_ids))
    return _Unary("AddToSegment", request, membership_change_of)


def remove_from_segment_call(name: str, profile_ids: Iterable[str]) -> _Unary:
    request = pb.RemoveFromSegmentRequest(name=name, profile_ids=list(profile_ids))
    return _Unary("RemoveFromSegment", request, membership_change_of)


def membership_change_of(reply: pb.SegmentMembershipReply) -> MembershipChange:
    return MembershipChange(reply.changed, reply.size, list(reply.unknown_ids))


def refresh_segment_call(name: str, as_of: datetime | str | None) -> _Unary:
    request = pb.RefreshSegmentRequest(name=name, as_of=convert.to_timestamp(as_of))
    return _Unary("RefreshSegment", request, lambda reply: RefreshResult(
        reply.size, reply.entered, reply.exited, reply.eval_micros,
        convert.to_datetime(reply.as_of)))


def segment_history_call(name: str) -> _Unary:
    return _Unary("SegmentHistory", pb.SegmentHistoryRequest(name=name),
                  lambda reply: [size_point_of(p) for p in reply.points])


def record_segment_size_call(name: str, as_of: datetime | str | None) -> _Unary:
    request = pb.RecordSegmentSizeRequest(name=name, as_of=convert.to_timestamp(as_of))
    return _Unary("RecordSegmentSize", request, size_point_of)


def size_point_of(point: pb.SizePoint) -> SizePoint:
    return SizePoint(convert.to_datetime(point.time), point.size, point.cause)


def health_status(reply: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class _Upload:
    """A client-streaming ingest call: iterate it for its messages, one per batch.

    gRPC consumes the messages on its own thread (or event loop): a failure while making
    them ends the stream (the batches sent so far commit) and is raised by result(), in
    the caller's thread.
    """

    def __init__(self, method: str, message: Any, field: str, items: Iterable[Any],
                 batch_size: int, result: Callable[[Any], Any]) -> None:
        self.method = method
        self._message, self._field, self._result = message, field, result
        self._items, self._batch_size = items, batch_size
        self._failed: Exception | None = None

    def __iter__(self) -> Iterator[Any]:
        try:
            for batch in _batches(self._items, self._batch_size):
                yield self._message(**{self._field: [_json_text(r) for r in batch]})
        except Exception as exc:
            self._failed = exc

    def result(self, reply: Any) -> Any:
        if self._failed is not None:
            raise InvalidArgumentError("INVALID_ARGUMENT", f"batch {reply.batches + 1} (the "
                                       f"{reply.batches} before it committed): {self._failed}")
        return self._result(reply)


def upsert_upload(profiles: Iterable[Any], batch_size: int) -> _Upload:
    return _Upload("UpsertProfiles", pb.ProfileBatch, "profiles_json", profiles, batch_size,
                   lambda reply: UpsertResult(reply.batches, reply.created, reply.updated,
                                              reply.version))


def events_upload(events: Iterable[Any], batch_size: int) -> _Upload:
    return _Upload("TrackEvents", pb.EventBatch, "events_json", events, batch_size,
                   lambda reply: reply.events)


def orders_upload(orders: Iterable[Any], batch_size: int) -> _Upload:
    return _Upload("AddOrders", pb.OrderBatch, "orders_json", orders, batch_size,
                   lambda reply: reply.orders)


def _query(rule: Any, segment: str | None, as_of: datetime | str | None) -> dict[str, Any]:
    """The target and as_of fields of an evaluating request."""
    return {**convert.rule_target(rule, segment), "as_of": convert.to_timestamp(as_of)}


def _json_text(record: Any) -> str:
    """A record as the JSON text a batch message carries; a str (or bytes) record is
    taken to be that text already (a line of a JSON Lines file) and sent as it is."""
    if isinstance(record, str):
        return record
    if isinstance(record, bytes):
        return record.decode()
    return orjson.dumps(record).decode()


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Records (dicts, or JSON texts as str/bytes) grouped `size` at a time; a list (or
    tuple) item is a batch of its own."""
    batch: list[Any] = []
    for item in items:
        if isinstance(item, (Mapping, str, bytes)):
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
