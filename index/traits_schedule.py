"""Computed traits on a schedule (`bitseg serve --traits-every S [--traits FILE]`): a
daemon thread that runs the traits refresh every S seconds at as_of = now.

Each run logs one line (what changed, how long it took). A failing run is logged once
(a traceback only for an unexpected error), then tried again after S × 2, 4, 8, …
seconds, at most `max_pause` apart, until it works again (logged).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from bitseg.index.engine import Engine
from bitseg.index.errors import BitsegError, PartUnavailable
from bitseg.index.ticker import Ticker
from bitseg.index.traits import RefreshReport, parse_config, refresh

US = 1_000_000
MAX_PAUSE = 3600.0  # seconds: the longest wait between tries of a failing refresh

log = logging.getLogger("bitseg.traits")


def load_config(path: str) -> dict[str, dict[str, Any]]:
    """The traits config of a JSON file, checked; errors name the file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BitsegError(f"{path}: cannot read the traits config: "
                          f"{exc.strerror or exc}") from None
    return parse_config(text, source=path)


def summary(report: RefreshReport, seconds: float) -> str:
    """One line: the profiles written, the traits that changed, the duration."""
    changed = ", ".join(f"{name} {count:,}" for name, count in sorted(report.changed.items())
                        if count)
    return (f"traits refreshed as of {report.as_of} in {seconds:.2f} s: "
            f"{report.profiles:,} profiles written"
            + (f" (changed: {changed})" if changed else " (nothing changed)"))


class TraitsScheduler(Ticker):
    """A daemon thread that refreshes the computed traits every `every` seconds."""

    def __init__(self, engine: Engine, config: Any = None, every: float = 3600.0,
                 max_pause: float = MAX_PAUSE) -> None:
        self.config = parse_config(config)  # a bad config fails here, before any thread
        super().__init__(every, "bitseg-traits")
        self.engine = engine
        self.max_pause = max(max_pause, every)
        self.attempts = 0  # failed runs in a row
        self._retry_at = 0  # µs: no run before this while failing

    def run_once(self, now_us: int | None = None) -> RefreshReport | None:
        """Refresh the traits at now_us (default: now), unless pausing after failures;
        the report, or None when skipped or failed."""
        now_us = time.time_ns() // 1000 if now_us is None else now_us
        if self.attempts and now_us < self._retry_at:
            return None
        started = time.monotonic()
        try:
            report = self.refresh(now_us)
        except Exception as exc:  # the thread must outlive a failed run
            self._failed(now_us, exc)
            return None
        if self.attempts:
            log.info("scheduled traits refresh works again after %d failed run(s)",
                     self.attempts)
            self.attempts = 0
        log.info("%s", summary(report, time.monotonic() - started))
        return report

    def refresh(self, as_of_us: int) -> RefreshReport:
        """One refresh (the sharded front's scheduler refreshes every shard instead)."""
        return refresh(self.engine, self.config, as_of=as_of_us)

    def _failed(self, now_us: int, exc: Exception) -> None:
        self.attempts += 1
        pause = min(self.interval * 2 ** self.attempts, self.max_pause)
        self._retry_at = now_us + int(pause * US)
        if self.attempts > 1:
            return  # said once already
        if isinstance(exc, (BitsegError, PartUnavailable)):
            log.warning("scheduled traits refresh failed: %s; trying again after growing "
                        "pauses (at most %.0f s), and saying so when it works",
                        exc, self.max_pause)
        else:
            log.error("scheduled traits refresh failed unexpectedly; trying again after "
                      "growing pauses (at most %.0f s)", self.max_pause, exc_info=exc)
