"""Items made on a thread of their own, a bounded number ahead of their use.

A load reads and parses the next blocks of a file while the loading thread indexes the
one before (loaders/columnar.py), and an events batch merges the next chunk of its
count runs while it writes the one before (EventBatch.finish). Both hand a generator to
an `Ahead`: its thread starts at once, makes at most `depth` items beyond those taken,
and raises what making one raised in its turn, after the items made before it.

Closing an Ahead (or leaving its `with`) stops the thread once the item it is making is
made, and closes the generator there, so its `finally` (a file, scratch files) runs.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")
_DONE = object()
_POLL = 0.1  # seconds between the maker's looks at a close while it waits for room


class Ahead(Generic[T]):
    """The items of a generator, made on the thread `name` up to `depth` ahead."""

    def __init__(self, items: Iterator[T], depth: int, name: str) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, not {depth}")
        self._ready: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._room = threading.Semaphore(depth)  # one per item made and not yet taken
        self._stop = threading.Event()
        self._ended = False
        self._maker = threading.Thread(target=self._make, args=(items,), name=name,
                                       daemon=True)
        self._maker.start()

    def _make(self, items: Iterator[T]) -> None:
        try:
            while True:
                while not self._room.acquire(timeout=_POLL):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                try:
                    item = next(items)
                except StopIteration:
                    break
                self._ready.put(item)
            self._ready.put(_DONE)
        except BaseException as exc:  # handed to the thread taking the items, raised there
            self._ready.put(exc)
        finally:
            close = getattr(items, "close", None)  # a generator's: its finally runs here
            if close is not None:
                close()

    def __iter__(self) -> Ahead[T]:
        return self

    def __next__(self) -> T:
        if self._ended:
            raise StopIteration
        item = self._ready.get()
        if item is _DONE or isinstance(item, BaseException):
            self._ended = True
            if item is _DONE:
                raise StopIteration
            raise item
        self._room.release()
        return item

    def close(self) -> None:
        """Stop the thread (after the item it is making), close the generator there, and
        let go of the items made and not taken (a parsed block, a chunk of runs)."""
        self._stop.set()
        self._maker.join()
        self._ended = True
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                break

    def __enter__(self) -> Ahead[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
