"""Every conversion between protobuf messages and the engine's Python values.

The protobuf rule tree converts to the canonical JSON form (CONTRACT §2) and the engine
parses and validates that, so a bad rule is reported with the same JSON path whichever
way it was sent.  The only checks made here are for what JSON cannot express (a
non-finite number); they raise RuleError with the node's path too.
"""

from __future__ import annotations

import base64
import math
import struct
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import orjson
from google.protobuf.timestamp_pb2 import Timestamp

from bitseg.index import types as T
from bitseg.index.errors import BitsegError, RuleError
from bitseg.index.rules import MAX_RULE_DEPTH
from bitseg.index.types import parse_timestamp
from bitseg.v1 import bitseg_pb2 as pb

if TYPE_CHECKING:
    from bitseg.index.describe import Description, FieldInfo
    from bitseg.index.explain import Node
    from bitseg.index.segments import Change, Metrics, Overlap, Point, SegmentInfo
    from bitseg.index.templates import Template

DEFAULT_PAGE_SIZE = 10_000
MAX_PAGE_SIZE = 100_000
EXACT_DOUBLE = 2**53  # doubles hold every integer up to this exactly
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


# ====================================================================== rules: proto -> JSON
def rule_to_json(rule: pb.Rule, path: str = "$") -> dict[str, Any]:
    """A protobuf rule tree -> the CONTRACT JSON form (an unset node becomes {}).

    Trees nested deeper than MAX_RULE_DEPTH are refused first, without recursion."""
    if path == "$":
        check_depth(rule)
    return _rule_to_json(rule, path)


def check_depth(rule: pb.Rule) -> None:
    """RuleError naming the first node nested deeper than MAX_RULE_DEPTH, as
    rules.check_depth does for the JSON form (the same levels, the same paths)."""
    stack: list[tuple[pb.Rule, int, Any, str]] = [(rule, 1, None, "$")]
    while stack:
        entry = stack.pop()
        node, depth = entry[0], entry[1]
        if depth > MAX_RULE_DEPTH:
            parts = []
            while entry is not None:
                parts.append(entry[3])
                entry = entry[2]
            path = "".join(reversed(parts))
            raise RuleError(path, f"rule nested too deep: at most {MAX_RULE_DEPTH} levels "
                            "of rules are allowed")
        kind = node.WhichOneof("node") if isinstance(node, pb.Rule) else "step"
        if kind in ("and", "or"):
            children = getattr(node, kind).rules
            stack.extend((children[i], depth + 1, entry, f".{kind}[{i}]")
                         for i in reversed(range(len(children))))  # the first on top
        elif kind == "not":
            stack.append((getattr(node, "not"), depth + 1, entry, ".not"))
        elif kind == "event" and node.event.HasField("where"):
            stack.append((node.event.where, depth + 1, entry, ".where"))
        elif kind == "orders" and node.orders.HasField("orders"):
            stack.append((node.orders.orders, depth + 1, entry, ".orders"))
        elif kind == "items":
            for part in ("orders", "items"):  # items on top: reported first, as in JSON
                if node.items.HasField(part):
                    stack.append((getattr(node.items, part), depth + 1, entry, f".{part}"))
        elif kind == "top" and node.top.HasField("of"):
            stack.append((node.top.of, depth + 1, entry, ".top.of"))
        elif kind == "sequence":  # steps count as nodes, as in the JSON form
            steps = node.sequence.steps
            stack.extend((steps[i], depth + 1, entry, f".sequence[{i}]")
                         for i in reversed(range(len(steps))))
            if node.sequence.HasField("then_not"):
                stack.append((node.sequence.then_not, depth + 1, entry, ".then_not"))
        elif kind == "step":
            which = node.WhichOneof("step")
            if which == "event" and node.event.HasField("where"):
                stack.append((node.event.where, depth + 1, entry, ".where"))
            elif which == "orders":
                stack.append((node.orders, depth + 1, entry, ".orders"))


