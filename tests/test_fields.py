"""The bit-sliced range index against a brute-force comparison of plain integers."""

from __future__ import annotations

import operator
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

from bitseg.index import types as T
from bitseg.index.fields import RangeIndex, RangeWriter, ValueIndex, ValueWriter, group_ids, unique

OPS = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le,
       "eq": operator.eq}

keys = st.one_of(st.integers(-50, 50), st.integers(-50, 50).map(lambda k: k * 1000),
                 st.integers(-(2**40), 2**40))
batches = st.lists(
    st.lists(st.tuples(st.integers(0, 40), st.one_of(st.none(), keys)), max_size=15),
    min_size=1, max_size=5)


def apply(index: RangeIndex, batch: list, truth: dict[int, int]) -> RangeIndex:
    """One batch: each id in it is set (or cleared, for None) to its last value."""
    last = dict(batch)
    writer = RangeWriter(index, T.INT)
    gone = np.array([i for i in last if i in truth], dtype=np.uint32)
    if len(gone):
        writer.remove(gone)
    for i in gone.tolist():
        del truth[i]
    fresh = {i: k for i, k in last.items() if k is not None}
    if fresh:
        writer.add(np.array(list(fresh), dtype=np.uint32),
                   np.array(list(fresh.values()), dtype=np.int64))
    truth.update(fresh)
    return writer.finish()


@settings(max_examples=200, deadline=None)
@given(batches=batches, constants=st.lists(st.one_of(keys, st.fractions()), min_size=1,
                                           max_size=4))
def test_range_index_matches_brute_force(batches, constants):
    index, truth = RangeIndex(), {}
    for batch in batches:
        index = apply(index, batch, truth)
    assert set(index.exists) == set(truth)
    for pid, key in truth.items():
        assert index.key_of(pid) == key
    ids, decoded = index.decode()
    assert dict(zip(ids.tolist(), decoded.tolist(), strict=True)) == truth
    for c in constants:
        c = Fraction(c)
        for name, op in OPS.items():
            expected = {pid for pid, key in truth.items() if op(key, c)}
            assert set(index.compare(name, c)) == expected, (name, c)
        lo, hi = c - 10, c + 10
        assert set(index.between(lo, hi)) == {p for p, k in truth.items() if lo <= k <= hi}


def test_month_days_of_dates_and_timestamps():
    days = np.array([T.parse_date("2024-02-29"), T.parse_date("1969-12-31")], dtype=np.int64)
    from bitseg.index.fields import month_days

    assert month_days(T.DATE, days).tolist() == [229, 1231]
    stamps = np.array([T.parse_timestamp("1960-03-01T23:59:59Z")], dtype=np.int64)
    assert month_days(T.TIMESTAMP, stamps).tolist() == [301]


@pytest.mark.parametrize("dense", [True, False], ids=["in place", "new bitmaps"])
def test_value_writer_never_mutates_the_published_index(monkeypatch, dense):
    from bitseg.index import fields

    monkeypatch.setattr(fields, "in_place", lambda bitmap: dense)  # either way of taking
    writer = ValueWriter(ValueIndex())
    writer.add(np.array([1, 2, 3], dtype=np.uint32), np.array([0, 0, 1], dtype=np.uint32),
               ["a", "b"])
    first = writer.finish()
    second_writer = ValueWriter(first)
    second_writer.remove(np.array([1], dtype=np.uint32), np.array([0], dtype=np.uint32), ["a"])
    second_writer.remove(np.array([2], dtype=np.uint32), np.array([0], dtype=np.uint32), ["a"])
    second_writer.drop(BitMap([3]))
    second = second_writer.finish()
    assert set(first.eq("a")) == {1, 2} and set(first.eq("b")) == {3}
    assert set(first.exists) == {1, 2, 3}
    assert "a" not in second.values and "b" not in second.values and not second.exists


def test_group_ids_groups_by_code():
    groups = dict(group_ids(np.array([5, 6, 7, 8]), np.array([2, 1, 2, 0])))
    assert {k: v.tolist() for k, v in groups.items()} == {0: [8], 1: [6], 2: [5, 7]}


