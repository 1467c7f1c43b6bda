"""Computed traits: per-profile values derived from events and orders, kept as ordinary
profile fields (so Describe lists them and every rule can use them).

Every trait is computed over whole columns with numpy (grouping by sorting, never a
Python loop per profile), compared column-wise with the values the fields hold now, and
only the profiles whose values differ are written, column-wise in one LMDB transaction:
the trait fields' bitmaps change, the rows do not (the fields are held by their index,
see profiles.with_held).  A profile for which a trait has no value loses the field.

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
from bitseg.index.engine import Also, Engine, as_of_micros
from bitseg.index.errors import BitsegError
from bitseg.index.fields import RangeIndex, RangeWriter, ValueIndex, ValueWriter, bitmap_of, ids_of
from bitseg.index.order_index import OrderIndex
from bitseg.index.profiles import FieldWriters, hold_fields
from bitseg.index.schema import Schema
from bitseg.index.snapshot import Snapshot
from bitseg.index.store import Txn
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
MAX_SLOTS = 1 << 26  # cells of a profiles x labels table (512 MB of sums); more: sorting


def _firsts(keys: np.ndarray) -> np.ndarray:
    """Positions where a sorted array starts a new run."""
    return np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if len(keys) else \
        np.zeros(0, dtype=np.int64)


def _window(as_of: int, last_days: int) -> tuple[int, int]:
    """(lo, hi] in µs: the last n days up to as_of."""
    return as_of - last_days * T.US_PER_DAY, as_of


def _alive(snap: Snapshot, profiles: np.ndarray) -> np.ndarray:
    """Which of these dense ids are live profiles (a lookup table, not a search)."""
    live = ids_of(snap.live)
    if not len(profiles) or not len(live):
        return np.zeros(len(profiles), dtype=bool)
    table = np.zeros(max(int(profiles.max()), int(live[-1])) + 1, dtype=bool)
    table[live] = True
    return table[profiles]


def quintiles(metric: np.ndarray) -> np.ndarray:
    """1 + floor(5 r / n) with r the number of metrics strictly below each (ties share)."""
    n = len(metric)
    order = np.argsort(metric)
    ordered = metric[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]] if n else np.zeros(0, dtype=bool)
    below = np.empty(n, dtype=np.int64)  # r of the sorted: where its run of ties starts
    below[order] = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    return 1 + (5 * below) // max(n, 1)


def _best_label(profile: np.ndarray, label: np.ndarray, count: int,
                weights: np.ndarray | None = None) -> Values:
    """Per profile, the label (0..count-1) whose rows sum the most for it (their weights,
    or 1 per row); ties: the lowest label. One table of profiles x labels, filled by
    np.add.at; when that table would pass MAX_SLOTS, by sorting instead."""
    there = np.zeros(int(profile.max()) + 1, dtype=bool)
    there[profile] = True
    ids = np.flatnonzero(there)
    if len(ids) * count > MAX_SLOTS:
        keys = profile.astype(np.int64) * count + label
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        starts = _firsts(keys)
        totals = np.add.reduceat(np.ones(len(keys), dtype=np.int64) if weights is None
                                 else weights[order], starts)
        return _best_by_sorting(keys[starts] // count, totals, keys[starts] % count)
    rank = np.zeros(len(there), dtype=np.intp)
    rank[ids] = np.arange(len(ids))
    slot = rank[profile] * count + label
    totals = np.zeros(len(ids) * count, dtype=np.int64)
    np.add.at(totals, slot, 1 if weights is None else weights)  # exact, in C
    if weights is not None:  # a label with rows summing to 0 or less still competes
        seen = np.zeros(len(totals), dtype=bool)
        seen[slot] = True
        totals[~seen] = I64_MIN
    best = totals.reshape(len(ids), count).argmax(axis=1)  # the first of equal maxima
    return ids.astype(np.uint32), best.astype(np.int64)


def _best_by_sorting(profile: np.ndarray, score: np.ndarray, label: np.ndarray) -> Values:
    """Per profile, the label with the highest score (ties: the lowest label)."""
    order = np.lexsort((label, -score, profile))
    first = _firsts(profile[order])
    return profile[order][first].astype(np.uint32), label[order][first]


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
    alive = _alive(snap, profile)  # not deleted ones
    profile = profile[alive].astype(np.intp)
    if not len(profile):
        return _none(np.int64)
    hour = (np.concatenate(stamps)[alive] // US_PER_HOUR) % 24
    return _best_label(profile, hour, 24)


class _Orders:
    """The orders a set of params chooses, and per owner their count; shared by the
    traits with the same window and statuses."""

    def __init__(self, snap: Snapshot, params: dict[str, Any], as_of: int) -> None:
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
        alive = _alive(snap, owners)  # of live profiles
        self.oids, self.owners = oids[alive], owners[alive].astype(np.intp)
        self.size = int(self.owners.max()) + 1 if len(self.owners) else 0
        self.count = np.bincount(self.owners, minlength=self.size)
        self.buyers = np.flatnonzero(self.count)


def _chosen(snap: Snapshot, params: dict[str, Any], as_of: int,
            memo: dict[tuple, _Orders]) -> _Orders:
    key = (params["last_days"], tuple(params.get("statuses") or ()) or None)
    if key not in memo:
        memo[key] = _Orders(snap, params, as_of)
    return memo[key]


def rfm_metric(snap: Snapshot, params: dict[str, Any], as_of: int, which: str,
               memo: dict[tuple, _Orders] | None = None) -> Values:
    """(the buyers' sorted dense ids, their metric): the latest order's ts, the number
    of orders or the sum of `of` over the orders the params choose."""
    index: OrderIndex = snap.orders
    chosen = _chosen(snap, params, as_of, {} if memo is None else memo)
    buyers = chosen.buyers
    if not len(buyers):
        return _none(np.int64)
    if which == "rfm_frequency":
        return buyers.astype(np.uint32), chosen.count[buyers].astype(np.int64)
    by_owner = np.zeros(chosen.size, dtype=np.int64)
    if which == "rfm_recency":
        by_owner[:] = I64_MIN
        np.maximum.at(by_owner, chosen.owners, index.ts_buf[chosen.oids])
    else:
        column = index.columns.get(params["of"])
        if column is not None:
            oids = chosen.oids
            np.add.at(by_owner, chosen.owners, np.where(column.valid[oids], column.keys[oids], 0))
    return buyers.astype(np.uint32), by_owner[buyers]


def rfm(snap: Snapshot, params: dict[str, Any], as_of: int, which: str,
        memo: dict[tuple, _Orders] | None = None, cuts: list[int] | None = None) -> Values:
    """The buyers' scores 1-5: their quintiles among themselves, or by `cuts` (the cut
    points of a base larger than this store's, see quintile_cuts)."""
    buyers, metric = rfm_metric(snap, params, as_of, which, memo)
    if not len(buyers):
        return buyers, metric
    return buyers, quintiles(metric) if cuts is None else scored(metric, cuts)


def quintile_cuts(values: np.ndarray, counts: np.ndarray) -> list[int]:
    """The cut points of the quintile scores of a base given as its distinct metrics
    (sorted) and how many hold each: with c the base's sorted metrics, n of them, a
    metric x scores 1 + (how many cuts are below x), the same as quintiles() gives:
    1 + floor(5 r / n) >= k exactly when r >= m = ceil((k - 1) n / 5), that is when
    c[m - 1] < x; so the cut for k = 2..5 is c[m - 1]."""
    ends = np.cumsum(counts, dtype=np.int64)
    n = int(ends[-1]) if len(ends) else 0
    if not n:
        return []
    ranks = [-((1 - k) * n // 5) - 1 for k in range(2, 6)]  # m - 1, m = ceil((k-1) n / 5)
    return [int(values[np.searchsorted(ends, rank, side="right")]) for rank in ranks]


def scored(metric: np.ndarray, cuts: list[int]) -> np.ndarray:
    """1 + how many cut points are strictly below each metric (see quintile_cuts)."""
    return 1 + np.searchsorted(np.asarray(cuts, dtype=np.int64), metric, side="left")


def metrics(snap: Snapshot, config: Mapping[str, dict[str, Any]], as_of: int
            ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each declared RFM trait's metrics as (distinct values sorted, how many buyers
    hold each): what the sharded front sums over the shards to cut the quintiles."""
    memo: dict[tuple, _Orders] = {}
    out = {}
    for name, params in config.items():
        if name in RFM:
            _, metric = rfm_metric(snap, params, as_of, name, memo)
            values, counts = np.unique(metric, return_counts=True)
            out[name] = values, counts.astype(np.int64)
    return out


def favourite_category(snap: Snapshot, params: dict[str, Any], as_of: int,
                       memo: dict[tuple, _Orders] | None = None
                       ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(ids, codes into the returned sorted category names)."""
    index: OrderIndex = snap.orders
    cats = index.item_values.get(params["category"])
    qty, price = index.item_columns.get("items.qty"), index.item_columns.get("items.price")
    oids = _chosen(snap, params, as_of, {} if memo is None else memo).oids
    if cats is None or qty is None or price is None or not len(oids):
        return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64), []
    names = sorted(cats.values)
    code = np.full(index.item_count, -1, dtype=np.int16 if len(names) < 2**15 else np.int64)
    for k, name in enumerate(names):
        ids = ids_of(cats.values[name])
        code[ids[ids < index.item_count]] = k
    owner, n = index.item_owner, index.item_count
    chosen = np.zeros(index.count + 1, dtype=bool)  # the last slot: a replaced item's
    chosen[oids] = True
    keep = chosen[np.minimum(owner, index.count)]  # whole-column passes, no gathers
    keep &= code >= 0
    keep &= qty.valid[:n]
    keep &= price.valid[:n]
    iids = np.flatnonzero(keep)
    if not len(iids):
        return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=np.int64), names
    spend = qty.keys[iids] * price.keys[iids]
    profile = index.owner_buf[owner[iids]].astype(np.intp)
    ids, best = _best_label(profile, code[iids], len(names), spend)
    return ids, best, names


def _none(dtype: Any) -> Values:
    return np.zeros(0, dtype=np.uint32), np.zeros(0, dtype=dtype)


Computed = tuple[np.ndarray, np.ndarray, list]  # sorted dense ids, values, keyword table


def compute(snap: Snapshot, config: Mapping[str, dict[str, Any]], as_of: int,
            cuts: Mapping[str, list[int]] | None = None) -> dict[str, Computed]:
    """Each declared trait: (sorted dense ids, their values as an int64 array, and for a
    keyword trait the table its values are codes into, else []). `cuts`: an RFM trait's
    quintile cut points over a larger base (the sharded front's), else its own."""
    out: dict[str, Computed] = {}
    memo: dict[tuple, _Orders] = {}  # the orders chosen, shared by traits with equal params
    for name, params in config.items():
        if name == "best_send_hour":
            ids, values = best_send_hour(snap, params, as_of)
            out[name] = ids, values, []
        elif name in RFM:
            ids, values = rfm(snap, params, as_of, name, memo,
                              None if cuts is None else cuts.get(name))
            out[name] = ids, values, []
        else:
            out[name] = favourite_category(snap, params, as_of, memo)
    return out


def values_of(computed: Computed) -> list:
    """A computed trait's values as Python objects (keywords as their names)."""
    _, values, table = computed
    return [table[c] for c in values.tolist()] if table else values.tolist()


# ---------------------------------------------------------------------- writing
MISSING = I64_MIN  # no value, in the code arrays below


def _as_codes(snap: Snapshot, name: str, computed: Computed, size: int
              ) -> tuple[np.ndarray, np.ndarray, list]:
    """(old, new) values of one field over dense ids 0..size-1 as int64 arrays (MISSING:
    no value; keywords as codes into the returned table), for a column-wise diff."""
    ids, values, table = computed
    old = np.full(size, MISSING, dtype=np.int64)
    new = np.full(size, MISSING, dtype=np.int64)
    index = snap.fields.get(name)
    if TYPES[name] == T.INT:
        if isinstance(index, RangeIndex):
            have, keys = index.decode()
            old[have] = keys
        new[ids] = values
        return old, new, []
    merged = sorted(set(table) | set(index.values if isinstance(index, ValueIndex) else ()))
    code = {word: k for k, word in enumerate(merged)}
    if isinstance(index, ValueIndex):
        for word, bitmap in index.values.items():
            old[ids_of(bitmap)] = code[word]
    if len(ids):
        new[ids] = np.array([code[word] for word in table], dtype=np.int64)[values]
    return old, new, merged


Change = tuple[np.ndarray, np.ndarray, list]  # changed ids, their new codes, keyword table


def _changes(snap: Snapshot, computed: dict[str, Computed]
             ) -> tuple[np.ndarray, dict[str, Change]]:
    """(dense ids of the profiles to write, per trait: the ids whose value differs, their
    new values as codes (MISSING: removed; keywords: into the table))."""
    size = int(snap.live.max()) + 1 if snap.live else 0
    for ids, _, _ in computed.values():
        size = max(size, int(ids.max()) + 1 if len(ids) else 0)
    per_trait: dict[str, Change] = {}
    touched = BitMap()
    for name, one in computed.items():
        old, new, table = _as_codes(snap, name, one, size)
        where = np.flatnonzero(old != new).astype(np.uint32)
        per_trait[name] = where, new[where], table
        touched |= bitmap_of(where)
    return ids_of(touched), per_trait


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


def refresh(engine: Engine, config: Any = None, *, as_of: Any = None,
            cuts: Mapping[str, list[int]] | None = None, also: Also | None = None
            ) -> RefreshReport:
    """Recompute the declared traits and write the changed ones in one transaction
    (`cuts`: the RFM quintiles' cut points over every shard, see compute; `also`: run
    in that transaction when there is one, as the sharded front unstages a refresh)."""
    traits = parse_config(config)
    as_of_us = as_of_micros(as_of)
    engine.declare_schema({"profiles": {name: TYPES[name] for name in traits}},
                          source="traits")
    found: dict[str, Any] = {}

    def build(txn: Txn, snap: Snapshot) -> tuple[FieldWriters, Schema, BitMap] | None:
        computed = compute(snap, traits, as_of_us, cuts)
        dense, per_trait = _changes(snap, computed)
        found.update(changed={name: len(c[0]) for name, c in per_trait.items()},
                     profiles=len(dense),
                     holders={name: len(c[0]) for name, c in computed.items()})
        if not len(dense):
            return None  # nothing changed: no new version, so result caches stay valid
        writers = FieldWriters(snap, snap.schema)
        hold_fields(engine.store, txn, per_trait)  # the rows are not rewritten
        _update_indexes(writers, snap, per_trait)
        return writers, snap.schema, bitmap_of(dense)

    engine.write_columns(build, also=also)
    return RefreshReport(T.format_timestamp(as_of_us), found["profiles"], found["changed"],
                         found["holders"])


def describe_config(config: Any = None) -> dict[str, dict[str, Any]]:
    """The traits a config declares, each with its field type and parameters."""
    return {name: {"type": TYPES[name], **params}
            for name, params in parse_config(config).items()}

