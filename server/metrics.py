"""Prometheus metrics of a running server (`bitseg serve --metrics-port P`).

Two sources, one registry:
- `CallMetrics`, a server interceptor: every call counted and timed by RPC and status
  code, and the evaluation time the evaluating RPCs report (their `eval_micros`);
- `EngineCollector`, read at scrape time only (nothing is updated on a write): the
  snapshot version, the profiles, events and orders there are, the bytes of data.mdb
  in use, and the result cache's hits and misses;
and prometheus_client's process_* metrics (memory, CPU, open files).

The page is served by prometheus_client's HTTP server on its own thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bitseg.index.engine import Engine
from bitseg.index.event_index import EventIndex
from bitseg.index.keys import SEP_TEXT

# Seconds: a cached Count answers in well under a millisecond, a cold rule over millions
# of profiles or a long Members stream takes seconds.
CALL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                2.5, 5.0, 10.0, 30.0, 60.0)
EVAL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def split_method(method: str) -> tuple[str, str]:
    """"/bitseg.v1.Segments/Count" -> ("bitseg.v1.Segments", "Count")."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


class CallMetrics(grpc.ServerInterceptor):
    """Counts and times every call by service, method and final status code, and records
    the evaluation time of replies that carry `eval_micros` (a stream: its first page,
    since every page repeats its one evaluation's)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("service", "method", "code")
        self.calls = Counter("bitseg_rpc_requests", "Calls finished, by RPC and status code.",
                             labels, registry=registry)
        self.latency = Histogram("bitseg_rpc_duration_seconds",
                                 "Time from the call's start to its status, by RPC and code.",
                                 labels, buckets=CALL_BUCKETS, registry=registry)
        self.evaluation = Histogram("bitseg_evaluation_seconds",
                                    "Rule evaluation time as the RPC reports it (eval_micros).",
                                    ("method",), buckets=EVAL_BUCKETS, registry=registry)

    def intercept_service(self, continuation: Callable[[Any], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED itself
            return None
        service, method = split_method(details.method)
        decode, encode = handler.request_deserializer, handler.response_serializer
        if handler.response_streaming:
            behaviour = handler.stream_stream if handler.request_streaming \
                else handler.unary_stream
            wrapped = self._streamed(behaviour, service, method)
            make = grpc.stream_stream_rpc_method_handler if handler.request_streaming \
                else grpc.unary_stream_rpc_method_handler
        else:
            behaviour = handler.stream_unary if handler.request_streaming \
                else handler.unary_unary
            wrapped = self._unary(behaviour, service, method)
            make = grpc.stream_unary_rpc_method_handler if handler.request_streaming \
                else grpc.unary_unary_rpc_method_handler
        return make(wrapped, request_deserializer=decode, response_serializer=encode)

    def _unary(self, behaviour: Callable[..., Any], service: str, method: str
               ) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            start = time.perf_counter()
            try:
                reply = behaviour(request, context)
            except BaseException:
                self._done(service, method, context, start, grpc.StatusCode.UNKNOWN)
                raise
            self._evaluated(method, reply)
            self._done(service, method, context, start, grpc.StatusCode.OK)
            return reply
        return run

    def _streamed(self, behaviour: Callable[..., Iterable[Any]], service: str, method: str
                  ) -> Callable[..., Iterator[Any]]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start, first = time.perf_counter(), True
            fallback = grpc.StatusCode.UNKNOWN
            try:
                for reply in behaviour(request, context):
                    if first:
                        self._evaluated(method, reply)
                        first = False
                    yield reply
                fallback = grpc.StatusCode.OK
            except GeneratorExit:  # gRPC closed the stream: the client went away
                fallback = grpc.StatusCode.CANCELLED
                raise
            finally:
                self._done(service, method, context, start, fallback)
        return run

    def _evaluated(self, method: str, reply: Any) -> None:
        micros = getattr(reply, "eval_micros", None)
        if isinstance(micros, int):
            self.evaluation.labels(method).observe(micros / 1e6)

    def _done(self, service: str, method: str, context: grpc.ServicerContext,
              start: float, fallback: grpc.StatusCode) -> None:
        """Record the call; its code is what the handler set (abort), else `fallback`."""
        code = (context.code() or fallback).name
        self.calls.labels(service, method, code).inc()
        self.latency.labels(service, method, code).observe(time.perf_counter() - start)


def event_rows(events: EventIndex) -> int:
    """How many events are stored: each type's count stream per calendar month holds
    every profile's count of that month in bit slices, so the total is the sum over
    slices i of 2^i × the profiles in slice i (decoded buckets are cached)."""
    total = 0
    for stream, months in events.stream_months.items():
        if SEP_TEXT in stream:  # a (type, property value) stream: its rows are in its type's
            continue
        for month in months:
            counts = events.bucket(b"m", stream, month)
            total += sum(len(bits) << i for i, bits in enumerate(counts.slices))
    return total


class EngineCollector(Collector):
    """The store's state, read from the engine when Prometheus scrapes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        snapshot, cache = self.engine.snapshot, self.engine.cache_stats()
        yield GaugeMetricFamily("bitseg_snapshot_version",
                                "The version of the published snapshot (one per write).",
                                value=snapshot.version)
        yield GaugeMetricFamily("bitseg_profiles", "Live (not deleted) profiles.",
                                value=len(snapshot.live))
        yield GaugeMetricFamily("bitseg_events", "Events stored, of every type.",
                                value=event_rows(snapshot.events))
        yield GaugeMetricFamily("bitseg_orders", "Orders stored.",
                                value=len(snapshot.orders.live))
        yield GaugeMetricFamily("bitseg_store_used_bytes",
                                "Bytes of data.mdb in use (LMDB pages up to the last used "
                                "one; not a bulk load's sparse reserve).",
                                value=self.engine.store.used_bytes())
        yield CounterMetricFamily("bitseg_result_cache_hits",
                                  "Counts and member sets answered from the result cache.",
                                  value=cache.hits)
        yield CounterMetricFamily("bitseg_result_cache_misses",
                                  "Counts and member sets the result cache did not hold.",
                                  value=cache.misses)
        yield GaugeMetricFamily("bitseg_result_cache_entries",
                                "Results the cache holds now.", value=cache.entries)
        yield GaugeMetricFamily("bitseg_result_cache_bytes",
                                "Estimated bytes of the results the cache holds now.",
                                value=cache.bytes)


class Metrics:
    """One server's metrics: the interceptor to install, and the page to serve. Without
    an engine (a sharded store's front: its shards' stores are in other processes),
    the calls and the process alone."""

    def __init__(self, engine: Engine | None) -> None:
        disable_created_metrics()  # no `_created` series: one process, started once
        self.registry = CollectorRegistry()
        self.interceptor = CallMetrics(self.registry)
        if engine is not None:
            self.registry.register(EngineCollector(engine))
        ProcessCollector(registry=self.registry)  # process_*: memory, CPU, open files
        self._http: Any = None  # a wsgiref server

    def start(self, host: str, port: int) -> int:
        """Serve http://host:port/metrics on a daemon thread; the port bound (0: any)."""
        try:
            self._http, _ = start_http_server(port, addr=host.strip("[]"),
                                              registry=self.registry)
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port} for metrics: "
                          f"{exc.strerror or exc}") from None
        return int(self._http.server_port)

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
