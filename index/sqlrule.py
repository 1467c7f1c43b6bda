"""Conditions on external SQL tables: {"sql": {"source": NAME, "query": Q, "params": [...]}}.

The rule is true for the live profiles whose id the query returns.  The index never
talks to a database: a snapshot carries an `ExternalIds` provider (the server's
sources, see server/sources.py) that runs the query, caches its answer and maps the
returned ids to dense ids with `resolve_ids`.  Without sources every sql rule is an
error naming its path.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.errors import BitsegError, RuleError
from bitseg.index.ids import MAX_KEY_BYTES
from bitseg.index.keys import from_u32

MAX_QUERY_CHARS = 100_000
MAX_PARAMS = 1_000


@dataclass(frozen=True, slots=True)
class SqlRule:
    """One query of one named source; params are bound by the driver (%s placeholders)."""

    source: str
    query: str
    params: tuple[Any, ...]
    path: str = field(default="$", compare=False)  # for errors found when it runs


@dataclass(frozen=True, slots=True)
class SqlAnswer:
    """What a query returned, mapped to dense ids: `members` are the ids that were known
    profiles when it was mapped, `unknown` the distinct returned ids that were not.
    `age` is how old (seconds) the query's result is."""

    members: BitMap
    unknown: tuple[str, ...]
    distinct: int
    age: float


class ExternalIds(Protocol):
    def answer(self, rule: SqlRule, snapshot: Any) -> SqlAnswer:
        """The query's ids as of the snapshot: raises RuleError (bad source, failed
        query) or SourceUnavailable (the source does not answer)."""
        ...

    def fresh(self) -> ExternalIds:
        """The same provider, but one that re-runs every query (a materialized refresh)."""
        ...


class NoSources:
    """The provider of a server started without --sources."""

    def answer(self, rule: SqlRule, snapshot: Any) -> SqlAnswer:
        raise RuleError(f"{rule.path}.source", f"unknown source {rule.source!r}: no SQL "
                        "sources are configured (start the server with --sources FILE)")

    def fresh(self) -> ExternalIds:
        return self


def with_fresh_sources(snapshot: Any) -> Any:
    """The snapshot with a provider that re-runs its queries instead of using a cache."""
    return replace(snapshot, external=snapshot.external.fresh())


# ---------------------------------------------------------------------- evaluation
def evaluate_sql(rule: SqlRule, snapshot: Any) -> BitMap:
    """The live profiles whose id the query returns."""
    return snapshot.external.answer(rule, snapshot).members & snapshot.live


def unknown_ids(answer: SqlAnswer, live: BitMap) -> int:
    """Distinct returned ids that are not live profiles (never seen, or deleted)."""
    return answer.distinct - answer.members.intersection_cardinality(live)


def resolve_ids(externals: list[str], ids: Any) -> tuple[BitMap, tuple[str, ...]]:
    """External ids -> (dense ids of the known ones, the unknown ones), in one read
    transaction of the id map's store (ids are never reused: a later mapping only adds)."""
    dense: list[int] = []
    unknown: list[str] = []
    store = ids.store
    with store.read() as txn:
        get, db = txn.get, store.db["ids"]
        for external in externals:
            raw = external.encode()
            found = get(raw, db=db) if 0 < len(raw) <= MAX_KEY_BYTES else None
            if found is None:
                unknown.append(external)
            else:
                dense.append(from_u32(found))
    return BitMap(dense), tuple(unknown)


