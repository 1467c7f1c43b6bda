"""index/ahead.py: items made on a thread of their own, a bounded number ahead."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bitseg.index.ahead import Ahead


class Source:
    """A generator's items, recording how many were made and whether it was closed."""

    def __init__(self, count: int, fail_at: int | None = None) -> None:
        self.count = count
        self.fail_at = fail_at
        self.made = 0
        self.closed = threading.Event()
        self.threads: set[str] = set()
        self.first = threading.Event()

    def items(self) -> Iterator[int]:
        try:
            for i in range(self.count):
                self.threads.add(threading.current_thread().name)
                self.first.set()
                if i == self.fail_at:
                    raise ValueError(f"item {i} is bad")
                self.made += 1
                yield i
        finally:
            self.closed.set()


@settings(max_examples=40, deadline=None)
@given(count=st.integers(0, 30), depth=st.integers(1, 4))
def test_every_item_comes_once_in_order_made_on_the_named_thread(count: int,
                                                                 depth: int) -> None:
    source = Source(count)
    with Ahead(source.items(), depth, "maker") as made:
        assert list(made) == list(range(count))
        assert next(made, None) is None  # stays ended
    assert source.closed.is_set()
    assert source.threads <= {"maker"}


def _reaches(source: Source, made: int) -> bool:
    """Whether the source has made `made` items within 5 s, and no more a moment later."""
    for _ in range(500):
        if source.made >= made:
            break
        threading.Event().wait(0.01)
    threading.Event().wait(0.05)
    return source.made == made


@pytest.mark.parametrize("depth", [1, 3])
def test_the_thread_starts_at_once_and_makes_at_most_depth_ahead(depth: int) -> None:
    source = Source(100)
    with Ahead(source.items(), depth, "maker") as made:
        assert _reaches(source, depth)  # before anything is taken
        for taken in range(1, 6):
            assert next(made) == taken - 1
            assert _reaches(source, taken + depth)


def test_an_error_comes_after_the_items_made_before_it() -> None:
    source = Source(10, fail_at=3)
    made = Ahead(source.items(), 2, "maker")
    assert [next(made) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="item 3 is bad"):
        next(made)
    assert next(made, None) is None
    made.close()
    assert source.closed.is_set()


def test_closing_early_stops_the_thread_and_closes_the_items() -> None:
    source = Source(1000)
    made = Ahead(source.items(), 1, "maker-closed")
    assert next(made) == 0
    made.close()
    assert source.closed.wait(5)
    assert "maker-closed" not in {t.name for t in threading.enumerate()}
    assert source.made <= 2  # the one taken and the one made ahead
    assert made._ready.empty()  # what was made and not taken is let go
    with pytest.raises(StopIteration):
        next(made)


def test_a_depth_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="depth must be at least 1"):
        Ahead(iter([1]), 0, "maker")
