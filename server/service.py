"""The gRPC servicer: convert the request, call the engine, convert the reply.

Errors are mapped to status codes in one place (`status_of`), and every RPC goes through
`rpc`, so a bad request gets a clear status and an unexpected failure becomes INTERNAL
with its traceback in the log; the server never dies of either.
"""

from __future__ import annotations

import functools
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc
import orjson

from bitseg.index import batch as batches
from bitseg.index import bulk, describe, exports, insights, traits
from bitseg.index.engine import Engine, as_of_micros
from bitseg.index.errors import (
    AlreadyExists,
    BitsegError,
    DataError,
    NotFound,
    PartUnavailable,
    RuleError,
    SchemaError,
    SourceUnavailable,
    StoreError,
    StoreFull,
)
from bitseg.index.evaluate import Evaluator
from bitseg.index.explain import explain
from bitseg.index.export import check_fields, profile_rows
from bitseg.index.fields import ids_of
from bitseg.index.segments import SegmentInUse, Segments
from bitseg.index.split import split_segment
from bitseg.index.templates import Catalogue, load_catalogue
from bitseg.loaders.columnar import decoded, numbered_on, texts_block
from bitseg.server import convert
from bitseg.v1 import bitseg_pb2 as pb
from bitseg.v1 import bitseg_pb2_grpc as pb_grpc

log = logging.getLogger("bitseg.server")

NO_SEGMENTS = "this server runs without segments"
PREVIEW_DEFAULT, PREVIEW_MAX = 10, 1000
COMMITTED_KEY = "bitseg-committed-batches"
# Group commit: the messages of a stream that arrived while a transaction ran are applied
# together in the next one, up to this many records (see _batches). Each transaction
# rewrites every count bucket its events touch, so fewer, larger ones cost less: 3M
# events in 10k messages took the handler 7.15-7.45 s of CPU at 300k, 7.42-7.69 s at
# 100k (RESULTS.md, session 10).
GROUP_RECORDS = 300_000
INBOX_MESSAGES = 64  # messages read ahead of the one being applied, at most
# The kind of records a stream's messages carry, by their field: what the thread reading
# the stream prepares of each message ahead of its turn (loaders/columnar.decoded).
KINDS = {"profiles_json": "profiles", "events_json": "events", "orders_json": "orders"}


class Unimplemented(Exception):
    """What this server version does not do yet."""


class Unauthenticated(Exception):
    """A call without a token, or with one the server does not know."""


class PermissionDenied(Exception):
    """A read token on a call that writes."""


class Busy(Exception):
    """The server's limit on concurrent streams is reached."""


class Expired(Exception):
    """The call's deadline passed, or its stream sat idle too long."""


class BadRequest(Exception):
    """A request message that does not decode."""


class Cancelled(Exception):
    """The client went away in the middle of a stream."""


class ShardUnavailable(PartUnavailable):
    """A shard of a sharded store did not answer (its actor died); names the shard."""


