"""The gRPC server: `create_server` builds one around an open Engine; `serve` runs it,
with the segments loaded and materialized ones refreshed on their schedule.

    python -m bitseg.server.app --db DB [--host H] [--port P]   (port 0: any free port)

Every call passes the Gate (server/gate.py): tokens, the stream limit, idle streams and
the log. Unary calls keep UNARY_WORKERS threads of their own: streams take at most
`max_streams` workers, so neither they nor idle clients can starve Count or the health
check.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bitseg.index.allocator import keep_freed_memory
from bitseg.index.engine import Engine
from bitseg.index.exports import Exports, ExportScheduler
from bitseg.index.segments import RefreshScheduler, Segments, open_segments
from bitseg.index.templates import Catalogue, TemplateError, load_catalogue
from bitseg.index.traits_schedule import TraitsScheduler
from bitseg.server.console import Api, ConsoleServer
from bitseg.server.gate import ConfigError, Gate, Tokens
from bitseg.server.metrics import Metrics
from bitseg.server.service import SegmentsServicer
from bitseg.v1 import bitseg_pb2, bitseg_pb2_grpc

SERVICE_NAME = bitseg_pb2.DESCRIPTOR.services_by_name["Segments"].full_name
WORKERS = 16  # threads for unary calls, beyond those streams may take
MAX_STREAMS = 32  # streaming calls at once; beyond, RESOURCE_EXHAUSTED
STREAM_IDLE_SECONDS = 60.0  # a stream that moves no message this long is ended
GRACE_SECONDS = 10.0
EXIT_MARGIN = 2.0  # seconds after the grace period before exiting regardless
REFRESH_TICK = 1.0  # seconds between looks for materialized segments due a refresh
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a Members page of 100000 long ids, a big batch

log = logging.getLogger("bitseg.server")


@dataclass(frozen=True)
class Options:
    """How a server admits and bounds its calls (the serve flags)."""

    tokens: Tokens | None = None
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    max_streams: int = MAX_STREAMS
    stream_idle: float = STREAM_IDLE_SECONDS
    access_log: bool = False
    metrics_port: int | None = None  # Prometheus metrics on --host at this port (0: any)
    templates: str | None = None  # a folder of the user's segment templates (*.json)
    sources: dict | None = None  # name -> server.sources.Source (serve --sources FILE)
    traits_every: float | None = None  # seconds between scheduled traits refreshes
    traits: dict | None = None  # the traits config (serve --traits FILE); None: built-in
    http_port: int | None = None  # the console and its HTTP API on http_host (0: any)
    http_host: str = "127.0.0.1"

    def gate(self) -> Gate:
        return Gate(self.tokens, self.max_streams, self.stream_idle, self.access_log)


def create_server(engine: Engine, address: str, workers: int = WORKERS,
                  segments: Segments | None = None, options: Options = Options()
                  ) -> tuple[grpc.Server, int]:
    """A server (not started) for the engine on `address` ("host:0" picks a free port).

    Its segments are `segments`, or the engine's stored ones, loaded here.
    """
    server, port, _, _ = _build(engine, address, workers, segments, options)
    return server, port


def _build(engine: Engine, address: str, workers: int, segments: Segments | None = None,
           options: Options = Options(), outer: Sequence[grpc.ServerInterceptor] = (),
           make_servicer: Callable[..., SegmentsServicer] = SegmentsServicer
           ) -> tuple[grpc.Server, int, health.HealthServicer, Gate]:
    if segments is None and isinstance(engine, Engine):
        segments = open_segments(engine)
    credentials = _credentials(options)  # before anything starts: a bad file fails first
    templates = _templates(options)
    gate = options.gate()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers + options.max_streams,
                                   thread_name_prefix="bitseg-rpc"),
        interceptors=[*outer, gate],  # outer ones (metrics) also see what the gate refuses
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.so_reuseport", 0)],  # a second server on a taken port must fail
    )
    bitseg_pb2_grpc.add_SegmentsServicer_to_server(make_servicer(engine, segments, templates),
                                                    server)
    health_servicer = health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = (server.add_insecure_port(address) if credentials is None
                else server.add_secure_port(address, credentials))
    except RuntimeError:  # grpc raises this when it cannot bind
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {address} (is the port taken?)")
    return server, port, health_servicer, gate


def _templates(options: Options) -> Catalogue:
    """The built-in templates and the user's; a bad template file names itself."""
    try:
        return load_catalogue(options.templates)
    except TemplateError as exc:
        raise ConfigError(f"--templates: {exc}") from None


