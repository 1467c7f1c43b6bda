"""The remote commands of `bitseg` (CONTRACT §4): count, members, check, segments,
explain, segment ..., and serve.

Each command returns its exit status and, on failure, prints one line on stderr:
  0 success, 1 server-side failure, 2 bad input (rule, as_of, arguments),
  3 unknown profile or segment, 4 server unreachable or too slow,
  5 name already taken, 6 not supported by this server version.

`--rule R` is a path to a JSON file, `-` for stdin, or the rule's JSON text (anything
starting with `{`).  grpc is imported only when a remote command runs, so `bitseg load`
does not pay for it.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from bitseg.client import Client

DEFAULT_ADDR = "127.0.0.1:50051"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NOT_FOUND, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
EXIT_EXISTS, EXIT_UNIMPLEMENTED = 5, 6
_EXIT_OF_CODE = {
    "INVALID_ARGUMENT": EXIT_BAD_INPUT,
    "OUT_OF_RANGE": EXIT_BAD_INPUT,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "UNAVAILABLE": EXIT_UNREACHABLE,
    "DEADLINE_EXCEEDED": EXIT_UNREACHABLE,
    "ALREADY_EXISTS": EXIT_EXISTS,
    "UNIMPLEMENTED": EXIT_UNIMPLEMENTED,
}

Command = Callable[[argparse.Namespace], int]


class InputError(Exception):
    """A bad command-line input, found before calling the server."""


def _fail(message: str, status: int) -> int:
    print(f"bitseg: {' '.join(message.split())}", file=sys.stderr)
    return status


def remote(command: Callable[[argparse.Namespace, Client], int]) -> Command:
    """Run a command with a Client, turning every failure into one line and a status."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        from bitseg.client import Client, ClientError

        try:
            with Client(args.addr, timeout=args.timeout) as client:
                return command(args, client)
        except InputError as exc:
            return _fail(str(exc), EXIT_BAD_INPUT)
        except ClientError as exc:
            status = _EXIT_OF_CODE.get(exc.code, EXIT_FAILED)
            if exc.code == "UNAVAILABLE":
                return _fail(f"cannot reach the server at {args.addr}: {exc.message}", status)
            if exc.code == "DEADLINE_EXCEEDED":
                return _fail(f"the server at {args.addr} did not answer within "
                             f"{args.timeout} s", status)
            if exc.code in ("INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS",
                            "UNIMPLEMENTED"):
                return _fail(exc.message, status)
            return _fail(f"{exc.code.lower().replace('_', ' ')}: {exc.message}", status)
        except BrokenPipeError:  # `bitseg members ... | head`: the reader has had enough
            _silence_stdout()
            return EXIT_OK
    return run


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


# ------------------------------------------------------------------ inputs
def read_rule(spec: str) -> str:
    """--rule R: the JSON text of a file, of stdin (-), or R itself when it starts with {."""
    if spec == "-":
        return sys.stdin.read()
    if spec.lstrip().startswith("{"):
        return spec
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"--rule: no such file {spec!r} (give a JSON file, - for stdin, "
                         f"or the rule's JSON text)")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--rule: cannot read {spec!r}: {exc}") from None


def _target(args: argparse.Namespace) -> dict[str, Any]:
    """rule= or segment= for the client, from --rule / --segment."""
    if getattr(args, "segment", None) is not None:
        return {"segment": args.segment}
    return {"rule": read_rule(args.rule)}


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, default=str).decode() + "\n")


def _iso(moment: Any) -> str:
    return moment.isoformat().replace("+00:00", "Z")


# ------------------------------------------------------------------ evaluation
@remote
def cmd_count(args: argparse.Namespace, client: Client) -> int:
    result = client.count_result(**_target(args), as_of=args.as_of)
    if args.json:
        _print_json({"count": result.count, "eval_micros": result.eval_micros,
                     "as_of": _iso(result.as_of)})
    else:
        print(result.count)
    return EXIT_OK


@remote
def cmd_members(args: argparse.Namespace, client: Client) -> int:
    fmt = "jsonl" if args.json else args.format
    pages = client.pages(**_target(args), as_of=args.as_of, limit=args.limit,
                         page_size=args.page_size, cursor=args.cursor)
    out = sys.stdout
    if fmt == "csv":
        out.write("id\n")
    for page in pages:
        out.write(_render_ids(page.ids, fmt))
    out.flush()
    return EXIT_OK


