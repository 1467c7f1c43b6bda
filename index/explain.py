"""Explain a rule: the whole rule as one sentence in plain words, and the count at every
node of its tree, all from one snapshot and one as_of (so each count equals a separate
Count of that sub-rule).

    Profiles whose country is 'DE', who had at least 3 'popup_opened' events where popup
    is 'spring' in the last 30 days and who are not in segment 'churned'

Words are exact, and English: a negated condition says "(or is unset)" where the
profiles lacking the field are included (CONTRACT §2.2), and the negation of a count
is said as the opposite count ("placed fewer than 3 orders", "did not place an order").
Rule constants are shown as written; counts of profiles have thousands separators.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from bitseg.index import describe
from bitseg.index import types as T
from bitseg.index.evaluate import Evaluator
from bitseg.index.rules import And, Cond, Not, Or, Rule
from bitseg.index.sample import sample_words
from bitseg.index.snapshot import Snapshot
from bitseg.index.sqlrule import SqlRule, sql_note, sql_words
from bitseg.index.top import Top


@dataclass(frozen=True)
class Node:
    """One node of the rule tree: its JSON path, itself in words, and its count."""

    path: str
    text: str
    count: int
    children: tuple[Node, ...] = ()
    note: str = ""  # names a value that never occurs (index.describe.note)

    def lines(self, depth: int = 0) -> str:
        """One node per line, children indented: `text: count`; a note on a line of
        its own under its node: `note: …`."""
        out = [f"{'  ' * depth}{self.text}: {self.count:,}"]
        if self.note:
            out.append(f"{'  ' * (depth + 1)}note: {self.note}")
        out.extend(child.lines(depth + 1) for child in self.children)
        return "\n".join(out)


@dataclass(frozen=True)
class Explanation:
    sentence: str
    root: Node

    @property
    def text(self) -> str:
        return self.root.lines()


def explain(snapshot: Snapshot, rule: Any, typed: Rule, as_of_us: int) -> Explanation:
    """The explanation of a rule given in JSON form (dict or text) and parsed (`typed`)."""
    obj = orjson.loads(rule) if isinstance(rule, (str, bytes)) else rule
    root = _tree(obj, typed, "$", Evaluator(snapshot, as_of_us))
    return Explanation(_sentence(obj, typed, snapshot), root)


def _tree(obj: dict[str, Any], node: Rule, path: str, ev: Evaluator) -> Node:
    children: list[Node] = []
    if isinstance(node, (And, Or)):
        key = "and" if isinstance(node, And) else "or"
        children = [_tree(o, n, f"{path}.{key}[{i}]", ev)
                    for i, (o, n) in enumerate(zip(obj[key], node.children, strict=True))]
    elif isinstance(node, Not):
        children = [_tree(obj["not"], node.child, f"{path}.not", ev)]
    elif isinstance(node, Top) and "of" in obj["top"]:
        children = [_tree(obj["top"]["of"], node.of, f"{path}.top.of", ev)]
    note = sql_note(node, ev.snap) if isinstance(node, SqlRule) else describe.note(node, ev.snap)
    return Node(path, node_words(obj, node), ev.count(node), tuple(children), note)


def _sentence(obj: dict[str, Any], typed: Rule, snapshot: Snapshot) -> str:
    if "all" in obj:
        return "All live profiles"
    sentence = "Profiles " + positive(obj, typed)
    if "segment" in obj:  # say what the segment is
        from bitseg.index.segments import SegmentSet

        segments = snapshot.segments
        segment = segments.segments.get(obj["segment"]) \
            if isinstance(segments, SegmentSet) else None
        if segment is not None and segment.typed is not None:
            sentence += (f"; {segment.kind} segment {_show(segment.name)} is: Profiles "
                         + positive(segment.rule, segment.typed))
        elif segment is not None:
            sentence += f"; segment {_show(segment.name)} is a static list of profiles"
    return sentence


# ---------------------------------------------------------------------- tree nodes
def node_words(obj: dict[str, Any], node: Rule) -> str:
    """One node (not its children) in plain words."""
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
    if "sample" in obj:
        return sample_words(obj)
    if "top" in obj:
        return _top(obj, node)
    if "sql" in obj:
        return "profiles " + sql_words(obj["sql"])
    if "sequence" in obj:
        return _sequence(obj, negated=False)
    if "event" in obj or "orders" in obj or "items" in obj:
        return _timed(obj, negated=False)
    return condition_words(obj, _type_of(node))


# ---------------------------------------------------------------------- clauses
def positive(obj: dict[str, Any], node: Rule | None) -> str:
    """A clause true for the rule's profiles: "whose …" / "who …"."""
    if "and" in obj:
        return _join([_part(o, n, positive) for o, n in _kids(obj, "and", node)], "and")
    if "or" in obj:
        return _join([_part(o, n, positive) for o, n in _kids(obj, "or", node)], "or")
    if "not" in obj:
        return negative(obj["not"], node.child if isinstance(node, Not) else None)
    if "all" in obj:
        return "who exist"
    if "segment" in obj:
        return f"who are in segment {_show(obj['segment'])}"
    if "sample" in obj:
        return "who are " + sample_words(obj)
    if "top" in obj:
        return "who are " + _top(obj, node, clause=True)
    if "sql" in obj:
        return sql_words(obj["sql"])
    if "sequence" in obj:
        return "who " + _sequence(obj, negated=False)
    if "event" in obj or "orders" in obj or "items" in obj:
        return "who " + _timed(obj, negated=False)
    return "whose " + condition_words(obj, _type_of(node))


