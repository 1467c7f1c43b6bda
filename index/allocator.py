"""How a serving process and a bulk load ask glibc's malloc to keep, or give back, what they free.

Each query makes numpy arrays and bytes of about a megabyte and frees them before the
next: a day's raw event rows read from LMDB, their profiles and stamps, a window's edge
counts. By default glibc gives the free top of its heap back to the system as soon as
128 KiB of it is free (that threshold only rises after a large mmapped chunk is freed),
so whether the next query's buffers land on pages already in the process or on new ones,
each faulted in, depends on what the process did before. Measured at 10M on a warm
30-day event count: 1.9 ms in one process and 2.8 ms in another that had summed other
blocks first, the difference all in page faults (LMDB reads 10x slower, numpy steps 1.5x).

keep_freed_memory fixes both thresholds, as MALLOC_TRIM_THRESHOLD_ and
MALLOC_MMAP_THRESHOLD_ in the environment would (and those, when set, win): up to
TRIM_BYTES freed stays in the process, and a block of MMAP_BYTES or more is mapped on
its own and returned whole when freed.

A load is different: its reader, grouping and encoding threads allocate in arenas of
their own, whose heaps glibc shrinks or unmaps as soon as they empty, unless M_TOP_PAD
says to keep that much beyond their top. The 1M load faulted
in ~4 million pages (16 GB of zeroed memory, 14 s of system time in a 30 s load).
pad_heaps keeps LOAD_PAD_BYTES beyond each heap's top (MALLOC_TOP_PAD_ wins): ~1.3
million faults, 25.5 s instead of 29, peak own memory 1.73 GiB instead of 1.45. A
server is not padded: its gRPC Counts at 10M ran 471 req/s padded against 561 without.

A load also bounds what its heap keeps (bound_load_memory, then trim_heap after each
file): glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed,
so a load's numpy temporaries of a few MiB landed in the heap and its freed holes stayed
the process's memory, 1 GiB of a 2.4 GiB peak loading a 1M-profile events file. A fixed
threshold of LOAD_MMAP_BYTES maps every larger block on its own and unmaps it when
freed. (The padding above is of the heaps' tops, not their holes.)

Elsewhere than glibc all of these do nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Any

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
TRIM_BYTES = 128 << 20
MMAP_BYTES = 32 << 20
LOAD_PAD_BYTES = 64 << 20
GLIBC_TOP_PAD = 128 << 10  # glibc's DEFAULT_TOP_PAD
LOAD_MMAP_BYTES = 1 << 20


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds for a long-running server, and its top pad
    back to glibc's own (a process that loaded first is not served padded); calling it
    again changes nothing. Whether they were set."""
    return _mallopt(("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, TRIM_BYTES),
                    ("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, MMAP_BYTES),
                    ("MALLOC_TOP_PAD_", M_TOP_PAD, GLIBC_TOP_PAD))


def pad_heaps() -> bool:
    """Keep LOAD_PAD_BYTES beyond each heap's top, for a bulk load (load_dataset sets it,
    beside bound_load_memory); whether it was set."""
    return _mallopt(("MALLOC_TOP_PAD_", M_TOP_PAD, LOAD_PAD_BYTES))


def bound_load_memory() -> bool:
    """Fix the mmap and trim thresholds at LOAD_MMAP_BYTES for a load (load_dataset sets
    it: a load in any process); whether they were set."""
    return _mallopt(("MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, LOAD_MMAP_BYTES),
                    ("MALLOC_TRIM_THRESHOLD_", M_TRIM_THRESHOLD, LOAD_MMAP_BYTES))


def trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc only): after each file a
    load reads."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _mallopt(*settings: tuple[str, int, int]) -> bool:
    """mallopt(param, value) for each (environment name, param, value) the environment
    does not set; whether every call that was made succeeded (False off glibc)."""
    libc = _glibc()
    if libc is None:
        return False
    done = True
    for name, param, value in settings:
        if name not in os.environ:
            done = libc.mallopt(param, value) == 1 and done
    return done


def _glibc() -> Any:
    """This process's C library when it has glibc's mallopt, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None