def _rule_to_json(rule: pb.Rule, path: str) -> dict[str, Any]:
    kind = rule.WhichOneof("node")
    if kind is None:
        return {}
    if kind in ("and", "or"):
        children = getattr(rule, kind).rules
        return {kind: [_rule_to_json(c, f"{path}.{kind}[{i}]")
                       for i, c in enumerate(children)]}
    if kind == "not":
        return {"not": _rule_to_json(getattr(rule, "not"), f"{path}.not")}
    if kind == "all":
        return {"all": rule.all}
    if kind == "segment":
        return {"segment": rule.segment}
    if kind == "field":
        return _condition_to_json(rule.field, path)
    if kind == "event":
        return _event_to_json(rule.event, path)
    if kind == "sample":
        return {"sample": _sample_to_json(rule.sample)}
    if kind == "sql":
        return {"sql": {"source": rule.sql.source, "query": rule.sql.query,
                        "params": [value_to_json(v, f"{path}.sql.params[{i}]")
                                   for i, v in enumerate(rule.sql.params)]}}
    if kind == "top":
        return _top_to_json(rule.top, path)
    if kind == "sequence":
        return _sequence_to_json(rule.sequence, path)
    if kind == "items":
        return _items_to_json(rule.items, path)
    return _orders_to_json(rule.orders, path)


def _sample_to_json(node: pb.SampleRule) -> dict[str, Any]:
    out: dict[str, Any] = {"salt": node.salt}
    for key in ("percent", "from", "to"):
        if node.HasField(key):
            number = getattr(node, key)
            out[key] = int(number) if number.is_integer() else number
    return out