def negative(obj: dict[str, Any], node: Rule | None) -> str:
    """A clause true for the live profiles the rule leaves out (De Morgan for and/or)."""
    if "and" in obj:
        return _join([_part(o, n, negative) for o, n in _kids(obj, "and", node)], "or")
    if "or" in obj:
        return _join([_part(o, n, negative) for o, n in _kids(obj, "or", node)], "and")
    if "not" in obj:
        return positive(obj["not"], node.child if isinstance(node, Not) else None)
    if "all" in obj:
        return "who do not exist"
    if "segment" in obj:
        return f"who are not in segment {_show(obj['segment'])}"
    if "sample" in obj:
        return "who are " + sample_words(obj, negated=True)
    if "top" in obj:
        return "who are not " + _top(obj, node, clause=True)
    if "sql" in obj:
        return sql_words(obj["sql"], negated=True)
    if "sequence" in obj:
        return "who " + _sequence(obj, negated=True)
    if "event" in obj or "orders" in obj or "items" in obj:
        return "who " + _timed(obj, negated=True)
    return "whose " + condition_words(obj, _type_of(node), negated=True)


def _kids(obj: dict[str, Any], key: str, node: Rule | None) -> list[tuple[Any, Rule | None]]:
    typed = node.children if isinstance(node, (And, Or)) else [None] * len(obj[key])
    return list(zip(obj[key], typed, strict=True))


def _part(obj: dict[str, Any], node: Rule | None, clause: Any) -> str:
    """A child clause, in parentheses when it is itself a list joined by and/or."""
    text = clause(obj, node)
    compound = ("and" in obj or "or" in obj) and len(next(iter(obj.values()))) > 1
    return f"({text})" if compound else text


def _join(parts: list[str], word: str) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + f" {word} " + parts[-1]


def _type_of(node: Rule | None) -> str | None:
    return node.type if isinstance(node, Cond) else None


# ---------------------------------------------------------------------- conditions
_COMPARE = {"gt": "greater than", "gte": "at least", "lt": "less than", "lte": "at most"}
_COMPARE_TIME = {"gt": "after", "gte": "on or after", "lt": "before", "lte": "on or before"}
_OPPOSITE = {"gt": "lte", "gte": "lt", "lt": "gte", "lte": "gt"}


