"""The console: a small HTTP JSON API over the gRPC servicer's own methods, and the single
page that uses it (static files in server/console_static/, shipped in the package).

    POST /api/v1/METHOD   body: the request message in protobuf's JSON form ({} or empty
                          for a request with no fields); answer: the reply in that form
    POST /export          {"segment": S or "rule_json": R, "fields": [...], "require":
                          [...], "format": "csv" | "jsonl"}: the members having every
                          required field, as a file (what `bitseg export` writes), read
                          through the Members stream; header X-Bitseg-Audience: all
                          members, required fields or not
    GET  /                the console page; GET /static/NAME its files

METHOD is any unary RPC of bitseg.v1.Segments (Count, Describe, Values, Explain, Preview,
ListSegments, GetSegment, CreateSegment, SegmentHistory, Overlap, Insights, ...). It is
called on a SegmentsServicer over the served engine, so the engine calls, the checks and
the error mapping (service.status_of) are those of gRPC: a failed call answers the HTTP
status of its gRPC code (HTTP_STATUS, Google's mapping of google.rpc.Code) with
{"code": "INVALID_ARGUMENT", "message": "..."}. With --tokens, the same tokens and roles
apply (gate.admit), sent as `Authorization: Bearer TOKEN`.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import ssl
import threading
from collections.abc import Iterable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, NoReturn

import grpc
import orjson
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from bitseg.index.errors import BitsegError, NotFound
from bitseg.index.exports import encode_rows
from bitseg.server.gate import SERVICE_PREFIX, Tokens, admit
from bitseg.server.service import BadRequest, PermissionDenied, SegmentsServicer, status_of
from bitseg.v1 import bitseg_pb2 as pb

log = logging.getLogger("bitseg.console")

API_PREFIX = "/api/v1/"
MAX_BODY = 16 * 1024 * 1024  # a request body beyond this is refused
STATIC_PACKAGE, STATIC_DIR = "bitseg.server", "console_static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
_C = grpc.StatusCode
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    _C.OK: 200, _C.INVALID_ARGUMENT: 400, _C.OUT_OF_RANGE: 400, _C.FAILED_PRECONDITION: 400,
    _C.UNAUTHENTICATED: 401, _C.PERMISSION_DENIED: 403, _C.NOT_FOUND: 404,
    _C.ALREADY_EXISTS: 409, _C.ABORTED: 409, _C.RESOURCE_EXHAUSTED: 429, _C.CANCELLED: 499,
    _C.UNIMPLEMENTED: 501, _C.UNAVAILABLE: 503, _C.DEADLINE_EXCEEDED: 504,
    _C.INTERNAL: 500, _C.UNKNOWN: 500, _C.DATA_LOSS: 500}


def unary_methods() -> dict[str, Any]:
    """The unary methods of the Segments service, by name (streams are gRPC's alone)."""
    service = pb.DESCRIPTOR.services_by_name["Segments"]
    return {m.name: m for m in service.methods
            if not m.client_streaming and not m.server_streaming}


class Aborted(Exception):
    """What the servicer's context.abort raises here: the call's code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class CallContext:
    """The part of grpc.ServicerContext the servicer uses, for a call made over HTTP."""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise Aborted(code, details)

    def is_active(self) -> bool:
        return True

    def time_remaining(self) -> float | None:
        return None

    def set_trailing_metadata(self, metadata: Iterable[tuple[str, str]]) -> None:
        pass


class Api:
    """Calls a servicer method with a JSON request; answers (HTTP status, JSON body)."""

    def __init__(self, servicer: SegmentsServicer, tokens: Tokens | None = None) -> None:
        self.servicer = servicer
        self.tokens = tokens
        self.methods = unary_methods()

    def call(self, name: str, body: bytes, authorization: str = "") -> tuple[int, bytes]:
        try:
            reply = self._call(name, body, authorization)
        except Aborted as exc:  # the servicer mapped it already (service.rpc)
            return _error(exc.code, str(exc))
        except Exception as exc:  # refused before the servicer: token, method, body
            code, message = status_of(exc)
            if code is grpc.StatusCode.INTERNAL:
                log.error("%s: internal error", name, exc_info=exc)
            return _error(code, message)
        return 200, orjson.dumps(json_format.MessageToDict(
            reply, preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True))

    def _call(self, name: str, body: bytes, authorization: str) -> Any:
        method = self.methods.get(name)
        if method is None:
            raise NotFound("API method", name)  # the unary RPCs of bitseg.v1.Segments
        admit(self.tokens, SERVICE_PREFIX + name,
              [("authorization", authorization)] if authorization else [])
        request = getattr(pb, method.input_type.name)()
        try:
            json_format.Parse(body or b"{}", request)
        except json_format.ParseError as exc:
            raise BadRequest(f"the body is not a {method.input_type.full_name} in JSON "
                             f"form: {exc}") from None
        return getattr(self.servicer, name)(request, CallContext())


    def export(self, body: bytes, authorization: str) -> tuple[int, Any, int]:
        """(status, the file's chunks or an error body, audience size) for POST /export."""
        try:
            admit(self.tokens, SERVICE_PREFIX + "Members",
                  [("authorization", authorization)] if authorization else [])
            asked = _export_request(body)
            as_of = Timestamp()
            as_of.GetCurrentTime()
            target = {"segment": asked["segment"]} if "segment" in asked \
                else {"rule_json": asked["rule_json"]}
            audience = orjson.loads(asked["rule_json"]) if "rule_json" in asked \
                else {"segment": asked["segment"]}
            kept = {"and": [audience, *({"field": f, "op": "exists"}
                                        for f in asked["require"])]}
            total = self.servicer.Count(pb.CountRequest(**target, as_of=as_of), CallContext())
            pages = self.servicer.Members(
                pb.MembersRequest(rule_json=orjson.dumps(kept).decode(),
                                  fields=asked["fields"], as_of=as_of), CallContext())
            first = next(pages)  # a bad field or segment fails here, before any byte
        except Aborted as exc:
            return (*_error(exc.code, str(exc)), 0)
        except Exception as exc:
            code, message = status_of(exc)
            return (*_error(code, message), 0)

        def rows() -> Iterator[dict[str, Any]]:
            for page in itertools.chain([first], pages):
                for text in page.rows_json:
                    yield orjson.loads(text)
        return 200, encode_rows(rows(), asked["fields"], asked["format"]), int(total.count)


def _export_request(body: bytes) -> dict[str, Any]:
    try:
        asked = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the export request is not JSON: {exc}") from None
    if not isinstance(asked, dict) or ("segment" in asked) == ("rule_json" in asked):
        raise BadRequest('export: give one of "segment" or "rule_json"')
    asked.setdefault("format", "csv")
    if asked["format"] not in ("csv", "jsonl"):
        raise BitsegError(f"format: expected csv or jsonl, got {asked['format']!r}")
    for key in ("fields", "require"):
        value = asked.setdefault(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadRequest(f"{key}: expected a list of field names")
    return asked


def _error(code: grpc.StatusCode, message: str) -> tuple[int, bytes]:
    return HTTP_STATUS.get(code, 500), orjson.dumps({"code": code.name, "message": message})


def static_files() -> dict[str, tuple[bytes, str]]:
    """The console's files by name: (content, content type), read once."""
    found = {}
    for entry in resources.files(STATIC_PACKAGE).joinpath(STATIC_DIR).iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in CONTENT_TYPES:
            found[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return found


class Handler(BaseHTTPRequestHandler):
    server: ConsoleServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 -- the name http.server looks for
        path = self.path.split("?", 1)[0]
        name = "index.html" if path in ("/", "/index.html") else \
            path.removeprefix("/static/") if path.startswith("/static/") else None
        found = self.server.files.get(name) if name else None
        if found is None:
            self._answer(404, b"not found\n", "text/plain; charset=utf-8")
        else:
            self._answer(200, *found)

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        refused = self._refused()
        if refused is not None:
            self.close_connection = True
            status, body = _error(*status_of(refused))
            log.info("console %s: %d %s", path, status, refused)
            self._answer(status, body, "application/json")
            return
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else b""
        if path == "/export":
            self._export(data)
            return
        if not path.startswith(API_PREFIX):
            status, body = _error(grpc.StatusCode.NOT_FOUND, f"no API at {path}; "
                                  f"POST {API_PREFIX}METHOD")
        else:
            status, body = self.server.api.call(path[len(API_PREFIX):], data,
                                                self.headers.get("Authorization", ""))
        if status >= 400:
            log.info("console %s: %d %s", path, status, body[:300].decode(errors="replace"))
        self._answer(status, body, "application/json")

    def _refused(self) -> Exception | None:
        """Why a POST is refused before it is read: a body too long or not JSON, or a
        call from another site's page. Every call must say Content-Type:
        application/json, which a page of another origin cannot send without the CORS
        preflight this server never answers; and on a loopback address the Host must be
        a loopback name, so a site's DNS name rebound to 127.0.0.1 gets nothing."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return BadRequest("Content-Length is not a number")
        if length > MAX_BODY or length < 0:
            return BadRequest(f"the body is over {MAX_BODY:,} bytes")
        kind = (self.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            return BadRequest("send the request as Content-Type: application/json")
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if self.server.loopback and not is_loopback_name(host):
            return PermissionDenied(f"Host {host!r} refused: this console answers "
                                    "127.0.0.1, localhost and ::1 only")
        return None

    def _export(self, data: bytes) -> None:
        status, body, total = self.server.api.export(data, self.headers.get("Authorization", ""))
        if status != 200:
            self._answer(status, body, "application/json")
            return
        fmt = orjson.loads(data).get("format", "csv")
        self.close_connection = True  # the file's end is the connection's: no length known
        self.send_response(200)
        self.send_header("Content-Type", "text/csv; charset=utf-8" if fmt == "csv"
                         else "application/x-ndjson")
        self.send_header("Content-Disposition", f'attachment; filename="export.{fmt}"')
        self.send_header("X-Bitseg-Audience", str(total))
        self.send_header("Connection", "close")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        for chunk in body:
            self.wfile.write(chunk)

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status, _reason(status))
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base's name
        log.debug("console %s " + format, self.address_string(), *args)


def is_loopback_name(host: str) -> bool:
    """Whether a Host header's name is this machine's loopback (localhost, 127.x, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # 499, nginx's "client closed request"
        return "Client Closed Request"


class ConsoleServer(ThreadingHTTPServer):
    """The console's HTTP server: one thread a connection, daemon threads."""

    daemon_threads = True

    def __init__(self, api: Api, host: str, port: int) -> None:
        self.api = api
        self.files = static_files()
        self.loopback = is_loopback_name(host.strip("[]"))  # then check every Host header
        super().__init__((host.strip("[]"), port), Handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def use_tls(self, cert: str, key: str) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.socket = context.wrap_socket(self.socket, server_side=True)

    def start(self) -> ConsoleServer:
        self._thread = threading.Thread(target=self.serve_forever, name="bitseg-console",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join()
