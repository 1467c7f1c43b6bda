"""Computed traits: per-profile values derived from events and orders, kept as ordinary
profile fields (so Describe lists them and every rule can use them).

Every trait is computed over whole columns with numpy (grouping by sorting, never a
Python loop per profile), compared column-wise with the values the fields hold now, and
only the profiles whose values differ are written, as one profile batch (one LMDB
transaction).  A profile for which a trait has no value loses the field.

Traits (names are the profile fields they fill):
- best_send_hour: the UTC hour (0-23) with the most rows of the configured event types
  in the window (as_of - last_days, as_of]; ties: the earliest hour.
- rfm_recency / rfm_frequency / rfm_monetary: over the profile's orders in the window
  (optionally only those with a listed status): the latest order's ts, the number of
  orders, the sum of `of` (missing: 0).  Among the n live profiles with at least one such
  order, a metric x scores 1 + floor(5 * r / n), r = how many of them have a metric
  strictly below x: ties share a score, larger (later) is better, the top score is 5.
  Profiles with no such order have no value.
- favourite_category: the item category with the greatest spend (price x qty) over the
  item lines of those orders that have a category, a price and a qty; ties: the first
  category in UTF-8 order.  No such line: no value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.compare import I64_MIN
from bitseg.index.engine import Engine, as_of_micros
from bitseg.index.errors import BitsegError
from bitseg.index.fields import RangeIndex, RangeWriter, ValueIndex, ValueWriter, bitmap_of, ids_of
from bitseg.index.keys import u32
from bitseg.index.order_index import NONE, OrderIndex
from bitseg.index.profiles import FieldWriters
from bitseg.index.schema import Schema
from bitseg.index.snapshot import Snapshot
from bitseg.index.store import Store, Txn
from bitseg.index.timeline import day_of

US_PER_HOUR = 3_600_000_000
RFM = ("rfm_recency", "rfm_frequency", "rfm_monetary")
DEFAULTS: dict[str, dict[str, Any]] = {
    "best_send_hour": {"events": ["email_opened", "email_clicked"], "last_days": 90},
    "rfm_recency": {"last_days": 365, "statuses": None},
    "rfm_frequency": {"last_days": 365, "statuses": None},
    "rfm_monetary": {"last_days": 365, "statuses": None, "of": "amount"},
    "favourite_category": {"last_days": 365, "statuses": None, "category": "items.category"},
}
TYPES = {"best_send_hour": T.INT, "rfm_recency": T.INT, "rfm_frequency": T.INT,
         "rfm_monetary": T.INT, "favourite_category": T.KEYWORD}

Values = tuple[np.ndarray, np.ndarray]  # (sorted dense ids, their values)


# ---------------------------------------------------------------------- the config
def parse_config(config: Any, source: str = "traits") -> dict[str, dict[str, Any]]:
    """A traits config ({trait: {param: value}}; params left out take their defaults)
    -> every declared trait with all its params. None: the built-in default."""
    if config is None:
        return {name: dict(params) for name, params in DEFAULTS.items()}
    if isinstance(config, (str, bytes)):
        try:
            config = orjson.loads(config)
        except orjson.JSONDecodeError as exc:
            raise BitsegError(f"{source}: not JSON ({exc})") from None
    if not isinstance(config, dict) or not config:
        raise BitsegError(f"{source}: expected an object of traits "
                          f"({', '.join(DEFAULTS)}) to their parameters")
    out = {}
    for name, params in config.items():
        where = f"{source}: $.{name}"
        if name not in DEFAULTS:
            raise BitsegError(f"{where}: unknown trait (known: {', '.join(DEFAULTS)})")
        if not isinstance(params, dict):
            raise BitsegError(f"{where}: expected an object of parameters")
        unknown = set(params) - set(DEFAULTS[name])
        if unknown:
            raise BitsegError(f"{where}.{sorted(unknown)[0]}: unknown parameter "
                              f"(known: {', '.join(DEFAULTS[name])})")
        merged = {**DEFAULTS[name], **params}
        _check_params(merged, where)
        out[name] = merged
    return out


def _check_params(params: dict[str, Any], where: str) -> None:
    days = params["last_days"]
    if type(days) is not int or days < 1:
        raise BitsegError(f"{where}.last_days: expected a whole number >= 1, got {days!r}")
    for key in ("events", "statuses"):
        words = params.get(key)
        if key in params and words is not None and (
                not isinstance(words, list) or not words
                or not all(isinstance(w, str) for w in words)):
            raise BitsegError(f"{where}.{key}: expected a non-empty list of strings"
                              + (" or null" if key == "statuses" else ""))
    for key in ("of", "category"):
        if key in params and not isinstance(params[key], str):
            raise BitsegError(f"{where}.{key}: expected a field name")


# ---------------------------------------------------------------------- grouping helpers
def _firsts(keys: np.ndarray) -> np.ndarray:
    """Positions where a sorted array starts a new run."""
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else \
        np.zeros(0, dtype=np.int64)


def _best_per_profile(profile: np.ndarray, score: np.ndarray, label: np.ndarray) -> Values:
    """Per profile, the label with the highest score (ties: the lowest label)."""
    order = np.lexsort((label, -score, profile))
    first = _firsts(profile[order])
    return profile[order][first].astype(np.uint32), label[order][first]


def _window(as_of: int, last_days: int) -> tuple[int, int]:
    """(lo, hi] in µs: the last n days up to as_of."""
    return as_of - last_days * T.US_PER_DAY, as_of


def quintiles(metric: np.ndarray) -> np.ndarray:
    """1 + floor(5 r / n) with r the number of metrics strictly below each (ties share)."""
    n = len(metric)
    below = np.searchsorted(np.sort(metric), metric, side="left")
    return 1 + (5 * below.astype(np.int64)) // max(n, 1)


# ---------------------------------------------------------------------- the traits
def best_send_hour(snap: Snapshot, params: dict[str, Any], as_of: int) -> Values:
    lo, hi = _window(as_of, params["last_days"])
    index = snap.events
    profiles, stamps = [], []
    for event in params["events"]:
        for day in index.type_days.get(event, ()):
            if not day_of(lo) <= day <= day_of(hi):
                continue
            block = index.block(event, day)
            if block is None:
                continue
            keep = (block.ts > lo) & (block.ts <= hi)
            profiles.append(block.profile[keep])
            stamps.append(block.ts[keep])
    if not profiles:
        return _none(np.int64)
    profile = np.concatenate(profiles)
    alive = np.isin(profile, ids_of(bitmap_of(profile) & snap.live))  # not deleted ones
    profile = profile[alive].astype(np.int64)
    hour = (np.concatenate(stamps)[alive] // US_PER_HOUR) % 24
    keys, counts = np.unique(profile * 24 + hour, return_counts=True)
    return _best_per_profile(keys // 24, counts, keys % 24)


def _orders(snap: Snapshot, params: dict[str, Any], as_of: int) -> np.ndarray:
    """Ids of the live orders of live profiles in the window with a listed status."""
    index: OrderIndex = snap.orders
    lo, hi = _window(as_of, params["last_days"])
    chosen = index.live
    if params.get("statuses") is not None:
        status = index.values.get("status") or ValueIndex()
        chosen = chosen & status.any_of(tuple(params["statuses"]))
    oids = ids_of(chosen)
    ts = index.ts_buf[oids]
    oids = oids[(ts > lo) & (ts <= hi)]
    owners = index.owner_buf[oids]
    return oids[np.isin(owners, ids_of(bitmap_of(owners) & snap.live))]


def rfm(snap: Snapshot, params: dict[str, Any], as_of: int, which: str) -> Values:
    index: OrderIndex = snap.orders
    oids = _orders(snap, params, as_of)
    if not len(oids):
        return _none(np.int64)
    owners = index.owner_buf[oids]
    order = np.argsort(owners, kind="stable")
    owners, oids = owners[order], oids[order]
    starts = _firsts(owners)
    if which == "rfm_recency":
        metric = np.maximum.reduceat(index.ts_buf[oids], starts)
    elif which == "rfm_frequency":
        metric = np.diff(np.r_[starts, len(oids)])
    else:
        column = index.columns.get(params["of"])
        if column is None:
            amounts = np.zeros(len(oids), dtype=np.int64)
        else:
            amounts = np.where(column.valid[oids], column.keys[oids], 0)
        metric = np.add.reduceat(amounts, starts)
    return owners[starts].astype(np.uint32), quintiles(metric)


def favourite_category(snap: Snapshot, params: dict[str, Any], as_of: int
                       ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(ids, codes into the returned sorted category names)."""
    index: OrderIndex = snap.orders
    cats = index.item_values.get(params["category"])
    qty, price = index.item_columns.get("items.qty"), index.item_columns.get("items.price")
    oids = _orders(snap, params, as_of)
    if cats is None or qty is None or price is None or not len(oids):
        return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64), []
    names = sorted(cats.values)
    code = np.full(index.item_count, -1, dtype=np.int64)
    for k, name in enumerate(names):
        ids = ids_of(cats.values[name])
        code[ids[ids < index.item_count]] = k
    owner = index.item_owner
    chosen = np.zeros(index.count, dtype=bool)
    chosen[oids] = True
    iids = np.flatnonzero((owner != NONE) & (code >= 0))
    iids = iids[chosen[owner[iids]]]
    iids = iids[qty.valid[iids] & price.valid[iids]]
    if not len(iids):
        return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64), names
    spend = qty.keys[iids] * price.keys[iids]
    profile = index.owner_buf[owner[iids]].astype(np.int64)
    keys = profile * len(names) + code[iids]
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    starts = _firsts(keys)
    totals = np.add.reduceat(spend[order], starts)
    ids, best = _best_per_profile(keys[starts] // len(names), totals, keys[starts] % len(names))
    return ids, best, names


def _none(dtype: Any) -> Values:
    return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=dtype)