# ---------------------------------------------------------------------- parsing
def parse_sql(obj: dict, path: str) -> SqlRule:
    """{"sql": {...}} -> SqlRule; the query must be one SELECT (see check_select)."""
    extra = sorted(set(obj) - {"sql"})
    if extra:
        raise RuleError(f"{path}.{extra[0]}", f"unexpected key {extra[0]!r} (expected only sql)")
    body, here = obj["sql"], f"{path}.sql"
    if not isinstance(body, dict):
        raise RuleError(here, 'expected {"source": NAME, "query": Q, "params": [...]}')
    extra = sorted(set(body) - {"source", "query", "params"})
    if extra:
        raise RuleError(f"{here}.{extra[0]}", f"unexpected key {extra[0]!r} (expected only "
                        "params, query, source)")
    source = body.get("source")
    if not isinstance(source, str) or not source:
        raise RuleError(f"{here}.source", "expected the name of a source (a non-empty string)")
    problem = T.text_problem(source)
    if problem is not None:
        raise RuleError(f"{here}.source", problem)
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise RuleError(f"{here}.query", "expected a SELECT query (a non-empty string)")
    if len(query) > MAX_QUERY_CHARS:
        raise RuleError(f"{here}.query", f"a query of {len(query):,} characters; at most "
                        f"{MAX_QUERY_CHARS:,} are allowed")
    check_select(query, f"{here}.query")
    params = _params(body.get("params", []), f"{here}.params")
    placeholders = count_placeholders(query, f"{here}.query") if params else 0
    if placeholders != len(params):
        raise RuleError(f"{here}.params", f"the query has {placeholders} %s placeholder"
                        f"{'' if placeholders == 1 else 's'} and {len(params)} param"
                        f"{'' if len(params) == 1 else 's'} were given"
                        + (" (with params, write a literal % as %%)" if params else ""))
    return SqlRule(source, query, params, here)


def _params(value: Any, path: str) -> tuple[Any, ...]:
    if not isinstance(value, list):
        raise RuleError(path, "expected a list of values (strings, numbers, booleans)")
    if len(value) > MAX_PARAMS:
        raise RuleError(path, f"{len(value):,} params; at most {MAX_PARAMS:,} are allowed")
    for i, item in enumerate(value):
        if not isinstance(item, (str, int, float, bool)):
            raise RuleError(f"{path}[{i}]", "expected a string, number or boolean")
    return tuple(value)


_PLACEHOLDER = re.compile(r"%(?:%|\((?:[^)]*)\)[sbt]|[sbt])")


def count_placeholders(query: str, path: str) -> int:
    """The driver's positional %s (%b, %t) placeholders; %% is a literal percent sign.
    The driver reads them anywhere in the text, inside string literals too."""
    found = 0
    for match in _PLACEHOLDER.finditer(query):
        text = match.group()
        if text.startswith("%("):
            raise RuleError(path, "named placeholders %(name)s are not supported: params is a "
                            "list, use %s")
        if text != "%%":
            found += 1
    return found


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")
_DOLLAR_TAG = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
MODIFYING = {"insert", "update", "delete", "merge"}


def check_select(query: str, path: str) -> None:
    """RuleError unless the text is one SELECT statement (or WITH … SELECT), found by
    reading its tokens outside string literals, quoted names and comments: no second
    statement after a ';', the first keyword SELECT or WITH, and the statement a WITH
    leads to a SELECT.  This refuses mistakes early; the READ ONLY transaction the query
    runs in is what guarantees it writes nothing."""
    words, semicolons = _top_level(query, path)
    if semicolons:
        raise RuleError(path, "expected a single SELECT statement, found statements "
                        "separated by ';'")
    if not words:
        raise RuleError(path, "expected a SELECT query, found no statement")
    first = words[0][1]
    if first not in ("select", "with"):
        raise RuleError(path, f"expected a SELECT query, got a statement starting with "
                        f"{first.upper()}")
    if first == "with":
        main = next((w for depth, w in words if depth == 0
                     and w in MODIFYING | {"select", "values", "table"}), None)
        if main != "select":
            raise RuleError(path, "expected WITH … SELECT, got WITH … "
                            f"{(main or 'nothing').upper()}")


def _top_level(query: str, path: str) -> tuple[list[tuple[int, str]], bool]:
    """(paren depth, lowercased word) of every word outside literals and comments, and
    whether a ';' is followed by anything but blanks and comments."""
    words: list[tuple[int, str]] = []
    depth, i, n, ended = 0, 0, len(query), False
    while i < n:
        c = query[i]
        nxt = query[i + 1] if i + 1 < n else ""
        if c == "-" and nxt == "-":
            end = query.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if c == "/" and nxt == "*":
            i = _block_comment_end(query, i, path)
            continue
        if c.isspace():
            i += 1
            continue
        if ended:
            return words, True  # something after the statement's ';'
        if c == ";":
            ended = True
            i += 1
        elif c in "'\"":
            escapes = c == "'" and i > 0 and query[i - 1] in "eE" and (
                i < 2 or not (query[i - 2].isalnum() or query[i - 2] == "_"))
            i = _quoted_end(query, i, c, escapes, path)
        elif c == "$" and (m := _DOLLAR_TAG.match(query, i)) and not (
                i > 0 and (query[i - 1].isalnum() or query[i - 1] == "_")):
            close = query.find(m.group(), m.end())
            if close < 0:
                raise RuleError(path, f"unterminated dollar-quoted string {m.group()}")
            i = close + len(m.group())
        elif c == "(":
            depth += 1
            i += 1
        elif c == ")":
            depth -= 1
            i += 1
        elif (m := _WORD.match(query, i)) is not None:
            words.append((depth, m.group().lower()))
            i = m.end()
        else:
            i += 1
    return words, False


