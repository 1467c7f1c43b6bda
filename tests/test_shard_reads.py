"""Reads over shards that are more than a sum (server/shard_reads.py): the merges alone,
then Describe, Values and size history of 3 shards against 1 on the same random data.
The property test of every rule form, top included, is in test_shards.py."""

from __future__ import annotations

from fractions import Fraction

from bitseg.index.rules import parse_rule
from bitseg.index.schema import Schema
from bitseg.server.shard_reads import merge_top, tops_of

SCHEMA = Schema.from_json({"profiles": {"n": "int", "x": "float"}})


# ---------------------------------------------------------------------- top
def test_merge_top_ranks_by_value_then_id_in_utf8_order() -> None:
    found = [[(5, "u9", 3), (4, "a", 1)],  # shard 0
             [(5, "u10", 0), (Fraction(9, 2), "b", 2)],  # shard 1
             [(5, "é", 7), (5, "z", 8)]]  # shard 2
    # 5 x 4 tied: u10 < u9 < z < é (code points, as UTF-8 bytes); then 4.5
    assert merge_top(found, 3, "desc") == [[3], [0], [8]]
    assert merge_top(found, 5, "desc") == [[3], [0, 2], [7, 8]]
    assert merge_top(found, 2, "asc") == [[1], [2], []]
    assert merge_top(found, 100, "asc") == [[1, 3], [0, 2], [7, 8]]
    assert merge_top([[], []], 3, "desc") == [[], []]


def test_tops_of_lists_each_top_after_the_tops_inside_it() -> None:
    inner = {"top": {"n": 3, "by": "x"}}
    outer = {"top": {"n": 2, "by": "n", "of": {"or": [inner, {"field": "n", "op": "gt",
                                                               "value": 1}]}}}
    rule = parse_rule({"and": [outer, {"not": inner}, {"top": {"n": 2, "by": "n"}}]}, SCHEMA)
    found = tops_of(rule)
    assert [(t.n, t.by) for t in found] == [(3, "x"), (2, "n"), (2, "n")]
    assert found[1].of != found[2].of  # the same n and by, another `of`: another top
    assert tops_of(parse_rule({"field": "n", "op": "gt", "value": 1}, SCHEMA)) == []