def _render_ids(ids: list[str], fmt: str | None) -> str:
    if not ids:
        return ""
    if fmt == "jsonl":
        return "".join(orjson.dumps({"id": i}).decode() + "\n" for i in ids)
    if fmt == "csv":
        return "".join(_csv_cell(i) + "\n" for i in ids)
    return "\n".join(ids) + "\n"


def _csv_cell(text: str) -> str:
    if any(c in text for c in ',"\r\n') or text != text.strip():
        return '"' + text.replace('"', '""') + '"'
    return text


@remote
def cmd_check(args: argparse.Namespace, client: Client) -> int:
    member = client.is_member(args.profile_id, **_target(args), as_of=args.as_of)
    if args.json:
        _print_json({"profile": args.profile_id, "member": member})
    else:
        print("true" if member else "false")
    return EXIT_OK


@remote
def cmd_segments(args: argparse.Namespace, client: Client) -> int:
    names = client.segments_of(args.profile_id, as_of=args.as_of)
    if args.json:
        _print_json({"profile": args.profile_id, "segments": names})
    else:
        for name in names:
            print(name)
    return EXIT_OK


@remote
def cmd_explain(args: argparse.Namespace, client: Client) -> int:
    result = client.explain(**_target(args), as_of=args.as_of)
    if args.json:
        _print_json({"root": result["root"], "eval_micros": result["eval_micros"],
                     "as_of": _iso(result["as_of"])})
    else:
        print(result["text"])
    return EXIT_OK


# ------------------------------------------------------------------ segment management
@remote
def cmd_segment_create(args: argparse.Namespace, client: Client) -> int:
    rule = read_rule(args.rule) if args.rule is not None else None
    if args.kind != "static" and rule is None:
        raise InputError(f"segment create: a {args.kind} segment needs --rule")
    created = client.create_segment(args.name, args.kind, rule=rule, profile_ids=args.ids,
                                    as_of=args.as_of)
    _print_segment(created, args.json)
    return EXIT_OK


@remote
def cmd_segment_get(args: argparse.Namespace, client: Client) -> int:
    _print_segment(client.get_segment(args.name), args.json)
    return EXIT_OK


@remote
def cmd_segment_list(args: argparse.Namespace, client: Client) -> int:
    found = client.list_segments()
    if args.json:
        _print_json(found)
    else:
        for segment in found:
            print(f"{segment['name']}\t{segment['kind']}\t{segment['size']}")
    return EXIT_OK


@remote
def cmd_segment_delete(args: argparse.Namespace, client: Client) -> int:
    client.delete_segment(args.name)
    if args.json:
        _print_json({"deleted": args.name})
    return EXIT_OK


@remote
def cmd_segment_add(args: argparse.Namespace, client: Client) -> int:
    _print_change(client.add_to_segment(args.name, args.profile_ids), "added", args.json)
    return EXIT_OK


@remote
def cmd_segment_remove(args: argparse.Namespace, client: Client) -> int:
    _print_change(client.remove_from_segment(args.name, args.profile_ids), "removed",
                  args.json)
    return EXIT_OK


@remote
def cmd_segment_refresh(args: argparse.Namespace, client: Client) -> int:
    result = client.refresh_segment(args.name, as_of=args.as_of)
    if args.json:
        _print_json({**result, "as_of": _iso(result["as_of"])})
    else:
        print(f"{args.name}: {result['size']} members, {result['entered']} entered, "
              f"{result['exited']} exited")
    return EXIT_OK


