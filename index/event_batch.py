"""The event batch writer: records in, block parts and count buckets out.

A batch collects rows as columns (add: one record; add_block: a parsed block checked
column-wise by event_blocks), and every FLUSH_ROWS rows converts them with numpy and
writes them as new raw block parts, grouping their rows' (stream, day or month,
profile) into count runs held over the whole batch (event_group; past RUN_BYTES they
wait in a scratch file). Each bucket is written once, at finish, which also joins the
parts it wrote for a day and rewrites the catalog entries it changed.
"""

from __future__ import annotations

import warnings
from array import array
from bisect import insort
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from typing import Any, NoReturn

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyroaring import BitMap

from bitseg.index import idhash
from bitseg.index import types as T
from bitseg.index.ahead import Ahead
from bitseg.index.blocks import RowBlock
from bitseg.index.errors import DataError, StoreError
from bitseg.index.event_blocks import EventColumns, columns_of, first_seen
from bitseg.index.event_counts import add_counts, count_index, decode_counts, encode_counts
from bitseg.index.event_group import (
    BUCKET_OFFSET,
    KIND_OF,
    BucketRuns,
    bucket_code,
    bucket_parts,
    distinct,
    encoded_counts,
)
from bitseg.index.event_index import (
    Block,
    BucketKey,
    EventIndex,
    join_encoded,
    listed,
    write_catalog,
)
from bitseg.index.event_keys import ANY, EVENT_KEYS, STREAM_TYPES
from bitseg.index.event_merge import merged, stored_runs
from bitseg.index.event_parts import PartStash
from bitseg.index.ids import IdMap
from bitseg.index.keys import COUNTS, SEP_TEXT, block_key, stream_key
from bitseg.index.schema import Schema
from bitseg.index.store import Store, Txn, TxnReader
from bitseg.index.timeline import month_of

DENSE_CACHE = 1 << 21  # profile ids a batch keeps looked up, at most
FLUSH_ROWS = 1 << 20  # rows held in Python objects before they are written as a block part
# Bytes of count runs (16 a run) held before they are merged and moved to a scratch file
# (a spill; the end of the batch merges the files again, RUN_BYTES of runs at a time, and
# writes each bucket once). Merging the runs and writing the buckets need up to about
# twice that again, so the runs take at most ~3 x RUN_BYTES whatever the file's size.
# Since the merges run beside the next flush (BucketRuns.tend), 256 MiB let a 10M events
# file peak at 2.64 GiB; 96 and 160 MiB loaded the 1M file as fast as 256 (more spills,
# smaller merges), 0.3-0.5 GiB lower.
RUN_BYTES = 128 << 20
PUT_ITEMS = 4096  # count buckets encoded before they are put into LMDB in one call
PUT_BYTES = 32 << 20  # or fewer, when their encoded bytes reach this
ENCODE_RUNS = 1 << 20  # count runs whose buckets are encoded together (numpy temporaries)
# Groups of ENCODE_RUNS encoded at once, by threads: numpy lets go of the interpreter
# lock in its sorts and gathers, so a second core takes half (the 1M events file:
# 27.6 -> 24.9 s, RESULTS.md session 10).
ENCODE_THREADS = 2
# A batch of more rows than this merges each chunk of its count runs at its end on a
# thread of its own (an Ahead), beside the writing of the chunk before and, for the
# first, beside the writing of its block parts (_write_parts). The events file alone,
# alternated: 1M 12.0 -> 11.6 s (medians of 5), 10M 145.5 -> 141.5 s (RESULTS.md,
# session 17). A smaller batch's one merge is not worth a thread's start.
AHEAD_FROM = FLUSH_ROWS
# A stored bucket of up to this many bytes without a run container (up to ~200
# profiles) is read back into runs and merged in numpy (_summed), ENCODE_RUNS runs and
# stored profiles at a time; a larger one is added to with bitmaps, whose cost goes by
# container where numpy's goes by profile. (At 1M, 1M events streamed into a store of
# 2.7M: 8 KiB took 5.1 s of CPU, 0.5-2 KiB 4.2-4.5 s, every bucket by bitmaps 6.1 s.)
MERGE_BYTES = 1 << 10
_NO_RUNS_COOKIE = (12346).to_bytes(4, "little")  # at bytes 4-8: the `exists` part's


