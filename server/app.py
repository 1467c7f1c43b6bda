"""The gRPC server: `create_server` builds one around an open Engine; `serve` runs it,
with the segments loaded and materialized ones refreshed on their schedule.

    python -m bitseg.server.app --db DB [--host H] [--port P]   (port 0: any free port)
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bitseg.index.engine import Engine
from bitseg.index.segments import RefreshScheduler, Segments, open_segments
from bitseg.server.service import SegmentsServicer
from bitseg.v1 import bitseg_pb2, bitseg_pb2_grpc

SERVICE_NAME = bitseg_pb2.DESCRIPTOR.services_by_name["Segments"].full_name
WORKERS = 16
GRACE_SECONDS = 10.0
REFRESH_TICK = 1.0  # seconds between looks for materialized segments due a refresh
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a Members page of 100000 long ids, a big batch

log = logging.getLogger("bitseg.server")


def create_server(engine: Engine, address: str, workers: int = WORKERS,
                  segments: Segments | None = None) -> tuple[grpc.Server, int]:
    """A server (not started) for the engine on `address` ("host:0" picks a free port).

    Its segments are `segments`, or the engine's stored ones, loaded here.
    """
    server, port, _ = _build(engine, address, workers, segments)
    return server, port


def _build(engine: Engine, address: str, workers: int, segments: Segments | None = None
           ) -> tuple[grpc.Server, int, health.HealthServicer]:
    if segments is None and isinstance(engine, Engine):
        segments = open_segments(engine)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bitseg-rpc"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)],  # a second server on a taken port must fail
    )
    bitseg_pb2_grpc.add_SegmentsServicer_to_server(SegmentsServicer(engine, segments), server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError:  # grpc raises this when it cannot bind
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address} (is the port taken?)")
    return server, port, health_servicer


def serve(db_path: str, host: str = "127.0.0.1", port: int = 50051,
          grace: float = GRACE_SECONDS, tick: float = REFRESH_TICK) -> int:
    """Serve the store at db_path until SIGINT or SIGTERM, then stop cleanly; 0 when done.

    Every `tick` seconds, materialized segments whose refresh interval has passed are
    refreshed; the scheduler stops (after a refresh in progress) before the store closes.
    """
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Engine.open(db_path) as engine:
            segments = open_segments(engine)
            server, bound, health_servicer = _build(engine, _address(host, port), WORKERS,
                                                    segments)
            scheduler = RefreshScheduler(segments, tick).start()
            server.start()
            print(f"bitseg serving {db_path} on {host}:{bound}", file=sys.stderr, flush=True)
            stop.wait()
            log.info("stopping: letting calls in flight finish (up to %.0f s)", grace)
            health_servicer.enter_graceful_shutdown()
            scheduler.stop()
            server.stop(grace).wait()
        log.info("stopped; store closed")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bitseg.server.app", description=__doc__)
    parser.add_argument("--db", required=True, help="store directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    args = parser.parse_args(argv)
    configure_logging()
    return serve(args.db, args.host, args.port)


if __name__ == "__main__":
    sys.exit(main())