# ------------------------------------------------------------------ the error mapping
_STATUS: tuple[tuple[type[Exception], grpc.StatusCode, str], ...] = (
    (StoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    (Unimplemented, grpc.StatusCode.UNIMPLEMENTED, ""),
    (Unauthenticated, grpc.StatusCode.UNAUTHENTICATED, ""),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED, ""),
    (Busy, grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    (Expired, grpc.StatusCode.DEADLINE_EXCEEDED, ""),
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT, "invalid request: "),
    (Cancelled, grpc.StatusCode.CANCELLED, ""),
    (SourceUnavailable, grpc.StatusCode.UNAVAILABLE, ""),  # an sql rule's database is down
    (ShardUnavailable, grpc.StatusCode.UNAVAILABLE, ""),  # serve --shards: a shard died
    (RuleError, grpc.StatusCode.INVALID_ARGUMENT, "invalid rule: "),
    (DataError, grpc.StatusCode.INVALID_ARGUMENT, "invalid data: "),
    (SchemaError, grpc.StatusCode.INVALID_ARGUMENT, "invalid schema: "),
    (NotFound, grpc.StatusCode.NOT_FOUND, ""),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, ""),
    (SegmentInUse, grpc.StatusCode.FAILED_PRECONDITION, ""),
    (StoreError, grpc.StatusCode.INTERNAL, "store error: "),  # not the caller's fault
    (BitsegError, grpc.StatusCode.INVALID_ARGUMENT, ""),
)


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed call answers with."""
    for kind, code, prefix in _STATUS:
        if isinstance(exc, kind):
            return code, prefix + str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def _abort(context: grpc.ServicerContext, exc: Exception, name: str) -> NoReturn:
    code, message = status_of(exc)
    if code is grpc.StatusCode.INTERNAL:  # the gate logs one line per failed call;
        log.error("%s: internal error", name, exc_info=exc)  # this is the traceback
    context.abort(code, message)


F = TypeVar("F", bound=Callable[..., Any])


def rpc(method: F) -> F:
    """Run an RPC method (unary result or generator) under the error mapping."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as exc:
                _abort(context, exc, method.__name__)
        return streaming  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            _abort(context, exc, method.__name__)
    return unary  # type: ignore[return-value]


def _micros_since(start_ns: int) -> int:
    return (time.perf_counter_ns() - start_ns) // 1000


