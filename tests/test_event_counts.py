"""count_indexes (index/event_counts.py): many buckets' count indexes built at once must
be, bitmap for bitmap and byte for byte, one count_index per bucket."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

from bitseg.index.event_counts import count_index, count_indexes, encode_counts

# a group: distinct profiles with counts; counts reach past a few bits, some powers of two
group = st.dictionaries(st.integers(0, 2**32 - 1),
                        st.one_of(st.integers(1, 9), st.sampled_from([1, 2, 4, 255, 256]),
                                  st.integers(1, 2**40)),
                        min_size=1, max_size=30)


def _runs(groups: list[dict[int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = [np.array(sorted(g), dtype=np.uint32) for g in groups]
    counts = [np.array([g[p] for p in sorted(g)], dtype=np.int64) for g in groups]
    bounds = np.cumsum([0] + [len(g) for g in groups]).astype(np.int64)
    return bounds, np.concatenate(ids), np.concatenate(counts)


@settings(max_examples=100, deadline=None)
@given(st.lists(group, min_size=1, max_size=12))
def test_many_buckets_at_once_are_one_count_index_each(groups: list[dict[int, int]]) -> None:
    bounds, ids, counts = _runs(groups)
    built = list(count_indexes(bounds, ids, counts))
    assert len(built) == len(groups)
    for k, index in enumerate(built):
        a, b = int(bounds[k]), int(bounds[k + 1])
        alone = count_index(ids[a:b], counts[a:b])
        assert index.exists == alone.exists
        assert list(index.slices) == list(alone.slices)
        assert encode_counts(index) == encode_counts(alone)
        for p, c in groups[k].items():  # and it is the counts, read back bit by bit
            assert sum(1 << i for i, s in enumerate(index.slices) if p in s) == c
    backwards = list(range(len(groups)))[::-1]  # asked for in another order
    assert [encode_counts(x) for x in count_indexes(bounds, ids, counts, backwards)] == \
        [encode_counts(built[k]) for k in backwards]


def test_no_buckets_and_a_bucket_of_ones() -> None:
    assert list(count_indexes(np.array([0], dtype=np.int64), np.empty(0, np.uint32),
                              np.empty(0, np.int64))) == []
    (index,) = count_indexes(np.array([0, 3]), np.array([1, 5, 9], dtype=np.uint32),
                             np.ones(3, dtype=np.int64))
    assert list(index.exists) == [1, 5, 9] and [list(s) for s in index.slices] == [[1, 5, 9]]


def test_large_buckets_are_byte_for_byte_one_count_index_each() -> None:
    """Buckets with bitmap containers (dense chunks), run-like stretches, no even count
    (slice 0 a copy of exists) and few or many: stored exactly as count_index builds."""
    rng = np.random.default_rng(5)
    groups = []
    for dense, evens in [(1.0, 0.0), (0.9, 0.001), (0.5, 0.3), (0.07, 0.9), (0.02, 0.5)]:
        ids = np.flatnonzero(rng.random(200_000) < dense).astype(np.uint32)
        counts = np.where(rng.random(len(ids)) < evens, 2, 1) * rng.integers(1, 4, len(ids))
        groups.append((ids, counts.astype(np.int64)))
    bounds = np.cumsum([0] + [len(g[0]) for g in groups])
    ids = np.concatenate([g[0] for g in groups])
    counts = np.concatenate([g[1] for g in groups])
    for index, (gids, gcounts) in zip(count_indexes(bounds, ids, counts), groups, strict=True):
        assert encode_counts(index) == encode_counts(count_index(gids, gcounts))


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, 5000), st.one_of(st.integers(1, 6), st.integers(1, 70)),
                       max_size=60),
       st.sampled_from(["gte", "gt", "lt", "lte", "eq", "ne", "between", "in", "not_in"]),
       st.integers(-12, 40), st.integers(-12, 320))
def test_count_comparisons_match_the_counts(counts, op, a4, b4) -> None:
    """at_least, and the window comparisons made with it, against each profile's count
    (whole and fractional constants; a count index holds only counts of 1 or more)."""
    from fractions import Fraction

    from bitseg.index.event_counts import at_least
    from bitseg.index.events import _compare_index
    from bitseg.index.rules import Having

    ids = np.array(sorted(counts), dtype=np.uint32)
    index = count_index(ids, np.array([counts[i] for i in sorted(counts)], dtype=np.int64))
    for n in range(-1, 72):
        assert set(at_least(index, n)) == {p for p, c in counts.items() if c >= n}
    a, b = Fraction(a4, 4), Fraction(b4, 4)  # quarters: whole and fractional constants
    value: object = a
    if op == "between":
        value = (min(a, b), max(a, b))
    elif op in ("in", "not_in"):
        value = (a, b, Fraction(int(a)))
    passes = {"gte": lambda c: c >= value, "gt": lambda c: c > value,
              "lt": lambda c: c < value, "lte": lambda c: c <= value,
              "eq": lambda c: c == value, "ne": lambda c: c != value,
              "between": lambda c: value[0] <= c <= value[1],
              "in": lambda c: c in value, "not_in": lambda c: c not in value}[op]
    having = Having("count", None, None, op, value)
    assert set(_compare_index(index, having)) == {p for p, c in counts.items() if passes(c)}


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(counts=st.dictionaries(st.integers(0, 200_000), st.integers(1, 40), max_size=300),
       asks=st.lists(st.sets(st.integers(0, 200_000), max_size=200), min_size=1,
                     max_size=4),
       table=st.booleans())
def test_counts_at_reads_each_profiles_count(monkeypatch, counts, asks, table) -> None:
    """counts_at against the counts themselves, by binary search and by the process's
    position table (forced here; it serves 4,096 ids or more), several calls in a row so
    the table holds an earlier call's positions when it is read (0 for a profile without
    a count)."""
    from bitseg.index import event_counts

    monkeypatch.setattr(event_counts, "POSITIONS_FROM", 0 if table else 1 << 30)
    ids = np.array(sorted(counts), dtype=np.uint32)
    index = count_index(ids, np.array([counts[i] for i in sorted(counts)], dtype=np.int64))
    for ask in asks:
        # half of the asked profiles have counts, as the partial days' mostly do
        wanted = np.array(sorted(set(ask) | set(sorted(counts)[::2])), dtype=np.uint32)
        got = event_counts.counts_at(index, wanted, BitMap(wanted))
        assert got.tolist() == [counts.get(int(i), 0) for i in wanted]


@settings(max_examples=150, deadline=None)
@given(counts=st.dictionaries(st.integers(0, 200_000),
                              st.one_of(st.integers(1, 40), st.sampled_from([255, 256, 70_000]),
                                        st.integers(1, 2**40)), max_size=300),
       ask=st.sets(st.integers(0, 250_000), max_size=200))
def test_a_count_table_holds_every_profiles_count(counts, ask) -> None:
    """count_table and counts_in against the counts themselves: a profile without a
    count reads 0, inside the table or past its end (an id above every counted one); the
    table is a byte an id while counts fit in 8 bits, and wider past that."""
    from bitseg.index.event_counts import count_table, counts_in

    ids = np.array(sorted(counts), dtype=np.uint32)
    index = count_index(ids, np.array([counts[i] for i in sorted(counts)], dtype=np.int64))
    table = count_table(index.slices)
    assert len(table) == (int(ids[-1]) + 1 if len(ids) else 0)
    bits = max(counts.values(), default=0).bit_length()
    assert table.itemsize == next(size for size in (1, 2, 4, 8) if 8 * size >= bits)
    wanted = np.array(sorted(ask | set(sorted(counts)[::2])), dtype=np.uint32)
    assert counts_in(table, wanted).tolist() == [counts.get(int(i), 0) for i in wanted]
    assert count_table(index.slices, table.nbytes - 1 if table.nbytes else 0) is None \
        or not table.nbytes
