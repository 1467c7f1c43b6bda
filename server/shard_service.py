"""The gRPC servicer of a sharded store: the same bitseg.v1.Segments API, fanned out.

- Count: the sum of the shards' counts. Explain: shard 0's words, each node's count
  summed over the shards; a node's note when every shard notes it (shard 0's words).
- Members (with fields too), Preview: shard by shard (shard 0 first), each shard's
  members in its dense id order (the order profiles were first seen on that shard).
  The cursor names the shard and the last id given, so the order is the same on every
  page of one stream and across cursors; the front holds one page, never a whole
  member list.
- IsMember, SegmentsOf, GetProfile: the profile's shard alone. IsMemberBatch,
  SegmentsOfBatch: each shard is asked about its own ids, the answers are put back in
  the request's order. Metrics and Overlap: the shards' numbers summed.
- Segments: create and split (every shard or none), delete, get, list, refresh; sizes,
  entries and exits are summed over the shards.
- Describe, Values (every shard's values summed and ranked again, quantiles by a search
  over all shards' values), SegmentHistory (the shards' points as one) and Insights (a
  number, date or timestamp field's buckets cut on the shards' common key grid, as one
  store cuts them; its quantiles by Describe's search): shard_reads.
- Export schedules: kept in shard 0's store; a run writes one file, shard by shard (as
  Members orders them), asking one shard at a time (shard_reads.ShardExports).
- A rule with a `top` node over more than one shard: its top sets are chosen over all
  shards first (shard_reads.resolve_tops), then every read above evaluates with them.
  A static or materialized segment with a `top` rule is created, updated, split and
  refreshed the same way, each shard counting its part with those sets
  (shard_segments); a read that meets a dynamic one's top node is refused by the
  shards and asked again with its sets chosen (shard_reads, "asked again").
- Scheduled refresh (refresh_every): the front's RefreshScheduler asks every shard which
  materialized segments are due and refreshes each through the front (shard_segments).
- UpsertProfiles, TrackEvents, AddOrders, DeleteProfiles: each batch on every shard or
  none, by a two-phase commit (shard_writes). UpdateSegment, AddTags, RemoveTags: shard
  0 first, then the others, put back on a failure; RecordSegmentSize on every shard.
- BulkAction (every shard acts on its own members, counts summed), ListActions (the
  shards' entries of one action id merged) and RefreshTraits (the RFM quintiles cut
  over every shard's metrics), each on every shard or none by the same two-phase
  commit: shard_actions.
- {"sql": ...} rules (serve --shards N --sources F) and ListSources: the front holds the
  sources and runs each query once per RPC, every shard evaluating with its part of the
  ids (shard_sources); every RPC holds that pin of answers for all its shard calls.
- An RPC not in SHARDED (none today) answers UNIMPLEMENTED "<RPC> is not yet supported
  with --shards", never a wrong answer.
"""

from __future__ import annotations

import base64
import functools
import inspect
import logging
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import grpc
import orjson

from bitseg.index import describe, insights
from bitseg.index import types as T
from bitseg.index.batch import check_size
from bitseg.index.segments import Change
from bitseg.index.sqlrule import summed_note
from bitseg.server import convert, shard_actions
from bitseg.server.convert import CursorError
from bitseg.server.service import (
    PREVIEW_DEFAULT,
    PREVIEW_MAX,
    SegmentsServicer,
    Unimplemented,
    _micros_since,
    _profile_id,
    rpc,
)
from bitseg.server.shard_reads import (
    EVERY,
    ResolvedShards,
    ShardExports,
    export_scheduler,
    merge_description,
    merge_history,
    merge_insights,
    merge_values,
    ranged_insights,
    resolve_tops,
)
from bitseg.server.shard_segments import (
    SegmentChanges,
    changes_for,
    has_top,
    may_meet_top,
    refresh_scheduler,
)
from bitseg.server.shard_sources import install, pinned_calls
from bitseg.server.shard_writes import (
    DELETE,
    ShardWrites,
    split_ids,
    stream_batches,
    writes_for,
)
from bitseg.server.shards import ShardSet
from bitseg.v1 import bitseg_pb2 as pb

log = logging.getLogger("bitseg.server")