# ------------------------------------------------------------------ the servicer
class SegmentsServicer(pb_grpc.SegmentsServicer):
    """bitseg.v1.Segments over one open Engine."""

    def __init__(self, engine: Engine, segments: Segments | None = None,
                 templates: Catalogue | None = None) -> None:
        self.engine = engine
        self._segments = segments
        self.templates = templates if templates is not None else load_catalogue()

    @property
    def segments(self) -> Segments:
        if self._segments is None:
            raise Unimplemented(NO_SEGMENTS)
        return self._segments

    # ---------------------------------------------------------------- evaluation
    @rpc
    def Count(self, request: pb.CountRequest, context: grpc.ServicerContext) -> pb.CountReply:
        rule = convert.target_of(request)
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        count = self.engine.count(rule, as_of=as_of)
        return pb.CountReply(count=count, eval_micros=_micros_since(start),
                             as_of=convert.to_timestamp(as_of))

    @rpc
    def Members(self, request: pb.MembersRequest,
                context: grpc.ServicerContext) -> Iterator[pb.MembersPage]:
        rule = convert.target_of(request)
        cursor = convert.Cursor.decode(request.cursor) if request.cursor else None
        as_of = convert.as_of_of(request) or (cursor.as_of if cursor else convert.now())
        page_size = convert.page_size_of(request)
        fields = check_fields(self.engine, request.fields) if request.fields else None
        version = self.engine.snapshot.version
        start = time.perf_counter_ns()
        found = self.engine.evaluate(rule, as_of=as_of)
        eval_micros = _micros_since(start)
        total = len(found)
        _check_deadline(context, 0, total)
        position = found.rank(cursor.last) if cursor else 0
        end = total if not request.limit else min(total, position + request.limit)
        last = cursor.last if cursor else None
        as_of_us, as_of_ts = convert.micros_of(as_of), convert.to_timestamp(as_of)
        while True:
            stop = min(position + page_size, end)
            page = found[position:stop]  # one page of dense ids; strings only for it
            if page:
                last = page.max()
            dense = ids_of(page)
            rows = [] if fields is None else profile_rows(self.engine, dense, fields)
            yield pb.MembersPage(
                ids=[row["id"] for row in rows] if rows else self.engine.ids.externals(dense),
                rows_json=[orjson.dumps(row).decode() for row in rows],
                cursor="" if last is None else convert.Cursor(version, last, as_of_us).encode(),
                done=stop >= total, total=total, eval_micros=eval_micros, as_of=as_of_ts)
            position = stop
            if position >= end or not context.is_active():
                return
            _check_deadline(context, position, total)

    @rpc
    def IsMember(self, request: pb.IsMemberRequest,
                 context: grpc.ServicerContext) -> pb.IsMemberReply:
        rule = convert.target_of(request)
        as_of = convert.as_of_of(request) or convert.now()
        member = self.engine.is_member(_profile_id(request.profile_id), rule, as_of=as_of)
        return pb.IsMemberReply(member=member, as_of=convert.to_timestamp(as_of))

    @rpc
    def SegmentsOf(self, request: pb.SegmentsOfRequest,
                   context: grpc.ServicerContext) -> pb.SegmentsOfReply:
        as_of = convert.as_of_of(request) or convert.now()
        names = self.segments.segments_of(_profile_id(request.profile_id), as_of=as_of)
        return pb.SegmentsOfReply(segments=names)

    @rpc
    def Explain(self, request: pb.ExplainRequest,
                context: grpc.ServicerContext) -> pb.ExplainReply:
        rule = convert.target_of(request)
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        snap = self.engine.snapshot
        found = explain(snap, rule, self.engine.parse(rule, snap), as_of_micros(as_of))
        return pb.ExplainReply(root=convert.explain_node(found.root), text=found.text,
                               sentence=found.sentence, eval_micros=_micros_since(start),
                               as_of=convert.to_timestamp(as_of))

    # ---------------------------------------------------------------- describe, batches
    @rpc
    def ListSources(self, request: pb.ListSourcesRequest,
                    context: grpc.ServicerContext) -> pb.ListSourcesReply:
        from bitseg.server.sources import Sources

        sources = self.engine.snapshot.external
        if not isinstance(sources, Sources):  # served without --sources
            return pb.ListSourcesReply()
        return convert.sources_reply(sources.status(), sources.sources)

    @rpc
    def Describe(self, request: pb.DescribeRequest,
                 context: grpc.ServicerContext) -> pb.DescribeReply:
        top = min(request.top or describe.DEFAULT_TOP, describe.MAX_TOP)
        start = time.perf_counter_ns()
        found = describe.describe(self.engine.snapshot, top)
        return convert.describe_reply(found, _micros_since(start))

    @rpc
    def Values(self, request: pb.ValuesRequest,
               context: grpc.ServicerContext) -> pb.ValuesReply:
        limit = min(request.limit or describe.DEFAULT_TOP, describe.MAX_VALUES)
        return convert.values_reply(describe.values(self.engine.snapshot, request.field, limit))

    @rpc
    def IsMemberBatch(self, request: pb.IsMemberBatchRequest,
                      context: grpc.ServicerContext) -> pb.IsMemberBatchReply:
        rule = convert.target_of(request)
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        found = batches.is_member_many(self.engine, request.profile_ids, rule, as_of=as_of)
        return pb.IsMemberBatchReply(member=found.member, unknown_ids=found.unknown,
                                     as_of=convert.to_timestamp(as_of),
                                     eval_micros=_micros_since(start))

    @rpc
    def SegmentsOfBatch(self, request: pb.SegmentsOfBatchRequest,
                        context: grpc.ServicerContext) -> pb.SegmentsOfBatchReply:
        as_of = convert.as_of_of(request) or convert.now()
        self.segments  # noqa: B018 -- UNIMPLEMENTED on a server without segments
        found = batches.segments_of_many(self.engine, request.profile_ids, as_of=as_of)
        unknown = set(found.unknown)
        return pb.SegmentsOfBatchReply(
            profiles=[pb.ProfileSegments(profile_id=p, segments=names, unknown=p in unknown)
                      for p, names in zip(request.profile_ids, found.segments, strict=True)],
            unknown_ids=found.unknown, as_of=convert.to_timestamp(as_of))

    @rpc
    def Preview(self, request: pb.PreviewRequest,
                context: grpc.ServicerContext) -> pb.PreviewReply:
        rule = convert.target_of(request)
        as_of = convert.as_of_of(request) or convert.now()
        limit = min(request.limit or PREVIEW_DEFAULT, PREVIEW_MAX)
        start = time.perf_counter_ns()
        found = self.engine.evaluate(rule, as_of=as_of)
        rows = profile_rows(self.engine, ids_of(found)[:limit])
        return pb.PreviewReply(total=len(found), profiles=[convert.profile_reply(r) for r in rows],
                               eval_micros=_micros_since(start),
                               as_of=convert.to_timestamp(as_of))

    @rpc
    def Metrics(self, request: pb.MetricsRequest,
                context: grpc.ServicerContext) -> pb.MetricsReply:
        rule = convert.target_of(request)
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        metrics = self.segments.metrics(rule, as_of=as_of,
                                        amount_field=request.amount_field or "amount")
        reply = convert.metrics_reply(metrics)
        reply.eval_micros = _micros_since(start)
        reply.as_of.CopyFrom(convert.to_timestamp(as_of))
        return reply

    @rpc
    def Overlap(self, request: pb.OverlapRequest,
                context: grpc.ServicerContext) -> pb.OverlapReply:
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        reply = convert.overlap_reply(self.segments.overlap(list(request.segments), as_of=as_of))
        reply.eval_micros = _micros_since(start)
        reply.as_of.CopyFrom(convert.to_timestamp(as_of))
        return reply

    @rpc
    def GetProfile(self, request: pb.GetProfileRequest,
                   context: grpc.ServicerContext) -> pb.Profile:
        return convert.profile_reply(self.engine.profile(_profile_id(request.profile_id)))

    # ---------------------------------------------------------------- insights, exports
    @rpc
    def Insights(self, request: pb.InsightsRequest,
                 context: grpc.ServicerContext) -> pb.InsightsReply:
        rule = convert.target_of(request)
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        snap = self.engine.snapshot
        as_of_us = as_of_micros(as_of)
        audience = Evaluator(snap, as_of_us).bitmap(self.engine.parse(rule, snap))
        found = insights.insights(snap, audience, as_of_us, list(request.fields),
                                  request.top or insights.DEFAULT_TOP,
                                  request.buckets or insights.BUCKETS,
                                  request.amount_field or "amount")
        reply = convert.insights_reply(found, _micros_since(start))
        reply.as_of.CopyFrom(convert.to_timestamp(as_of))
        return reply

    @property
    def exports(self) -> exports.Exports:
        self.segments  # noqa: B018 -- UNIMPLEMENTED on a server without segments
        return exports.Exports(self.engine)

    @rpc
    def CreateExportSchedule(self, request: pb.CreateExportScheduleRequest,
                             context: grpc.ServicerContext) -> pb.ExportSchedule:
        made = self.exports.create(request.segment, request.every_seconds,
                                   list(request.fields), list(request.require),
                                   request.format or "csv", request.out, request.rotate)
        return convert.export_schedule_reply(made)

    @rpc
    def ListExportSchedules(self, request: pb.ListExportSchedulesRequest,
                            context: grpc.ServicerContext) -> pb.ListExportSchedulesReply:
        return pb.ListExportSchedulesReply(
            schedules=[convert.export_schedule_reply(s) for s in self.exports.list()])

    @rpc
    def DeleteExportSchedule(self, request: pb.DeleteExportScheduleRequest,
                             context: grpc.ServicerContext) -> pb.DeleteExportScheduleReply:
        self.exports.delete(request.id)
        return pb.DeleteExportScheduleReply()

    # ---------------------------------------------------------------- bulk actions, traits
    @rpc
    def BulkAction(self, request: pb.BulkActionRequest,
                   context: grpc.ServicerContext) -> pb.BulkActionReply:
        action = convert.bulk_action_of(request)
        done = bulk.run(self.engine, action, as_of=convert.as_of_of(request) or convert.now(),
                        dry_run=request.dry_run)
        return convert.bulk_action_reply(done)

    @rpc
    def ListActions(self, request: pb.ListActionsRequest,
                    context: grpc.ServicerContext) -> pb.ListActionsReply:
        entries = bulk.list_entries(self.engine, request.limit)
        return pb.ListActionsReply(entries_json=[orjson.dumps(e).decode() for e in entries])

    @rpc
    def RefreshTraits(self, request: pb.RefreshTraitsRequest,
                      context: grpc.ServicerContext) -> pb.RefreshTraitsReply:
        report = traits.refresh(self.engine, request.config_json or None,
                                as_of=convert.as_of_of(request) or convert.now())
        return convert.refresh_traits_reply(report)

    # ---------------------------------------------------------------- segments
    @rpc
    def CreateSegment(self, request: pb.CreateSegmentRequest,
                      context: grpc.ServicerContext) -> pb.Segment:
        as_of = convert.as_of_of(request) or convert.now()
        rule, tags = self.templates.source(request.template, dict(request.params),
                                           convert.source_of(request))
        info, change = self.segments.create(
            request.name, convert.kind_of(request.kind), rule=rule,
            ids=list(request.profile_ids), as_of=as_of,
            refresh_every=request.refresh_every_seconds or None,
            tags=[*request.tags, *tags])
        return convert.segment_reply(info, change)

    @rpc
    def UpdateSegment(self, request: pb.UpdateSegmentRequest,
                      context: grpc.ServicerContext) -> pb.Segment:
        as_of = convert.as_of_of(request) or convert.now()
        every = request.refresh_every_seconds if request.HasField("refresh_every_seconds") \
            else None
        info, change = self.segments.update(
            request.name, rule=convert.source_of(request), refresh_every=every or None,
            clear_refresh_every=every == 0, as_of=as_of)
        return convert.segment_reply(info, change)

    @rpc
    def SplitSegment(self, request: pb.SplitSegmentRequest,
                     context: grpc.ServicerContext) -> pb.SplitSegmentReply:
        made = split_segment(self.segments, request.name, request.salt,
                             [(p.label, p.percent) for p in request.into],
                             rule=convert.source_of(request), prefix=request.prefix or None,
                             as_of=convert.as_of_of(request) or convert.now())
        return pb.SplitSegmentReply(segments=[convert.segment_reply(i, c) for i, c in made])

    @rpc
    def GetSegment(self, request: pb.GetSegmentRequest,
                   context: grpc.ServicerContext) -> pb.Segment:
        return convert.segment_reply(self.segments.get(request.name, as_of=convert.now()))

    @rpc
    def ListSegments(self, request: pb.ListSegmentsRequest,
                     context: grpc.ServicerContext) -> pb.ListSegmentsReply:
        infos = self.segments.list(as_of=convert.now(), tag=request.tag or None)
        return pb.ListSegmentsReply(segments=[convert.segment_reply(info) for info in infos])

    @rpc
    def AddTags(self, request: pb.SegmentTagsRequest,
                context: grpc.ServicerContext) -> pb.Segment:
        return convert.segment_reply(self.segments.retag(request.name, add=request.tags))

    @rpc
    def RemoveTags(self, request: pb.SegmentTagsRequest,
                   context: grpc.ServicerContext) -> pb.Segment:
        return convert.segment_reply(self.segments.retag(request.name, remove=request.tags))

    @rpc
    def ListTemplates(self, request: pb.ListTemplatesRequest,
                      context: grpc.ServicerContext) -> pb.ListTemplatesReply:
        return pb.ListTemplatesReply(
            templates=[convert.template_reply(t) for t in self.templates])

    @rpc
    def DeleteSegment(self, request: pb.DeleteSegmentRequest,
                      context: grpc.ServicerContext) -> pb.DeleteSegmentReply:
        self.segments.delete(request.name)
        return pb.DeleteSegmentReply()

    @rpc
    def AddToSegment(self, request: pb.AddToSegmentRequest,
                     context: grpc.ServicerContext) -> pb.SegmentMembershipReply:
        change = self.segments.add(request.name, list(request.profile_ids))
        return pb.SegmentMembershipReply(changed=change.entered, size=change.size,
                                         unknown_ids=change.unknown)

    @rpc
    def RemoveFromSegment(self, request: pb.RemoveFromSegmentRequest,
                          context: grpc.ServicerContext) -> pb.SegmentMembershipReply:
        change = self.segments.remove(request.name, list(request.profile_ids))
        return pb.SegmentMembershipReply(changed=change.exited, size=change.size,
                                         unknown_ids=change.unknown)

    @rpc
    def RefreshSegment(self, request: pb.RefreshSegmentRequest,
                       context: grpc.ServicerContext) -> pb.RefreshSegmentReply:
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        change = self.segments.refresh(request.name, as_of=as_of)
        return pb.RefreshSegmentReply(size=change.size, entered=change.entered,
                                      exited=change.exited, eval_micros=_micros_since(start),
                                      as_of=convert.to_timestamp(as_of))

    @rpc
    def SegmentHistory(self, request: pb.SegmentHistoryRequest,
                       context: grpc.ServicerContext) -> pb.SegmentHistoryReply:
        return pb.SegmentHistoryReply(
            points=[convert.point_reply(p) for p in self.segments.history(request.name)])

    @rpc
    def RecordSegmentSize(self, request: pb.RecordSegmentSizeRequest,
                          context: grpc.ServicerContext) -> pb.SizePoint:
        as_of = convert.as_of_of(request) or convert.now()
        return convert.point_reply(self.segments.record_size(request.name, as_of=as_of))

    # ---------------------------------------------------------------- ingestion
    @rpc
    def UpsertProfiles(self, request_iterator: Iterator[pb.ProfileBatch],
                       context: grpc.ServicerContext) -> pb.UpsertProfilesReply:
        reply = pb.UpsertProfilesReply()
        for messages, report in _batches(request_iterator, "profiles_json",
                                         self.engine.upsert_profiles, context):
            reply.batches += messages
            reply.created += report.created
            reply.updated += report.updated
            reply.version = report.version
        return reply

    @rpc
    def DeleteProfiles(self, request: pb.DeleteProfilesRequest,
                       context: grpc.ServicerContext) -> pb.DeleteProfilesReply:
        ids = [_profile_id(p) for p in request.profile_ids]
        return pb.DeleteProfilesReply(deleted=self.engine.delete_profiles(ids))

    @rpc
    def TrackEvents(self, request_iterator: Iterator[pb.EventBatch],
                    context: grpc.ServicerContext) -> pb.TrackEventsReply:
        reply = pb.TrackEventsReply()
        for messages, report in _batches(request_iterator, "events_json",
                                         self.engine.track_events, context):
            reply.batches += messages
            reply.events += report.rows
        return reply

    @rpc
    def AddOrders(self, request_iterator: Iterator[pb.OrderBatch],
                  context: grpc.ServicerContext) -> pb.AddOrdersReply:
        reply = pb.AddOrdersReply()
        for messages, report in _batches(request_iterator, "orders_json",
                                         self.engine.add_orders, context):
            reply.batches += messages
            reply.orders += report.rows
        return reply


