"""Issue 14: streaming ingest over gRPC, from a client in another process than the server.

The server is `bitseg serve` on a new store in a child process; this process is the
client.  It streams the bench dataset's lines as they are (JSON texts, which the client
sends without decoding them) in messages of 10,000 records, each message one transaction
on the server (or several together, group commit): the profiles, then events, then
orders. Beside each rate, the CPU seconds of the server process and of this one (the
client), which a shared machine disturbs less than the wall time.
"""

from __future__ import annotations

import os
import sys
import time
from itertools import islice
from pathlib import Path

import pytest
from conftest import PROFILES, fmt_seconds

from bitseg import Client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest_grpc import ServerProcess  # noqa: E402  (the tests' server fixture)

TABLE = "Issue 14: gRPC ingest, server and client in two processes, 10,000 records a message"
BATCH = 10_000
LIMITS = {"profiles.jsonl": PROFILES, "events.jsonl": 3_000_000, "orders.jsonl": 500_000}
TARGETS = {"profiles.jsonl": "≥ 100k/s", "events.jsonl": "≥ 300k/s", "orders.jsonl": ""}


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.benchmark(group="ingest")
def test_grpc_ingest(dataset: Path, tmp_path: Path, bench_report) -> None:
    server = ServerProcess(tmp_path / "store")
    try:
        with Client(server.addr, timeout=3600) as client:
            calls = {"profiles.jsonl": client.upsert_profiles,
                     "events.jsonl": client.track_events, "orders.jsonl": client.add_orders}
            for name, call in calls.items():
                with (dataset / name).open("rb") as lines:
                    rows = list(islice(lines, LIMITS[name]))
                server_cpu, client_cpu = process_cpu(server.proc.pid), time.process_time()
                started = time.perf_counter()
                result = call(rows, batch_size=BATCH)
                seconds = time.perf_counter() - started
                client_cpu = time.process_time() - client_cpu
                server_cpu = process_cpu(server.proc.pid) - server_cpu
                sent = result.created + result.updated if name == "profiles.jsonl" else result
                assert sent == len(rows), f"{name}: sent {len(rows):,}, the server took {sent:,}"
                bench_report.add(TABLE, what=name, rows=f"{len(rows):,}",
                                 time=fmt_seconds(seconds),
                                 rate=f"{len(rows) / seconds / 1000:,.0f}k/s",
                                 server_cpu=fmt_seconds(server_cpu),
                                 client_cpu=fmt_seconds(client_cpu), target=TARGETS[name])
                print(f"\n{name}: {len(rows):,} in {seconds:.1f} s")
    finally:
        server.stop()
