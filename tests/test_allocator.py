"""index/allocator.py: a serving process keeps what it frees for the next query, and a
load's threads keep their heaps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# In a fresh interpreter: RSS (KiB) before a 16 MiB string, with it, and after it is freed.
PROBE = """
import json, sys
from bitseg.index.allocator import keep_freed_memory
tuned = keep_freed_memory() if sys.argv[1] == "tuned" else None
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4
before = rss()
held = b"x" * (16 << 20)
with_it = rss()
del held
print(json.dumps({"tuned": tuned, "before": before, "with": with_it, "after": rss()}))
"""


def probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True,
                          text=True, env=env, check=True)
    return json.loads(done.stdout)


def test_freed_memory_stays_in_a_tuned_process_and_leaves_an_untuned_one():
    """Untuned, glibc maps a 16 MiB block on its own and unmaps it when freed; tuned (the
    mmap threshold at 32 MiB, the trim threshold at 128 MiB), the block comes from the
    heap and stays there for the next query's buffers."""
    tuned, plain = probe("tuned"), probe("plain")
    assert tuned["tuned"] is True
    for run in (tuned, plain):
        assert run["with"] - run["before"] > 15 * 1024, run  # the string's pages are in
    assert tuned["with"] - tuned["after"] < 1024, tuned  # kept
    assert plain["with"] - plain["after"] > 15 * 1024, plain  # given back


# In a fresh interpreter: the pages a thread faults in making and freeing 3 x 8 MiB forty
# times (a load's reader and encoding threads do that with their blocks).
THREAD_PROBE = """
import json, resource, sys, threading
from bitseg.index.allocator import pad_heaps
padded = pad_heaps() if sys.argv[1] == "padded" else None
faults = []
def work():
    for _ in range(3):  # the first blocks settle glibc's own thresholds
        held = b"x" * (8 << 20)
        del held
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        held = [b"x" * (8 << 20) for _ in range(3)]
        del held
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(json.dumps({"padded": padded, "faults": faults[0]}))
"""


def test_a_padded_threads_heap_keeps_its_pages_for_the_next_block():
    """Unpadded, a thread's arena gives its 24 MiB back each time it is freed and faults it
    in again (~6,000 pages a round); padded by 64 MiB, the pages are faulted in once."""
    runs = {}
    for mode in ("padded", "plain"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        done = subprocess.run([sys.executable, "-c", THREAD_PROBE, mode], capture_output=True,
                              text=True, env=env, check=True)
        runs[mode] = json.loads(done.stdout)
    assert runs["padded"]["padded"] is True
    assert runs["plain"]["faults"] > 40 * 3 * 1024, runs  # every round: 3 x 2,048 pages
    assert runs["padded"]["faults"] < runs["plain"]["faults"] / 10, runs


def test_the_environment_wins(monkeypatch):
    """MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ set by whoever starts the server are
    left as they are: with the trim threshold set there, only the mmap threshold and the
    top pad (back to glibc's own) are set."""
    from bitseg.index import allocator

    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert allocator.keep_freed_memory()
    assert calls == [(allocator.M_MMAP_THRESHOLD, allocator.MMAP_BYTES),
                     (allocator.M_TOP_PAD, allocator.GLIBC_TOP_PAD)]
