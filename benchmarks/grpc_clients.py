"""The client side of the gRPC load test, run as its own process so that the clients do
not share the server's interpreter (and GIL).

    python grpc_clients.py ADDRESS CLIENTS REQUESTS RULE_JSON AS_OF EXPECTED

Each of CLIENTS threads opens its own channel, makes one warm-up Count, waits for the
others, then makes REQUESTS timed Counts and checks every answer. Prints one JSON
object: {"seconds": wall time of the timed part, "latencies": [seconds per call]}.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from bitseg import Client


def run_clients(address: str, clients: int, requests: int, rule: dict, as_of: str,
                expected: int, timeout: float) -> tuple[float, list[float]]:
    """Run this script in a child process against the server at address; (wall seconds
    of the timed part, seconds per call)."""
    done = subprocess.run(
        [sys.executable, __file__, address, str(clients), str(requests), json.dumps(rule),
         as_of, str(expected)],
        capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    return result["seconds"], result["latencies"]


def client(address: str, rule: dict, as_of: str, requests: int, expected: int,
           start: threading.Barrier) -> list[float]:
    latencies = []
    with Client(address) as conn:
        if conn.count(rule, as_of=as_of) != expected:
            raise AssertionError("warm-up Count disagrees with the engine")
        start.wait()
        for _ in range(requests):
            began = time.perf_counter()
            got = conn.count(rule, as_of=as_of)
            latencies.append(time.perf_counter() - began)
            if got != expected:
                raise AssertionError(f"Count over gRPC gave {got}, the engine {expected}")
    return latencies


def main(address: str, clients: str, requests: str, rule: str, as_of: str,
         expected: str) -> None:
    n = int(clients)
    start = threading.Barrier(n + 1)
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(client, address, json.loads(rule), as_of, int(requests),
                               int(expected), start) for _ in range(n)]
        start.wait(timeout=120)
        began = time.perf_counter()
        latencies = [x for f in futures for x in f.result()]
        wall = time.perf_counter() - began
    print(json.dumps({"seconds": wall, "latencies": latencies}))


if __name__ == "__main__":
    main(*sys.argv[1:])