SHARDED = frozenset({
    "Count", "Members", "IsMember", "IsMemberBatch", "SegmentsOf", "Explain",
    "CreateSegment", "DeleteSegment", "GetSegment", "ListSegments", "RefreshSegment",
    "ListTemplates", "Metrics", "Overlap", "GetProfile", "SegmentsOfBatch", "SplitSegment",
    "Preview", "AddToSegment", "RemoveFromSegment",
    # writes and definition changes: shard_writes.py
    "UpsertProfiles", "TrackEvents", "AddOrders", "DeleteProfiles", "UpdateSegment",
    "AddTags", "RemoveTags", "RecordSegmentSize",
    # reads merged beyond a sum: shard_reads.py
    "Describe", "Values", "SegmentHistory", "Insights",
    "CreateExportSchedule", "ListExportSchedules", "DeleteExportSchedule",
    # bulk actions and computed traits: shard_actions.py
    "BulkAction", "ListActions", "RefreshTraits",
    # {"sql": ...} rules' sources, held by the front: shard_sources.py
    "ListSources",
})
CURSOR_FORMAT = 2  # a sharded store's Members cursor (1 is an unsharded store's)
_CURSOR = struct.Struct(">BQHIq")  # format, versions summed, shard, last dense id, as_of µs


def not_sharded(name: str) -> Unimplemented:
    return Unimplemented(f"{name} is not yet supported with --shards")


@dataclass(frozen=True)
class ShardCursor:
    """Where a Members stream over shards stopped: after dense id `last` of `shard`."""

    version: int
    shard: int
    last: int
    as_of_us: int

    def encode(self) -> str:
        raw = _CURSOR.pack(CURSOR_FORMAT, self.version, self.shard, self.last, self.as_of_us)
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, shards: int) -> ShardCursor:
        shown = text if len(text) <= 40 else text[:37] + "..."
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            fmt, version, shard, last, as_of_us = _CURSOR.unpack(raw)
        except (ValueError, struct.error):
            raise CursorError(f"not a Members cursor of this sharded store: {shown!r}") from None
        if fmt != CURSOR_FORMAT or shard >= shards or not T.MIN_US <= as_of_us <= T.MAX_US:
            raise CursorError(f"not a Members cursor of this sharded store: {shown!r}")
        return cls(version, shard, last, as_of_us)

    @property
    def as_of(self) -> datetime:
        return T.EPOCH + timedelta(microseconds=self.as_of_us)


