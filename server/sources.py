"""External SQL sources: named PostgreSQL connections that {"sql": ...} rules query.

    bitseg serve --db DB --sources sources.json

sources.json (or .toml, the same keys):

    {"sources": {"crm": {"dsn_env": "CRM_DSN", "statement_timeout": 10,
                         "row_limit": 10000000, "ttl": 60, "connect_timeout": 5}}}

A source has `dsn` (a libpq connection string or URI) or `dsn_env` (the environment
variable holding it), so rules never hold credentials.  Every query runs in a READ ONLY
transaction with `statement_timeout`, and at most `row_limit` rows are read.  Answers
(the query's ids, mapped to dense ids) are cached per (source, query, params) for `ttl`
seconds; a refresher thread re-runs the queries asked within the last ttl when 80 % of it
has passed, so a query in use is answered from the cache.  Pools connect on first use:
nothing connects when the file is read.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bitseg.index.errors import BitsegError, RuleError, SourceUnavailable
from bitseg.index.sqlrule import SqlAnswer, SqlRule, resolve_ids
from bitseg.server.gate import ConfigError

log = logging.getLogger("bitseg.sources")

STATEMENT_TIMEOUT = 10.0  # seconds
ROW_LIMIT = 10_000_000
TTL = 60.0  # seconds
CONNECT_TIMEOUT = 5.0  # seconds to wait for a connection before UNAVAILABLE
REFRESH_AT = 0.8  # of the ttl: when the refresher re-runs a query in use
POOL_SIZE = 4
FETCH_ROWS = 10_000  # rows a round trip
MAX_CACHED = 256  # answers kept; the least recently asked go first


@dataclass(frozen=True)
class Source:
    name: str
    dsn: str
    statement_timeout: float = STATEMENT_TIMEOUT
    row_limit: int = ROW_LIMIT
    ttl: float = TTL
    connect_timeout: float = CONNECT_TIMEOUT

    def where(self) -> tuple[str, str]:
        """(host, database) of the DSN, without user or password."""
        from psycopg.conninfo import conninfo_to_dict

        try:
            parts = conninfo_to_dict(self.dsn)
        except Exception:  # a DSN libpq cannot read: say so, never echo it
            return "?", "?"
        host = str(parts.get("host") or "localhost")
        if parts.get("port"):
            host += f":{parts['port']}"
        return host, str(parts.get("dbname") or parts.get("user") or "")


@dataclass(frozen=True)
class SourceStatus:
    name: str
    host: str
    database: str
    answers: bool
    error: str  # why it does not answer ("" when it does)


# ---------------------------------------------------------------------- the file
_NUMBERS = {"statement_timeout": float, "ttl": float, "connect_timeout": float,
            "row_limit": int}


def load_sources(path: str | Path, environ: Any = None) -> dict[str, Source]:
    """The sources of a JSON or TOML file (by its extension); ConfigError naming the
    file and the key of anything wrong.  DSNs from `dsn_env` are read from environ."""
    path = Path(path)
    environ = os.environ if environ is None else environ
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--sources: cannot read {path}: {exc.strerror or exc}") from None
    try:
        if path.suffix == ".toml":
            import tomllib  # Python 3.11+; JSON works everywhere

            data = tomllib.loads(text.decode())
        else:
            data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}"
                          f": {exc}") from None
    table = data.get("sources") if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise ConfigError(f'{path}: expected {{"sources": {{NAME: {{"dsn": ...}}, ...}}}}')
    return {name: _source(path, name, entry, environ) for name, entry in table.items()}


def _source(path: Path, name: str, entry: Any, environ: Any) -> Source:
    here = f"{path}: sources.{name}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{here}: expected a table with dsn or dsn_env")
    extra = sorted(set(entry) - {"dsn", "dsn_env", *_NUMBERS})
    if extra:
        raise ConfigError(f"{here}.{extra[0]}: unknown key (expected dsn or dsn_env, "
                          f"{', '.join(sorted(_NUMBERS))})")
    if ("dsn" in entry) == ("dsn_env" in entry):
        raise ConfigError(f"{here}: expected exactly one of dsn, dsn_env")
    if "dsn_env" in entry:
        var = entry["dsn_env"]
        dsn = environ.get(var) if isinstance(var, str) else None
        if not dsn:
            raise ConfigError(f"{here}.dsn_env: the environment variable {var!r} is not set")
    else:
        dsn = entry["dsn"]
        if not isinstance(dsn, str) or not dsn:
            raise ConfigError(f"{here}.dsn: expected a connection string")
    numbers = {}
    for key, kind in _NUMBERS.items():
        if key in entry:
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 \
                    or (kind is int and value != int(value)):
                what = "a whole number" if kind is int else "a number of seconds"
                raise ConfigError(f"{here}.{key}: expected {what} > 0, got {value!r}")
            numbers[key] = kind(value)
    return Source(name, dsn, **numbers)


# ---------------------------------------------------------------------- running queries
def ids_of(value: Any, source: str, path: str) -> str:
    """A returned id as the profile id it names: text as is, an integer in decimal."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise RuleError(path, f"source {source!r}: the query must return profile ids as text "
                    f"or integers, got {type(value).__name__}")


