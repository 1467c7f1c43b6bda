"""The gRPC servicer: convert the request, call the engine, convert the reply.

Errors are mapped to status codes in one place (`status_of`), and every RPC goes through
`rpc`, so a bad request gets a clear status and an unexpected failure becomes INTERNAL
with its traceback in the log; the server never dies of either.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import grpc
import orjson

from bitseg.index.engine import Engine, as_of_micros
from bitseg.index.errors import (
    AlreadyExists,
    BitsegError,
    DataError,
    NotFound,
    RuleError,
    SchemaError,
    StoreError,
)
from bitseg.index.evaluate import Evaluator
from bitseg.index.fields import ids_of
from bitseg.index.rules import And, Not, Or, Rule
from bitseg.server import convert
from bitseg.v1 import bitseg_pb2 as pb
from bitseg.v1 import bitseg_pb2_grpc as pb_grpc

log = logging.getLogger("bitseg.server")

SEGMENTS_LATER = "segments arrive with issue 5"
EVENTS_LATER = "events are not supported by this server version yet"
ORDERS_LATER = "orders are not supported by this server version yet"
COMMITTED_KEY = "bitseg-committed-batches"


class Unimplemented(Exception):
    """What this server version does not do yet."""


# ------------------------------------------------------------------ the error mapping
_STATUS: tuple[tuple[type[Exception], grpc.StatusCode, str], ...] = (
    (Unimplemented, grpc.StatusCode.UNIMPLEMENTED, ""),
    (RuleError, grpc.StatusCode.INVALID_ARGUMENT, "invalid rule: "),
    (DataError, grpc.StatusCode.INVALID_ARGUMENT, "invalid data: "),
    (SchemaError, grpc.StatusCode.INVALID_ARGUMENT, "invalid schema: "),
    (NotFound, grpc.StatusCode.NOT_FOUND, ""),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, ""),
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
    if code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", name, exc_info=exc)
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

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

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
        version = self.engine.snapshot.version
        start = time.perf_counter_ns()
        found = self.engine.evaluate(rule, as_of=as_of)
        eval_micros = _micros_since(start)
        total = len(found)
        position = found.rank(cursor.last) if cursor else 0
        end = total if not request.limit else min(total, position + request.limit)
        last = cursor.last if cursor else None
        as_of_us, as_of_ts = convert.micros_of(as_of), convert.to_timestamp(as_of)
        while True:
            stop = min(position + page_size, end)
            page = found[position:stop]  # one page of dense ids; strings only for it
            if page:
                last = page.max()
            yield pb.MembersPage(
                ids=self.engine.ids.externals(ids_of(page)),
                cursor="" if last is None else convert.Cursor(version, last, as_of_us).encode(),
                done=stop >= total, total=total, eval_micros=eval_micros, as_of=as_of_ts)
            position = stop
            if position >= end or not context.is_active():
                return
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                return

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
        raise Unimplemented(SEGMENTS_LATER)

    @rpc
    def Explain(self, request: pb.ExplainRequest,
                context: grpc.ServicerContext) -> pb.ExplainReply:
        rule = convert.target_of(request)
        as_of = convert.as_of_of(request) or convert.now()
        start = time.perf_counter_ns()
        tree = explain(self.engine, rule, as_of)
        return pb.ExplainReply(root=convert.explain_node(tree), text=explain_text(tree),
                               eval_micros=_micros_since(start),
                               as_of=convert.to_timestamp(as_of))

    @rpc
    def GetProfile(self, request: pb.GetProfileRequest,
                   context: grpc.ServicerContext) -> pb.Profile:
        return convert.profile_reply(self.engine.profile(_profile_id(request.profile_id)))

    # ---------------------------------------------------------------- segments
    @rpc
    def CreateSegment(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise Unimplemented(SEGMENTS_LATER)

    @rpc
    def GetSegment(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise Unimplemented(SEGMENTS_LATER)

    @rpc
    def ListSegments(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise Unimplemented(SEGMENTS_LATER)

    @rpc
    def DeleteSegment(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise Unimplemented(SEGMENTS_LATER)

    @rpc
    def AddToSegment(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise Unimplemented(SEGMENTS_LATER)

    @rpc
    def RemoveFromSegment(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise Unimplemented(SEGMENTS_LATER)

    @rpc
    def RefreshSegment(self, request: Any, context: grpc.ServicerContext) -> Any:
        raise Unimplemented(SEGMENTS_LATER)

    # ---------------------------------------------------------------- ingestion
    @rpc
    def UpsertProfiles(self, request_iterator: Iterator[pb.ProfileBatch],
                       context: grpc.ServicerContext) -> pb.UpsertProfilesReply:
        reply = pb.UpsertProfilesReply()
        for report in _batches(request_iterator, "profiles_json",
                               self.engine.upsert_profiles, context):
            reply.batches += 1
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
        track = getattr(self.engine, "track_events", None)  # until the engine has events
        if track is None:
            raise Unimplemented(EVENTS_LATER)
        reply = pb.TrackEventsReply()
        for report in _batches(request_iterator, "events_json", track, context):
            reply.batches += 1
            reply.events += report.rows
        return reply

    @rpc
    def AddOrders(self, request_iterator: Iterator[pb.OrderBatch],
                  context: grpc.ServicerContext) -> pb.AddOrdersReply:
        add = getattr(self.engine, "add_orders", None)  # until the engine has orders
        if add is None:
            raise Unimplemented(ORDERS_LATER)
        reply = pb.AddOrdersReply()
        for report in _batches(request_iterator, "orders_json", add, context):
            reply.batches += 1
            reply.orders += report.rows
        return reply


def _batches(requests: Iterator[Any], field: str, apply: Callable[[Any], Any],
             context: grpc.ServicerContext) -> Iterator[Any]:
    """Apply each streamed batch as one engine call (one transaction); yield its report.

    A bad batch fails the call naming it; the batches before it stay committed, and
    their number goes in the trailing metadata.
    """
    committed = 0
    for batch in requests:
        try:
            report = apply(convert.records_of(getattr(batch, field)))
        except DataError as exc:
            context.set_trailing_metadata(((COMMITTED_KEY, str(committed)),))
            raise DataError(f"batch {committed + 1} ({committed} before it committed): "
                            f"{exc}") from None
        committed += 1
        yield report


def _profile_id(profile_id: str) -> str:
    if not profile_id:
        raise BitsegError("profile_id: expected a non-empty profile id")
    return profile_id


# ------------------------------------------------------------------ explain
# (Domain logic, kept here until the engine offers it: index/ owns the rule language.)
def explain(engine: Engine, rule: Any, as_of: Any) -> dict[str, Any]:
    """The rule as a tree of {path, text, count, children}, every count from one snapshot."""
    snap = engine.snapshot
    typed = engine.parse(rule, snap)  # validates all of it first: errors carry paths
    as_json = orjson.loads(rule) if isinstance(rule, (str, bytes)) else rule
    return _explain(as_json, typed, "$", Evaluator(snap, as_of_micros(as_of)))


def _explain(obj: dict[str, Any], node: Rule, path: str, ev: Evaluator) -> dict[str, Any]:
    children = []
    if isinstance(node, (And, Or)):
        key = "and" if isinstance(node, And) else "or"
        children = [_explain(o, n, f"{path}.{key}[{i}]", ev)
                    for i, (o, n) in enumerate(zip(obj[key], node.children, strict=True))]
    elif isinstance(node, Not):
        children = [_explain(obj["not"], node.child, f"{path}.not", ev)]
    return {"path": path, "text": words(obj), "count": ev.count(node), "children": children}


def explain_text(tree: dict[str, Any], depth: int = 0) -> str:
    """One node per line, children indented: `text: count`."""
    lines = [f"{'  ' * depth}{tree['text']}: {tree['count']}"]
    lines.extend(explain_text(child, depth + 1) for child in tree["children"])
    return "\n".join(lines)


_OP_WORDS = {"eq": "is", "ne": "is not", "in": "is one of", "not_in": "is none of",
             "has_all": "has all of", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def words(obj: dict[str, Any]) -> str:
    """One rule node (not its children) in plain words."""
    if "and" in obj:
        return "all of"
    if "or" in obj:
        return "any of"
    if "not" in obj:
        return "not"
    if "all" in obj:
        return "every live profile"
    if "segment" in obj:
        return f"in segment {_show(obj['segment'])}"
    if "event" in obj or "orders" in obj:
        return _timed_words(obj)
    if "field" not in obj:
        return orjson.dumps(obj).decode()
    field, op, value = obj["field"], obj["op"], obj.get("value")
    if op == "exists":
        return f"{field} has a value"
    if op == "not_exists":
        return f"{field} has no value"
    if op == "between":
        return f"{field} is between {_show(value[0])} and {_show(value[1])}"
    if op == "anniversary_in":
        return f"the anniversary of {field} is in the next {value['next_days']} days"
    if isinstance(value, list):
        return f"{field} {_OP_WORDS[op]} {', '.join(_show(v) for v in value)}"
    return f"{field} {_OP_WORDS[op]} {_show(value)}"


def _timed_words(obj: dict[str, Any]) -> str:
    """An event or orders node: what rows, when, and how many (or how much)."""
    if "event" in obj:
        rows = "any events" if obj["event"] == "*" else f"{_show(obj['event'])} events"
        if "where" in obj:
            rows += f" where {orjson.dumps(obj['where']).decode()}"
    else:
        rows = f"orders matching {orjson.dumps(obj['orders']).decode()}"
    window = obj.get("window") or {}
    if "last_days" in window:
        when = f"in the last {window['last_days']} days"
    elif "next_days" in window:
        when = f"in the next {window['next_days']} days"
    elif "from" in window or "to" in window:
        when = f"from {window.get('from')} to {window.get('to')}"
    else:
        when = "up to as_of"
    having = obj.get("having")
    if having is None:
        return f"has {rows} {when}"
    agg = having.get("agg")
    what = f"{agg} of {having['of']}" if having.get("of") else str(agg)
    op = having.get("op")
    value = having.get("value")
    amount = (f"between {_show(value[0])} and {_show(value[1])}"
              if op == "between" and isinstance(value, list) and len(value) == 2
              else f"{_OP_WORDS.get(op, op)} {_show(value)}")
    return f"{what} of {rows} {when} {amount}"


def _show(value: Any) -> str:
    if isinstance(value, dict) and "days_ago" in value:
        return f"{value['days_ago']} days before as_of"
    return orjson.dumps(value).decode()
