"""The gate every call passes: one server interceptor for what all RPCs share and none
should repeat — bearer tokens and their roles, requests that do not decode, the limit on
concurrent streams, idle streams, and one log line per failed call.

Tokens file (`bitseg serve --tokens FILE`): one token a line, `ROLE TOKEN`, ROLE being
`read` (evaluate and describe) or `write` (everything, reads included); blank lines and
lines starting with `#` are ignored. Clients send `authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import hmac
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bitseg.server.service import (
    BadRequest,
    Busy,
    Cancelled,
    Expired,
    PermissionDenied,
    Unauthenticated,
    status_of,
)

log = logging.getLogger("bitseg.server")

SERVICE_PREFIX = "/bitseg.v1.Segments/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # need no token
READ_METHODS = frozenset({
    "ListSources",  # names, hosts and databases of the SQL sources; never a password
    "Count", "Members", "IsMember", "SegmentsOf", "Explain", "GetProfile", "Preview",
    "Metrics", "Overlap", "GetSegment", "ListSegments", "SegmentHistory",
    "Describe", "Values", "IsMemberBatch", "SegmentsOfBatch",
    "Insights", "ListExportSchedules", "ListTemplates",
    "ListActions"})  # the audit entries of bulk actions
ROLES = ("read", "write")


class ConfigError(ValueError):
    """A bad serve option (tokens file, TLS files); the message names the file."""


@dataclass(frozen=True)
class Tokens:
    """The tokens the server accepts, each with its role."""

    roles: Mapping[str, str]

    @classmethod
    def load(cls, path: str | Path) -> Tokens:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--tokens: cannot read {path}: {exc}") from None
        roles: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts or parts[0].startswith("#"):
                continue
            if len(parts) != 2 or parts[0] not in ROLES:
                raise ConfigError(f"{path}:{number}: expected `read TOKEN` or `write TOKEN`")
            roles[parts[1]] = parts[0]
        if not roles:
            raise ConfigError(f"{path}: no tokens (lines `read TOKEN` / `write TOKEN`)")
        return cls(roles)

    def role_of(self, token: str) -> str | None:
        """The token's role, or None; compared in constant time, token by token."""
        found = None
        for known, role in self.roles.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                found = role
        return found


def required_role(method: str) -> str | None:
    """The role a full method name needs: None for health and reflection."""
    if method.startswith(OPEN_PREFIXES):
        return None
    name = method[len(SERVICE_PREFIX):] if method.startswith(SERVICE_PREFIX) else ""
    return "read" if name in READ_METHODS else "write"


def admit(tokens: Tokens | None, method: str, metadata: Any) -> None:
    """Raise Unauthenticated or PermissionDenied unless the call's token may call method."""
    needed = required_role(method)
    if tokens is None or needed is None:
        return
    header = next((v for k, v in metadata or () if k == "authorization"), "")
    scheme, _, token = str(header).partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("missing token: send the header `authorization: Bearer TOKEN`")
    role = tokens.role_of(token.strip())
    if role is None:
        raise Unauthenticated("unknown token")
    if needed == "write" and role != "write":
        raise PermissionDenied(f"{_short(method)} changes the store: it needs a write token, "
                               "and this is a read token")


@dataclass(frozen=True)
class Undecodable:
    """Stands for a request message that did not decode; the gate refuses it."""

    type_name: str
    reason: str

    def error(self) -> BadRequest:
        return BadRequest(
            f"the message is not a valid {self.type_name} ({self.reason}); protobuf rules "
            "nest at most 100 deep, and string fields must be UTF-8")


def tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A request deserializer that answers Undecodable instead of raising (gRPC would turn
    the exception into INTERNAL "Exception deserializing request!")."""
    if deserialize is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, RecursionError: all are the sender's
            return Undecodable(_type_name(deserialize), type(exc).__name__)
    return decode


def _type_name(deserialize: Callable[[bytes], Any]) -> str:
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request message")


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


class _Watch:
    """Server streams whose client has not taken a message for `idle` seconds are
    cancelled, by one daemon thread that looks four times per idle period."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self.armed: dict[int, tuple[float, grpc.ServicerContext, str]] = {}
        self.expired: set[int] = set()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def arm(self, key: int, context: grpc.ServicerContext, method: str) -> None:
        with self.lock:
            self.armed[key] = (time.monotonic() + self.idle, context, method)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="bitseg-idle",
                                               daemon=True)
                self.thread.start()

    def disarm(self, key: int) -> bool:
        """Forget the stream; whether it had been cancelled for idling."""
        with self.lock:
            self.armed.pop(key, None)
            idled = key in self.expired
            self.expired.discard(key)
            return idled

    def _run(self) -> None:
        while True:
            time.sleep(min(0.5, self.idle / 4))
            now = time.monotonic()
            with self.lock:  # copy what is due, cancel outside the lock
                due = [(k, c, m) for k, (t, c, m) in self.armed.items() if t <= now]
                for key, _, _ in due:
                    del self.armed[key]
                    self.expired.add(key)
            for _, context, method in due:
                log.info("%s: the client read nothing for %g s (the stream idle timeout); "
                         "stream cancelled", _short(method), self.idle)
                context.cancel()