class ShardedServicer(SegmentsServicer):
    """bitseg.v1.Segments over a ShardSet."""

    def __init__(self, shards: ShardSet, templates: Any = None) -> None:
        super().__init__(None, None, templates)  # type: ignore[arg-type]
        self.shards = shards
        self.sql = install(shards, None)  # the sources serve_sharded gave it, if any

    def _rule(self, request: Any) -> Any:
        return convert.target_of(request)

    def _shards_for(self, rule: Any, as_of: datetime) -> Any:
        """The shards to evaluate `rule` on: with a top node and more than one shard, the
        shards with its top sets chosen over all of them first (shard_reads)."""
        if self.shards.count > 1 and has_top(rule):
            return ResolvedShards(self.shards, resolve_tops(self.shards, rule, as_of))
        return self.shards

    # ---------------------------------------------------------------- evaluation
    @rpc
    def Count(self, request: pb.CountRequest, context: grpc.ServicerContext) -> pb.CountReply:
        rule = self._rule(request)
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        count = sum(self._shards_for(rule, as_of).each("count", rule, as_of))
        return pb.CountReply(count=count, eval_micros=_micros_since(start),
                             as_of=convert.to_timestamp(as_of))

    @rpc
    def Members(self, request: pb.MembersRequest,
                context: grpc.ServicerContext) -> Iterator[pb.MembersPage]:
        rule = self._rule(request)
        fields = list(request.fields) or None
        cursor = ShardCursor.decode(request.cursor, self.shards.count) if request.cursor \
            else None
        as_of = convert.as_of_of(request) or (cursor.as_of if cursor else convert.now())
        page_size = convert.page_size_of(request)
        start = time.perf_counter_ns()
        shards = self._shards_for(rule, as_of)
        from_shard = cursor.shard if cursor else 0
        firsts = shards.each("page", per_shard=[
            (rule, as_of, cursor.last if cursor and i == from_shard else None,
             page_size if i >= from_shard else 0, fields) for i in range(self.shards.count)])
        eval_micros = _micros_since(start)
        version = sum(first[0] for first in firsts)
        totals = [first[1] for first in firsts]
        total = sum(totals)
        position = sum(totals[:from_shard]) + firsts[from_shard][2] if cursor else 0
        end = total if not request.limit else min(total, position + request.limit)
        as_of_us, as_of_ts = convert.micros_of(as_of), convert.to_timestamp(as_of)
        members = self._in_order(shards, firsts, from_shard, rule, as_of, page_size, fields)
        last = (cursor.shard, cursor.last) if cursor else None
        while True:
            stop = min(position + page_size, end)
            ids, rows = [], []
            for _ in range(stop - position):
                found = next(members, None)
                if found is None:  # a shard changed since the count: the page ends here
                    break
                shard, dense, external, row = found
                last = (shard, dense)
                ids.append(external)
                if row is not None:
                    rows.append(orjson.dumps(row).decode())
            yield pb.MembersPage(
                ids=ids, rows_json=rows,
                cursor="" if last is None
                else ShardCursor(version, last[0], last[1], as_of_us).encode(),
                done=stop >= total, total=total, eval_micros=eval_micros, as_of=as_of_ts)
            position = stop
            if position >= end or not context.is_active():
                return

    def _in_order(self, shards: Any, firsts: list[Any], from_shard: int, rule: Any,
                  as_of: datetime, page_size: int, fields: list[str] | None
                  ) -> Iterator[tuple[int, int, str, dict[str, Any] | None]]:
        """(shard, dense id, external id, row or None) of the members from `from_shard`
        on, fetching a page at a time from each shard."""
        for shard in range(from_shard, self.shards.count):
            _, total, at, dense, external, rows = firsts[shard]
            while dense:
                shown = rows if fields else [None] * len(dense)
                yield from ((shard, d, e, r)
                            for d, e, r in zip(dense, external, shown, strict=True))
                at += len(dense)
                if at >= total:
                    break
                _, total, at, dense, external, rows = shards.call(
                    shard, "page", rule, as_of, dense[-1], page_size, fields)

    @rpc
    def Preview(self, request: pb.PreviewRequest,
                context: grpc.ServicerContext) -> pb.PreviewReply:
        rule = self._rule(request)
        as_of = convert.as_of_of(request) or convert.now()
        limit = min(request.limit or PREVIEW_DEFAULT, PREVIEW_MAX)
        start = time.perf_counter_ns()
        found = self._shards_for(rule, as_of).each("preview", rule, as_of, limit)
        rows = [row for _, shard_rows in found for row in shard_rows][:limit]
        return pb.PreviewReply(total=sum(total for total, _ in found),
                               profiles=[convert.profile_reply(r) for r in rows],
                               eval_micros=_micros_since(start),
                               as_of=convert.to_timestamp(as_of))

    @rpc
    def Explain(self, request: pb.ExplainRequest,
                context: grpc.ServicerContext) -> pb.ExplainReply:
        rule = self._rule(request)
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        found = self._shards_for(rule, as_of).each("explain", rule, as_of)
        root = _summed_node([f.root for f in found])
        return pb.ExplainReply(root=convert.explain_node(root), text=root.lines(),
                               sentence=found[0].sentence, eval_micros=_micros_since(start),
                               as_of=convert.to_timestamp(as_of))

    @rpc
    def IsMember(self, request: pb.IsMemberRequest,
                 context: grpc.ServicerContext) -> pb.IsMemberReply:
        rule = self._rule(request)
        as_of = convert.as_of_of(request) or convert.now()
        profile_id = _profile_id(request.profile_id)
        member = self._shards_for(rule, as_of).call(self.shards.shard_of(profile_id),
                                                    "is_member", profile_id, rule, as_of)
        return pb.IsMemberReply(member=member, as_of=convert.to_timestamp(as_of))

    @rpc
    def IsMemberBatch(self, request: pb.IsMemberBatchRequest,
                      context: grpc.ServicerContext) -> pb.IsMemberBatchReply:
        rule = self._rule(request)
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        profile_ids = list(request.profile_ids)
        check_size(profile_ids)
        where, mine = self._by_shard(profile_ids)
        answers = self._shards_for(rule, as_of).each(
            "is_member_many", per_shard=[(ids, rule, as_of) for ids in mine])
        unknown = {p for _, gone in answers for p in gone}
        taken = [iter(found) for found, _ in answers]
        member = [next(taken[shard]) for shard in where]
        return pb.IsMemberBatchReply(member=member,
                                     unknown_ids=[p for p in profile_ids if p in unknown],
                                     as_of=convert.to_timestamp(as_of),
                                     eval_micros=_micros_since(start))

    @rpc
    def SegmentsOf(self, request: pb.SegmentsOfRequest,
                   context: grpc.ServicerContext) -> pb.SegmentsOfReply:
        as_of = convert.as_of_of(request) or convert.now()
        profile_id = _profile_id(request.profile_id)
        names = self.shards.call(self.shards.shard_of(profile_id), "segments_of", profile_id,
                                 as_of)
        return pb.SegmentsOfReply(segments=names)

    @rpc
    def SegmentsOfBatch(self, request: pb.SegmentsOfBatchRequest,
                        context: grpc.ServicerContext) -> pb.SegmentsOfBatchReply:
        as_of = convert.as_of_of(request) or convert.now()
        profile_ids = list(request.profile_ids)
        check_size(profile_ids)
        where, mine = self._by_shard(profile_ids)
        answers = self.shards.each("segments_of_many", per_shard=[(ids, as_of) for ids in mine])
        unknown = {p for _, gone in answers for p in gone}
        taken = [iter(found) for found, _ in answers]
        names = [next(taken[shard]) for shard in where]
        return pb.SegmentsOfBatchReply(
            profiles=[pb.ProfileSegments(profile_id=p, segments=n, unknown=p in unknown)
                      for p, n in zip(profile_ids, names, strict=True)],
            unknown_ids=[p for p in profile_ids if p in unknown],
            as_of=convert.to_timestamp(as_of))

    def _by_shard(self, profile_ids: list[str]) -> tuple[list[int], list[list[str]]]:
        """Each id's shard, and the ids of each shard in the request's order."""
        where = [self.shards.shard_of(p) if p else 0 for p in profile_ids]
        mine: list[list[str]] = [[] for _ in range(self.shards.count)]
        for profile_id, shard in zip(profile_ids, where, strict=True):
            mine[shard].append(profile_id)
        return where, mine

    @rpc
    def GetProfile(self, request: pb.GetProfileRequest,
                   context: grpc.ServicerContext) -> pb.Profile:
        profile_id = _profile_id(request.profile_id)
        return convert.profile_reply(
            self.shards.call(self.shards.shard_of(profile_id), "profile", profile_id))

    @rpc
    def Metrics(self, request: pb.MetricsRequest,
                context: grpc.ServicerContext) -> pb.MetricsReply:
        rule = self._rule(request)
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        found = self._shards_for(rule, as_of).each("metrics", rule, as_of,
                                                   request.amount_field or "amount")
        summed = replace(found[0], **{key: sum((getattr(m, key) for m in found[1:]),
                                               getattr(found[0], key))
                                      for key in ("profiles", "total_profiles", "orders",
                                                  "customers", "revenue", "total_revenue")})
        reply = convert.metrics_reply(summed)
        reply.eval_micros = _micros_since(start)
        reply.as_of.CopyFrom(convert.to_timestamp(as_of))
        return reply

    @rpc
    def Overlap(self, request: pb.OverlapRequest,
                context: grpc.ServicerContext) -> pb.OverlapReply:
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        found = self.shards.each("overlap", list(request.segments), as_of)
        summed = replace(found[0],
                         sizes=tuple(map(sum, zip(*(o.sizes for o in found), strict=True))),
                         matrix=tuple(tuple(map(sum, zip(*cells, strict=True)))
                                      for cells in zip(*(o.matrix for o in found),
                                                       strict=True)))
        reply = convert.overlap_reply(summed)
        reply.eval_micros = _micros_since(start)
        reply.as_of.CopyFrom(convert.to_timestamp(as_of))
        return reply

    @rpc
    def ListSources(self, request: pb.ListSourcesRequest,
                    context: grpc.ServicerContext) -> pb.ListSourcesReply:
        if self.sql.sources is None:  # served without --sources
            return pb.ListSourcesReply()
        return convert.sources_reply(self.sql.status(), self.sql.sources.sources)

    # ---------------------------------------------------------------- merged reads
    @rpc
    def Describe(self, request: pb.DescribeRequest,
                 context: grpc.ServicerContext) -> pb.DescribeReply:
        top = min(request.top or describe.DEFAULT_TOP, describe.MAX_TOP)
        start = time.perf_counter_ns()
        found = merge_description(self.shards, self.shards.each("describe_part"), top)
        return convert.describe_reply(found, _micros_since(start))

    @rpc
    def Values(self, request: pb.ValuesRequest,
               context: grpc.ServicerContext) -> pb.ValuesReply:
        limit = min(request.limit or describe.DEFAULT_TOP, describe.MAX_VALUES)
        found = self.shards.each("values", request.field, EVERY)
        return convert.values_reply(merge_values(found, limit))

    @rpc
    def SegmentHistory(self, request: pb.SegmentHistoryRequest,
                       context: grpc.ServicerContext) -> pb.SegmentHistoryReply:
        found = self.shards.each("history", request.name)
        return pb.SegmentHistoryReply(points=[convert.point_reply(p)
                                              for p in merge_history(found)])

    @rpc
    def Insights(self, request: pb.InsightsRequest,
                 context: grpc.ServicerContext) -> pb.InsightsReply:
        rule = self._rule(request)
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        top = request.top or insights.DEFAULT_TOP
        buckets = request.buckets or insights.BUCKETS
        shards = self._shards_for(rule, as_of)
        found = shards.each("insights_part", rule, as_of, list(request.fields), top, buckets,
                            request.amount_field or "amount")
        ranged = ranged_insights(shards, rule, as_of, found, buckets) \
            if len(found) > 1 else None
        reply = convert.insights_reply(merge_insights(found, top, ranged),
                                       _micros_since(start))
        reply.as_of.CopyFrom(convert.to_timestamp(as_of))
        return reply

    @property
    def exports(self) -> Any:  # the Create/List/DeleteExportSchedule RPCs are the base's
        return ShardExports(self.shards)

    # ---------------------------------------------------------------- segments
    @rpc
    def CreateSegment(self, request: pb.CreateSegmentRequest,
                      context: grpc.ServicerContext) -> pb.Segment:
        as_of = convert.as_of_of(request) or convert.now()
        rule, tags = self.templates.source(request.template, dict(request.params),
                                           convert.source_of(request))
        kind, tags = convert.kind_of(request.kind), [*request.tags, *tags]
        ids: list[list[str]] = [[] for _ in range(self.shards.count)]
        for profile_id in request.profile_ids:
            ids[self.shards.shard_of(profile_id) if profile_id else 0].append(profile_id)
        asked = {"name": request.name, "kind": kind, "rule": rule, "as_of": as_of,
                 "refresh_every": request.refresh_every_seconds or None, "tags": tags}
        with self.segment_changes.changing([rule], as_of, kind) as (chosen,):
            made = self._create_everywhere("segment_change", [
                ("create", {**asked, "ids": ids[i]}, rule, chosen)
                for i in range(self.shards.count)], lambda made: [made[0].name])
        info, change = _summed(made)
        order = {p for _, c in made for p in c.unknown}
        change = replace(change, unknown=tuple(p for p in request.profile_ids if p in order))
        return convert.segment_reply(info, change)

    def _create_everywhere(self, method: str, per_shard: list[tuple],
                           names: Callable[[Any], list[str]]) -> list[Any]:
        """Create on shard 0 (where a bad rule or a taken name fails, nothing else
        touched), then on the others at once; when one of those fails, delete what it
        made (`names` of a shard's answer) from the shards that made it, so every shard
        has the segments or none does."""
        made = [self.shards.call(0, method, *per_shard[0])]
        if self.shards.count == 1:
            return made
        rest = list(range(1, self.shards.count))
        pending = [(i, self.shards._submit(i, method, per_shard[i])) for i in rest]
        failure: BaseException | None = None
        done = [0]
        for i, handle in pending:
            try:
                made.append(self.shards._answer(i, self.shards._wait(i, handle)))
                done.append(i)
            except Exception as exc:  # noqa: BLE001 -- rolled back below, then raised
                failure = failure or exc
        if failure is None:
            return made
        for i in done:
            for name in names(made[0]):
                try:
                    self.shards.call(i, "delete_segment", name)
                except Exception:
                    log.exception("segment %r: rolling back its creation on shard %d failed",
                                  name, i)
        raise failure

    @rpc
    def SplitSegment(self, request: pb.SplitSegmentRequest,
                     context: grpc.ServicerContext) -> pb.SplitSegmentReply:
        as_of = convert.as_of_of(request) or convert.now()
        rule = convert.source_of(request)
        asked = {"name": request.name, "salt": request.salt, "rule": rule, "as_of": as_of,
                 "parts": [(p.label, p.percent) for p in request.into],
                 "prefix": request.prefix or None}
        # the pieces' rules hold the source at $.and[0]: its top nodes chosen there (a
        # segment by name: its own, and those of the dynamic segments it names)
        source = rule if rule is not None else {"segment": request.name}
        placed = {"and": [orjson.loads(source) if isinstance(source, (str, bytes))
                          else source, {"all": True}]} if may_meet_top(source) else None
        with self.segment_changes.changing([placed], as_of) as (chosen,):
            made = self._create_everywhere("segment_change", [
                ("split", asked, placed, chosen)] * self.shards.count,
                lambda pieces: [info.name for info, _ in pieces])
        return pb.SplitSegmentReply(segments=[convert.segment_reply(*_summed(list(piece)))
                                              for piece in zip(*made, strict=True)])

    @rpc
    def AddToSegment(self, request: pb.AddToSegmentRequest,
                     context: grpc.ServicerContext) -> pb.SegmentMembershipReply:
        change = self._edit(request.name, list(request.profile_ids), adding=True)
        return pb.SegmentMembershipReply(changed=change.entered, size=change.size,
                                         unknown_ids=change.unknown)

    @rpc
    def RemoveFromSegment(self, request: pb.RemoveFromSegmentRequest,
                          context: grpc.ServicerContext) -> pb.SegmentMembershipReply:
        change = self._edit(request.name, list(request.profile_ids), adding=False)
        return pb.SegmentMembershipReply(changed=change.exited, size=change.size,
                                         unknown_ids=change.unknown)

    def _edit(self, name: str, profile_ids: list[str], adding: bool) -> Change:
        """Add or remove each shard's ids, shard 0 first (an unknown or non-static
        segment fails there, nothing changed). A shard that fails after it leaves the
        others changed: adding and removing are idempotent, so the caller's retry
        finishes the edit."""
        _, mine = self._by_shard(profile_ids)
        first = self.shards.call(0, "edit_segment", name, mine[0], adding)
        others = range(1, self.shards.count)
        changes = [first, *self.shards.these(others, "edit_segment",
                                             [(name, mine[i], adding) for i in others])]
        unknown = {p for c in changes for p in c.unknown}
        return replace(first, size=sum(c.size for c in changes),
                       entered=sum(c.entered for c in changes),
                       exited=sum(c.exited for c in changes),
                       unknown=tuple(p for p in profile_ids if p in unknown))

    @rpc
    def DeleteSegment(self, request: pb.DeleteSegmentRequest,
                      context: grpc.ServicerContext) -> pb.DeleteSegmentReply:
        self.shards.call(0, "get_segment", request.name, convert.now())  # NotFound first
        self.shards.each("delete_segment", request.name)
        return pb.DeleteSegmentReply()

    @rpc
    def GetSegment(self, request: pb.GetSegmentRequest,
                   context: grpc.ServicerContext) -> pb.Segment:
        infos = self.shards.each("get_segment", request.name, convert.now())
        return convert.segment_reply(_sized(infos))

    @rpc
    def ListSegments(self, request: pb.ListSegmentsRequest,
                     context: grpc.ServicerContext) -> pb.ListSegmentsReply:
        lists = self.shards.each("list_segments", convert.now(), request.tag or None)
        return pb.ListSegmentsReply(segments=[convert.segment_reply(_sized(list(infos)))
                                              for infos in zip(*lists, strict=True)])

    @rpc
    def RefreshSegment(self, request: pb.RefreshSegmentRequest,
                       context: grpc.ServicerContext) -> pb.RefreshSegmentReply:
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        change = self.segment_changes.refresh(request.name, as_of)
        return pb.RefreshSegmentReply(size=change.size, entered=change.entered,
                                      exited=change.exited, eval_micros=_micros_since(start),
                                      as_of=convert.to_timestamp(as_of))

    @property
    def segment_changes(self) -> SegmentChanges:
        """This front's segment changes, one at a time (shard_segments)."""
        return changes_for(self.shards)

    # ---------------------------------------------------------------- writes (shard_writes.py)
    @property
    def writes(self) -> ShardWrites:
        """The two-phase commit of this front's writes, made on first use."""
        return writes_for(self.shards)

    @rpc
    def UpsertProfiles(self, request_iterator: Iterator[pb.ProfileBatch],
                       context: grpc.ServicerContext) -> pb.UpsertProfilesReply:
        reply = pb.UpsertProfilesReply()
        for messages, results in stream_batches(self.writes, request_iterator,
                                                "profiles_json", "profiles", context):
            reply.batches += messages
            reply.created += sum(r[0] for r in results)
            reply.updated += sum(r[1] for r in results)
            reply.version = sum(r[2] for r in results)  # summed, as a Members cursor's
        return reply

    @rpc
    def TrackEvents(self, request_iterator: Iterator[pb.EventBatch],
                    context: grpc.ServicerContext) -> pb.TrackEventsReply:
        batches, events = self._rows_streamed(request_iterator, "events", context)
        return pb.TrackEventsReply(batches=batches, events=events)

    @rpc
    def AddOrders(self, request_iterator: Iterator[pb.OrderBatch],
                  context: grpc.ServicerContext) -> pb.AddOrdersReply:
        batches, orders = self._rows_streamed(request_iterator, "orders", context)
        return pb.AddOrdersReply(batches=batches, orders=orders)

    def _rows_streamed(self, requests: Iterator[Any], kind: str,
                       context: grpc.ServicerContext) -> tuple[int, int]:
        """Write a stream of event or order batches: (messages, rows over every shard)."""
        batches = rows = 0
        for messages, results in stream_batches(self.writes, requests, f"{kind}_json", kind,
                                                context):
            batches += messages
            rows += sum(r[3] for r in results)
        return batches, rows

    @rpc
    def DeleteProfiles(self, request: pb.DeleteProfilesRequest,
                       context: grpc.ServicerContext) -> pb.DeleteProfilesReply:
        ids = [_profile_id(p) for p in request.profile_ids]
        if not ids:
            return pb.DeleteProfilesReply(deleted=0)
        results = self.writes.write(DELETE, split_ids(ids, self.shards.count))
        return pb.DeleteProfilesReply(deleted=sum(r[3] for r in results))

    @rpc
    def UpdateSegment(self, request: pb.UpdateSegmentRequest,
                      context: grpc.ServicerContext) -> pb.Segment:
        as_of = convert.as_of_of(request) or convert.now()
        rule = convert.source_of(request)
        every = request.refresh_every_seconds if request.HasField("refresh_every_seconds") \
            else None
        asked = {"name": request.name, "rule": rule, "refresh_every": every or None,
                 "clear_refresh_every": every == 0, "as_of": as_of}
        changes = self.segment_changes
        with changes.lock:
            before = self.shards.call(0, "get_segment", request.name, as_of)  # NotFound first
            old = before.rule if rule is not None else None
            with changes.changing([rule, old], as_of, before.kind) as (chosen, chosen_old):
                undo = ("update", {**asked, "rule": old, "refresh_every": before.refresh_every,
                                   "clear_refresh_every": before.refresh_every is None},
                        old, chosen_old)  # the rule and schedule put back where changed
                made = self._change_everywhere(
                    "segment_change", ("update", asked, rule, chosen),
                    undo=undo if rule is not None or every is not None else None)
        return convert.segment_reply(*_summed(made))

    @rpc
    def AddTags(self, request: pb.SegmentTagsRequest,
                context: grpc.ServicerContext) -> pb.Segment:
        return convert.segment_reply(_sized(self._retag(request.name, list(request.tags), [])))

    @rpc
    def RemoveTags(self, request: pb.SegmentTagsRequest,
                   context: grpc.ServicerContext) -> pb.Segment:
        return convert.segment_reply(_sized(self._retag(request.name, [], list(request.tags))))

    def _retag(self, name: str, add: list[str], remove: list[str]) -> list[Any]:
        """Retag on every shard or none: a shard that fails has the others put back."""
        before = set(self.shards.call(0, "get_segment", name, convert.now()).tags)
        undo = (name, sorted(before & set(remove)), sorted(set(add) - before))
        return self._change_everywhere("retag_segment", (name, add, remove), undo=undo)

    @rpc
    def RecordSegmentSize(self, request: pb.RecordSegmentSizeRequest,
                          context: grpc.ServicerContext) -> pb.SizePoint:
        as_of = convert.as_of_of(request) or convert.now()
        self.shards.call(0, "get_segment", request.name, as_of)  # NotFound: nothing recorded
        points = self._change_everywhere("record_size", (request.name, as_of), undo=None)
        return convert.point_reply(replace(points[0], size=sum(p.size for p in points)))

    def _change_everywhere(self, method: str, args: tuple, undo: tuple | None) -> list[Any]:
        """A definition change on shard 0 (where a bad rule or an unknown segment fails,
        nothing touched), then on the others at once; when one of those fails, the
        shards that made it run `method` again with `undo` (None: nothing to undo)."""
        first = self.shards.call(0, method, *args)
        others = list(range(1, self.shards.count))
        found = self.shards.outcomes(method, [args] * len(others), indices=others)
        failed = [value for ok, value in found if not ok]
        if not failed:
            return [first, *(value for _, value in found)]
        if undo is not None:
            done = [0, *(i for i, (ok, _) in zip(others, found, strict=True) if ok)]
            for i, (ok, value) in zip(done, self.shards.outcomes(method, [undo] * len(done),
                                                                  indices=done), strict=True):
                if not ok:
                    log.error("shard %d: undoing %s failed: %s", i, method, value)
        raise failed[0]

    # ---------------------------------------------------------------- actions, traits
    @rpc
    def BulkAction(self, request: pb.BulkActionRequest,
                   context: grpc.ServicerContext) -> pb.BulkActionReply:
        done = shard_actions.bulk_action(self.shards, convert.bulk_action_of(request),
                                         convert.as_of_of(request) or convert.now(),
                                         request.dry_run)
        return convert.bulk_action_reply(done)

    @rpc
    def ListActions(self, request: pb.ListActionsRequest,
                    context: grpc.ServicerContext) -> pb.ListActionsReply:
        entries = shard_actions.list_actions(self.shards, request.limit)
        return pb.ListActionsReply(entries_json=[orjson.dumps(e).decode() for e in entries])

    @rpc
    def RefreshTraits(self, request: pb.RefreshTraitsRequest,
                      context: grpc.ServicerContext) -> pb.RefreshTraitsReply:
        report = shard_actions.refresh_traits(self.shards, request.config_json or None,
                                              convert.as_of_of(request) or convert.now())
        return convert.refresh_traits_reply(report)