def _print_segment(segment: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(segment)
        return
    print(f"{segment['name']}: {segment['kind']}, {segment['size']} members")
    if segment["rule"] is not None:
        print(f"rule: {orjson.dumps(segment['rule']).decode()}")


def _print_change(result: dict[str, int], verb: str, as_json: bool) -> None:
    if as_json:
        _print_json(result)
    else:
        print(f"{verb} {result['changed']}; {result['size']} members now")


# ------------------------------------------------------------------ serve
def cmd_serve(args: argparse.Namespace) -> int:
    from bitseg.server import app

    app.configure_logging()
    try:
        return app.serve(args.db, args.host, args.port, grace=args.grace)
    except OSError as exc:
        return _fail(str(exc), EXIT_FAILED)


# ------------------------------------------------------------------ the parsers
def register(subparsers: Any) -> None:
    """Add the remote commands (and serve) to the `bitseg` parser's subparsers."""
    remote_opts = argparse.ArgumentParser(add_help=False)
    remote_opts.add_argument("--addr", default=os.environ.get("BITSEG_ADDR", DEFAULT_ADDR),
                             help="server address host:port (default: $BITSEG_ADDR or "
                             f"{DEFAULT_ADDR})")
    remote_opts.add_argument("--timeout", type=float, default=30.0,
                             help="seconds to wait for an answer (default 30)")
    remote_opts.add_argument("--json", action="store_true", help="print JSON")
    as_of = argparse.ArgumentParser(add_help=False)
    as_of.add_argument("--as-of", metavar="T", help="evaluate at ISO 8601 time T (default now)")
    evaluating = [remote_opts, as_of]

    count = subparsers.add_parser("count", parents=evaluating,
                                  help="count the profiles of a rule or segment")
    _add_target(count)
    count.set_defaults(func=cmd_count)

    members = subparsers.add_parser("members", parents=evaluating,
                                    help="stream the ids of a rule's or segment's profiles")
    _add_target(members)
    members.add_argument("--limit", type=int, help="at most N ids")
    members.add_argument("--format", choices=("csv", "jsonl"),
                         help="csv (with an 'id' header) or jsonl; default: one id a line")
    members.add_argument("--page-size", type=int, help="ids per streamed page")
    members.add_argument("--cursor", help="resume after the page that carried this cursor")
    members.set_defaults(func=cmd_members)

    check = subparsers.add_parser("check", parents=evaluating,
                                  help="is a profile in a segment / does it match a rule")
    check.add_argument("profile_id")
    _add_target(check)
    check.set_defaults(func=cmd_check)

    segments = subparsers.add_parser("segments", parents=evaluating,
                                     help="the segments a profile is in")
    segments.add_argument("profile_id")
    segments.set_defaults(func=cmd_segments)

    explain = subparsers.add_parser("explain", parents=evaluating,
                                    help="a rule in plain words, with the count at every node")
    _add_target(explain)
    explain.set_defaults(func=cmd_explain)

    _register_segment(subparsers, remote_opts, as_of)

    serve = subparsers.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--db", required=True, help="store directory")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    serve.add_argument("--grace", type=float, default=10.0,
                       help="seconds calls in flight get to finish on shutdown")
    serve.set_defaults(func=cmd_serve)


def _add_target(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--rule", metavar="R",
                        help="rule: a JSON file, - for stdin, or the JSON text")
    target.add_argument("--segment", metavar="S", help="a segment name")


def _register_segment(subparsers: Any, remote_opts: argparse.ArgumentParser,
                      as_of: argparse.ArgumentParser) -> None:
    segment = subparsers.add_parser("segment", help="manage segments")
    actions = segment.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = actions.add_parser("create", parents=[remote_opts, as_of], help="create a segment")
    create.add_argument("name")
    kind = create.add_mutually_exclusive_group(required=True)
    for name in ("static", "dynamic", "materialized"):
        kind.add_argument(f"--{name}", dest="kind", action="store_const", const=name)
    create.add_argument("--rule", metavar="R", help="the rule (a static segment: its source)")
    create.add_argument("--ids", nargs="*", default=[], metavar="ID",
                        help="a static segment's initial members")
    create.set_defaults(func=cmd_segment_create)

    for action, func, text in (("get", cmd_segment_get, "show a segment"),
                               ("delete", cmd_segment_delete, "delete a segment")):
        sub = actions.add_parser(action, parents=[remote_opts], help=text)
        sub.add_argument("name")
        sub.set_defaults(func=func)

    listing = actions.add_parser("list", parents=[remote_opts], help="list the segments")
    listing.set_defaults(func=cmd_segment_list)

    for action, func, text in (("add", cmd_segment_add, "add profiles to a static segment"),
                               ("remove", cmd_segment_remove,
                                "remove profiles from a static segment")):
        sub = actions.add_parser(action, parents=[remote_opts], help=text)
        sub.add_argument("name")
        sub.add_argument("profile_ids", nargs="+", metavar="PROFILE_ID")
        sub.set_defaults(func=func)

    refresh = actions.add_parser("refresh", parents=[remote_opts, as_of],
                                 help="recount a materialized segment now")
    refresh.add_argument("name")
    refresh.set_defaults(func=cmd_segment_refresh)