def _run(connection: Callable[[], Any], source: Source, rule: SqlRule) -> list[str]:
    """The query's ids: one READ ONLY transaction, its statement timeout, at most
    row_limit rows (one more is an error naming the limit)."""
    import psycopg

    query_path = f"{rule.path}.query"
    try:
        with connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION READ ONLY")
            conn.execute("SELECT set_config('statement_timeout', %s, true)",
                         [str(max(1, round(source.statement_timeout * 1000)))])
            cursor = conn.cursor()
            # closed before the transaction ends: a stream left open mid-result hangs it
            with closing(cursor.stream(rule.query, list(rule.params) or None,
                                       size=FETCH_ROWS)) as rows:
                return _ids(rows, source, rule, query_path)
    except psycopg.errors.QueryCanceled:
        raise RuleError(query_path, f"source {rule.source!r}: the query ran longer than the "
                        f"source's statement_timeout of {source.statement_timeout:g} s"
                        ) from None
    except psycopg.errors.ReadOnlySqlTransaction as exc:
        raise RuleError(query_path, f"source {rule.source!r}: refused by the READ ONLY "
                        f"transaction sql queries run in: {_first_line(exc)}") from None
    except psycopg.OperationalError as exc:  # the server went away, or cannot be reached
        raise SourceUnavailable(rule.source, _first_line(exc)) from None
    except psycopg.Error as exc:  # a query PostgreSQL refuses: the rule's fault
        raise RuleError(query_path, f"source {rule.source!r}: {_first_line(exc)}") from None


def _ids(rows: Iterator[Any], source: Source, rule: SqlRule, query_path: str) -> list[str]:
    """The first column of the rows as profile ids, at most row_limit of them."""
    out: list[str] = []
    for row in rows:
        if len(row) != 1:
            raise RuleError(query_path, f"source {rule.source!r}: the query must return one "
                            f"column of profile ids, it returns {len(row)}")
        if len(out) == source.row_limit:
            raise RuleError(query_path, f"source {rule.source!r}: the query returned more "
                            f"than its row limit of {source.row_limit:,} rows")
        if row[0] is not None:
            out.append(ids_of(row[0], rule.source, query_path))
    return out


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------- the provider
@dataclass
class _Entry:
    ids: list[str]  # what the query returned (distinct)
    fetched: float  # monotonic seconds
    asked: float  # when a rule last asked for it
    answer: SqlAnswer | None = None  # mapped against `mapped_count` known ids
    mapped_count: int = -1


