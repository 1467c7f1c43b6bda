"""index/native_roaring.py: CRoaring's operations called without the interpreter lock,
against pyroaring and plain sets; and a window's sum over two id ranges on two threads
(event_counts.split_signed_slices) against the per-profile sums themselves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroaring import BitMap

from bitseg.index import event_counts, native_roaring
from bitseg.index.event_counts import count_index, signed_slices, split_signed_slices

# ids in three 65,536-id containers, dense enough in places for bitset and run containers
ids = st.integers(0, 3 * 65_536 - 1)
runs = st.tuples(ids, st.integers(0, 9_000)).map(lambda t: set(range(t[0], t[0] + t[1])))
id_sets = st.one_of(st.sets(ids, max_size=300), runs,
                    st.tuples(st.sets(ids, max_size=300), runs).map(lambda t: t[0] | t[1]))


def test_this_build_has_the_native_path():
    """pyroaring's wheel exports CRoaring's functions; if a release stops doing so, this
    fails instead of the server quietly summing on one core."""
    assert native_roaring.AVAILABLE


def test_the_environment_turns_it_off():
    code = "from bitseg.index import native_roaring as n; print(n.AVAILABLE)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "BITSEG_NATIVE_ROARING": "0"}, check=True)
    assert out.stdout.strip() == "False"


@settings(max_examples=200, deadline=None)
@given(a=id_sets, b=id_sets)
def test_each_operation_is_the_set_operation(a: set[int], b: set[int]) -> None:
    x, y = BitMap(a), BitMap(b)
    nx, ny = native_roaring.borrow(x), native_roaring.borrow(y)
    assert set((nx & ny).bitmap()) == a & b
    assert set((nx | ny).bitmap()) == a | b
    assert set((nx ^ ny).bitmap()) == a ^ b
    assert set((nx - ny).bitmap()) == a - b
    assert set((nx & y).bitmap()) == a & b  # a BitMap as the right operand
    assert len(nx ^ ny) == len(a ^ b) and bool(nx - ny) == bool(a - b)
    assert set(native_roaring.joined(nx, ny)) == a | b
    assert x == BitMap(a) and y == BitMap(b)  # the borrowed bitmaps are left as they were


def test_a_borrowed_bitmap_is_itself_and_an_owned_one_a_copy():
    x = BitMap([1, 2, 3])
    assert native_roaring.borrow(x).bitmap() is x
    made = native_roaring.borrow(x) | native_roaring.borrow(BitMap([9]))
    first, second = made.bitmap(), made.bitmap()
    assert first == second == BitMap([1, 2, 3, 9]) and first is not second
    first.add(4)  # a copy: changing it changes nothing else
    assert made.bitmap() == BitMap([1, 2, 3, 9])


def test_operations_on_two_threads_at_once_give_each_its_answer():
    """Both threads really run at once (no lock held); each result is still its own."""
    rng = np.random.default_rng(5)
    pairs = [(BitMap(rng.choice(1 << 22, 50_000, replace=False).astype(np.uint32)),
              BitMap(rng.choice(1 << 22, 50_000, replace=False).astype(np.uint32)))
             for _ in range(4)]
    results: dict[int, list[BitMap]] = {}

    def work(k: int) -> None:
        results[k] = [(native_roaring.borrow(a) ^ native_roaring.borrow(b)).bitmap()
                      for a, b in pairs for _ in range(5)]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = [a ^ b for a, b in pairs for _ in range(5)]
    assert results[0] == expected and results[1] == expected


counts = st.dictionaries(st.integers(0, 2_000), st.integers(1, 40), min_size=1, max_size=60)


def _index(per_profile: dict[int, int]):
    ids = np.array(sorted(per_profile), dtype=np.uint32)
    return count_index(ids, np.array([per_profile[i] for i in sorted(per_profile)]))


def _halves(index, split: int):
    below = BitMap(range(split))
    return (tuple(b & below for b in index.slices), tuple(b - below for b in index.slices))


@settings(max_examples=150, deadline=None)
@given(plus=st.lists(counts, min_size=1, max_size=6), split=st.integers(0, 2_100),
       taken=st.data())
def test_a_sum_over_two_id_ranges_is_the_sum(plus, split, taken) -> None:
    """split_signed_slices of blocks split anywhere (also past every id, and at 0) is
    signed_slices of the blocks whole, slice for slice; the minus blocks count a part of
    the plus blocks' rows, as a window's subtracted blocks do."""
    total: dict[int, int] = {}
    for block in plus:
        for profile, n in block.items():
            total[profile] = total.get(profile, 0) + n
    minus = [taken.draw(st.dictionaries(st.sampled_from(sorted(total)), st.integers(0, 3),
                                        max_size=5))]
    minus = [{p: min(n, total[p]) for p, n in m.items() if min(n, total[p]) > 0} for m in minus]
    minus = [m for m in minus if m]
    plus_idx, minus_idx = [_index(b) for b in plus], [_index(m) for m in minus]
    got = split_signed_slices([_halves(b, split) for b in plus_idx],
                              [_halves(m, split) for m in minus_idx])
    assert got == signed_slices(plus_idx, minus_idx)
    left = dict(total)
    for m in minus:
        for profile, n in m.items():
            left[profile] -= n
    for profile, n in left.items():
        assert sum(1 << i for i, bits in enumerate(got) if profile in bits) == n
    assert not got or got[-1]  # no empty top slice


def test_the_helper_thread_is_one_and_named():
    block = _index({1: 3, 70_000: 1})
    split_signed_slices([_halves(block, 65_536)] * 2, [])
    helper = event_counts._helper()
    assert helper is event_counts._helper() and helper._max_workers == 1
    assert any(t.name.startswith("bitseg-sum") for t in threading.enumerate())


def test_a_forked_child_makes_its_own_helper_thread():
    """A child forked after the helper thread started would wait forever on its copy."""
    block = _index({1: 3, 70_000: 1})
    expected = signed_slices([block, block], [])
    assert split_signed_slices([_halves(block, 65_536)] * 2, []) == expected
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the sum comes back right, killed if it hangs
        signal.alarm(30)
        ok = split_signed_slices([_halves(block, 65_536)] * 2, []) == expected
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_without_a_helper_thread_both_halves_are_summed_here(monkeypatch):
    """At interpreter shutdown the pool takes no more work: the sum is still made."""
    class Closed:
        def submit(self, *args):
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")

    block = _index({1: 3, 70_000: 1})
    monkeypatch.setattr(event_counts, "_helper", Closed)
    assert split_signed_slices([_halves(block, 65_536)] * 2, []) == \
        signed_slices([block, block], [])