def compute(snap: Snapshot, config: Mapping[str, dict[str, Any]], as_of: int
            ) -> dict[str, tuple[np.ndarray, list]]:
    """Each declared trait: (sorted dense ids, their values as Python objects)."""
    out: dict[str, tuple[np.ndarray, list]] = {}
    for name, params in config.items():
        if name == "best_send_hour":
            ids, values = best_send_hour(snap, params, as_of)
            out[name] = ids, values.tolist()
        elif name in RFM:
            ids, values = rfm(snap, params, as_of, name)
            out[name] = ids, values.tolist()
        else:
            ids, codes, names = favourite_category(snap, params, as_of)
            out[name] = ids, [names[c] for c in codes.tolist()]
    return out


# ---------------------------------------------------------------------- writing
MISSING = I64_MIN  # no value, in the code arrays below


def _as_codes(snap: Snapshot, name: str, ids: np.ndarray, values: list, size: int
              ) -> tuple[np.ndarray, np.ndarray, list]:
    """(old, new) values of one field over dense ids 0..size-1 as int64 arrays (MISSING:
    no value; keywords as codes into the returned table), for a column-wise diff."""
    old = np.full(size, MISSING, dtype=np.int64)
    new = np.full(size, MISSING, dtype=np.int64)
    index = snap.fields.get(name)
    if TYPES[name] == T.INT:
        if isinstance(index, RangeIndex):
            have, keys = index.decode()
            old[have] = keys
        new[ids] = np.asarray(values, dtype=np.int64)
        return old, new, []
    table = sorted(set(values) | set(index.values if isinstance(index, ValueIndex) else ()))
    code = {word: k for k, word in enumerate(table)}
    if isinstance(index, ValueIndex):
        for word, bitmap in index.values.items():
            old[ids_of(bitmap)] = code[word]
    new[ids] = np.fromiter((code[v] for v in values), dtype=np.int64, count=len(values))
    return old, new, table