def condition_words(obj: dict[str, Any], type_: str | None, negated: bool = False) -> str:
    """A field condition without its subject: "country is 'DE'", "age is at least 18"."""
    field, op, value = obj["field"], obj["op"], obj.get("value")
    many = type_ == T.KEYWORDS
    unset = " (or is unset)"
    if op in ("exists", "not_exists"):
        return f"{field} is {'set' if (op == 'exists') != negated else 'unset'}"
    if op in _COMPARE:
        words = _COMPARE_TIME if type_ in T.TIME_TYPES else _COMPARE
        shown = f"{field} is {words[_OPPOSITE[op] if negated else op]} {_show(value)}"
        return shown + unset if negated else shown
    if op == "between":
        lo, hi = (_show(v) for v in value)
        return f"{field} is not between {lo} and {hi}{unset}" if negated \
            else f"{field} is between {lo} and {hi}"
    if op == "anniversary_in":
        days = value["next_days"]
        when = "today" if days == 1 else f"in the next {days} days"
        return (f"{field}'s anniversary is not {when} (or {field} is unset)" if negated
                else f"{field}'s anniversary is {when}")
    if op == "has_all":
        listed = _list(value, "and")
        return f"{field} {'do not ' if negated else ''}include all of {listed}"
    if op in ("in", "not_in") and isinstance(value, list) and len(value) == 1:
        op, value = ("eq" if op == "in" else "ne"), value[0]  # "is 'x'", not "is one of 'x'"
    if op in ("eq", "ne"):
        has = (op == "eq") != negated
        if many:
            return f"{field} include {_show(value)}" if has else (
                f"{field} do not include {_show(value)}" if op == "eq"
                else f"{field} include {_show(value)} (or are unset)")
        if op == "eq":
            return f"{field} is {_show(value)}" if has else f"{field} is not {_show(value)}{unset}"
        return f"{field} is not {_show(value)}" if not negated \
            else f"{field} is {_show(value)}{unset}"
    listed = _list(value, "or")  # in, not_in
    has = (op == "in") != negated
    if many:
        return f"{field} include any of {listed}" if has else (
            f"{field} include none of {listed}" if op == "in"
            else f"{field} include any of {listed} (or are unset)")
    if op == "in":
        return f"{field} is one of {listed}" if has else f"{field} is none of {listed}{unset}"
    return f"{field} is none of {listed}" if not negated \
        else f"{field} is one of {listed}{unset}"


def _where_words(obj: dict[str, Any], negated: bool = False) -> str:
    """A `where` (event properties) or `orders` (order fields) rule in words; negated:
    the rows it leaves out (De Morgan, as for profiles)."""
    if "and" in obj or "or" in obj:
        key = "and" if "and" in obj else "or"
        word = key if not negated else ("or" if key == "and" else "and")
        parts = [f"({_where_words(o, negated)})" if ("and" in o or "or" in o)
                 else _where_words(o, negated) for o in obj[key]]
        return _join(parts, word)
    if "not" in obj:
        return _where_words(obj["not"], not negated)
    if "all" in obj:
        return "none" if negated else "any"
    if "field" in obj:
        return condition_words(obj, None, negated)
    return orjson.dumps(obj).decode()


# ---------------------------------------------------------------------- events, orders
_TIMES = {"gte": "at least", "gt": "more than", "lte": "at most", "lt": "fewer than",
          "eq": "exactly"}
_AMOUNT = {"gte": "of at least", "gt": "of more than", "lte": "of at most",
           "lt": "of less than", "eq": "of exactly", "ne": "other than"}
_NEGATED = {"gt": "lte", "gte": "lt", "lt": "gte", "lte": "gt", "eq": "ne", "ne": "eq",
            "in": "not_in", "not_in": "in"}
_AGG = {"sum": "a total", "avg": "an average", "min": "a smallest", "max": "a largest"}


@dataclass(frozen=True)
class _Rows:
    """What an event or orders node counts, for a sentence: "an order where …"."""

    one: str  # "order", "'login' event", "event of any type"
    many: str  # "orders", "'login' events", "events of any type"
    where: str  # " where status is 'paid'", or ""
    verb: str  # "placed", "had"
    verb_not: str  # "did not place", "did not have"

    def some(self) -> str:
        article = "an" if self.one.lstrip("'")[:1].lower() in tuple("aeiou") else "a"
        return f"{article} {self.one}{self.where}"

    def number(self, amount: str, value: Any) -> str:
        return f"{amount} {self.one if value == 1 else self.many}{self.where}"


