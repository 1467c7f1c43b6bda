"""An immutable view of the index that readers evaluate against."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.errors import NotFound
from bitseg.index.event_index import EventIndex
from bitseg.index.fields import EMPTY, RangeIndex, ValueIndex
from bitseg.index.order_index import OrderIndex
from bitseg.index.rules import Rule
from bitseg.index.sample import Buckets
from bitseg.index.schema import Schema
from bitseg.index.sqlrule import ExternalIds, NoSources
from bitseg.index.top import TopSets

FieldIndex = ValueIndex | RangeIndex


class SegmentLookup(Protocol):
    def resolve(self, name: str) -> BitMap | Rule:
        """A stored membership (static, materialized) or a rule (dynamic); NotFound if none."""
        ...


class NoSegments:
    def resolve(self, name: str) -> BitMap | Rule:
        raise NotFound("segment", name)


def empty_index(type_: str) -> FieldIndex:
    return RangeIndex() if type_ in T.RANGE_TYPES else ValueIndex()


@dataclass(frozen=True, slots=True)
class Snapshot:
    version: int = 0
    live: BitMap = EMPTY
    schema: Schema = field(default_factory=Schema)
    fields: Mapping[str, FieldIndex] = field(default_factory=dict)
    segments: SegmentLookup = field(default_factory=NoSegments)
    events: EventIndex = field(default_factory=EventIndex)
    orders: OrderIndex = field(default_factory=OrderIndex)
    reader: Any = None  # a store.SnapshotReader pinned to this version (lookups by id)
    samples: Buckets = field(default_factory=Buckets)  # the engine's, shared by versions
    tops: TopSets = field(default_factory=TopSets)  # the engine's; holds the current one's
    external: ExternalIds = field(default_factory=NoSources)  # sql rules' ids (the server's)

    def field(self, name: str) -> FieldIndex:
        """The index of a profile field (an empty one if it has no values yet)."""
        index = self.fields.get(name)
        return index if index is not None else empty_index(self.schema.profiles[name])
