"""Many profiles in one call: IsMember and SegmentsOf for up to MAX_BATCH profile ids.

Ids are resolved against one snapshot; an id that is no live profile is reported as
unknown (member false, no segments), never as a failed call. A small batch asks each
profile alone (Evaluator.contains, which avoids whole bitmaps); from BITMAP_FROM known
ids on, the rule (or each segment) is evaluated once to a bitmap — through the engine's
result cache, so repeated batches against one rule evaluate it once per write — and each
dense id is tested in it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyroaring import BitMap

from bitseg.index.engine import Engine, as_of_micros
from bitseg.index.errors import BitsegError
from bitseg.index.evaluate import Evaluator
from bitseg.index.rules import SegmentRef
from bitseg.index.segments import SegmentSet, SegmentUnusable
from bitseg.index.snapshot import Snapshot

MAX_BATCH = 10_000
# Known ids from which one bitmap beats asking each profile. An estimate from the figures
# in benchmarks/RESULTS.md, not a measurement of its own: one IsMember costs ~15 µs, one
# bitmap of a 5-leaf rule ~1 ms at 1M profiles (a cached one nothing), so they cross near 64.
BITMAP_FROM = 64


@dataclass(frozen=True, slots=True)
class Memberships:
    member: list[bool]  # one per requested id, in order
    unknown: list[str]  # requested ids that are no live profile, in order


@dataclass(frozen=True, slots=True)
class SegmentsOfMany:
    segments: list[list[str]]  # one list of segment names per requested id, in order
    unknown: list[str]


def check_size(profile_ids: Sequence[str]) -> None:
    if len(profile_ids) > MAX_BATCH:
        raise BitsegError(f"profile_ids: at most {MAX_BATCH:,} ids per call, "
                          f"got {len(profile_ids):,}")


def dense_ids(engine: Engine, snap: Snapshot, profile_ids: Sequence[str]) -> list[int | None]:
    """The dense id of each live profile, None for the other ids."""
    lookup, reader, live = engine.ids.lookup, snap.reader, snap.live
    out: list[int | None] = []
    for external in profile_ids:
        dense = lookup(external, reader=reader) if external else None
        out.append(dense if dense is not None and dense in live else None)
    return out


def is_member_many(engine: Engine, profile_ids: Sequence[str], rule: Any,
                   as_of: Any = None) -> Memberships:
    """Whether each profile satisfies the rule (false for unknown ids, which are listed)."""
    check_size(profile_ids)
    snap = engine.snapshot
    typed = engine.parse(rule, snap)
    dense = dense_ids(engine, snap, profile_ids)
    known = sum(d is not None for d in dense)
    if known >= BITMAP_FROM:
        members = engine.bitmap(typed, as_of=as_of)
        answer = [d is not None and d in members for d in dense]
    else:
        evaluator = Evaluator(snap, as_of_micros(as_of))
        answer = [d is not None and evaluator.contains(typed, d) for d in dense]
    return Memberships(answer, _unknown(profile_ids, dense))


def segments_of_many(engine: Engine, profile_ids: Sequence[str],
                     as_of: Any = None) -> SegmentsOfMany:
    """The segments each profile is in (segments that cannot be evaluated are left out,
    as in SegmentsOf)."""
    check_size(profile_ids)
    snap = engine.snapshot
    dense = dense_ids(engine, snap, profile_ids)
    wanted = [d for d in dense if d is not None]
    evaluator = Evaluator(snap, as_of_micros(as_of))
    found: dict[int, list[str]] = {d: [] for d in wanted}
    segments = snap.segments if isinstance(snap.segments, SegmentSet) else SegmentSet()
    for segment in segments:
        ref = SegmentRef(segment.name, "$")
        try:
            if len(found) >= BITMAP_FROM:
                members: BitMap = evaluator.bitmap(ref)
                inside = [d for d in found if d in members]
            else:
                inside = [d for d in found if evaluator.contains(ref, d)]
        except (SegmentUnusable, RecursionError):
            continue
        for d in inside:
            found[d].append(segment.name)
    return SegmentsOfMany([list(found[d]) if d is not None else [] for d in dense],
                          _unknown(profile_ids, dense))


def _unknown(profile_ids: Sequence[str], dense: list[int | None]) -> list[str]:
    return [p for p, d in zip(profile_ids, dense, strict=True) if d is None]
