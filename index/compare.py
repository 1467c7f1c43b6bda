"""Exact comparisons of per-row and per-profile values with a rule's constant, and the
per-profile grouping they are made over. Events, orders and items all answer `where`
and `having` through these.

Values are int64 keys (or object arrays of Python ints where a sum could overflow);
the constant is an int or a Fraction, compared without rounding: `x > 2.5` is
`x > floor(2.5)` on integers, and `avg op c` is `sum * den op count * num`.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np
from pyroaring import BitMap

from bitseg.index.fields import bitmap_of

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
DENSE_RATIO = 8  # group by sorting when rows * DENSE_RATIO < the largest profile id


def _clamp(t: int) -> int:
    return min(max(t, I64_MIN), I64_MAX)


def summable(values: np.ndarray, bound: int, most: int) -> np.ndarray:
    """values to sum per group, as they are, or as Python ints when `most` of them, each
    at most `bound` in magnitude, could sum past int64 (numpy's int64 sums wrap)."""
    if values.dtype != object and bound * max(most, 1) >= 2**63:
        return values.astype(object)
    return values


def compare(arr: np.ndarray, op: str, c: Any) -> np.ndarray:
    """arr (int64, or object for big integers) OP c exactly, c an int or Fraction
    (a (lo, hi) pair for between, a tuple for in / not_in)."""
    if op in ("in", "not_in"):  # having: any of the listed values
        hit = np.zeros(arr.shape, dtype=bool)
        for v in c:
            hit |= compare(arr, "eq", v)
        return hit if op == "in" else ~hit
    if op == "between":
        return compare(arr, "gte", c[0]) & compare(arr, "lte", c[1])
    c = Fraction(c)
    clamp = (lambda t: t) if arr.dtype == object else _clamp  # int64 cannot hold more
    if op == "gt":
        hit = arr > clamp(math.floor(c))
    elif op == "lte":
        hit = arr <= clamp(math.floor(c))
    elif op == "gte":
        hit = arr >= clamp(math.ceil(c))
    elif op == "lt":
        hit = arr < clamp(math.ceil(c))
    elif op in ("eq", "ne"):
        if c.denominator == 1 and (arr.dtype == object or I64_MIN <= c <= I64_MAX):
            hit = arr == c.numerator
        else:
            hit = np.zeros(len(arr), dtype=bool)
        if op == "ne":
            hit = ~np.asarray(hit, dtype=bool)
    else:
        raise ValueError(op)
    return np.asarray(hit, dtype=bool)


def compare_avg(sums: np.ndarray, n: np.ndarray, op: str, c: Any) -> np.ndarray:
    """sums / n OP c exactly, for n > 0 (other entries are don't-care)."""
    if op in ("in", "not_in"):  # having: any of the listed values
        hit = np.zeros(sums.shape, dtype=bool)
        for v in c:
            hit |= compare_avg(sums, n, "eq", v)
        return hit if op == "in" else ~hit
    if op == "between":
        return compare_avg(sums, n, "gte", c[0]) & compare_avg(sums, n, "lte", c[1])
    c = Fraction(c)
    num, den = c.numerator, c.denominator
    big = int(np.abs(sums).max(initial=0)) * den >= 2**62 or \
        abs(num) * int(n.max(initial=0)) >= 2**62
    if big:  # the products could overflow int64: exact Python ints
        lhs = sums.astype(object) * den
        rhs = n.astype(object) * num
    else:
        lhs, rhs = sums * den, n.astype(np.int64) * num
    result = {"eq": lhs == rhs, "ne": lhs != rhs, "gt": lhs > rhs, "gte": lhs >= rhs,
              "lt": lhs < rhs, "lte": lhs <= rhs}[op]
    return np.asarray(result, dtype=bool)


class Groups:
    """Rows grouped by profile.  Few rows: sorted, one entry per profile that has rows
    (O(rows log rows)).  Many: one entry per profile id up to the largest (np.bincount /
    ufunc.at, O(rows + profiles))."""

    def __init__(self, owners: np.ndarray) -> None:
        rows = len(owners)
        top = int(owners.max()) + 1
        self.sparse = rows * DENSE_RATIO < top
        if self.sparse:
            packed = (owners.astype(np.uint64) << np.uint64(32)) | np.arange(rows,
                                                                           dtype=np.uint64)
            packed.sort()
            self.order = (packed & np.uint64(0xFFFFFFFF)).astype(np.intp)
            grouped = (packed >> np.uint64(32)).astype(np.uint32)
            self.starts = np.flatnonzero(np.concatenate(([True], grouped[1:] != grouped[:-1])))
            self.ids = grouped[self.starts]
            self._counts: np.ndarray | None = np.diff(np.append(self.starts, rows))
            self.size = len(self.ids)
        else:
            self.owners = owners
            self._counts = None  # a pass over every row: made when first asked for
            self.size = top

    @property
    def counts(self) -> np.ndarray:
        if self._counts is None:
            self._counts = np.bincount(self.owners, minlength=self.size)
        return self._counts

    @property
    def has(self) -> np.ndarray:
        return self.counts > 0

    def profiles(self, mask: np.ndarray) -> BitMap:
        return bitmap_of(self.ids[mask] if self.sparse else np.flatnonzero(mask))

    def reduce(self, ufunc: np.ufunc, values: np.ndarray, initial: Any) -> np.ndarray:
        """ufunc over each group's values (aligned with the rows); initial for none."""
        if self.sparse:
            return ufunc.reduceat(values[self.order], self.starts)
        out = np.zeros(self.size, dtype=values.dtype) if initial == 0 else \
            np.full(self.size, initial, dtype=values.dtype)  # zeros: calloc, pages on demand
        ufunc.at(out, self.owners, values)
        return out