Change = tuple[np.ndarray, np.ndarray, list]  # changed ids, their new codes, keyword table


def _changes(snap: Snapshot, computed: dict[str, tuple[np.ndarray, list]]
             ) -> tuple[np.ndarray, dict[str, Change]]:
    """(dense ids of the profiles to write, per trait: the ids whose value differs, their
    new values as codes (MISSING: removed; keywords: into the table))."""
    size = int(snap.live.max()) + 1 if snap.live else 0
    for ids, _ in computed.values():
        size = max(size, int(ids.max()) + 1 if len(ids) else 0)
    per_trait: dict[str, Change] = {}
    touched = BitMap()
    for name, (ids, values) in computed.items():
        old, new, table = _as_codes(snap, name, ids, values, size)
        where = np.flatnonzero(old != new).astype(np.uint32)
        per_trait[name] = where, new[where], table
        touched |= bitmap_of(where)
    return ids_of(touched), per_trait


def _rewrite_rows(store: Store, txn: Txn, dense: np.ndarray,
                  per_trait: dict[str, Change]) -> None:
    """Each changed profile's row read, given its new trait values, written back once."""
    updates: list[dict[str, Any]] = [{} for _ in range(len(dense))]
    for name, (where, codes, table) in per_trait.items():
        for position, code in zip(np.searchsorted(dense, where).tolist(), codes.tolist(),
                                  strict=True):
            updates[position][name] = None if code == MISSING else \
                table[code] if table else code
    for d, update in zip(dense.tolist(), updates, strict=True):
        key = u32(d)
        raw = store.get(txn, "rows", key)
        row = orjson.loads(raw) if raw is not None else {}
        for name, value in update.items():
            if value is None:
                row.pop(name, None)
            else:
                row[name] = value
        store.put(txn, "rows", key, orjson.dumps(row))


