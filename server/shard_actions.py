"""Bulk actions and computed traits through the sharded front, answered as one store.

- BulkAction: every shard acts on its own members of the audience (a profile, its
  events and orders are on one shard, so a rule's members on a shard are the store's
  members that live there). The action reaches every shard or none by the front's
  two-phase commit (shard_writes), as a staged kind of its own: to prepare, a shard
  runs the whole action in a write transaction that it aborts after every check passed
  and the audit entry was written, then stages it; after the front's decision it runs
  it again for real, removing the staged copy in the same transaction.
- The audit: each shard records its own entry under the front's one action id and
  time (the `stamp`: the id after the largest any shard has, the front's clock), with
  its own members and changed. ListActions merges the shards' entries by id, newest
  first, with members, changed and version summed: the entries one store would list.
- A dry run is each shard's dry run (bitmaps alone, nothing staged), the counts summed.
- A target that meets a top node (its own, or a dynamic segment's it names): the front
  chooses its top sets over every shard first (shard_reads.resolve_tops) while writes
  and segment changes wait, and each shard's payload carries its part of them, in
  force while it checks, runs or dry-runs the action (TopSets.chosen): the members
  acted on are the store's top N of the data counted. A staged action keeps them.
- RefreshTraits: best_send_hour and favourite_category need only a profile's own events
  and orders, all on its shard. The RFM quintiles rank a profile among every buyer of
  the base, so the front first asks every shard for its metrics (each RFM trait's
  distinct values and how many buyers hold each), sums them and cuts the quintiles as
  one store cuts them (traits.quintile_cuts); each shard then scores its buyers by those
  cut points. The refresh is a staged kind too: to prepare, a shard checks the config
  and that the trait fields' types fit its schema (the only refusals a refresh has);
  after the decision it computes and writes its traits, removing the staged copy in
  the same transaction (on its own when nothing changed). A refresh changes nothing
  but the trait fields, so one applied again after a crash writes nothing new.
- `serve --shards N --traits-every S`: ShardTraitsScheduler, the one store's scheduler
  refreshing through the front.

The front holds the two-phase commit's lock from reading the shards (the next action
id, the RFM metrics) to the apply, so no batch lands between what it read and the
action it decided.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from typing import Any

import numpy as np

from bitseg.index import bulk, traits
from bitseg.index import types as T
from bitseg.index.bulk import BulkAction, BulkResult
from bitseg.index.engine import as_of_micros
from bitseg.index.traits import RFM, RefreshReport
from bitseg.index.traits_schedule import TraitsScheduler
from bitseg.server.shard_reads import chosen_tops, resolve_tops
from bitseg.server.shard_segments import changes_for, may_meet_top
from bitseg.server.shard_writes import Split, schema_after, writes_for

BULK = "bulk"  # staged kinds of shard_writes
TRAITS = "traits"
KINDS = frozenset({BULK, TRAITS})
SUMMED = ("members", "changed", "version")  # an audit entry's numbers, over the shards


# ---------------------------------------------------------------------- a shard's side
def check(engine: Any, kind: str, payload: dict[str, Any]) -> dict[str, dict[str, str]]:
    """A shard's prepare of an action or refresh: every check, nothing written; the
    schema the shard would have after it."""
    if kind == TRAITS:
        declared = {name: traits.TYPES[name] for name in traits.parse_config(payload["config"])}
        return engine.schema.declare({"profiles": declared}, source="traits").to_json()

    with _tops(engine, payload):
        return schema_after(lambda also: bulk.run(engine, _action(payload),
                                                  as_of=payload["as_of"],
                                                  stamp=payload["stamp"], also=also),
                            "a bulk action's check")


def apply(engine: Any, key: str, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """A shard's apply of a staged action or refresh (decided to commit), the staged key
    removed with it; its numbers as a dict."""
    unstaged: list[bool] = []

    def unstage(txn: Any, snapshot: Any) -> dict[str, Any]:
        engine.store.delete(txn, "meta", key.encode())  # with the change, atomically
        unstaged.append(True)
        return {}

    if kind == TRAITS:
        report = traits.refresh(engine, payload["config"], as_of=payload["as_of"],
                                cuts=payload["cuts"], also=unstage)
        if not unstaged:  # nothing changed, so no transaction: unstaged on its own
            with engine.store.write() as txn:  # (a refresh applied twice writes nothing)
                engine.store.delete(txn, "meta", key.encode())
        return dataclasses.asdict(report)
    with _tops(engine, payload):
        done = bulk.run(engine, _action(payload), as_of=payload["as_of"],
                        stamp=payload["stamp"], also=unstage)
    return {"members": done.members, "changed": done.changed, "entry": done.entry}


def dry_run(engine: Any, payload: dict[str, Any]) -> tuple[int, int]:
    """(members, would change) of an action on this shard."""
    with _tops(engine, payload):
        done = bulk.run(engine, _action(payload), as_of=payload["as_of"], dry_run=True)
    return done.members, done.changed


def _tops(engine: Any, payload: dict[str, Any]) -> AbstractContextManager[None]:
    """The top sets chosen over every shard for the action's target in force on this
    thread (this shard's dense ids of each, in the payload), if it has any."""
    chosen = payload.get("tops")
    if chosen is None:
        return nullcontext()
    sets = chosen_tops(engine, _action(payload).target(), chosen)
    return engine.snapshot.tops.chosen(sets.sets)


def rfm_metrics(engine: Any, config: Any, as_of_us: int
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """This shard's RFM metrics: per trait, its distinct values and their counts."""
    return traits.metrics(engine.snapshot, traits.parse_config(config), as_of_us)


def _action(payload: dict[str, Any]) -> BulkAction:
    return BulkAction(**payload["action"])


# ---------------------------------------------------------------------- the front's side
def bulk_action(shards: Any, action: BulkAction, as_of: datetime, dry_run: bool
                ) -> BulkResult:
    """An action on every member over every shard (or none), or its dry run."""
    payload: dict[str, Any] = {"action": dataclasses.asdict(action),
                               "as_of": as_of_micros(as_of)}
    writes = writes_for(shards)
    # no segment change, action or batch between reading the shards and this action
    with changes_for(shards).lock, writes.held():
        chosen: list[Any] = [None] * shards.count
        if shards.count > 1 and may_meet_top(action.target()):
            chosen = resolve_tops(shards, action.target(), as_of)
        if dry_run:
            found = shards.each("bulk_dry_run", per_shard=[
                ({**payload, "tops": tops},) for tops in chosen])
            return BulkResult(sum(m for m, _ in found), sum(c for _, c in found), True, None)
        writes.finish_pending()
        number = max(shards.each("last_action")) + 1
        payload["stamp"] = {"id": number, "time": _now()}
        results = writes.write(BULK, Split([{**payload, "tops": tops} for tops in chosen],
                                           [[] for _ in chosen]))
    entries = [r["entry"] if isinstance(r, dict) else shards.call(i, "action_entry", number)
               for i, r in enumerate(results)]  # not a dict: applied before, answer lost
    entry = merge_entries([[e] for e in entries if e is not None])[0]
    return BulkResult(entry["members"], entry["changed"], False, entry)


def list_actions(shards: Any, limit: int) -> list[dict[str, Any]]:
    """The audit entries, newest first, as one store lists them (limit 0: all)."""
    merged = merge_entries(shards.each("actions", limit))
    return merged[:limit] if limit else merged


def merge_entries(lists: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The shards' audit entries as one list, newest first: the entries of one id are one
    entry (the first shard's words) with members, changed and version summed."""
    merged: dict[int, dict[str, Any]] = {}
    for entries in lists:
        for entry in entries:
            seen = merged.get(entry["id"])
            if seen is None:
                merged[entry["id"]] = dict(entry)
            else:
                for name in SUMMED:
                    seen[name] += entry[name]
    return [merged[number] for number in sorted(merged, reverse=True)]


def refresh_traits(shards: Any, config: Any, as_of: Any) -> RefreshReport:
    """Refresh the computed traits on every shard (or none), the RFM quintiles cut over
    every shard's buyers; the shards' reports summed."""
    parsed = traits.parse_config(config)
    as_of_us = as_of_micros(as_of)
    writes = writes_for(shards)
    with writes.held():  # no batch between the metrics read and the refresh
        writes.finish_pending()
        cuts: dict[str, list[int]] | None = None
        if shards.count > 1 and any(name in RFM for name in parsed):
            cuts = rfm_cuts(shards.each("traits_metrics", parsed, as_of_us))
        payload = {"config": parsed, "as_of": as_of_us, "cuts": cuts}
        results = writes.write(TRAITS, _everywhere(payload, shards.count))
    reports = [r for r in results if isinstance(r, dict)]  # (see bulk_action)
    return RefreshReport(T.format_timestamp(as_of_us),
                         sum(r["profiles"] for r in reports),
                         _sum_counts([r["changed"] for r in reports], parsed),
                         _sum_counts([r["holders"] for r in reports], parsed))


def rfm_cuts(parts: Sequence[Mapping[str, tuple[np.ndarray, np.ndarray]]]
             ) -> dict[str, list[int]]:
    """Each RFM trait's quintile cut points over the shards' metrics summed."""
    cuts = {}
    for name in parts[0]:
        values = np.concatenate([part[name][0] for part in parts])
        counts = np.concatenate([part[name][1] for part in parts])
        distinct, where = np.unique(values, return_inverse=True)
        summed = np.zeros(len(distinct), dtype=np.int64)
        np.add.at(summed, where, counts)
        cuts[name] = traits.quintile_cuts(distinct, summed)
    return cuts


def _sum_counts(counts: Sequence[Mapping[str, int]], names: Mapping[str, Any]
                ) -> dict[str, int]:
    return {name: sum(c.get(name, 0) for c in counts) for name in names}


def _everywhere(payload: dict[str, Any], shards: int) -> Split:
    """The same staged payload for every shard (no record numbers to name)."""
    return Split([payload] * shards, [[] for _ in range(shards)])


def _now() -> str:
    """The audit entry's time, as one store stamps it (whole seconds, UTC)."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    return now.isoformat().replace("+00:00", "Z")


class ShardTraitsScheduler(TraitsScheduler):
    """`serve --shards N --traits-every S`: every S seconds a refresh through the front."""

    def __init__(self, shards: Any, config: Any = None, every: float = 3600.0) -> None:
        super().__init__(None, config, every)  # type: ignore[arg-type]
        self.shards = shards

    def refresh(self, as_of_us: int) -> RefreshReport:
        return refresh_traits(self.shards, self.config, as_of_us)