def _block_props(props: Mapping[str, tuple[np.ndarray, np.ndarray, list | None]],
                 order: np.ndarray, starts: np.ndarray) -> list[tuple[dict, dict]]:
    """The property columns of each block of rows — block k is order[starts[k]:
    starts[k + 1]] — with keyword codes renumbered to the block's own table (its codes
    ascending, as np.unique of the block's codes gives them); one pass per property
    over all blocks, Python per block only to slice."""
    count = len(starts) - 1
    block_of = np.repeat(np.arange(count, dtype=np.int64), np.diff(starts))
    out: list[tuple[dict, dict]] = [({}, {}) for _ in range(count)]
    for name, (keys, valid, table) in props.items():
        ok = valid[order]
        has = np.flatnonzero(np.logical_or.reduceat(ok, starts[:-1])).tolist()
        values = keys[order]
        block_words: list[str] = []
        first = None
        if table is not None:
            width = max(len(table), 1)
            pairs, local = distinct(block_of[ok] * width + values[ok])
            pair_block = pairs // width
            first = np.searchsorted(pair_block, np.arange(count + 1, dtype=np.int64))
            values = np.zeros(len(order), dtype=np.int64)
            values[ok] = local - first[block_of[ok]]
            block_words = [table[i] for i in (pairs % width).tolist()]
            first = first.tolist()
        cut = starts.tolist()
        for k in has:
            a, b = cut[k], cut[k + 1]
            out[k][0][name] = (values[a:b], ok[a:b])
            if first is not None:
                out[k][1][name] = block_words[first[k]:first[k + 1]]
    return out


def _encoded(bounds: np.ndarray, profiles: np.ndarray, rows: np.ndarray) -> list[bytes]:
    """The stored bytes of each group's count index (encoded_counts), ENCODE_RUNS runs
    of groups at a time, so that its temporaries stay small whatever the chunk, and
    ENCODE_THREADS of those at once."""
    spans: list[tuple[int, int]] = []
    groups = len(bounds) - 1
    first = 0
    while first < groups:
        last = int(np.searchsorted(bounds, bounds[first] + ENCODE_RUNS, side="right")) - 1
        last = min(max(last, first + 1), groups)  # at least one group, however large
        spans.append((first, last))
        first = last

    def encoded(span: tuple[int, int]) -> list[bytes]:
        first, last = span
        a, b = int(bounds[first]), int(bounds[last])
        return encoded_counts(bounds[first:last + 1] - a, profiles[a:b], rows[a:b],
                              _roaring_bytes)

    if len(spans) < 2:
        return encoded(spans[0]) if spans else []
    out: list[bytes] = []
    with ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="bitseg-encode") as pool:
        for part in pool.map(encoded, spans):
            out += part
    return out