def _update_indexes(writers: FieldWriters, snap: Snapshot,
                    per_trait: dict[str, Change]) -> None:
    """Each trait field's bitmaps: changed ids lose their old value, take the new one."""
    for name, (where, codes, table) in per_trait.items():
        if not len(where):
            continue
        writer = writers.get(name)
        has = codes != MISSING
        if isinstance(writer, RangeWriter):
            writer.remove(where)
            if has.any():
                writer.add(where[has], codes[has])
            continue
        assert isinstance(writer, ValueWriter)
        old = snap.fields.get(name)
        if isinstance(old, ValueIndex):
            changed = bitmap_of(where)
            for word, bitmap in old.values.items():
                gone = ids_of(bitmap & changed)
                if len(gone):
                    writer.remove(gone, np.zeros(len(gone), dtype=np.uint32), [word])
        if has.any():
            writer.add(where[has], codes[has].astype(np.uint32), table)


@dataclass(frozen=True)
class RefreshReport:
    as_of: str
    profiles: int  # profiles written
    changed: dict[str, int]  # per trait: profiles whose value changed (set, altered, removed)
    holders: dict[str, int]  # per trait: profiles with a value now


def refresh(engine: Engine, config: Any = None, *, as_of: Any = None) -> RefreshReport:
    """Recompute the declared traits and write the changed ones in one transaction."""
    traits = parse_config(config)
    as_of_us = as_of_micros(as_of)
    engine.declare_schema({"profiles": {name: TYPES[name] for name in traits}},
                          source="traits")
    found: dict[str, Any] = {}

    def build(txn: Txn, snap: Snapshot) -> tuple[FieldWriters, Schema, BitMap] | None:
        computed = compute(snap, traits, as_of_us)
        dense, per_trait = _changes(snap, computed)
        found.update(changed={name: len(c[0]) for name, c in per_trait.items()},
                     profiles=len(dense),
                     holders={name: len(ids) for name, (ids, _) in computed.items()})
        if not len(dense):
            return None  # nothing changed: no new version, so result caches stay valid
        writers = FieldWriters(snap, snap.schema)
        _rewrite_rows(engine.store, txn, dense, per_trait)
        _update_indexes(writers, snap, per_trait)
        return writers, snap.schema, bitmap_of(dense)

    engine.write_columns(build)
    return RefreshReport(T.format_timestamp(as_of_us), found["profiles"], found["changed"],
                         found["holders"])


def describe_config(config: Any = None) -> dict[str, dict[str, Any]]:
    """The traits a config declares, each with its field type and parameters."""
    return {name: {"type": TYPES[name], **params}
            for name, params in parse_config(config).items()}

