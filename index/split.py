"""Control groups as a workflow: split a segment (or a rule) into disjoint static
segments by sample buckets (CONTRACT §2.4d).

`a:45,b:45,control:10` under salt S gives NAME-a = source AND sample(S, 0-45),
NAME-b = source AND sample(S, 45-90), NAME-control = source AND sample(S, 90-100):
cumulative ranges in the order given, summing to 100 or less.  Every piece is created in
one transaction (Segments.create_statics), so all exist afterwards or none does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from bitseg.index.errors import BitsegError, RuleError
from bitseg.index.sample import BUCKETS, parse_sample

if TYPE_CHECKING:
    from bitseg.index.segments import Change, SegmentInfo, Segments


@dataclass(frozen=True)
class Piece:
    """One new segment of a split: its name, and its rule (the source AND a sample)."""

    name: str
    label: str
    rule: dict[str, Any]


def parse_into(text: str) -> list[tuple[str, float | int]]:
    """"a:45,b:45,control:10" -> [("a", 45), ("b", 45), ("control", 10)]."""
    parts = []
    for item in text.split(","):
        label, colon, number = item.strip().partition(":")
        if not colon or not label:
            raise BitsegError(f"into: expected LABEL:PERCENT, got {item.strip()!r}")
        try:
            value: float | int = int(number) if number.strip().isdigit() else float(number)
        except ValueError:
            raise BitsegError(f"into: {label}: expected a percentage, got {number!r}") from None
        parts.append((label, value))
    return parts


def plan_split(base: str, source: dict[str, Any], salt: str,
               parts: Sequence[tuple[str, Any]]) -> list[Piece]:
    """The pieces of a split: names base-label, cumulative bucket ranges in order."""
    if not parts:
        raise BitsegError("into: expected at least one LABEL:PERCENT")
    pieces, lo = [], 0
    for i, (label, percent) in enumerate(parts):
        here = f"into[{i}]"
        if not isinstance(label, str) or not label:
            raise BitsegError(f"{here}: expected a label (a non-empty string)")
        if any(label == p.label for p in pieces):
            raise BitsegError(f"{here}: label {label!r} is given twice")
        try:
            width = parse_sample({"sample": {"salt": salt, "percent": percent}}, "$").hi
        except RuleError as exc:
            raise BitsegError(f"{here} ({label}): {exc.reason}") from None
        if lo + width > BUCKETS:
            raise BitsegError(f"into: the percentages add up to more than 100 "
                              f"(at {label!r}: {(lo + width) / 100:g})")
        sample = {"salt": salt, "from": _percent(lo), "to": _percent(lo + width)}
        pieces.append(Piece(f"{base}-{label}", label, {"and": [source, {"sample": sample}]}))
        lo += width
    return pieces


def _percent(buckets: int) -> float | int:
    return buckets // 100 if buckets % 100 == 0 else buckets / 100


def split_segment(segments: Segments, name: str, salt: str, parts: Sequence[tuple[str, Any]],
                  *, rule: Any = None, prefix: str | None = None, as_of: Any = None
                  ) -> list[tuple[SegmentInfo, Change]]:
    """Split segment `name` (or `rule`, then `name` only names the pieces) into static
    segments `prefix or name` + "-" + label; all are created, or none."""
    if not isinstance(salt, str):
        raise BitsegError("salt: expected a string")
    if rule is None:
        segments.current.get(name)  # NotFound for an unknown segment
        source: Any = {"segment": name}
    else:
        source = rule
        if isinstance(rule, (str, bytes)):  # checked first: a malformed one is a RuleError
            segments.engine.parse(rule)
            source = orjson.loads(rule)
    return segments.create_statics([(p.name, p.rule) for p in
                                    plan_split(prefix or name, source, salt, parts)], as_of)