def _summed_node(nodes: list[Any]) -> Any:
    """The shards' explain trees (the same rule, so the same shape) as one: each node's
    count summed; a note ("a value that never occurs") given when every shard has one,
    with shard 0's words (its suggestions are from shard 0's values)."""
    first = nodes[0]
    note = first.note if all(n.note for n in nodes) else ""
    if note:  # an sql node's: each shard counted its own part of the query's ids
        note = summed_note([n.note for n in nodes]) or note
    children = tuple(_summed_node(list(group))
                     for group in zip(*(n.children for n in nodes), strict=True))
    return replace(first, count=sum(n.count for n in nodes), note=note, children=children)


def _sized(infos: list[Any]) -> Any:
    """Shard 0's segment info with the size summed over the shards (and any problem)."""
    problem = next((i.problem for i in infos if i.problem), None)
    return replace(infos[0], size=sum(i.size for i in infos), problem=problem)


def _summed(made: list[tuple[Any, Change]]) -> tuple[Any, Change]:
    info = _sized([i for i, _ in made])
    changes = [c for _, c in made]
    return info, replace(changes[0], size=sum(c.size for c in changes),
                         entered=sum(c.entered for c in changes),
                         exited=sum(c.exited for c in changes))


def _refuse(name: str) -> Any:
    def refused(self: ShardedServicer, request: Any, context: grpc.ServicerContext) -> Any:
        raise not_sharded(name)
    refused.__name__ = name
    return rpc(refused)


