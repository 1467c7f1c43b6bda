"""Helpers for the end-to-end tests: a real `bitseg serve` process, and the CLI.

Imported explicitly (not a conftest.py): `from conftest_grpc import ServerProcess, run_cli`.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

READY = re.compile(r"^bitseg serving .* on (\S+):(\d+)\s*$")
START_SECONDS = 60.0  # a limit for a hung start; a busy 2-core machine has taken over 20 s


def bitseg_command() -> list[str]:
    """How to run the `bitseg` entry point of this environment."""
    script = Path(sys.executable).with_name("bitseg")
    return [str(script)] if script.exists() else [sys.executable, "-m", "bitseg.server.cli"]


def run_cli(*args: str, stdin: str | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*bitseg_command(), *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def cli_ok(server: ServerProcess, *args: str) -> str:
    """What `bitseg ARGS --addr SERVER` prints, asserting that it succeeded."""
    done = run_cli(*args, "--addr", server.addr)
    assert done.returncode == 0, done.stderr
    return done.stdout


class ServerProcess:
    """`bitseg serve --db DB --port 0`, started and waited for until it says it is ready."""

    def __init__(self, db: Path | str, extra_args: Sequence[str] = ()) -> None:
        self.db = str(db)
        self.proc = subprocess.Popen(
            [*bitseg_command(), "serve", "--db", self.db, "--create", "--host", "127.0.0.1",
             "--port", "0", *extra_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "PYTHONFAULTHANDLER": "1"})  # see stop()
        self.lines: list[str] = []
        ready: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, args=(ready,), daemon=True).start()
        deadline = time.monotonic() + START_SECONDS
        while True:
            try:
                line = ready.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise RuntimeError(f"server did not start in {START_SECONDS} s:\n"
                                   + self.stderr()) from None
            if line is None:
                raise RuntimeError(f"server exited with {self.proc.wait()}:\n" + self.stderr())
            found = READY.match(line)
            if found:
                self.host, self.port = found.group(1), int(found.group(2))
                self.addr = f"{self.host}:{self.port}"
                return

    def _drain(self, ready: queue.Queue[str | None]) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            ready.put(line.rstrip("\n"))
        ready.put(None)

    def stderr(self) -> str:
        return "".join(self.lines)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the server and wait for it to exit; its exit status. A server still
        running after `timeout` fails the test with what it wrote, ending in every
        thread's stack (SIGABRT, which Python's fault handler answers with them)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
            time.sleep(0.5)  # the stderr reader takes the last lines
            raise AssertionError(f"the server did not exit within {timeout} s of signal "
                                 f"{sig}; its stderr:\n{self.stderr()[-20000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
