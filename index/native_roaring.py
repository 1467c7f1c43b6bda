"""Bitmap operations that let go of the interpreter lock, for two threads at once.

pyroaring holds the interpreter lock through every operation, so two threads summing
bitmaps take as long as one. Its extension module also carries CRoaring's C API: called
through ctypes (which releases the lock around a foreign call) on the bitmaps' own
`raw_pointer`, the same operations run on both cores. Summing the two halves of a 10M
window's seven count blocks took 3.1 ms that way against 5.2 ms in one thread.

Only CRoaring's public functions are used: the binary operations that return a new
bitmap, its cardinality, `overwrite` (a copy into a pyroaring bitmap) and `free`. A
build of pyroaring that does not export them, or whose answers differ from pyroaring's
on a check at import, leaves AVAILABLE False and callers use pyroaring alone.
BITSEG_NATIVE_ROARING=0 in the environment turns the native path off.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import pyroaring
from pyroaring import BitMap

_P = ctypes.c_void_p
# name -> (result type, argument types): CRoaring's roaring.h
_FUNCTIONS = {
    "roaring_bitmap_and": (_P, [_P, _P]),
    "roaring_bitmap_or": (_P, [_P, _P]),
    "roaring_bitmap_xor": (_P, [_P, _P]),
    "roaring_bitmap_andnot": (_P, [_P, _P]),
    "roaring_bitmap_get_cardinality": (ctypes.c_uint64, [_P]),
    "roaring_bitmap_overwrite": (ctypes.c_bool, [_P, _P]),
    "roaring_bitmap_or_inplace": (None, [_P, _P]),
    "roaring_bitmap_free": (None, [_P]),
}


def _library() -> Any:
    """pyroaring's extension with CRoaring's functions typed, or None without them."""
    if os.environ.get("BITSEG_NATIVE_ROARING", "1") == "0":
        return None
    if not hasattr(BitMap(), "raw_pointer"):
        return None
    try:
        lib = ctypes.CDLL(pyroaring.__file__)
        for name, (result, arguments) in _FUNCTIONS.items():
            function = getattr(lib, name)
            function.restype, function.argtypes = result, arguments
    except (OSError, AttributeError):
        return None
    return lib


_lib = _library()


class Native:
    """A CRoaring bitmap for the operators &, |, ^ and - (with Natives or BitMaps), each
    run without the interpreter lock. One made by an operator owns its memory and frees
    it when dropped; one borrowed from a BitMap (borrow) keeps that BitMap alive and
    never changes it."""

    __slots__ = ("pointer", "owner")

    def __init__(self, pointer: int | None, owner: BitMap | None = None) -> None:
        if not pointer:
            raise MemoryError("CRoaring could not allocate a bitmap")
        self.pointer = pointer
        self.owner = owner

    def __del__(self) -> None:
        if self.owner is None and getattr(self, "pointer", None):
            _lib.roaring_bitmap_free(self.pointer)

    def __len__(self) -> int:
        return _lib.roaring_bitmap_get_cardinality(self.pointer)

    def __bool__(self) -> bool:
        return len(self) > 0

    def __and__(self, other: Native | BitMap) -> Native:
        return Native(_lib.roaring_bitmap_and(self.pointer, _pointer(other)))

    def __or__(self, other: Native | BitMap) -> Native:
        return Native(_lib.roaring_bitmap_or(self.pointer, _pointer(other)))

    def __xor__(self, other: Native | BitMap) -> Native:
        return Native(_lib.roaring_bitmap_xor(self.pointer, _pointer(other)))

    def __sub__(self, other: Native | BitMap) -> Native:
        return Native(_lib.roaring_bitmap_andnot(self.pointer, _pointer(other)))

    def bitmap(self) -> BitMap:
        """As a pyroaring BitMap: the one borrowed, or a copy of this one."""
        return self.owner if self.owner is not None else _copy(self.pointer)


def borrow(bitmap: BitMap) -> Native:
    """The BitMap as a Native operand, not copied (never mutate it while in use)."""
    return Native(bitmap.raw_pointer, owner=bitmap)


def joined(low: Native, high: Native) -> BitMap:
    """low | high as a new BitMap, made without the interpreter lock: a copy of low with
    high's containers merged in (appended, where high's ids are all above low's). Either
    alone, when the other is empty."""
    if not high:
        return low.bitmap()
    if not low:
        return high.bitmap()
    out = _copy(low.pointer)
    _lib.roaring_bitmap_or_inplace(out.raw_pointer, high.pointer)
    return out


def _copy(pointer: int) -> BitMap:
    """A new pyroaring BitMap holding a copy of the CRoaring bitmap at `pointer`."""
    out = BitMap()
    if not _lib.roaring_bitmap_overwrite(out.raw_pointer, pointer):
        raise MemoryError("CRoaring could not copy a bitmap")
    return out


def _pointer(bitmap: Native | BitMap) -> int:
    return bitmap.pointer if isinstance(bitmap, Native) else bitmap.raw_pointer


def _agrees() -> bool:
    """Whether each native operation gives pyroaring's answer on two small bitmaps that
    mix array, bitset and run containers."""
    a = BitMap(range(0, 100_000, 3)) | BitMap(range(200_000, 210_000))
    b = BitMap(range(0, 150_000, 7)) | BitMap([5, 1 << 31])
    x, y = borrow(a), borrow(b)
    return ((x & y).bitmap() == a & b and (x | y).bitmap() == a | b
            and (x ^ y).bitmap() == a ^ b and (x - y).bitmap() == a - b
            and len(x) == len(a) and x.bitmap() is a and joined(x, y) == a | b)


AVAILABLE = _lib is not None and _agrees()