def _timed(obj: dict[str, Any], negated: bool) -> str:
    """An event or orders node as a verb phrase: "had at least 3 'x' events in …"."""
    if "event" in obj:
        name = obj["event"]
        one = "event of any type" if name == "*" else f"{_show(name)} event"
        many = "events of any type" if name == "*" else f"{_show(name)} events"
        where = f" where {_where_words(obj['where'])}" if "where" in obj else ""
        rows = _Rows(one, many, where, "had", "did not have")
    elif "items" in obj:  # CONTRACT §2.4b: item lines as rows
        chosen = obj.get("items") or {"all": True}
        where = "" if "all" in chosen else f" where {_where_words(chosen)}"
        if "orders" in obj and "all" not in (obj["orders"] or {"all": True}):
            where += f" in orders where {_where_words(obj['orders'])}"
        rows = _Rows("item line", "item lines", where, "bought", "did not buy")
    else:
        selected = obj.get("orders") or {"all": True}
        where = "" if "all" in selected else f" where {_where_words(selected)}"
        rows = _Rows("order", "orders", where, "placed", "did not place")
    when = _window(obj.get("window"))
    having = obj.get("having") or {"agg": "count", "op": "gte", "value": 1}
    agg, op, value = having.get("agg"), having.get("op"), having.get("value")
    if agg == "count":
        return _count_words(rows, op, value, negated) + when
    if agg in ("first", "last"):
        return _recency_words(rows, when, agg, op, value, negated)
    if op == "between" and isinstance(value, list) and len(value) == 2:
        amount = f"between {_show(value[0])} and {_show(value[1])}"
    elif op in ("in", "not_in"):
        listed = _list(value, "or")
        amount = f"of {listed}" if op == "in" else f"other than {listed}"
    else:
        amount = f"{_AMOUNT.get(op, op)} {_show(value)}"
    verb = rows.verb_not if negated else rows.verb
    return (f"{verb} {rows.many}{rows.where}{when} with {_AGG.get(agg, agg)} "
            f"{having.get('of')} {amount}")


_MOMENT = {"lt": "before", "lte": "at or before", "gt": "after", "gte": "at or after",
           "eq": "at", "ne": "not at"}


def _recency_words(rows: _Rows, when: str, agg: str, op: str, value: Any,
                   negated: bool) -> str:
    """first / last: "placed orders, the latest before 90 days ago"."""
    if op == "between" and isinstance(value, list) and len(value) == 2:
        moment = f"between {_show(value[0])} and {_show(value[1])}"
    elif op in ("in", "not_in"):
        moment = ("at " if op == "in" else "at none of ") + _list(value, "or")
    else:
        moment = f"{_MOMENT.get(op, op)} {_show(value)}"
    which = "the latest" if agg == "last" else "the earliest"
    if negated:
        return f"{rows.verb_not} {rows.some()}{when}, or {which} was not {moment}"
    return f"{rows.verb} {rows.many}{rows.where}{when}, {which} {moment}"


def _top(obj: dict[str, Any], node: Rule | None, clause: bool = False) -> str:
    """"the 1,000 with the highest 'ltv' (ties by id) among profiles who …"."""
    params = obj["top"]
    n, by = params.get("n"), params.get("by")
    most = "lowest" if params.get("order") == "asc" else "highest"
    count = f"{n:,}" if isinstance(n, int) else _show(n)
    text = f"{'among ' if clause else ''}the {count} with the {most} {_show(by)}"
    if "of" in params:
        of = node.of if isinstance(node, Top) else None
        text += " among profiles " + positive(params["of"], of)
    return text + " (ties: smaller profile id first)"