def _credentials(options: Options) -> grpc.ServerCredentials | None:
    if (options.tls_cert is None) != (options.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if options.tls_cert is None or options.tls_key is None:
        return None
    pems = []
    for flag, path in (("--tls-key", options.tls_key), ("--tls-cert", options.tls_cert)):
        try:
            pems.append(Path(path).read_bytes())
        except OSError as exc:
            raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    return grpc.ssl_server_credentials([(pems[0], pems[1])])


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (a name other than localhost: no)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(db_path: str, host: str = "127.0.0.1", port: int = 50051,
          grace: float = GRACE_SECONDS, tick: float = REFRESH_TICK,
          options: Options = Options()) -> int:
    """Serve the store at db_path until SIGINT or SIGTERM, then stop cleanly; 0 when done.

    Every `tick` seconds, materialized segments whose refresh interval has passed are
    refreshed; the scheduler stops (after a refresh in progress) before the store closes.
    Calls still running after the grace period (gRPC has cancelled them, but Python
    cannot interrupt an evaluation) do not keep the process alive: once no write is in
    progress, it exits without waiting for them.
    """
    keep_freed_memory()
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with Engine.open(db_path) as engine:
            segments = open_segments(engine)
            sources = None
            if options.sources:  # {"sql": ...} rules' databases; pools connect on first use
                from bitseg.server.sources import Sources

                sources = Sources(options.sources, lambda: engine.ids).start()
                engine.set_external(sources)
            metrics = Metrics(engine) if options.metrics_port is not None else None
            server, bound, health_servicer, gate = _build(
                engine, _address(host, port), WORKERS, segments, options,
                outer=[metrics.interceptor] if metrics else [])
            start_metrics(metrics, host, options)
            console = start_console(SegmentsServicer(engine, segments, _templates(options)),
                                    options)
            scheduler = RefreshScheduler(segments, tick).start()
            exporter = ExportScheduler(Exports(engine), tick).start()
            traits = (TraitsScheduler(engine, options.traits, options.traits_every).start()
                      if options.traits_every else None)
            server.start()
            if options.tokens is None and not is_loopback(host):
                print(f"bitseg: warning: listening on {host} without --tokens: anyone who "
                      "can reach this port can read and change the store", file=sys.stderr)
            print(f"bitseg serving {db_path} on {host}:{bound}", file=sys.stderr, flush=True)
            stop.wait()
            log.info("stopping: letting calls in flight finish (up to %.0f s)", grace)
            health_servicer.enter_graceful_shutdown()
            scheduler.stop()
            exporter.stop()
            if traits is not None:
                traits.stop()
            server.stop(grace).wait(grace + EXIT_MARGIN)
            if not gate.wait_idle(EXIT_MARGIN):
                _exit_now(gate, grace)
            if console is not None:
                console.stop()
            if metrics is not None:  # before the store closes: a scrape reads it
                metrics.stop()
            if sources is not None:
                sources.close()
        log.info("stopped; store closed")
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def start_metrics(metrics: Metrics | None, host: str, options: Options) -> None:
    """Serve the metrics page on --host at --metrics-port, when asked for."""
    if metrics is not None and options.metrics_port is not None:
        scraped = metrics.start(host, options.metrics_port)
        print(f"bitseg metrics on http://{_address(host, scraped)}/metrics",
              file=sys.stderr, flush=True)


def start_console(servicer: SegmentsServicer, options: Options) -> ConsoleServer | None:
    """The console's HTTP server (server/console.py) over `servicer`, started, when
    --http asks for it."""
    if options.http_port is None:
        return None
    console = ConsoleServer(Api(servicer, options.tokens), options.http_host, options.http_port)
    scheme = "http"
    if options.tls_cert and options.tls_key:
        console.use_tls(options.tls_cert, options.tls_key)
        scheme = "https"
    if options.tokens is None and not is_loopback(options.http_host):
        print(f"bitseg: warning: the console listens on {options.http_host} without --tokens",
              file=sys.stderr)
    print(f"bitseg console on {scheme}://{_address(options.http_host, console.port)}/",
          file=sys.stderr, flush=True)
    return console.start()


def _exit_now(gate: Gate, grace: float) -> None:
    """Exit without the calls still running, once none of them is writing (LMDB is safe
    against a crash anyway; this keeps acknowledged-but-unfinished writes whole)."""
    log.warning("%d call(s) still running after the %.0f s grace period; exiting without "
                "them", gate.running(), grace)
    gate.wait_for_writes()
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)


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