def _pinned(method: Any) -> Any:
    """The RPC with one pin of sql answers for all its shard calls (shard_sources)."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def streaming(self: ShardedServicer, request: Any, context: Any) -> Iterator[Any]:
            with self.sql.pinned():
                yield from method(self, request, context)
        return streaming

    @functools.wraps(method)
    def unary(self: ShardedServicer, request: Any, context: Any) -> Any:
        with self.sql.pinned():
            return method(self, request, context)
    return unary


for _method in pb.DESCRIPTOR.services_by_name["Segments"].methods:
    if _method.name not in SHARDED:
        setattr(ShardedServicer, _method.name, _refuse(_method.name))
    else:
        setattr(ShardedServicer, _method.name, _pinned(getattr(ShardedServicer, _method.name)))


# ---------------------------------------------------------------------- serving
def create_sharded_server(shards: ShardSet, address: str, options: Any = None
                          ) -> tuple[grpc.Server, int]:
    """A server (not started) for the shards on `address` ("host:0" picks a free port)."""
    from bitseg.server import app

    server, port, _, _ = app._build(
        None, address, app.WORKERS, None, options or app.Options(),  # type: ignore[arg-type]
        make_servicer=lambda _engine, _segments, templates: ShardedServicer(shards, templates))
    return server, port


def serve_sharded(db: str, host: str, port: int, grace: float, options: Any,
                  shards_wanted: int | None = None, ray_address: str | None = None) -> int:
    """`bitseg serve --db DB --shards N`: serve the sharded store until SIGINT/SIGTERM."""
    import signal
    import sys
    import threading

    from bitseg.index.allocator import keep_freed_memory
    from bitseg.server import app
    from bitseg.server.metrics import Metrics
    from bitseg.server.shards import open_shards

    keep_freed_memory()
    stop = threading.Event()
    shards = open_shards(db, ray_address, expect=shards_wanted)
    sql = install(shards, None)
    if options.sources:  # {"sql": ...} rules' databases: the front runs every query
        from bitseg.server.sources import Sources

        sql.sources = Sources(options.sources, lambda: None).start()
    # after ray.init, which installs a SIGTERM handler of its own (exit status 15)
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            metrics = Metrics(None) if options.metrics_port is not None else None
            server, bound, health_servicer, gate = app._build(
                None, app._address(host, port), app.WORKERS, None, options,  # type: ignore[arg-type]
                outer=[metrics.interceptor] if metrics else [],
                make_servicer=lambda _e, _s, templates: ShardedServicer(shards, templates))
            app.start_metrics(metrics, host, options)  # the front's calls and process
            console = app.start_console(ShardedServicer(shards, app._templates(options)),
                                        options)
            exporter = export_scheduler(shards)
            refresher = refresh_scheduler(shards, app.REFRESH_TICK)
            traits = shard_actions.ShardTraitsScheduler(
                shards, options.traits, options.traits_every) if options.traits_every else None
            for ticker in (exporter, refresher, traits):  # a tick's sql answers: one pin
                if ticker is not None:
                    ticker.run_once = pinned_calls(sql, ticker.run_once)  # type: ignore
                    ticker.start()
            server.start()
            where = "in process" if shards.count == 1 and ray_address is None else "on Ray"
            print(f"bitseg serving {db} ({shards.count} shard{'s' * (shards.count > 1)} "
                  f"{where}) on {host}:{bound}", file=sys.stderr, flush=True)
            stop.wait()
            health_servicer.enter_graceful_shutdown()
            exporter.stop(app.EXIT_MARGIN)  # not forever on a call to a hung shard
            refresher.stop(app.EXIT_MARGIN)
            if traits is not None:
                traits.stop(app.EXIT_MARGIN)
            server.stop(grace).wait(grace + app.EXIT_MARGIN)
            gate.wait_idle(app.EXIT_MARGIN)
            if console is not None:
                console.stop()
            if metrics is not None:
                metrics.stop()
        finally:
            shards.close()
            sql.close()
        log.info("stopped; shards closed")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