def _count_words(rows: _Rows, op: str, value: Any, negated: bool) -> str:
    """A count condition, a negated one said as the opposite count (counts of no rows
    being 0, "not at least 3" is exactly "fewer than 3")."""
    between = op == "between" and isinstance(value, list) and len(value) == 2
    if negated and between:
        lo, hi = (_show(v) for v in value)
        return f"{rows.verb} fewer than {lo} or more than {hi} {rows.many}{rows.where}"
    if negated:
        op = _NEGATED.get(op, op)
    if (op, value) in (("eq", 0), ("lt", 1), ("lte", 0)):
        return f"{rows.verb_not} {rows.some()}"
    if (op, value) in (("gte", 1), ("gt", 0), ("ne", 0)):
        return f"{rows.verb} {rows.some()}"
    if between:
        return f"{rows.verb} between {_show(value[0])} and {_show(value[1])} " \
            f"{rows.many}{rows.where}"
    if op == "in":
        return f"{rows.verb} {rows.number(_list(value, 'or'), None)}"
    if op in ("ne", "not_in"):
        listed = _list(value, "or")
        return f"{rows.verb} a number of {rows.many}{rows.where} other than {listed}"
    return f"{rows.verb} {rows.number(f'{_TIMES.get(op, op)} {_show(value)}', value)}"


def _window(window: Any) -> str:
    if not window:
        return ""
    if "last_days" in window:
        n = window["last_days"]
        return " in the last day" if n == 1 else f" in the last {n} days"
    if "next_days" in window:
        n = window["next_days"]
        return " in the next day" if n == 1 else f" in the next {n} days"
    return f" from {window.get('from')} until {window.get('to')}"


def _sequence(obj: dict[str, Any], negated: bool) -> str:
    """A sequence as a verb phrase: "had an 'add_to_cart' event, then placed an order
    within 1 day, in the last 30 days"; with then_not: "had an 'add_to_cart' event in
    the last 7 days not followed by an order within 1 day"."""
    steps = obj["sequence"]
    days = obj.get("within_days")
    within = "" if days is None else f" within {days} day{'' if days == 1 else 's'}"
    when = _window(obj.get("window"))
    if "then_not" in obj:
        first, then_not = steps[0], obj["then_not"]
        if negated:
            return (f"had no {_step_noun(first, article=False)}{when} that was not followed "
                    f"by {_step_noun(then_not)}{within}")
        return f"{_step_verb(first)}{when} not followed by {_step_noun(then_not)}{within}"
    if len(steps) > 2 and within:
        within = f", all{within}"
    when = f",{when}" if len(steps) > 1 and when else when
    if negated:
        verb = "did not place " if "orders" in steps[0] else "did not have "
        chain = verb + " followed by ".join(
            [_step_noun(steps[0]), *(_step_noun(s) for s in steps[1:])])
        return chain + within + when
    return ", then ".join(_step_verb(s) for s in steps) + within + when


def _step_noun(step: dict[str, Any], article: bool = True) -> str:
    """A sequence step as a noun: "an 'add_to_cart' event where …", "an order"."""
    if "event" in step:
        name = step["event"]
        one = "event of any type" if name == "*" else f"{_show(name)} event"
        where = f" where {_where_words(step['where'])}" if "where" in step else ""
    else:
        selected = step.get("orders") or {"all": True}
        one, where = "order", ("" if "all" in selected else
                               f" where {_where_words(selected)}")
    if not article:
        return one + where
    return ("an " if one.lstrip("'")[:1].lower() in tuple("aeiou") else "a ") + one + where


def _step_verb(step: dict[str, Any]) -> str:
    return ("placed " if "orders" in step else "had ") + _step_noun(step)


# ---------------------------------------------------------------------- values
def _show(value: Any) -> str:
    if isinstance(value, dict) and "days_ago" in value:
        n = value["days_ago"]
        return "the as_of time" if n == 0 else ("1 day ago" if n == 1 else f"{n} days ago")
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return orjson.dumps(value).decode()


def _list(values: Any, word: str) -> str:
    if not isinstance(values, list):
        return _show(values)
    return _join([_show(v) for v in values], word)