def _condition_to_json(cond: pb.Condition, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {"field": cond.field, "op": cond.op}
    if cond.HasField("value"):
        out["value"] = value_to_json(cond.value, f"{path}.value")
    return out


def _event_to_json(node: pb.EventRule, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {"event": node.event}
    if node.HasField("where"):
        out["where"] = _rule_to_json(node.where, f"{path}.where")
    return _timed(node, out, path)


def _items_to_json(node: pb.ItemsRule, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {"items": _rule_to_json(node.items, f"{path}.items")
                           if node.HasField("items") else None}
    if node.HasField("orders"):
        out["orders"] = _rule_to_json(node.orders, f"{path}.orders")
    return _timed(node, out, path)


def _orders_to_json(node: pb.OrdersRule, path: str) -> dict[str, Any]:
    orders = _rule_to_json(node.orders, f"{path}.orders") if node.HasField("orders") else None
    return _timed(node, {"orders": orders}, path)


def _sequence_to_json(node: pb.SequenceRule, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {"sequence": [_step_to_json(s, f"{path}.sequence[{i}]")
                                        for i, s in enumerate(node.steps)]}
    if node.HasField("within_days"):
        out["within_days"] = node.within_days
    if node.HasField("window"):
        out["window"] = _window_to_json(node.window)
    if node.HasField("then_not"):
        out["then_not"] = _step_to_json(node.then_not, f"{path}.then_not")
    return out


def _step_to_json(step: pb.SequenceStep, path: str) -> dict[str, Any]:
    """A sequence step -> {"event": …, "where": …} or {"orders": …} (unset: {})."""
    which = step.WhichOneof("step")
    if which == "event":
        out: dict[str, Any] = {"event": step.event.event}
        if step.event.HasField("where"):
            out["where"] = _rule_to_json(step.event.where, f"{path}.where")
        return out
    if which == "orders":
        return {"orders": _rule_to_json(step.orders, f"{path}.orders")}
    return {}


def _top_to_json(node: pb.TopRule, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {"n": node.n, "by": node.by}
    if node.order:
        out["order"] = node.order
    if node.HasField("of"):
        out["of"] = _rule_to_json(node.of, f"{path}.top.of")
    return {"top": out}


def _timed(node: pb.EventRule | pb.OrdersRule, out: dict[str, Any],
           path: str) -> dict[str, Any]:
    """Add the window and having of an event or orders node."""
    if node.HasField("window"):
        out["window"] = _window_to_json(node.window)
    if node.HasField("having"):
        having = node.having
        agg: dict[str, Any] = {"agg": having.agg}
        if having.of:
            agg["of"] = having.of
        agg["op"] = having.op
        if having.HasField("value"):
            agg["value"] = value_to_json(having.value, f"{path}.having.value")
        out["having"] = agg
    return out


def _window_to_json(window: pb.Window) -> dict[str, Any]:
    kind = window.WhichOneof("kind")
    if kind == "range":
        return {"from": getattr(window.range, "from"), "to": window.range.to}
    return {} if kind is None else {kind: getattr(window, kind)}


def value_to_json(value: pb.Value, path: str) -> Any:
    """A protobuf Value -> its JSON form (an unset Value is null)."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise RuleError(path, f"expected a finite number, got {number}")
        return int(number) if number.is_integer() and abs(number) <= EXACT_DOUBLE else number
    if kind == "list_value":
        return [value_to_json(v, f"{path}[{i}]") for i, v in enumerate(value.list_value.values)]
    if kind in ("days_ago", "next_days"):
        return {kind: getattr(value, kind)}
    return getattr(value, kind)


# ====================================================================== rules: JSON -> proto
def rule_from_json(obj: Any) -> pb.Rule:
    """The CONTRACT JSON form (dict or text) -> a protobuf rule tree, for clients.

    Raises ValueError for what the tree cannot hold; the server does the validating.
    """
    if isinstance(obj, (str, bytes)):
        obj = orjson.loads(obj)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a rule object, got {type(obj).__name__}")
    if "and" in obj or "or" in obj:
        key = "and" if "and" in obj else "or"
        return pb.Rule(**{key: pb.Rules(rules=[rule_from_json(c) for c in obj[key]])})
    if "not" in obj:
        return pb.Rule(**{"not": rule_from_json(obj["not"])})
    if "all" in obj:
        return pb.Rule(all=obj["all"])
    if "segment" in obj:
        return pb.Rule(segment=obj["segment"])
    if "sample" in obj and isinstance(obj["sample"], dict):
        return pb.Rule(sample=pb.SampleRule(**obj["sample"]))
    if "sql" in obj and isinstance(obj["sql"], dict):
        body = obj["sql"]
        return pb.Rule(sql=pb.SqlRule(source=body.get("source", ""), query=body.get("query", ""),
                                      params=[value_from_json(v)
                                              for v in body.get("params", [])]))
    if "field" in obj:
        cond = pb.Condition(field=obj["field"], op=obj.get("op", ""))
        if "value" in obj:
            cond.value.CopyFrom(value_from_json(obj["value"]))
        return pb.Rule(field=cond)
    if "sequence" in obj:
        return pb.Rule(sequence=_sequence_from_json(obj))
    if "top" in obj and isinstance(obj["top"], dict):
        params = obj["top"]
        top = pb.TopRule(n=params.get("n", 0), by=params.get("by", ""),
                         order=params.get("order", ""))
        if "of" in params:
            top.of.CopyFrom(rule_from_json(params["of"]))
        return pb.Rule(top=top)
    if "items" in obj:
        items = pb.ItemsRule(items=rule_from_json(obj["items"]))
        if "orders" in obj:
            items.orders.CopyFrom(rule_from_json(obj["orders"]))
        _timed_from_json(items, obj)
        return pb.Rule(items=items)
    if "event" in obj:
        event = pb.EventRule(event=obj["event"])
        if "where" in obj:
            event.where.CopyFrom(rule_from_json(obj["where"]))
        _timed_from_json(event, obj)
        return pb.Rule(event=event)
    if "orders" in obj:
        orders = pb.OrdersRule(orders=rule_from_json(obj["orders"]))
        _timed_from_json(orders, obj)
        return pb.Rule(orders=orders)
    raise ValueError(f"not a rule node: {sorted(obj)}")


def _sequence_from_json(obj: dict[str, Any]) -> pb.SequenceRule:
    steps = obj["sequence"]
    if not isinstance(steps, list):
        raise ValueError("expected a list of steps in sequence")
    node = pb.SequenceRule(steps=[_step_from_json(s) for s in steps])
    if "within_days" in obj:
        node.within_days = obj["within_days"]
    if "then_not" in obj:
        node.then_not.CopyFrom(_step_from_json(obj["then_not"]))
    _window_from_json(node, obj.get("window"))
    return node


def _step_from_json(step: Any) -> pb.SequenceStep:
    if isinstance(step, dict) and "event" in step:
        event = pb.EventStep(event=step["event"])
        if "where" in step:
            event.where.CopyFrom(rule_from_json(step["where"]))
        return pb.SequenceStep(event=event)
    if isinstance(step, dict) and "orders" in step:
        return pb.SequenceStep(orders=rule_from_json(step["orders"]))
    raise ValueError(f"expected a sequence step (event or orders), got {step!r}")


def _window_from_json(node: Any, window: Any) -> None:
    """Set node.window from a JSON window (None: leave it unset)."""
    if window is not None:
        if "from" in window or "to" in window:
            node.window.range.CopyFrom(pb.TimeRange(**{"from": window.get("from", ""),
                                                       "to": window.get("to", "")}))
        elif "last_days" in window:
            node.window.last_days = window["last_days"]
        elif "next_days" in window:
            node.window.next_days = window["next_days"]


def _timed_from_json(node: pb.EventRule | pb.OrdersRule, obj: dict[str, Any]) -> None:
    _window_from_json(node, obj.get("window"))
    having = obj.get("having")
    if having is not None:
        node.having.agg = having.get("agg", "")
        node.having.of = having.get("of", "")
        node.having.op = having.get("op", "")
        if "value" in having:
            node.having.value.CopyFrom(value_from_json(having["value"]))


def value_from_json(value: Any) -> pb.Value:
    if isinstance(value, bool):
        return pb.Value(bool_value=value)
    if isinstance(value, int):
        return pb.Value(int_value=value)
    if isinstance(value, float):
        return pb.Value(number_value=value)
    if isinstance(value, str):
        return pb.Value(string_value=value)
    if isinstance(value, list):
        return pb.Value(list_value=pb.ValueList(values=[value_from_json(v) for v in value]))
    if isinstance(value, dict) and len(value) == 1 and ("days_ago" in value
                                                       or "next_days" in value):
        return pb.Value(**value)
    raise ValueError(f"cannot send {value!r} as a rule value")


# ====================================================================== requests
TARGET_FIELDS = ("rule", "rule_json", "segment")


def target_of(request: Any) -> Any:
    """What a request asks to evaluate: a JSON rule (dict or text) or a segment reference."""
    given = [name for name in TARGET_FIELDS if request.HasField(name)]
    if len(given) > 1:  # no silent winner: the caller meant one of them
        raise BitsegError(f"both {given[0]} and {given[1]} are set: give only one of "
                          "rule, rule_json or segment")
    if not given:
        raise RuleError("$", "expected a rule: set one of rule, rule_json or segment")
    if given[0] == "rule":
        return rule_to_json(request.rule)
    if given[0] == "rule_json":
        return request.rule_json
    return {"segment": request.segment}


def rule_target(rule: Any = None, segment: str | None = None) -> dict[str, Any]:
    """Client side: the `target` fields of a request for a rule (dict, JSON text or
    protobuf) or a segment name."""
    if (rule is None) == (segment is None):
        raise ValueError("give exactly one of rule or segment")
    if segment is not None:
        return {"segment": segment}
    if isinstance(rule, pb.Rule):
        return {"rule": rule}
    if isinstance(rule, bytes):
        rule = rule.decode()
    return {"rule_json": rule if isinstance(rule, str) else orjson.dumps(rule).decode()}


def as_of_of(request: Any) -> datetime | None:
    """A request's as_of, or None when it has none."""
    if not request.HasField("as_of"):
        return None
    try:
        return to_datetime(request.as_of)
    except (ValueError, OverflowError) as exc:
        raise BitsegError(f"as_of: not a valid timestamp: {exc}") from None


def now() -> datetime:
    return datetime.now(timezone.utc)


def to_datetime(ts: Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=timezone.utc)


def to_timestamp(moment: datetime | str | None) -> Timestamp | None:
    """A datetime (naive is UTC) or ISO 8601 text -> Timestamp; None stays None."""
    if moment is None:
        return None
    ts = Timestamp()
    if isinstance(moment, str):
        try:
            ts.FromMicroseconds(parse_timestamp(moment.strip()))  # the engine's own reading
        except ValueError:
            raise BitsegError(f"as_of: expected an ISO 8601 timestamp, got {moment!r}") from None
        return ts
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    ts.FromDatetime(moment)
    return ts


def page_size_of(request: pb.MembersRequest) -> int:
    """0 means the default; more than the maximum is taken as the maximum (AIP-158)."""
    return min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def profile_reply(profile: dict[str, Any]) -> pb.Profile:
    """A profile ({"id": ..., field: value}) -> Profile, its values in a Struct."""
    reply = pb.Profile(id=profile["id"])
    reply.fields.update({k: v for k, v in profile.items() if k != "id"})
    return reply


_KIND_NAMES = {pb.SEGMENT_KIND_STATIC: "static", pb.SEGMENT_KIND_DYNAMIC: "dynamic",
               pb.SEGMENT_KIND_MATERIALIZED: "materialized"}
KIND_OF_NAME = {name: kind for kind, name in _KIND_NAMES.items()}


def kind_of(kind: int) -> str:
    """A request's SegmentKind -> the engine's kind name."""
    name = _KIND_NAMES.get(kind)
    if name is None:
        raise BitsegError("kind: expected static, dynamic or materialized")
    return name


def source_of(request: Any) -> Any:
    """The rule of a segment request's `source`, or None when unset."""
    kind = request.WhichOneof("source")
    if kind == "rule":
        return rule_to_json(request.rule)
    if kind == "rule_json":
        return request.rule_json
    return None


def from_micros(micros: int | None) -> Timestamp | None:
    if micros is None:
        return None
    ts = Timestamp()
    ts.FromMicroseconds(micros)
    return ts


def segment_reply(info: SegmentInfo, change: Change | None = None) -> pb.Segment:
    reply = pb.Segment(
        name=info.name, kind=KIND_OF_NAME[info.kind],
        rule_json="" if info.rule is None else orjson.dumps(info.rule).decode(),
        size=info.size, created_at=from_micros(info.created_at),
        refreshed_at=from_micros(info.refreshed_at),
        refresh_every_seconds=info.refresh_every or 0, tags=info.tags)
    if change is not None:
        reply.entered, reply.exited = change.entered, change.exited
        reply.unknown_ids.extend(change.unknown)
    return reply




def template_reply(template: Template) -> pb.Template:
    """A template, its defaults and rule as JSON text."""
    return pb.Template(
        name=template.name, description=template.description, builtin=template.builtin,
        rule_json=orjson.dumps(template.rule).decode(),
        params=[pb.TemplateParam(name=p.name, type=p.type, description=p.description,
                                 default_json=orjson.dumps(p.default).decode(), min=p.min)
                for p in template.params])


def point_reply(point: Point) -> pb.SizePoint:
    return pb.SizePoint(time=from_micros(point.at), size=point.size, cause=point.cause)




def overlap_reply(overlap: Overlap) -> pb.OverlapReply:
    return pb.OverlapReply(segments=list(overlap.names), sizes=list(overlap.sizes),
                           rows=[pb.OverlapRow(segment=name, counts=row)
                                 for name, row in zip(overlap.names, overlap.matrix,
                                                      strict=True)])




# ====================================================================== decimals
RATIO_PLACES = 6


def decimal_text(value: Fraction | None, places: int | None = None) -> str:
    """A rational as decimal text: exact when `places` is None (the value must then be a
    terminating decimal, as sums of decimal amounts are), otherwise rounded half-even
    to `places`; None (undefined) is ""."""
    if value is None:
        return ""
    if places is None:
        places = _decimal_places(value)
        if places is None:
            places = RATIO_PLACES
    units = round(value * 10**places)  # Fraction rounds half to even
    return format(Decimal(units).scaleb(-places), "f")


def _decimal_places(value: Fraction) -> int | None:
    """How many decimal places represent the value exactly (None: none do)."""
    d, twos, fives = value.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    return max(twos, fives) if d == 1 else None


def metrics_reply(metrics: Metrics) -> pb.MetricsReply:
    percent = Fraction(100)
    share_p, share_r = metrics.share_of_profiles, metrics.share_of_revenue
    return pb.MetricsReply(
        profiles=metrics.profiles, total_profiles=metrics.total_profiles,
        share_of_profiles_pct=decimal_text(None if share_p is None else share_p * percent,
                                           RATIO_PLACES),
        orders=metrics.orders, customers=metrics.customers,
        revenue=decimal_text(metrics.revenue), total_revenue=decimal_text(metrics.total_revenue),
        share_of_revenue_pct=decimal_text(None if share_r is None else share_r * percent,
                                          RATIO_PLACES),
        average_order_value=decimal_text(metrics.average_order_value, RATIO_PLACES))




# ====================================================================== insights, exports
def insights_reply(found: Any, eval_micros: int) -> pb.InsightsReply:
    """index.insights.Insights -> protobuf (shares in percent, lift to RATIO_PLACES)."""
    percent = Fraction(100)

    def pct(x: Fraction | None) -> str:
        return decimal_text(None if x is None else x * percent, RATIO_PLACES)

    def field(f: Any) -> pb.FieldInsight:
        shown = {} if f.min is None else {"min": value_text(f.min), "max": value_text(f.max)}
        return pb.FieldInsight(
            name=f.name, type=f.type, count=f.count, base_count=f.base_count,
            distinct=f.distinct,
            values=[pb.ValueShare(value_json=orjson.dumps(v.value).decode(), count=v.count,
                                  base_count=v.base_count, share_pct=pct(v.share),
                                  base_share_pct=pct(v.base_share),
                                  lift=decimal_text(v.lift, RATIO_PLACES))
                    for v in f.values],
            buckets=[pb.HistogramBucket(low=value_text(b.low), high=value_text(b.high),
                                        count=b.count, base_count=b.base_count)
                     for b in f.buckets],
            quantiles=[pb.Quantile(name=q, value=value_text(v)) for q, v in f.quantiles],
            **shown)

    return pb.InsightsReply(
        profiles=found.profiles, total_profiles=found.total_profiles,
        fields=[field(f) for f in found.fields],
        events=[pb.EventInsight(event=e.event, windows=[
            pb.EventActivity(days=w.days, events=w.events, profiles=w.profiles,
                             base_events=w.base_events, base_profiles=w.base_profiles)
            for w in e.windows]) for e in found.events],
        orders=metrics_reply(found.orders), eval_micros=eval_micros)


def export_schedule_reply(s: Any) -> pb.ExportSchedule:
    """index.exports.Schedule -> protobuf."""
    return pb.ExportSchedule(id=s.id, segment=s.segment, every_seconds=s.every,
                             fields=list(s.fields), require=list(s.require), format=s.format,
                             out=s.out, rotate=s.rotate, runs=s.runs, last_file=s.last_file,
                             last_rows=s.last_rows, last_error=s.last_error)


# ====================================================================== bulk actions, traits
def bulk_action_of(request: pb.BulkActionRequest) -> Any:
    """BulkActionRequest -> index.bulk.BulkAction (value_json "" is no value)."""
    from bitseg.index.bulk import BulkAction
    value = None
    if request.value_json:
        try:
            value = orjson.loads(request.value_json)
        except orjson.JSONDecodeError as exc:
            raise BitsegError(f"value_json: not JSON ({exc})") from None
    target = target_of(request)
    if request.HasField("segment"):
        return BulkAction(request.action, request.field, value, segment=request.segment)
    return BulkAction(request.action, request.field, value, rule=target)


def bulk_action_reply(done: Any) -> pb.BulkActionReply:
    """index.bulk.BulkResult -> protobuf."""
    return pb.BulkActionReply(members=done.members, changed=done.changed, dry_run=done.dry_run,
                              entry_json=orjson.dumps(done.entry).decode() if done.entry else "")


def refresh_traits_reply(report: Any) -> pb.RefreshTraitsReply:
    """index.traits.RefreshReport -> protobuf."""
    return pb.RefreshTraitsReply(as_of=to_timestamp(report.as_of), profiles=report.profiles,
                                 changed=report.changed, holders=report.holders)


# ====================================================================== cursors
class CursorError(BitsegError):
    """A Members cursor that this server did not hand out (INVALID_ARGUMENT)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"cursor: {message}")


CURSOR_FORMAT = 1
_CURSOR = struct.Struct(">BQIq")  # format, store version, last dense id, as_of µs


@dataclass(frozen=True)
class Cursor:
    """Where a Members stream stopped: after dense id `last`, evaluated at `as_of_us`."""

    version: int
    last: int
    as_of_us: int

    def encode(self) -> str:
        raw = _CURSOR.pack(CURSOR_FORMAT, self.version, self.last, self.as_of_us)
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """The cursor a Members page handed out; CursorError for anything else."""
        shown = text if len(text) <= 40 else text[:37] + "..."
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            fmt, version, last, as_of_us = _CURSOR.unpack(raw)
        except (ValueError, struct.error):
            raise CursorError(f"not a Members cursor: {shown!r}") from None
        if fmt != CURSOR_FORMAT:
            raise CursorError(f"unknown cursor format {fmt}")
        if not T.MIN_US <= as_of_us <= T.MAX_US:
            raise CursorError(f"not a Members cursor (its as_of is out of range): {shown!r}")
        return cls(version, last, as_of_us)

    @property
    def as_of(self) -> datetime:
        return EPOCH + timedelta(microseconds=self.as_of_us)


def micros_of(moment: datetime) -> int:
    """µs since the epoch of an aware datetime, exactly."""
    return (moment - EPOCH) // timedelta(microseconds=1)


# ====================================================================== explain
def explain_node(node: Node) -> pb.ExplainNode:
    """An explain tree (index.explain.Node) -> protobuf."""
    return pb.ExplainNode(path=node.path, text=node.text, count=node.count, note=node.note,
                          children=[explain_node(c) for c in node.children])


# ====================================================================== describe
def value_text(value: Any) -> str:
    """A described value as proto text: numbers exact in decimal, bools true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return format(value, "f")
    return str(value)


def field_info(info: FieldInfo) -> pb.FieldInfo:
    shown = {} if info.min is None else {"min": value_text(info.min),
                                         "max": value_text(info.max)}
    return pb.FieldInfo(
        name=info.name, type=info.type, count=info.count, distinct=info.distinct,
        top=[pb.ValueCount(value=value_text(v), count=n) for v, n in info.top],
        quantiles=[pb.Quantile(name=q, value=value_text(v)) for q, v in info.quantiles],
        **shown)


def describe_reply(found: Description, eval_micros: int) -> pb.DescribeReply:
    return pb.DescribeReply(
        profiles=found.profiles, fields=[field_info(f) for f in found.fields],
        events=[pb.EventTypeInfo(name=e.name, count=e.count, profiles=e.profiles,
                                 properties=[field_info(p) for p in e.properties])
                for e in found.events],
        orders=found.orders, order_fields=[field_info(f) for f in found.order_fields],
        item_fields=[field_info(f) for f in found.item_fields], version=found.version,
        eval_micros=eval_micros)


def values_reply(info: FieldInfo) -> pb.ValuesReply:
    return pb.ValuesReply(field=info.name, type=info.type, count=info.count,
                          distinct=info.distinct,
                          values=[pb.ValueCount(value=value_text(v), count=n)
                                  for v, n in info.top])


# ====================================================================== sql sources
def sources_reply(statuses: list[Any], sources: dict[str, Any]) -> pb.ListSourcesReply:
    """server.sources.SourceStatus list (and their settings) -> protobuf."""
    return pb.ListSourcesReply(sources=[
        pb.SourceInfo(name=s.name, host=s.host, database=s.database, answers=s.answers,
                      error=s.error, statement_timeout=sources[s.name].statement_timeout,
                      row_limit=sources[s.name].row_limit, ttl=sources[s.name].ttl)
        for s in statuses])
