"""A daemon thread that calls `run_once()` every `interval` seconds until stopped: what the
segment-refresh, export and traits schedulers share (each says what one run does)."""

from __future__ import annotations

import threading
from typing import Any, TypeVar

T = TypeVar("T", bound="Ticker")


class Ticker:
    """Subclasses define run_once(); start() begins ticking, stop() ends it after the run
    in progress, if any."""

    def __init__(self, interval: float, name: str) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self: T) -> T:
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop after the run in progress, if any."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def stopping(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()

    def run_once(self, now_us: int | None = None) -> Any:
        raise NotImplementedError