def _quoted_end(query: str, start: int, quote: str, escapes: bool, path: str) -> int:
    """The index after a '…' literal or "…" name ('' doubles a quote; E'…' has \\)."""
    i, n = start + 1, len(query)
    while i < n:
        c = query[i]
        if escapes and c == "\\":
            i += 2
            continue
        if c == quote:
            if i + 1 < n and query[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    what = "string literal" if quote == "'" else "quoted name"
    raise RuleError(path, f"unterminated {what} starting at character {start + 1}")


def _block_comment_end(query: str, start: int, path: str) -> int:
    """The index after a /* … */ comment (they nest in PostgreSQL)."""
    depth, i, n = 0, start, len(query)
    while i < n:
        pair = query[i:i + 2]
        if pair == "/*":
            depth += 1
            i += 2
        elif pair == "*/":
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    raise RuleError(path, f"unterminated /* comment starting at character {start + 1}")


# ---------------------------------------------------------------------- explain
def sql_words(body: dict[str, Any], negated: bool = False) -> str:
    """"whose id query '…' on source 'crm' returns" (with its params when it has any)."""
    query = " ".join(body["query"].split())
    if len(query) > 200:
        query = query[:150] + " … " + query[-40:]
    params = body.get("params") or []
    with_params = f" with params {params!r}" if params else ""
    verb = "does not return" if negated else "returns"
    return f"whose id query {query!r}{with_params} on source {body['source']!r} {verb}"


def sql_note(rule: SqlRule, snapshot: Any) -> str:
    """How many ids the query returned, how many of them are not live profiles, and
    the age of the answer (a cached one is reused until the source's ttl)."""
    answer = snapshot.external.answer(rule, snapshot)
    return _note(answer.distinct, unknown_ids(answer, snapshot.live), f"{answer.age:.1f}")


def _note(distinct: int, unknown: int, age: str) -> str:
    return (f"the query returned {distinct:,} distinct ids, {unknown:,} of them not "
            f"live profiles (ignored); answer {age} s old")


# ---------------------------------------------------------------------- on a shard
# A sharded store's front runs the queries (server/shard_sources.py); a shard is handed
# its part of each answer with the call that needs it, and asks for one it lacks.
Key = tuple[str, str, tuple[Any, ...]]  # (source, query, params)
# per query: (the front's number for this answer, this shard's ids of it or None when
# the front sent them before, how many they are, the answer's age, whether run afresh)
Given = dict[Key, tuple[int, list[str] | None, int, float, bool]]
KEPT_ANSWERS = 64  # answers a shard keeps mapped, by the front's number


class SqlNeeded(BitsegError):
    """A shard evaluated an sql rule whose answer its call did not carry (or carried by
    a number it no longer holds): the front runs the query and asks again (never seen
    by a client).  `needed` is plain data: [(source, query, params, path, fresh)]."""

    def __init__(self, needed: list[tuple[str, str, tuple[Any, ...], str, bool]]) -> None:
        super().__init__("an sql rule reached a shard without its answer (the front of a "
                         "sharded store runs the queries)")
        self.needed = needed


def key_of(rule: SqlRule) -> Key:
    return (rule.source, rule.query, rule.params)


def needed(rule: SqlRule, fresh: bool) -> SqlNeeded:
    """The refusal a shard answers for a query whose answer it lacks."""
    return SqlNeeded([(rule.source, rule.query, rule.params, rule.path, fresh)])


class KeptAnswers:
    """A shard's answers mapped to dense ids, by the front's number for each, so a call
    naming one the shard was sent before maps nothing (as one store's cache); mapped
    again, for the unknown ids only, when profiles were added since."""

    def __init__(self) -> None:
        self._kept: dict[int, tuple[SqlAnswer, int]] = {}
        self._lock = threading.Lock()

    def get(self, number: int, ids: Any) -> SqlAnswer | None:
        with self._lock:
            found = self._kept.get(number)
        if found is None:
            return None
        answer, count = found
        if count != ids.count:  # ids are never reused: only unknown ones can be known now
            known, unknown = resolve_ids(list(answer.unknown), ids)
            answer = SqlAnswer(answer.members | known, unknown, answer.distinct, 0.0)
            self.put(number, answer, ids)
        return answer

    def put(self, number: int, answer: SqlAnswer, ids: Any) -> None:
        with self._lock:
            self._kept.pop(number, None)
            self._kept[number] = (answer, ids.count)
            while len(self._kept) > KEPT_ANSWERS:
                self._kept.pop(next(iter(self._kept)))


class GivenIds:
    """The answers one call to a shard carries: this shard's ids of each query's answer,
    or the number of one it was sent before (in `kept`). `fresh` asks for answers the
    front ran again."""

    def __init__(self, given: Given, ids: Any, kept: KeptAnswers, fresh: bool = False
                 ) -> None:
        self.given = given
        self._ids = ids
        self._kept = kept
        self._fresh = fresh

    def answer(self, rule: SqlRule, snapshot: Any = None) -> SqlAnswer:
        found = self.given.get(key_of(rule))
        if found is None or (self._fresh and not found[4]):
            raise needed(rule, self._fresh)
        number, externals, distinct, age, _ = found
        answer = self._kept.get(number, self._ids)
        if answer is None:
            if externals is None:  # sent before, but not kept here (a restarted shard)
                raise needed(rule, self._fresh)
            answer = self._map(number, externals, distinct)
        return replace(answer, age=age)

    def _map(self, number: int, externals: list[str], distinct: int) -> SqlAnswer:
        """An answer's ids given in full, mapped to this shard's dense ids and kept."""
        members, unknown = resolve_ids(externals, self._ids)
        answer = SqlAnswer(members, unknown, distinct, 0.0)
        self._kept.put(number, answer, self._ids)
        return answer

    def fresh(self) -> GivenIds:
        return GivenIds(self.given, self._ids, self._kept, True)

    def keep(self) -> GivenIds:
        """Map and keep every answer given in full now: a call stops at the first answer
        it lacks, and those it was given must be here when it is asked again."""
        for number, externals, distinct, _, _ in self.given.values():
            if externals is not None and self._kept.get(number, self._ids) is None:
                self._map(number, externals, distinct)
        return self


class CallIds:
    """A shard engine's provider: the answers of the call this thread runs (set by
    `carrying`), or SqlNeeded when it carries none."""

    def __init__(self, ids: Any, fresh: bool = False) -> None:
        self._ids = ids
        self._fresh = fresh

    def answer(self, rule: SqlRule, snapshot: Any = None) -> SqlAnswer:
        given = getattr(_CALL, "given", None)
        if given is None:
            raise needed(rule, self._fresh)
        return (given.fresh() if self._fresh else given).answer(rule, snapshot)

    def fresh(self) -> CallIds:
        return CallIds(self._ids, True)


_CALL = threading.local()


@contextmanager
def carrying(given: GivenIds) -> Iterator[None]:
    """This thread's shard call answers sql rules with `given` (see CallIds)."""
    before = getattr(_CALL, "given", None)
    _CALL.given = given
    try:
        yield
    finally:
        _CALL.given = before


_NOTE = re.compile(r"the query returned ([\d,]+) distinct ids, ([\d,]+) of them not live "
                   r"profiles \(ignored\); answer ([\d.]+) s old")


def summed_note(notes: list[str]) -> str | None:
    """The shards' sql_notes of one node as one store's: each shard was given its own
    part of the answer, so the distinct and unknown ids add up; None if not sql notes."""
    found = [_NOTE.fullmatch(n) for n in notes]
    if not found or not all(found):
        return None
    distinct = sum(int(m.group(1).replace(",", "")) for m in found if m)
    unknown = sum(int(m.group(2).replace(",", "")) for m in found if m)
    return _note(distinct, unknown, found[0].group(3) if found[0] else "0.0")