def test_float_precision_refines_across_batches_without_touching_slices():
    scale = Fraction(T.FLOAT_SCALE)
    writer = RangeWriter(RangeIndex(), T.FLOAT)
    writer.add_floats(np.array([1, 2], dtype=np.uint32), np.array([0.25, 1520.5]))
    coarse = writer.finish()
    assert coarse.digits == 2 and not coarse.rounded
    writer = RangeWriter(coarse, T.FLOAT)
    writer.add_floats(np.array([3], dtype=np.uint32), np.array([0.123456781]))
    fine = writer.finish()
    assert fine.digits == 9 and not fine.rounded
    assert set(fine.compare("eq", Fraction("0.123456781") * scale)) == {3}
    assert set(fine.compare("gt", Fraction("0.12345678") * scale)) == {1, 2, 3}
    assert set(fine.compare("lt", Fraction("0.25") * scale)) == {3}
    writer = RangeWriter(fine, T.FLOAT)  # 1.2e10 with 9 decimals exceeds 62 bits
    writer.add_floats(np.array([4], dtype=np.uint32), np.array([12345678901.123455]))
    huge = writer.finish()
    assert huge.rounded and huge.digits == 8
    assert set(huge.compare("eq", T.exact(12345678901.123455) * scale)) == {4}  # x eq x
    assert set(huge.compare("eq", Fraction("0.123456781") * scale)) == {3}  # rounded alike
    assert set(huge.compare("lt", Fraction("0.25") * scale)) == {3}
    ids, keys = huge.decode()
    assert dict(zip(ids.tolist(), keys.tolist(), strict=True)) == {
        1: 25_000_000, 2: 152_050_000_000, 3: 12_345_678, 4: 1_234_567_890_112_345_500}


@settings(max_examples=150, deadline=None)
@example([0.0009325811886973749])  # 17 places: a product of .5 where the decimal is .49
@given(st.lists(st.one_of(st.floats(-1e12, 1e12), st.floats(-1e-3, 1e-3),
                          st.sampled_from([2.49e-293, 1.2345678901234567e-05, 0.0, 5e-324])),
                min_size=1, max_size=12))
def test_every_loaded_float_equals_itself_and_keeps_its_order(values):
    """Whatever decimals a value needs (past 17 places the field is marked rounded and
    constants round alike): a loaded value equals itself, and no comparison inverts two
    values' order."""
    scale = Fraction(T.FLOAT_SCALE)
    writer = RangeWriter(RangeIndex(), T.FLOAT)
    ids = np.arange(len(values), dtype=np.uint32)
    writer.add_floats(ids, np.array(values, dtype=np.float64))
    index = writer.finish()
    if any(T.float_digits(np.array([v])) == T.MORE_DIGITS for v in values):
        assert index.rounded
    for i, v in enumerate(values):
        constant = T.exact(v) * scale
        assert i in set(index.compare("eq", constant))
        assert set(index.compare("lt", constant)) <= {j for j, w in enumerate(values) if w < v}
        assert set(index.compare("gt", constant)) <= {j for j, w in enumerate(values) if w > v}


def test_a_float_past_17_decimals_rounds_the_field_instead_of_missing_itself():
    scale = Fraction(T.FLOAT_SCALE)
    writer = RangeWriter(RangeIndex(), T.FLOAT)
    writer.add_floats(np.array([1, 2, 3], dtype=np.uint32), np.array([1.5, 2.49e-293, 0.0]))
    index = writer.finish()
    assert index.rounded and index.digits == 17
    assert set(index.compare("eq", T.exact(2.49e-293) * scale)) == {2, 3}  # 0 at 17 places
    assert set(index.compare("eq", Fraction(3, 2) * scale)) == {1}
    assert set(index.compare("gt", Fraction(1, 10**17) * scale)) == {1}


def test_round_half_even():
    from bitseg.index.fields import round_half_even

    assert round_half_even(np.array([15, 25, -15, -25, 14, 16, -16]), 10).tolist() == [
        2, 2, -2, -2, 1, 2, -2]


@given(st.lists(st.integers(-2**63, 2**63 - 1), max_size=200), st.sampled_from(["int64", "uint32"]))
def test_unique_is_numpys_sorted_distinct_values(values, dtype):
    if dtype == "uint32":
        values = [v % 2**32 for v in values]
    array = np.array(values, dtype=dtype)
    found = unique(array)
    assert found.dtype == array.dtype
    assert found.tolist() == sorted(set(values))