class Gate(grpc.ServerInterceptor):
    """Admits, limits, watches and logs every call (see the module docstring)."""

    def __init__(self, tokens: Tokens | None = None, max_streams: int = 32,
                 idle: float = 60.0, access_log: bool = False) -> None:
        self.tokens = tokens
        self.max_streams = max_streams
        self.idle = idle
        self.access_log = access_log
        self._streams = threading.BoundedSemaphore(max_streams)
        self._watch = _Watch(idle)
        self._running = {"read": 0, "write": 0}
        self._changed = threading.Condition()

    # ------------------------------------------------------------------ in flight
    def running(self) -> int:
        """How many calls are still running (their handlers, not the network)."""
        with self._changed:
            return sum(self._running.values())

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every call to end; whether they all did."""
        with self._changed:
            return self._changed.wait_for(lambda: not any(self._running.values()), timeout)

    def wait_for_writes(self) -> None:
        """Block until no writing call runs (each commits or aborts its transaction)."""
        with self._changed:
            self._changed.wait_for(lambda: self._running["write"] == 0)

    def _enter(self, kind: str) -> None:
        with self._changed:
            self._running[kind] += 1

    def _leave(self, kind: str) -> None:
        with self._changed:
            self._running[kind] -= 1
            self._changed.notify_all()

    # ------------------------------------------------------------------ the interceptor
    def intercept_service(self, continuation: Callable[[Any], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        try:
            admit(self.tokens, method, details.invocation_metadata)
            refused: Exception | None = None
        except (Unauthenticated, PermissionDenied) as exc:
            refused = exc
        call = _Call(self, method, refused)
        decode = tolerant(handler.request_deserializer)
        encode = handler.response_serializer
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                call.streamed(handler.stream_stream, True), decode, encode)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                call.unary(handler.stream_unary, True), decode, encode)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                call.streamed(handler.unary_stream, False), decode, encode)
        return grpc.unary_unary_rpc_method_handler(
            call.unary(handler.unary_unary, False), decode, encode)


class _Call:
    """One method's wrappers: its behaviour, run behind the gate's checks."""

    def __init__(self, gate: Gate, method: str, refused: Exception | None) -> None:
        self.gate = gate
        self.method = method
        self.name = _short(method)
        self.refused = refused
        self.kind = "write" if required_role(method) == "write" else "read"

    def unary(self, behaviour: Callable[..., Any], streaming_in: bool) -> Callable[..., Any]:
        def run(request: Any, context: grpc.ServicerContext) -> Any:
            start, slot = time.monotonic(), False
            self.gate._enter(self.kind)
            try:
                slot = self._admit(request, context, streaming_in)
                if streaming_in:
                    request = self._read(request)
                result = behaviour(request, context)
            except BaseException:
                self._log(context, start)
                raise
            finally:
                self._release(slot)
                self.gate._leave(self.kind)
            self._log(context, start)
            return result
        return run

    def streamed(self, behaviour: Callable[..., Any], streaming_in: bool
                 ) -> Callable[..., Iterator[Any]]:
        def run(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            start, slot = time.monotonic(), False
            watch, key = self.gate._watch, id(context)
            self.gate._enter(self.kind)
            try:
                slot = self._admit(request, context, True)
                if streaming_in:
                    request = self._read(request)
                for reply in behaviour(request, context):
                    watch.arm(key, context, self.method)
                    yield reply  # returns once the client has taken it (flow control)
                    if watch.disarm(key):
                        return
            finally:  # also when gRPC drops the generator of a cancelled call
                idled = watch.disarm(key)
                self._release(slot)
                self.gate._leave(self.kind)
                self._log(context, start, idled)
        return run

    def _admit(self, request: Any, context: grpc.ServicerContext, streaming: bool) -> bool:
        """Let the call in, or end it (context.abort raises); whether it took a stream slot."""
        refusal: Exception | None = self.refused
        if refusal is None and isinstance(request, Undecodable):
            refusal = request.error()
        taken = False
        if refusal is None and streaming:
            taken = self.gate._streams.acquire(blocking=False)
            if not taken:
                refusal = Busy(f"too many streams: this server serves at most "
                               f"{self.gate.max_streams} streaming calls at once; "
                               "try again later")
        if refusal is not None:
            context.abort(*status_of(refusal))
        return taken

    def _release(self, slot: bool) -> None:
        if slot:
            self.gate._streams.release()

    def _read(self, requests: Iterator[Any]) -> Iterator[Any]:
        """The client's messages, read by a helper thread so that a client that sends
        nothing for `idle` seconds ends the call (Expired) instead of holding a worker."""
        idle = self.gate.idle
        inbox: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()

        def pump() -> None:
            try:
                for message in requests:
                    inbox.put((True, message))
                inbox.put((False, None))
            except grpc.RpcError:  # the client cancelled, or the call was answered
                inbox.put((False, Cancelled("the client cancelled the stream")))

        threading.Thread(target=pump, name=f"bitseg-read-{self.name}", daemon=True).start()
        while True:
            try:
                more, message = inbox.get(timeout=idle)
            except queue.Empty:
                raise Expired(f"no message from the client for {idle:g} s (the stream idle "
                              "timeout); the batches before were applied") from None
            if not more:
                if message is not None:
                    raise message
                return
            if isinstance(message, Undecodable):
                raise message.error()
            yield message

    def _log(self, context: grpc.ServicerContext, start: float, idled: bool = False) -> None:
        millis = (time.monotonic() - start) * 1000
        code = context.code()
        if idled:
            code, details = grpc.StatusCode.CANCELLED, "the client read nothing (idle timeout)"
        elif code is None or code is grpc.StatusCode.OK:
            if self.gate.access_log:
                log.info("%s OK in %.1f ms", self.name, millis)
            return
        else:
            raw = context.details() or b""
            details = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        level = logging.ERROR if code in (grpc.StatusCode.INTERNAL,
                                          grpc.StatusCode.UNKNOWN) else logging.INFO
        log.log(level, "%s failed: %s in %.1f ms: %s", self.name, code.name, millis,
                " ".join(details.split()))