def _batches(requests: Iterator[Any], field: str, apply: Callable[[Any], Any],
             context: grpc.ServicerContext) -> Iterator[tuple[int, Any]]:
    """Apply the streamed batches; yield (how many, the report of their transaction).

    Every message is one batch, all of it or nothing, applied as soon as the batch before
    has been. The messages that arrived meanwhile are applied together, in one
    transaction (group commit), so a batch's fixed cost is paid once for them all. When
    that transaction fails they are applied one by one: a bad batch fails the call naming
    it, the batches before it stay committed, and their number goes in the trailing
    metadata, as without grouping. The thread reading the stream parses each message
    (and prepares its columns) while the batches before it are applied.
    """
    committed = 0
    decode = functools.partial(_decoded, KINDS[field])
    for group in _arrived(requests, field, decode):
        if len(group) > 1 and not any(isinstance(items, Exception) for _, items in group):
            try:  # one engine batch: its fixed cost paid once
                report = apply(numbered_on([(len(texts), items) for texts, items in group]))
            except Exception:  # the batch at fault fails again below, alone, and is named
                report = None
            if report is not None:
                committed += len(group)
                yield len(group), report
                continue
        for texts, items in group:
            try:  # parsed again after a failed group or parse: its error names the record
                fresh = len(group) > 1 or isinstance(items, Exception)
                report = apply(texts_block(texts) if fresh else items)
            except DataError as exc:
                context.set_trailing_metadata(((COMMITTED_KEY, str(committed)),))
                raise DataError(f"batch {committed + 1} ({committed} before it committed): "
                                f"{exc}") from None
            committed += 1
            yield 1, report


