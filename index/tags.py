"""Tags on segments: short labels to organise and filter segments by.

A tag is 1-64 characters of letters, digits and `_ - . :` (case kept, compared
exactly); a segment carries at most MAX_TAGS of them. A segment's tags are a set,
kept sorted, stored with its definition (segments.py). Adding a tag the segment has,
or removing one it lacks, changes nothing and is no error.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from bitseg.index.errors import BitsegError

TAG = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
MAX_TAGS = 32


def check_tag(tag: object, where: str = "tag") -> str:
    """A valid tag, or BitsegError saying where and what was expected."""
    if not isinstance(tag, str) or not TAG.fullmatch(tag):
        raise BitsegError(f"{where}: expected 1-64 characters of letters, digits, _ - . : ;"
                          f" got {tag!r}")
    return tag


def check_tags(tags: Iterable[object]) -> tuple[str, ...]:
    """Valid tags, deduplicated and sorted (at most MAX_TAGS of them)."""
    if isinstance(tags, (str, bytes)):  # one tag given where a list was meant
        raise BitsegError(f"tags: expected a list of tags, got {tags!r}")
    found = {check_tag(tag, f"tags[{i}]") for i, tag in enumerate(tags)}
    return _bounded(found)


def retagged(current: Iterable[str], add: Iterable[object] = (),
             remove: Iterable[object] = ()) -> tuple[str, ...]:
    """A segment's tags after adding some and removing others (removing one it lacks
    is ignored); the result may hold at most MAX_TAGS."""
    added, removed = check_tags(add), check_tags(remove)
    return _bounded((set(current) | set(added)) - set(removed))


def _bounded(tags: set[str]) -> tuple[str, ...]:
    if len(tags) > MAX_TAGS:
        raise BitsegError(f"tags: a segment carries at most {MAX_TAGS} tags; this would "
                          f"make {len(tags)}")
    return tuple(sorted(tags))