def _summed(bounds: np.ndarray, cut: list[int], profiles: np.ndarray, rows: np.ndarray,
            which: list[int], stored: list[bytes | None]) -> list[bytes]:
    """The bytes of the count index of each bucket i in `which`: its runs
    (profiles[bounds[i]:bounds[i + 1]] with their rows; `cut` is bounds as a list) plus
    its stored counts (`stored`, encoded, in the same order; None: none). Small stored
    buckets are read back into runs and merged in numpy (MERGE_BYTES), so they are
    written as one batch of all their rows would write them; a larger one is added to
    with bitmaps."""
    out: list[bytes | None] = [None] * len(which)
    part: list[int] = []  # positions in `which` to merge in numpy
    held = 0  # their runs and stored profiles (about 2 bytes each)
    for n, (i, raw) in enumerate(zip(which, stored, strict=True)):
        a, b = cut[i], cut[i + 1]
        if raw is not None and (len(raw) > MERGE_BYTES or raw[4:8] != _NO_RUNS_COOKIE):
            out[n] = encode_counts(add_counts(decode_counts(raw),
                                              count_index(profiles[a:b], rows[a:b])))
            continue
        part.append(n)
        held += b - a + (len(raw) // 2 if raw is not None else 0)
        if held >= ENCODE_RUNS:
            _merge_into(out, part, which, bounds, profiles, rows, stored)
            part, held = [], 0
    if part:
        _merge_into(out, part, which, bounds, profiles, rows, stored)
    return out  # type: ignore[return-value]  # every bucket was given its bytes


def _merge_into(out: list[bytes | None], part: list[int], which: list[int],
                bounds: np.ndarray, profiles: np.ndarray, rows: np.ndarray,
                stored: list[bytes | None]) -> None:
    """out[n] for the positions n in `part`: the runs of bucket which[n] merged with
    its stored ones."""
    chosen = np.array([which[n] for n in part], dtype=np.int64)
    sizes = bounds[chosen + 1] - bounds[chosen]
    new_bounds = np.concatenate(([0], np.cumsum(sizes)))
    at = np.repeat(bounds[chosen] - new_bounds[:-1], sizes) + \
        np.arange(int(new_bounds[-1]), dtype=np.int64)
    old = stored_runs([stored[n] or b"" for n in part])
    summed = merged(*old, new_bounds, profiles[at], rows[at])
    for n, value in zip(part, _encoded(*summed), strict=True):
        out[n] = value


def _count_heads(kinds: np.ndarray, buckets: np.ndarray) -> list[bytes]:
    """The first six bytes of each bucket's count_key (all but the stream's name)."""
    heads = np.empty((len(kinds), 6), dtype=np.uint8)
    heads[:, 0] = COUNTS[0]
    heads[:, 1] = np.where(kinds == 0, KIND_OF[0][0], KIND_OF[1][0])
    heads[:, 2:] = (buckets + BUCKET_OFFSET).astype(">u4").view(np.uint8).reshape(-1, 4)
    return heads.view("V6").ravel().tolist()


def _roaring_bytes(ids: np.ndarray) -> bytes:
    """What pyroaring stores for a bitmap of these ids (ascending)."""
    return BitMap(array("I", ids.astype(np.uint32).tobytes())).serialize()


class EventBatch:
    """Collects the event records of one batch as columns, and writes them in parts.

    add() only appends raw values (about a microsecond a row); every FLUSH_ROWS rows,
    and at finish, the columns are checked and converted with numpy — timestamps,
    profile ids, property types — and a bad value is found again row by row so that
    its error names the line and the field.

    add_block() takes a parsed block whose rows are checked column-wise (event_blocks)
    as EventColumns parts, held like add()'s rows until the same flush, which merges
    them in line order: the stored bytes are those of the rows added one by one.
    """

    def __init__(self, store: Store, txn: Txn, index: EventIndex, schema: Schema,
                 ensure_profile: Callable[[Any], int], version: int,
                 known_profiles: Callable[[list[str]], list[int | None]],
                 id_map: IdMap | None = None, live: BitMap | None = None) -> None:
        self.store = store
        self.txn = txn
        self.index = index
        self.schema = schema
        self.types = dict(schema.events)
        self.ensure_profile = ensure_profile
        self.known_profiles = known_profiles
        self.id_map = id_map  # the committed ids, looked up in memory (idhash), with
        self.live = live  # the live profiles they are current for
        self.version = version
        self.dense: dict[str, int] = {}  # profile ids seen in this batch (bounded)
        self.count = 0
        self.reader = TxnReader(store, txn)
        self.runs = BucketRuns()  # per-profile row counts of the buckets, not written yet
        self.scratch = store.path  # where spilled runs wait (unnamed files, on its disk)
        self.stream_number: dict[str, int] = {}  # the streams of self.runs, numbered
        self.stream_names: list[str] = []
        self.written = dict(index.written)
        self.stream_days = {k: list(v) for k, v in index.stream_days.items()}
        self.stream_months = {k: list(v) for k, v in index.stream_months.items()}
        self.type_days = {k: list(v) for k, v in index.type_days.items()}
        self.parts = dict(index.parts)
        self.relisted: set[tuple[bytes, str]] = set()  # catalog entries to rewrite
        self.first_part: dict[tuple[str, int], int] = {}  # the part this batch writes
        self.stash = PartStash(self.scratch)  # parts of flushes before the last (event_parts)
        self.refused: frozenset[str] = frozenset()  # event types add_block leaves to add
        self._clear()

    def _clear(self) -> None:
        self.columns: list[EventColumns] = []  # add_block's rows, before add()'s
        self.held = 0  # rows in self.columns
        self.c_profile: list[Any] = []
        self.c_event: list[Any] = []
        self.c_ts: list[Any] = []
        self.c_line: list[int | None] = []
        self.c_props: dict[str, tuple[list[int], list[Any]]] = {}

    def add(self, record: Any, line: int | None = None) -> None:
        if type(record) is not dict:
            raise DataError("expected a JSON object")
        get = record.get
        profile, event, ts = get("profile"), get("event"), get("ts")
        if profile is None or event is None or ts is None:
            missing = next(k for k in EVENT_KEYS if get(k) is None)
            raise DataError(f"{missing!r} is required", field=missing)
        row = len(self.c_ts)
        self.c_profile.append(profile)
        self.c_event.append(event)
        self.c_ts.append(ts)
        self.c_line.append(line)
        if len(record) > 3:
            columns = self.c_props
            for name, value in record.items():
                if value is None or name in EVENT_KEYS:
                    continue
                column = columns.get(name)
                if column is None:
                    column = columns[name] = ([], [])
                column[0].append(row)
                column[1].append(value)
        self.count += 1
        if self.held + row + 1 >= FLUSH_ROWS:
            self._flush()

    def add_block(self, block: RowBlock) -> bool:
        """Take a parsed block column-wise (True), or none of it (False): the row path
        then adds its rows. A block waits for the flush after rows of add(), so that a
        flush's parts are always block rows first, then add()'s rows, in line order."""
        if self.c_ts:
            return False
        part = columns_of(block, self._type_of, self.refused)
        if part is None:
            return False
        start = 0
        while start < len(part):  # flush at the row counts the row path flushes at
            end = min(len(part), start + FLUSH_ROWS - self.held)
            self.columns.append(part if (start, end) == (0, len(part))
                                else part.slice(start, end))
            self.held += end - start
            self.count += end - start
            start = end
            if self.held >= FLUSH_ROWS:
                self._flush()
        return True

    def _type_of(self, name: str) -> str | None:
        """A property's type as the next flush will see it: known, or inferred from
        the first held block that has it."""
        known = self.types.get(name)
        if known is not None:
            return known
        return next((part.props[name].type_ for part in self.columns
                     if name in part.props), None)

    def _fail(self, row: int, message: str, field: str) -> NoReturn:
        raise DataError(message, field=field, line=self.c_line[row])

    # ------------------------------------------------------------------ columns
    def _timestamps(self) -> np.ndarray:
        raw = self.c_ts
        if all(type(s) is str and len(s) >= 10 and s[4] == "-" and s[7] == "-" for s in raw):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # e.g. zone offsets: the careful path
                    parsed = np.array([s[:-1] if s[-1] == "Z" else s for s in raw],
                                      dtype="datetime64[us]")
                micros = parsed.astype(np.int64)  # NaT is the smallest int64
                if ((micros >= T.MIN_US) & (micros <= T.MAX_US)).all():  # years 1-9999
                    return micros
            except (ValueError, Warning):
                pass
        out = np.empty(len(raw), dtype=np.int64)
        for row, text in enumerate(raw):
            try:
                out[row] = T.parse_timestamp(text)
            except ValueError as exc:
                self._fail(row, str(exc), "ts")
        return out

    def _event_types(self) -> tuple[list[str], np.ndarray]:
        names = set(self.c_event) if all(type(e) is str for e in self.c_event) else None
        if names is None or not all(e != ANY and SEP_TEXT not in e and T.name_problem(e) is None
                                    for e in names):
            for row, e in enumerate(self.c_event):
                if type(e) is not str or e == ANY or SEP_TEXT in e or T.name_problem(e):
                    self._fail(row, 'expected an event type name (a non-empty string of at '
                               f'most {T.MAX_NAME_BYTES} bytes, not "*")', "event")
        for part in self.columns:
            names.update(part.event_names)
        ordered = sorted(names)
        code = {name: i for i, name in enumerate(ordered)}
        codes = [np.array([code[e] for e in part.event_names], dtype=np.int64)[part.event_codes]
                 for part in self.columns]
        codes.append(np.fromiter((code[e] for e in self.c_event), dtype=np.int64,
                                 count=len(self.c_event)))
        return ordered, np.concatenate(codes)

    def _profiles(self) -> np.ndarray:
        raw = self.c_profile
        if not all(type(p) is str for p in raw):  # ints are fine; find anything else
            for row, p in enumerate(raw):
                if type(p) is not str and type(p) is not int:
                    self._fail(row, "expected a non-empty string or integer profile id",
                               "profile")
        if len(self.dense) > DENSE_CACHE:  # keep the cache bounded
            self.dense = {}
        out = self._part_profiles()  # first: their new ids are made before add()'s
        seen: dict[Any, None] = dict.fromkeys(raw)  # first appearance: the order of new ids
        missing = [p for p in seen if p not in self.dense]
        known = self.known_profiles([p if type(p) is str else str(p) for p in missing])
        for p, found in zip(missing, known, strict=True):
            if found is not None:  # an existing profile: one lookup, no Python per-id work
                self.dense[p] = found
                continue
            try:
                self._dense_of(p)
            except DataError as exc:
                self._fail(raw.index(p), exc.reason, "profile")
        dense = self.dense
        out.append(np.fromiter((dense[p] for p in raw), dtype=np.uint32, count=len(raw)))
        return np.concatenate(out)

    def _part_profiles(self) -> list[np.ndarray]:
        """The dense ids of the held parts' rows, part by part: their distinct ids found
        together in the id map's hash table (idhash), the rest as the rows' are, the new
        ones made in order of first appearance; no Python per known id."""
        if not self.columns:
            return []
        used = [part.profiles_used() for part in self.columns]
        names = pa.concat_arrays([part.profile_ids.take(pa.array(codes, pa.int64()))
                                  for part, codes in zip(self.columns, used, strict=True)])
        encoded = pc.dictionary_encode(names)  # parts in order: first appearance kept
        dense = self._resolve(encoded.dictionary)[
            encoded.indices.to_numpy(zero_copy_only=False)]
        out, at = [], 0
        for part, codes in zip(self.columns, used, strict=True):
            table = np.zeros(len(part.profile_ids), dtype=np.uint32)
            table[codes] = dense[at:at + len(codes)]
            at += len(codes)
            out.append(table[part.profile_codes])
        return out

    def _resolve(self, names: pa.Array) -> np.ndarray:
        """The dense id (uint32) of each distinct profile id (utf-8, each valid), those
        never seen made in order: found in the id map's table (idhash.found_live) where
        it can, else in LMDB."""
        found = idhash.found_live(self.id_map, self.live, names)
        misses = np.flatnonzero(found < 0)
        if len(misses):  # made earlier in this batch, or by it now, or a table miss
            texts = names.take(pa.array(misses, pa.int64())).to_pylist()
            ask = [text for text in texts if text not in self.dense]
            for text, known in zip(ask, self.known_profiles(ask), strict=True):
                if known is not None:
                    self.dense[text] = known
            found[misses] = [self._dense_of(text) for text in texts]
        return found.astype(np.uint32)

    def _dense_of(self, profile: Any) -> int:
        found = self.dense.get(profile)
        if found is None:
            found = self.ensure_profile(profile)
            self.dense[profile] = found
        return found

    def _properties(self, n: int) -> dict[str, tuple[np.ndarray, np.ndarray, list | None]]:
        """name -> (int64 keys or keyword codes, valid, keyword table) over the chunk:
        the held blocks' rows, then add()'s, each property in the order the rows meet
        it (which orders inferred types in the schema, and decides which error is first)."""
        out = {}
        order: dict[str, None] = {}
        # The order among properties first met on one line only matters for types still
        # to infer and for errors among add()'s rows; else no line is parsed again for it.
        exact = bool(self.c_props) or any(name not in self.types for part in self.columns
                                          for name in part.props)
        for part in self.columns:
            order.update(dict.fromkeys(part.prop_order(exact)))
        order.update(dict.fromkeys(self.c_props))
        for name in order:
            type_ = self.types.get(name)
            if type_ is None:
                type_ = self._type_of(name)
                if type_ is not None:
                    self.types[name] = type_  # from a held block (its name was checked)
            keys = np.zeros(n, dtype=np.int64)
            valid = np.zeros(n, dtype=bool)
            table: dict[str, int] = {}
            offset = 0
            for part in self.columns:
                prop = part.props.get(name)
                if prop is not None:
                    valid[offset:offset + len(part)] = prop.valid
                    keys[offset:offset + len(part)] = self._part_keys(prop, table,
                                                                      part.whole)
                offset += len(part)
            words = list(table) if type_ == T.KEYWORD else None
            if name not in self.c_props:
                out[name] = (keys, valid, words)
                continue
            rows, values = self.c_props[name]
            if type_ is None:
                try:
                    type_ = self._infer(name, values[0])
                except DataError as exc:
                    self._fail(rows[0], exc.reason, name)
            at = np.array(rows, dtype=np.int64) + offset
            valid[at] = True
            converted = self._fast(type_, values)
            if converted is None:
                converted = self._careful(type_, name, rows, values)
            if type_ == T.KEYWORD:
                converted = np.fromiter((table.setdefault(v, len(table)) for v in converted),
                                        dtype=np.int64, count=len(values))
                words = list(table)
            keys[at] = converted
            out[name] = (keys, valid, words)
        return out

    @staticmethod
    def _part_keys(prop: Any, table: dict[str, int], whole: bool) -> np.ndarray:
        """A held part's keys; keyword codes renumbered into the chunk's table in order
        of first appearance, as add()'s rows number theirs. A `whole` block's codes are
        its dictionary's, already numbered in order of first appearance."""
        if prop.words is None:
            return prop.keys
        remap = np.zeros(max(len(prop.words), 1), dtype=np.int64)
        seen = range(len(prop.words)) if whole else first_seen(prop.keys[prop.valid]).tolist()
        for code in seen:
            remap[code] = table.setdefault(prop.words[code], len(table))
        return np.where(prop.valid, remap[prop.keys], 0)

    @staticmethod
    def _fast(type_: str, values: list) -> Any:
        """The values converted with numpy when they plainly fit the type, else None."""
        if type_ == T.KEYWORD:
            short = T.MAX_VALUE_BYTES // 4  # longer strings go value by value (size check)
            return values if all(type(v) is str and len(v) <= short for v in values) else None
        if type_ == T.BOOL:
            return np.array(values, dtype=np.int64) if all(
                type(v) is bool for v in values) else None
        if type_ == T.INT and all(type(v) is int for v in values):
            if all(-T.MAX_KEY < v < T.MAX_KEY for v in values):
                return np.array(values, dtype=np.int64)
            return None
        if type_ == T.FLOAT and all(type(v) is float or type(v) is int for v in values):
            floats = np.array(values, dtype=np.float64)
            if not (np.isfinite(floats) & (np.abs(floats) < T.MAX_KEY / T.FLOAT_SCALE)).all():
                return None  # checked first: float_keys of 1e12 overflows int64
            return T.float_keys(floats, T.FLOAT_DIGITS)
        return None

    def _careful(self, type_: str, name: str, rows: list[int], values: list) -> Any:
        """Value by value, so the first bad one is reported with its line."""
        out = []
        for row, value in zip(rows, values, strict=True):
            try:
                canonical = T.coerce(type_, value)
                out.append(T.range_key(type_, canonical) if type_ in T.RANGE_TYPES
                           else canonical)
            except ValueError as exc:
                self._fail(row, str(exc), name)
        if type_ == T.KEYWORD:
            return out
        return np.array([int(v) for v in out], dtype=np.int64)

    # ------------------------------------------------------------------ writing
    def _flush(self, last: bool = False) -> None:
        """Check and convert the queued columns; stash them as block parts (the `last`
        flush writes a part that has none stashed) and add their counts to the buckets
        (in memory)."""
        n = self.held + len(self.c_ts)
        if not n:
            return
        ts = np.concatenate([part.ts for part in self.columns] + [self._timestamps()])
        names, codes = self._event_types()
        props = self._properties(n)
        dense = self._profiles()
        days = np.floor_divide(ts, T.US_PER_DAY)
        order = np.lexsort((days, codes))
        key = codes[order] * (1 << 32) + (days[order] + 2**31)
        starts = np.concatenate(([0], np.flatnonzero(np.diff(key)) + 1, [n]))
        version = np.full(n, self.version, dtype=np.uint32)
        per_block = _block_props(props, order, starts)
        dense_sorted, ts_sorted = dense[order], ts[order]
        heads = order[starts[:-1]]  # each block's first row: its type and day
        cut, event_codes, block_days = starts.tolist(), codes[heads].tolist(), \
            days[heads].tolist()
        for k, (block_props, block_words) in enumerate(per_block):
            a, b = cut[k], cut[k + 1]
            event, day = names[event_codes[k]], block_days[k]
            raw = Block(dense_sorted[a:b], ts_sorted[a:b], version[:b - a],
                        block_props, block_words).encode()
            seq = self.first_part.get((event, day))
            if seq is None:  # the batch's first rows of this type and day
                seq = self.first_part[(event, day)] = self.parts.get((event, day), 0)
                self.relisted.add((b"t", event))
                if seq == 0:
                    insort(self.type_days.setdefault(event, []), day)
            if last and (event, day) not in self.stash:
                self.store.put(self.txn, "events", block_key(event, day, seq), raw)
                self.parts[(event, day)] = seq + 1
            else:
                self.stash.add((event, day), raw)
        self._count(names, codes, days, dense, props)
        self._clear()
        self.runs.tend(RUN_BYTES, self.scratch)  # merged, spilled when still too many

    def _count(self, names: list[str], codes: np.ndarray, days: np.ndarray,
               dense: np.ndarray, props: Mapping[str, tuple[np.ndarray, np.ndarray, Any]]
               ) -> None:
        """Count the flushed rows into their buckets' runs: each row in its type's stream
        and in the stream of each of its keyword and bool values, on its day and in its
        month. One group-by over all rows; Python only per distinct stream."""
        number = self._stream_number
        streams = [np.array([number(stream_key(e)) for e in names], dtype=np.int64)[codes]]
        rows = [np.arange(len(codes), dtype=np.int64)]
        for name, (keys, valid, words) in props.items():
            if self.types[name] not in STREAM_TYPES:
                continue
            at = np.flatnonzero(valid)
            if not len(at):
                continue
            width = max(len(words), 2) if words is not None else 2
            pairs, inverse = distinct(codes[at] * width + keys[at])
            found = [number(stream_key(names[p // width], name, words[p % width]
                                       if words is not None else bool(p % width)))
                     for p in pairs.tolist()]
            streams.append(np.array(found, dtype=np.int64)[inverse])
            rows.append(at)
        row = np.concatenate(rows)
        day_list, day_at = distinct(days)
        width = len(day_list)
        local, inverse = distinct(np.concatenate(streams) * width + day_at[row])
        stream, day = local // width, local % width
        months = np.array([month_of(d) for d in day_list.tolist()], dtype=np.int64)
        day_gids = self.runs.gids(bucket_code(0, stream, day_list[day]))
        month_codes, month_at = np.unique(bucket_code(1, stream, months[day]),
                                          return_inverse=True)
        month_gids = self.runs.gids(month_codes)[month_at]
        profiles = dense[row]
        self.runs.add(day_gids[inverse], profiles)
        self.runs.add(month_gids[inverse], profiles)

    def _stream_number(self, stream: str) -> int:
        found = self.stream_number.get(stream)
        if found is None:
            found = self.stream_number[stream] = len(self.stream_names)
            self.stream_names.append(stream)
        return found

    def _is_stored(self, key: BucketKey) -> bool:
        """Whether the bucket has counts stored already: written by an earlier eviction
        of this batch, or committed before it."""
        kind, stream, bucket = key
        if self.written.get(key) == self.version:
            return True
        return listed((self.index.stream_days if kind == b"d" else self.index.stream_months
                       ).get(stream, []), bucket)

    def _stored(self, key: BucketKey, raw_key: bytes) -> bytes:
        """The stored counts of a bucket that has them (its count_key: `raw_key`)."""
        raw = self.reader.get("events", raw_key)
        if raw is None:
            raise StoreError(f"event count bucket {key!r} is missing from the store")
        return raw

    def _write_buckets(self, chunks: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray,
                                                    np.ndarray]]) -> None:
        """At the end of the batch: add the runs (held, and spilled by BucketRuns.tend) to
        the stored counts of their buckets and write those into the transaction, a chunk
        of runs at a time (BucketRuns.chunks, merged ahead for a large batch: see
        finish), each chunk in key order; list the buckets new to their streams."""
        for chunk in chunks:
            self._write_chunk(*chunk)

    def _write_chunk(self, codes: np.ndarray, bounds: np.ndarray, profiles: np.ndarray,
                     rows: np.ndarray) -> None:
        """Write the buckets of drained runs (BucketRuns.drain), in key order, each one's
        runs added to what it has stored."""
        kinds = (codes >> 62).tolist()
        streams = ((codes >> 32) & ((1 << 30) - 1))
        buckets = (codes & 0xFFFFFFFF) - BUCKET_OFFSET
        self._list(codes)
        names = self.stream_names
        rank = np.empty(len(names), dtype=np.int64)
        rank[sorted(range(len(names)), key=lambda i: names[i].encode())] = \
            np.arange(len(names))
        order = np.lexsort((rank[streams], buckets, codes >> 62)).tolist()
        stream_list = streams.tolist()
        keys = [(KIND_OF[k], names[s], b)
                for k, s, b in zip(kinds, stream_list, buckets.tolist(), strict=True)]
        texts = [name.encode() for name in names]
        raw_keys = [head + texts[s] for head, s in
                    zip(_count_heads(codes >> 62, buckets), stream_list, strict=True)]
        written, version = self.written, self.version
        items: list[tuple[bytes, bytes]] = []
        size = 0
        for i, value in self._values(order, keys, raw_keys, bounds, profiles, rows):
            items.append((raw_keys[i], value))
            size += len(value)
            written[keys[i]] = version
            if len(items) == PUT_ITEMS or size >= PUT_BYTES:
                self.store.put_many(self.txn, "events", items, overwrite=True)
                items, size = [], 0
        self.store.put_many(self.txn, "events", items, overwrite=True)

    def _values(self, order: list[int], keys: list[BucketKey], raw_keys: list[bytes],
                bounds: np.ndarray, profiles: np.ndarray, rows: np.ndarray
                ) -> Iterator[tuple[int, bytes]]:
        """(bucket, its bytes) in `order`: its runs added to its stored counts. The
        stored ones are read and summed PUT_ITEMS buckets or PUT_BYTES of them at a time,
        so that a chunk's stored buckets are never all held at once."""
        stored = [self._is_stored(key) for key in keys]
        if not any(stored):  # (a load into a store without events: every bucket new)
            encoded = _encoded(bounds, profiles, rows)
            yield from ((i, encoded[i]) for i in order)
            return
        cut = bounds.tolist()
        which: list[int] = []
        raws: list[bytes | None] = []
        size = 0
        for position, i in enumerate(order, 1):
            raw = self._stored(keys[i], raw_keys[i]) if stored[i] else None
            which.append(i)
            raws.append(raw)
            size += len(raw) if raw is not None else 0
            if len(which) == PUT_ITEMS or size >= PUT_BYTES or position == len(order):
                yield from zip(which, _summed(bounds, cut, profiles, rows, which, raws),
                               strict=True)
                which, raws, size = [], [], 0

    def _list(self, codes: np.ndarray) -> None:
        """Add the buckets to their streams' sorted listings (and mark those to rewrite)."""
        codes = np.sort(codes)
        head = codes >> 32  # kind and stream
        starts = np.flatnonzero(np.concatenate(([True], head[1:] != head[:-1])))
        for a, b in zip(starts.tolist(), np.append(starts[1:], len(codes)).tolist(),
                        strict=True):
            kind, stream, _ = bucket_parts(int(codes[a]))
            name = self.stream_names[stream]
            listing = (self.stream_days if kind == b"d" else self.stream_months
                       ).setdefault(name, [])
            merged = np.union1d(np.array(listing, dtype=np.int64),
                                (codes[a:b] & 0xFFFFFFFF) - BUCKET_OFFSET)
            if len(merged) != len(listing):
                listing[:] = merged.tolist()
                self.relisted.add((kind, name))

    def finish(self) -> tuple[EventIndex, Schema]:
        """Write the rest of the rows and every changed count bucket into the transaction;
        the next index (reading through the transaction until the engine pins it to the
        committed snapshot) and schema."""
        self._flush(last=True)
        ahead = self.count > AHEAD_FROM
        # runs of RUN_BYTES a chunk (16 bytes a run), each half that when one is merged
        # while the one before is written: two held at once, as many bytes as one before
        limit = RUN_BYTES // 32 if ahead else RUN_BYTES // 16
        chunks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = \
            self.runs.chunks(max(limit, 1), self.scratch)
        if ahead:
            chunks = Ahead(chunks, 1, "bitseg-chunks")
        with closing(chunks):  # a generator or an Ahead: both close
            self._write_parts()  # while the first chunk of runs is merged, ahead
            self._write_buckets(chunks)
        self._write_catalog()
        schema = self.schema
        added = {k: v for k, v in self.types.items() if k not in schema.events}
        if added:
            schema = schema.with_fields("events", added)
        index = EventIndex(self.reader, self.version, self.written, self.stream_days,
                           self.stream_months, self.type_days, self.parts, self.index.cache)
        return index, schema

    def _write_parts(self) -> None:
        """Write the parts the batch's flushes stashed: one part a (type, day), after
        those committed before (a snapshot from before this batch reads what it always
        read); its parts joined when it has several (input that is not in one time order
        has a part per flush, and every read of that day would otherwise decode them
        all)."""
        try:
            for (event, day), raws in self.stash.items():
                value = join_encoded(raws)
                seq = self.first_part[(event, day)]
                self.store.put(self.txn, "events", block_key(event, day, seq), value)
                self.parts[(event, day)] = seq + 1
        finally:
            self.stash.close()

    def _write_catalog(self) -> None:
        """Rewrite the catalog entries of the streams and types this batch listed anew
        (Engine.open gives a store from before the catalog a whole one)."""
        if self.relisted:
            index = EventIndex(None, self.version, {}, self.stream_days, self.stream_months,
                               self.type_days, self.parts)
            write_catalog(self.store, self.txn, index, self.relisted)

    def _infer(self, name: str, value: Any) -> str:
        problem = T.name_problem(name)
        if problem:
            raise DataError(f"property names {problem}", field=str(name)[:100])
        if isinstance(value, bool):
            type_ = T.BOOL
        elif isinstance(value, int):
            type_ = T.INT
        elif isinstance(value, float):
            type_ = T.FLOAT
        elif isinstance(value, str):
            type_ = T.KEYWORD
        else:
            raise DataError("event properties are keywords, numbers or bools", field=name)
        self.types[name] = type_
        return type_
