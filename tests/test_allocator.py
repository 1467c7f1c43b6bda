"""server/allocator.py: a serving process keeps what it frees for the next query."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# In a fresh interpreter: RSS (KiB) before a 16 MiB string, with it, and after it is freed.
PROBE = """
import json, sys
from bitseg.server.allocator import keep_freed_memory
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


def test_the_environment_wins(monkeypatch):
    """MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ set by whoever starts the server are
    left as they are: with both set, nothing is changed (and the call says so)."""
    from bitseg.server import allocator

    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Libc())
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert allocator.keep_freed_memory()
    assert calls == [(allocator.M_MMAP_THRESHOLD, allocator.MMAP_BYTES)]
