"""index/event_parts.py: an events batch's block parts, held in a scratch file."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from bitseg.index.event_parts import PartStash

_keys = st.tuples(st.sampled_from(["open", "buy", "vüe"]), st.integers(-3, 3))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_keys, st.binary(max_size=300)), max_size=40))
def test_parts_come_back_by_day_in_the_order_they_were_added(
        tmp_path_factory, adds: list[tuple[tuple[str, int], bytes]]) -> None:
    folder = tmp_path_factory.mktemp("stash")
    stash = PartStash(folder)
    model: dict[tuple[str, int], list[bytes]] = {}
    for key, raw in adds:
        stash.add(key, raw)
        model.setdefault(key, []).append(raw)
    assert len(stash) == len(model)
    assert all(key in stash for key in model)
    assert list(stash.items()) == list(model.items())  # days in order of their first part
    stash.close()
    assert list(stash.items()) == [] and len(stash) == 0
    assert list(folder.iterdir()) == []  # the scratch file never had a name there


def test_an_empty_stash_makes_no_file(tmp_path: Path) -> None:
    stash = PartStash(tmp_path)
    assert list(stash.items()) == []
    assert stash.file is None
    stash.close()