def _decoded(kind: str, texts: Any) -> Any:
    """A message's engine items made ahead (columnar.decoded), or what parsing it raised:
    raised again, in its turn, where the batch can be named."""
    try:
        return decoded(texts, kind)
    except Exception as exc:  # raised again by texts_block when the batch is applied
        return exc


def _arrived(requests: Iterator[Any], field: str,
             decode: Callable[[Any], Any] | None = None) -> Iterator[list[Any]]:
    """The messages' record texts in groups: the next message, with those that arrived
    behind it (read by a helper thread), up to GROUP_RECORDS records. An error reading
    the stream (the client cancelled, the stream idled) is raised after the messages
    before it were handed out. With `decode`, each message is handed out as (texts,
    decode(texts)), decoded on the helper thread as it arrives.

    The helper reads at most INBOX_MESSAGES ahead: a client sending faster than the
    store applies is held back by gRPC's flow control, not buffered in the server's
    memory. It stops when the call ends, however it ends."""
    inbox: queue.Queue[tuple[bool, Any, int]] = queue.Queue(maxsize=INBOX_MESSAGES)
    done = threading.Event()

    def put(item: tuple[bool, Any, int]) -> bool:
        while not done.is_set():
            try:
                inbox.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the call ended: nobody reads on

    def pump() -> None:
        try:
            for message in requests:
                texts = getattr(message, field)
                item = texts if decode is None else (texts, decode(texts))
                if not put((True, item, len(texts))):
                    return
            put((False, None, 0))
        except Exception as exc:  # raised by the handler, after the batches before it
            put((False, exc, 0))

    threading.Thread(target=pump, name=f"bitseg-group-{field}", daemon=True).start()
    try:
        yield from _groups(inbox)
    finally:
        done.set()


def _groups(inbox: queue.Queue[tuple[bool, Any, int]]) -> Iterator[list[Any]]:
    waiting: tuple[bool, Any, int] | None = None  # taken from the inbox, not handed out
    while True:
        more, item, records = waiting or inbox.get()
        waiting = None
        if not more:
            if item is not None:
                raise item
            return
        group, size = [item], records
        while size < GROUP_RECORDS:
            try:
                waiting = inbox.get_nowait()
            except queue.Empty:
                break
            if not waiting[0]:  # the end of the stream, or an error: after this group
                break
            group.append(waiting[1])
            size += waiting[2]
            waiting = None
        yield group


def _check_deadline(context: grpc.ServicerContext, sent: int, total: int) -> None:
    """Expired once the caller's deadline has passed: a stream it cut short is never OK."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise Expired(f"the deadline passed after {sent:,} of {total:,} ids were sent")


def _profile_id(profile_id: str) -> str:
    if not profile_id:
        raise BitsegError("profile_id: expected a non-empty profile id")
    return profile_id