class Sources:
    """The configured sources; the `ExternalIds` provider snapshots hand sql rules to.
    Thread-safe: one lock guards the cache's dictionary, never held while querying."""

    def __init__(self, sources: dict[str, Source], ids: Callable[[], Any],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sources = sources
        self._ids = ids  # the engine's current id map
        self._clock = clock
        self._pools: dict[str, Any] = {}
        self._cache: dict[tuple[str, str, tuple[Any, ...]], _Entry] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    # -------------------------------------------------------------- ExternalIds
    def answer(self, rule: SqlRule, snapshot: Any = None, *, fresh: bool = False) -> SqlAnswer:
        entry, now = self._entry(rule, fresh)
        return self._mapped(entry, now)

    def external_ids(self, rule: SqlRule, *, fresh: bool = False) -> tuple[list[str], float]:
        """The query's distinct ids as it returned them (cached as for `answer`), and the
        age of that answer in seconds: what a sharded front splits over its shards."""
        entry, now = self._entry(rule, fresh)
        return entry.ids, max(0.0, now - entry.fetched)

    def _entry(self, rule: SqlRule, fresh: bool) -> tuple[_Entry, float]:
        source = self._source(rule)
        key = (rule.source, rule.query, rule.params)
        now = self._clock()
        with self._lock:
            entry = self._cache.get(key)
        if fresh or entry is None or now - entry.fetched >= source.ttl:
            entry = self._fetch(rule, source, now)
        entry.asked = now
        return entry, now

    def fresh(self) -> _Fresh:
        return _Fresh(self)

    def _source(self, rule: SqlRule) -> Source:
        found = self.sources.get(rule.source)
        if found is None:
            known = ", ".join(sorted(self.sources)) or "none"
            raise RuleError(f"{rule.path}.source", f"unknown source {rule.source!r} "
                            f"(known sources: {known})")
        return found

    def _fetch(self, rule: SqlRule, source: Source, now: float) -> _Entry:
        ids = list(dict.fromkeys(_run(lambda: self._connection(source), source, rule)))
        entry = _Entry(ids, now, now)
        key = (rule.source, rule.query, rule.params)
        with self._lock:
            self._cache[key] = entry
            if len(self._cache) > MAX_CACHED:
                oldest = min(self._cache, key=lambda k: self._cache[k].asked)
                del self._cache[oldest]
        return entry

    def _mapped(self, entry: _Entry, now: float) -> SqlAnswer:
        """The entry's ids as dense ids; mapped again only when profiles were added."""
        ids = self._ids()
        answer = entry.answer
        if answer is None or entry.mapped_count != ids.count:
            if answer is None:
                members, unknown = resolve_ids(entry.ids, ids)
            else:  # ids are never reused: only the unknown ones can have become known
                found, unknown = resolve_ids(list(answer.unknown), ids)
                members = answer.members | found
            answer = SqlAnswer(members, unknown, len(entry.ids), 0.0)
            entry.answer, entry.mapped_count = answer, ids.count
        return replace(answer, age=max(0.0, now - entry.fetched))

    @contextmanager
    def _connection(self, source: Source) -> Iterator[Any]:
        """A connection from the source's pool, or, when the pool has none within
        connect_timeout, a direct one: after an outage the pool waits longer and longer
        between reconnects, and a source that is back must answer now, not at the pool's
        next try.  A direct connection that also fails is SourceUnavailable."""
        from psycopg_pool import PoolTimeout

        pool = self._pool(source)
        try:
            conn = pool.getconn(timeout=source.connect_timeout)
        except PoolTimeout as exc:
            conn, waited = None, f"no connection within {source.connect_timeout:g} s ({exc})"
        if conn is None:
            with closing(self._direct(source, pool, waited)) as direct:
                yield direct
            return
        try:
            yield conn
        finally:
            pool.putconn(conn)

    def _direct(self, source: Source, pool: Any, waited: str) -> Any:
        import psycopg

        try:
            conn = psycopg.connect(source.dsn,
                                   connect_timeout=max(1, math.ceil(source.connect_timeout)))
        except psycopg.OperationalError as exc:
            raise SourceUnavailable(source.name, f"{waited}; {_first_line(exc)}") from None
        # the source is back: a new pool connects now instead of at the old one's next try
        # (only the pool that had no connection: another query may have replaced it already)
        with self._lock:
            stale = self._pools.get(source.name) is pool
            if stale:
                del self._pools[source.name]
        if stale:
            threading.Thread(target=pool.close, name="bitseg-sources-close", daemon=True).start()
        return conn

    def _pool(self, source: Source) -> Any:
        with self._lock:
            pool = self._pools.get(source.name)
            if pool is None:
                from psycopg_pool import ConnectionPool

                pool = ConnectionPool(source.dsn, min_size=1, max_size=POOL_SIZE, open=False,
                                      check=ConnectionPool.check_connection,
                                      name=f"bitseg-{source.name}",
                                      timeout=source.connect_timeout)
                pool.open(wait=False)
                self._pools[source.name] = pool
        return pool

    # -------------------------------------------------------------- listing
    def status(self) -> list[SourceStatus]:
        """Every source with its host and database, and whether it answers SELECT 1 now."""
        out = []
        for name in sorted(self.sources):
            source = self.sources[name]
            host, database = source.where()
            error = ""
            try:
                with self._connection(source) as conn:
                    conn.execute("SELECT 1")
            except Exception as exc:  # anything that stops it answering, said in a line
                error = _first_line(exc)
            out.append(SourceStatus(name, host, database, not error, error))
        return out

    # -------------------------------------------------------------- refreshing
    def start(self, tick: float = 1.0) -> Sources:
        """Start the refresher: every tick, queries asked within their ttl whose answer
        is past REFRESH_AT of it are re-run, so readers keep getting cached answers."""
        self._refresher = threading.Thread(target=self._refresh_loop, args=(tick,),
                                           name="bitseg-sources", daemon=True)
        self._refresher.start()
        return self

    def refresh_due(self) -> int:
        """Re-run the queries in use whose answer is near its ttl; how many were re-run.
        A source that fails keeps its old answer until it expires (then rules fail)."""
        now = self._clock()
        with self._lock:
            due = [(key, entry) for key, entry in self._cache.items()
                   if key[0] in self.sources
                   and now - entry.asked < self.sources[key[0]].ttl
                   and now - entry.fetched >= REFRESH_AT * self.sources[key[0]].ttl]
        done = 0
        for (name, query, params), old in due:
            rule = SqlRule(name, query, params, "$.sql")
            try:
                fetched = self._fetch(rule, self.sources[name], self._clock())
            except BitsegError as exc:
                log.warning("refreshing a query of source %r: %s", name, exc)
                continue
            fetched.asked = old.asked  # refreshing is not asking: unused queries lapse
            done += 1
        return done

    def _refresh_loop(self, tick: float) -> None:
        while not self._stop.wait(tick):
            self.refresh_due()

    def close(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()

    @contextmanager
    def running(self, tick: float = 1.0) -> Iterator[Sources]:
        self.start(tick)
        try:
            yield self
        finally:
            self.close()


class _Fresh:
    """A view of Sources that re-runs every query (and caches what it gets)."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def answer(self, rule: SqlRule, snapshot: Any = None) -> SqlAnswer:
        return self.sources.answer(rule, snapshot, fresh=True)

    def fresh(self) -> _Fresh:
        return self
