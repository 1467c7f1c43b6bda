"""The remote commands of `bitseg` (CONTRACT §4): count, members, preview, check,
segments, explain, segment ..., and serve.

Each command returns its exit status and, on failure, prints one line on stderr:
  0 success, 1 server-side failure, 2 bad input (rule, as_of, arguments, or a
  segment still used by others),
  3 unknown profile or segment, 4 server unreachable or too slow,
  5 name already taken, 6 not supported by this server version, 7 no or a wrong token
  (UNAUTHENTICATED), or a read token on a write (PERMISSION_DENIED).

`--rule R` is a path to a JSON file, `-` for stdin, or the rule's JSON text (anything
starting with `{`).  grpc is imported only when a remote command runs, so `bitseg load`
does not pay for it.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import io
import os
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from bitseg.client import Client

DEFAULT_ADDR = "127.0.0.1:50051"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NOT_FOUND, EXIT_UNREACHABLE = 0, 1, 2, 3, 4
EXIT_EXISTS, EXIT_UNIMPLEMENTED, EXIT_NOT_ALLOWED = 5, 6, 7
EXIT_FALSE = 1  # `check --quiet`: the profile does not match
EXIT_QUIET_FAILED = 8  # `check --quiet`: a server-side failure (1 means false there)
_EXIT_OF_CODE = {
    "INVALID_ARGUMENT": EXIT_BAD_INPUT,
    "OUT_OF_RANGE": EXIT_BAD_INPUT,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "UNAVAILABLE": EXIT_UNREACHABLE,
    "DEADLINE_EXCEEDED": EXIT_UNREACHABLE,
    "ALREADY_EXISTS": EXIT_EXISTS,
    "FAILED_PRECONDITION": EXIT_BAD_INPUT,
    "UNIMPLEMENTED": EXIT_UNIMPLEMENTED,
    "UNAUTHENTICATED": EXIT_NOT_ALLOWED,
    "PERMISSION_DENIED": EXIT_NOT_ALLOWED,
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
        from bitseg.client import ClientError

        try:
            with connect(args) as client:
                return command(args, client)
        except InputError as exc:
            return _fail(str(exc), EXIT_BAD_INPUT)
        except ClientError as exc:
            status = _EXIT_OF_CODE.get(exc.code, EXIT_FAILED)
            if status == EXIT_FAILED and getattr(args, "quiet", False):
                status = EXIT_QUIET_FAILED
            if exc.code == "UNAVAILABLE":
                return _fail(f"cannot reach the server at {args.addr}: {exc.message}", status)
            if exc.code == "DEADLINE_EXCEEDED":
                return _fail(f"the server at {args.addr} did not answer within "
                             f"{args.timeout} s", status)
            if exc.code in ("INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS",
                            "UNIMPLEMENTED", "FAILED_PRECONDITION"):
                return _fail(exc.message, status)
            return _fail(f"{exc.code.lower().replace('_', ' ')}: {exc.message}", status)
        except BrokenPipeError:  # `bitseg members ... | head`: the reader has had enough
            _silence_stdout()
            return EXIT_OK
    return run


def connect(args: argparse.Namespace) -> Client:
    """A Client for the connection options every remote command takes: --addr, --timeout,
    --tls-ca, --token-file (or $BITSEG_TOKEN)."""
    from bitseg.client import Client

    token = os.environ.get("BITSEG_TOKEN") or None
    if getattr(args, "token_file", None):
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"--token-file: cannot read {args.token_file}: {exc}") from None
        if not token:
            raise InputError(f"--token-file: {args.token_file} is empty")
    tls_ca = getattr(args, "tls_ca", None)
    if tls_ca is not None and not Path(tls_ca).is_file():
        raise InputError(f"--tls-ca: no such file {tls_ca!r}")
    return Client(args.addr, timeout=getattr(args, "timeout", 30.0), tls_ca=tls_ca,
                  token=token)


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


def read_ids(specs: list[str]) -> list[str]:
    """--ids: each spec is a file (one id a line; CSV with an `id` column; JSON Lines with
    an "id" key, as `bitseg members` writes them), - for stdin, or comma-separated ids."""
    ids: list[str] = []
    for spec in specs:
        if spec == "-":
            ids += _ids_in(sys.stdin.read(), "")
        elif Path(spec).is_file():
            try:
                text = Path(spec).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"--ids: cannot read {spec!r}: {exc}") from None
            ids += _ids_in(text, Path(spec).suffix)
        else:
            ids += [part.strip() for part in spec.split(",") if part.strip()]
    return ids


def _ids_in(text: str, suffix: str) -> list[str]:
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    if suffix == ".jsonl" or first.startswith("{"):
        try:
            return [str(orjson.loads(line)["id"]) for line in lines if line.strip()]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"--ids: expected JSON Lines with an \"id\" key: {exc}") from None
    if suffix == ".csv" or first == "id" or first.startswith("id,"):
        rows = csv.DictReader(io.StringIO(text))
        if "id" not in (rows.fieldnames or []):
            raise InputError("--ids: a CSV file needs an 'id' column")
        return [row["id"] for row in rows if row["id"]]
    return [line.strip() for line in lines if line.strip()]


def _target(args: argparse.Namespace) -> dict[str, Any]:
    """rule= or segment= for the client, from --rule / --segment."""
    if getattr(args, "segment", None) is not None:
        return {"segment": args.segment}
    return {"rule": read_rule(args.rule)}


def _print_json(value: Any) -> None:
    sys.stdout.write(orjson.dumps(value, default=str, option=orjson.OPT_UTC_Z).decode() + "\n")


def _plain(result: Any) -> Any:
    """A client result (dataclasses) as the plain dicts and lists printed here; a
    profile as its profiles.jsonl form."""
    if hasattr(result, "as_dict"):
        return result.as_dict()
    if dataclasses.is_dataclass(result):
        return {f.name: _plain(getattr(result, f.name)) for f in dataclasses.fields(result)}
    if isinstance(result, list):
        return [_plain(item) for item in result]
    return result


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
        print(f"{result.count:,}")
    return EXIT_OK


@remote
def cmd_members(args: argparse.Namespace, client: Client) -> int:
    fmt = "jsonl" if args.json else args.format
    fields = _fields(args.fields)
    if args.preview is not None:
        return _preview(args, client, args.preview)
    pages = client.pages(**_target(args), as_of=args.as_of, limit=args.limit,
                         page_size=args.page_size, cursor=args.cursor, fields=fields)
    out = sys.stdout
    if fmt == "csv":
        out.write(",".join(_csv_cell(c) for c in ["id", *fields]) + "\n")
    for page in pages:
        if fields:
            out.write(_render_rows([r.as_dict() for r in page.rows], fields, fmt))
        else:
            out.write(_render_ids(page.ids, fmt))
    out.flush()
    return EXIT_OK


def _fields(spec: str | None) -> list[str]:
    names = [f.strip() for f in (spec or "").split(",") if f.strip()]
    return [n for n in dict.fromkeys(names) if n != "id"]


def _render_rows(rows: list[dict[str, Any]], fields: list[str], fmt: str | None) -> str:
    """Members with fields: JSON Lines, or CSV (multi-valued fields |-separated, as in
    profiles.csv; an absent value is an empty cell); plain text is tab-separated."""
    if fmt == "jsonl":
        return "".join(orjson.dumps(row).decode() + "\n" for row in rows)
    sep = "," if fmt == "csv" else "\t"
    cell = _csv_cell if fmt == "csv" else str
    return "".join(sep.join(cell(_cell_text(row.get(k))) for k in ["id", *fields]) + "\n"
                   for row in rows)


def _cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "|".join(str(v) for v in value)
    return str(value)


@remote
def cmd_preview(args: argparse.Namespace, client: Client) -> int:
    return _preview(args, client, args.limit)


def _preview(args: argparse.Namespace, client: Client, limit: int) -> int:
    result = _plain(client.preview(**_target(args), as_of=args.as_of, limit=limit))
    if args.json:
        _print_json(result)
        return EXIT_OK
    profiles = result["profiles"]
    print(f"{result['total']:,} profiles; the first {len(profiles):,}:")
    if profiles:
        print(profile_table(profiles))
    return EXIT_OK


PREVIEW_CELL = 24  # characters a preview cell shows; a longer value ends in "…"


def profile_table(profiles: list[dict[str, Any]], width: int = PREVIEW_CELL) -> str:
    """Profiles as aligned columns: id, then every field any of them has, by name; a
    multi-valued field |-separated, an absent value blank, numbers right-aligned."""
    fields = sorted({k for p in profiles for k in p} - {"id"})
    columns = ["id", *fields]
    rows = [[_clip(_cell_text(p.get(c)), width) for c in columns] for p in profiles]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(p.get(c), (int, float)) and not isinstance(p.get(c), bool)
                   for p in profiles if p.get(c) is not None) for c in columns]
    numeric[0] = False

    def line(cells: list[str]) -> str:
        return "  ".join(cell.rjust(w) if right else cell.ljust(w)
                         for cell, w, right in zip(cells, widths, numeric, strict=True)
                         ).rstrip()
    return "\n".join([line([c[:w] for c, w in zip(columns, widths, strict=True)]),
                      *(line(r) for r in rows)])


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())  # a newline or tab in a value would break the columns
    return text if len(text) <= width else text[:width - 1] + "…"


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
    if args.quiet:
        return EXIT_OK if member else EXIT_FALSE
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
def cmd_describe(args: argparse.Namespace, client: Client) -> int:
    result = _plain(client.describe(top=args.top))
    if args.json:
        _print_json(result)
        return EXIT_OK
    print(f"profiles: {result['profiles']:,}")
    for info in result["fields"]:
        print("  " + _field_line(info))
    print(f"events: {sum(e['count'] for e in result['events']):,}")
    for event in result["events"]:
        print(f"  {event['name']}: {event['count']:,} events, {event['profiles']:,} profiles")
        for info in event["properties"]:
            print("    " + _field_line(info))
    print(f"orders: {result['orders']:,}")
    for info in result["order_fields"] + result["item_fields"]:
        print("  " + _field_line(info))
    return EXIT_OK


def _field_line(info: dict[str, Any]) -> str:
    """`name (type): count` and the top values or min / quantiles / max."""
    line = f"{info['name']} ({info['type']}): {info['count']:,}"
    if info["top"]:
        shown = ", ".join(f"{v} {n:,}" for v, n in info["top"])
        more = info["distinct"] - len(info["top"])
        line += f"; {shown}" + (f", … {more:,} more" if more > 0 else "")
    elif info["min"] is not None:
        marks = " ".join(f"{q} {v}" for q, v in info["quantiles"].items())
        line += f"; min {info['min']} {marks} max {info['max']}"
    return line


@remote
def cmd_values(args: argparse.Namespace, client: Client) -> int:
    result = _plain(client.values(args.field, limit=args.limit))
    if args.json:
        _print_json(result)
        return EXIT_OK
    width = max([len(v) for v, _ in result["top"]] or [0])
    for value, n in result["top"]:
        print(f"{value:<{width}}  {n:>12,}")
    return EXIT_OK


@remote
def cmd_sources(args: argparse.Namespace, client: Client) -> int:
    found = [_plain(s) for s in client.sources()]
    if args.json:
        _print_json({"sources": found})
        return EXIT_OK
    if not found:
        print("no SQL sources (the server runs without --sources)")
    for s in found:
        state = "answers" if s["answers"] else f"does not answer: {s['error']}"
        print(f"{s['name']}  {s['host']}/{s['database']}  {state}")
    return EXIT_OK


@remote
def cmd_explain(args: argparse.Namespace, client: Client) -> int:
    result = _plain(client.explain(**_target(args), as_of=args.as_of))
    if args.json:
        _print_json({"sentence": result["sentence"], "root": result["root"],
                     "eval_micros": result["eval_micros"], "as_of": _iso(result["as_of"])})
    else:
        print(result["sentence"])
        print()
        print(result["text"])
    return EXIT_OK


# ------------------------------------------------------------------ segment management
@remote
def cmd_segment_create(args: argparse.Namespace, client: Client) -> int:
    rule = read_rule(args.rule) if args.rule is not None else None
    if rule is not None and args.from_template is not None:
        raise InputError("segment create: give --rule or --from-template, not both")
    if args.param and args.from_template is None:
        raise InputError("segment create: --param is for --from-template")
    if args.kind != "static" and rule is None and args.from_template is None:
        raise InputError(f"segment create: a {args.kind} segment needs --rule "
                         f"(or --from-template)")
    if args.kind != "static" and args.ids:
        raise InputError(f"segment create: --ids is for static segments, not {args.kind}")
    if args.refresh_every is not None and args.kind != "materialized":
        raise InputError("segment create: --refresh-every is for materialized segments")
    created = _plain(client.create_segment(args.name, args.kind, rule=rule,
                                           profile_ids=read_ids(args.ids), as_of=args.as_of,
                                           refresh_every=args.refresh_every, tags=args.tag,
                                           template=args.from_template,
                                           params=_params(args.param)))
    _print_segment(created, args.json)
    return EXIT_OK


def _params(items: list[str]) -> dict[str, str]:
    """--param k=v ... -> {k: v} (the server reads each value by the parameter's type)."""
    found: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"segment create: --param: expected NAME=VALUE, got {item!r}")
        if key in found:
            raise InputError(f"segment create: --param {key} is given twice")
        found[key] = value
    return found


@remote
def cmd_segment_tag(args: argparse.Namespace, client: Client) -> int:
    untag = args.action == "untag"
    result = _plain(client.remove_tags(args.name, args.tags) if untag
                    else client.add_tags(args.name, args.tags))
    if args.json:
        _print_json(_segment_json(result))
    else:
        print(f"{result['name']}: " + (", ".join(result["tags"]) or "no tags"))
    return EXIT_OK


@remote
def cmd_templates(args: argparse.Namespace, client: Client) -> int:
    found = _plain(client.templates())
    if args.json:
        _print_json(found)
        return EXIT_OK
    for template in found:
        mark = "" if template["builtin"] else " (user)"
        print(f"{template['name']}{mark}: {template['description']}")
        for param in template["params"]:
            low = f", at least {_number(param['min'])}" if param["min"] is not None else ""
            about = f": {param['description']}" if param["description"] else ""
            print(f"    --param {param['name']}={_param_shown(param['default'])}"
                  f"  ({param['type']}{low}){about}")
    return EXIT_OK


def _param_shown(value: Any) -> str:
    """A default as it would be typed after --param NAME=."""
    if isinstance(value, list):
        return ",".join(value)
    return orjson.dumps(value).decode() if not isinstance(value, str) else value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@remote
def cmd_segment_split(args: argparse.Namespace, client: Client) -> int:
    rule = read_rule(args.rule) if args.rule is not None else None
    made = _plain(client.split_segment(args.name, args.salt, _parts(args.into), rule=rule,
                                       prefix=args.prefix, as_of=args.as_of))
    if args.json:
        _print_json(made)
        return EXIT_OK
    for segment in made:
        sample = segment["rule"]["and"][1]["sample"]
        print(f"{segment['name']}: static, {_members(segment['size'])} "
              f"(buckets {sample['from']}-{sample['to']} % of salt {sample['salt']!r})")
    return EXIT_OK


def _parts(text: str) -> list[tuple[str, float]]:
    """--into a:45,b:45,control:10 -> [("a", 45.0), ...] (the server checks the rest)."""
    parts = []
    for item in text.split(","):
        label, _, number = item.strip().partition(":")
        try:
            parts.append((label, float(number)))
        except ValueError:
            raise InputError(f"segment split: --into: expected LABEL:PERCENT, got "
                             f"{item.strip()!r}") from None
    return parts


@remote
def cmd_segment_update(args: argparse.Namespace, client: Client) -> int:
    rule = read_rule(args.rule) if args.rule is not None else None
    every = 0 if args.no_schedule else args.refresh_every
    if rule is None and every is None:
        raise InputError("segment update: give --rule, --refresh-every or --no-schedule")
    _print_segment(_plain(client.update_segment(args.name, rule=rule, refresh_every=every,
                                                as_of=args.as_of)), args.json)
    return EXIT_OK


@remote
def cmd_segment_get(args: argparse.Namespace, client: Client) -> int:
    _print_segment(_plain(client.get_segment(args.name)), args.json)
    return EXIT_OK


@remote
def cmd_segment_list(args: argparse.Namespace, client: Client) -> int:
    found = _plain(client.list_segments(tag=args.tag))
    if args.json:
        _print_json([_segment_json(s) for s in found])
    else:
        for segment in found:
            tags = "\t" + ",".join(segment["tags"]) if segment["tags"] else ""
            print(f"{segment['name']}\t{segment['kind']}\t{segment['size']:,}{tags}")
    return EXIT_OK


@remote
def cmd_segment_delete(args: argparse.Namespace, client: Client) -> int:
    client.delete_segment(args.name)
    if args.json:
        _print_json({"deleted": args.name})
    else:
        print(f"deleted {args.name}")
    return EXIT_OK


@remote
def cmd_segment_add(args: argparse.Namespace, client: Client) -> int:
    ids = _edit_ids(args)
    _print_change(_plain(client.add_to_segment(args.name, ids)), "added", args.json)
    return EXIT_OK


@remote
def cmd_segment_remove(args: argparse.Namespace, client: Client) -> int:
    ids = _edit_ids(args)
    _print_change(_plain(client.remove_from_segment(args.name, ids)), "removed", args.json)
    return EXIT_OK


def _edit_ids(args: argparse.Namespace) -> list[str]:
    ids = list(args.profile_ids) + read_ids(args.ids)
    if not ids:
        raise InputError(f"segment {args.action}: give profile ids (or --ids FILE)")
    return ids


@remote
def cmd_segment_refresh(args: argparse.Namespace, client: Client) -> int:
    result = _plain(client.refresh_segment(args.name, as_of=args.as_of))
    if args.json:
        _print_json({**result, "as_of": _iso(result["as_of"])})
    else:
        print(f"{args.name}: {_members(result['size'])}, {result['entered']:,} entered, "
              f"{result['exited']:,} exited")
    return EXIT_OK


@remote
def cmd_segment_history(args: argparse.Namespace, client: Client) -> int:
    if args.record:
        client.record_segment_size(args.name, as_of=args.as_of)
    points = _plain(client.segment_history(args.name))
    if args.json:
        _print_json({"name": args.name, "points": points})
    else:
        if not points:
            print(f"no history points for segment {args.name}")
        for point in points:
            print(f"{_iso(point['time'])}\t{point['size']:,}\t{point['cause']}")
    return EXIT_OK


@remote
def cmd_segment_overlap(args: argparse.Namespace, client: Client) -> int:
    result = _plain(client.overlap(args.names, as_of=args.as_of))
    if args.json:
        _print_json(result)
        return EXIT_OK
    names = result["segments"]
    width = max([len("size"), *(len(n) for n in names)])
    cells = [[f"{n:,}" for n in row] for row in result["matrix"]]
    col = max([width, *(len(c) for row in cells for c in row), 4])
    print(" " * width + "".join(f"  {n:>{col}}" for n in names))
    for name, row in zip(names, cells, strict=True):
        print(f"{name:<{width}}" + "".join(f"  {c:>{col}}" for c in row))
    return EXIT_OK


@remote
def cmd_segment_metrics(args: argparse.Namespace, client: Client) -> int:
    if (args.name is None) == (args.rule is None):
        raise InputError("segment metrics: give a segment NAME or --rule R")
    target = {"segment": args.name} if args.name is not None else {"rule": read_rule(args.rule)}
    m = _plain(client.metrics(**target, as_of=args.as_of, amount_field=args.amount_field))
    if args.json:
        _print_json({k: (str(v) if v is not None and k not in ("eval_micros", "as_of")
                         and not isinstance(v, int) else v) for k, v in m.items()})
        return EXIT_OK
    print(f"profiles             {m['profiles']:,} ({_pct(m['share_of_profiles_pct'])} of "
          f"{m['total_profiles']:,})")
    print(f"customers            {m['customers']:,} (profiles with orders)")
    print(f"orders               {m['orders']:,}")
    print(f"revenue              {_money(m['revenue'])} ({_pct(m['share_of_revenue_pct'])} "
          f"of {_money(m['total_revenue'])})")
    print(f"average order value  {_money(m['average_order_value'])}")
    return EXIT_OK


# ------------------------------------------------------------------ insights, exports
@remote
def cmd_insights(args: argparse.Namespace, client: Client) -> int:
    found = client.insights(**_target(args), fields=_fields(args.fields), as_of=args.as_of,
                            top=args.top or 0, buckets=args.buckets or 0)
    if args.json:
        _print_json(found)
        return EXIT_OK
    print(f"audience {int(found['profiles']):,} of {int(found['total_profiles']):,} profiles")
    for f in found["fields"]:
        print(f"\n{f['name']} ({f['type']}): {int(f['count']):,} in the audience, "
              f"{int(f['base_count']):,} in the base")
        if f["values"]:
            print(_table(["value", "count", "share", "base share", "lift"],
                         [[_json_text(v["value_json"]), f"{int(v['count']):,}",
                           _pct_text(v["share_pct"]), _pct_text(v["base_share_pct"]),
                           _ratio_text(v["lift"])] for v in f["values"]]))
        if f["buckets"]:
            print(_table(["from", "to", "count", "base"],
                         [[b["low"], b["high"], f"{int(b['count']):,}",
                           f"{int(b['base_count']):,}"] for b in f["buckets"]]))
        if f["quantiles"]:
            marks = "  ".join(f"{q['name']} {q['value']}" for q in f["quantiles"])
            print(f"  min {f['min']}  {marks}  max {f['max']}")
    if found["events"]:
        print("\nevents (last 7 / 30 / 90 days): events, members with one")
        for e in found["events"]:
            cells = "  ".join(f"{int(w['events']):,} / {int(w['profiles']):,}"
                              for w in e["windows"])
            print(f"  {e['event']:<20} {cells}")
    o = found["orders"]
    print(f"\norders {int(o['orders']):,}, buyers {int(o['customers']):,}, revenue "
          f"{_money(_dec(o['revenue']))}, average order value "
          f"{_money(_dec(o['average_order_value']))}")
    return EXIT_OK


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                       for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                     for r in [header, *rows])


def _pct_text(text: str) -> str:
    return f"{Decimal(text):.2f}%" if text else "-"


def _dec(text: str) -> Decimal | None:
    return Decimal(text) if text else None


def _json_text(text: str) -> str:
    value = orjson.loads(text)
    return value if isinstance(value, str) else text


def _ratio_text(text: str) -> str:
    return f"{Decimal(text):.2f}" if text else "-"


@remote
def cmd_export(args: argparse.Namespace, client: Client) -> int:
    """One-off: members through the Members stream, written here (PATH.tmp, renamed)."""
    from bitseg.index.exports import encode_rows, write_atomically

    if args.action:
        return _export_schedules(args, client)
    if (args.rule is None) == (args.segment is None):
        raise InputError("export: give one of --rule R or --segment S")
    if not args.out:
        raise InputError("export: --out PATH is required")
    fields = _fields(args.fields)
    require = _fields(args.require)
    as_of = args.as_of or _iso(datetime.now(timezone.utc))
    target = _target(args)
    audience = {"segment": args.segment} if args.segment is not None \
        else orjson.loads(target["rule"])
    kept = {"and": [audience, *({"field": f, "op": "exists"} for f in require)]}
    total = client.count(**target, as_of=as_of)
    rows = (row.as_dict() for row in client.rows(fields, rule=kept, as_of=as_of))
    counted = _Counted(rows)
    write_atomically(args.out, encode_rows(counted, fields, args.format))
    print(f"{counted.n:,} of {total:,} members exported to {args.out}")
    return EXIT_OK


class _Counted:
    def __init__(self, items: Any) -> None:
        self.items, self.n = items, 0

    def __iter__(self) -> Any:
        for item in self.items:
            self.n += 1
            yield item


def _export_schedules(args: argparse.Namespace, client: Client) -> int:
    action, rest = args.action[0], args.action[1:]
    if action == "schedule" and len(rest) == 1:
        if not args.every or not args.out:
            raise InputError("export schedule SEGMENT: --every S and --out DIR are required")
        made = client.create_export_schedule(rest[0], args.every, _fields(args.fields),
                                             args.out, _fields(args.require), args.format,
                                             args.rotate)
        print(f"export schedule {made['id']}: segment {made['segment']} every "
              f"{made['every_seconds']} s to {made['out']}")
        return EXIT_OK
    if action == "schedules" and not rest:
        found = client.export_schedules()
        if args.json:
            _print_json(found)
            return EXIT_OK
        for s in found:
            last = s["last_error"] or s["last_file"] or "not run yet"
            print(f"{s['id']}  {s['segment']}  every {s['every_seconds']} s  {s['format']}  "
                  f"{'rotating' if s['rotate'] else 'numbered'}  {s['out']}  runs "
                  f"{int(s['runs'])}  last: {last}")
        return EXIT_OK
    if action == "unschedule" and len(rest) == 1 and rest[0].isdigit():
        client.delete_export_schedule(int(rest[0]))
        print(f"export schedule {rest[0]} deleted")
        return EXIT_OK
    raise InputError("export: expected `export --rule R|--segment S --out PATH`, "
                     "`export schedule SEGMENT`, `export schedules` or `export unschedule ID`")


def _money(value: Any) -> str:
    """Two decimal places (rounded half-even) for people; JSON keeps every digit."""
    from decimal import ROUND_HALF_EVEN, Decimal

    if value is None:
        return "-"
    return f"{Decimal(value).quantize(Decimal('0.01'), rounding=ROUND_HALF_EVEN):,}"


def _pct(value: Any) -> str:
    return "-" if value is None else _money(value) + "%"


def _segment_json(segment: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in segment.items() if k not in ("entered", "exited", "unknown_ids")}


def _print_segment(segment: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(segment)
        return
    line = f"{segment['name']}: {segment['kind']}, {_members(segment['size'])}"
    if segment.get("refresh_every"):
        line += f", refreshed every {segment['refresh_every']:,} s"
    print(line)
    if segment["rule"] is not None:
        print(f"rule: {orjson.dumps(segment['rule']).decode()}")
    if segment.get("tags"):
        print(f"tags: {', '.join(segment['tags'])}")
    if segment.get("entered") or segment.get("exited"):
        print(f"{segment['entered']:,} entered, {segment['exited']:,} exited")
    _print_unknown(segment.get("unknown_ids") or [])


def _print_change(result: dict[str, Any], verb: str, as_json: bool) -> None:
    if as_json:
        _print_json(result)
    else:
        print(f"{verb} {result['changed']:,}; {_members(result['size'])} now")
        _print_unknown(result.get("unknown_ids") or [])


def _members(size: int) -> str:
    return f"{size:,} member" + ("" if size == 1 else "s")


def _print_unknown(ids: list[str]) -> None:
    if ids:
        shown = ", ".join(ids[:20]) + (", ..." if len(ids) > 20 else "")
        print(f"unknown ids, ignored ({len(ids):,}): {shown}")


# ------------------------------------------------------------------ serve
def cmd_serve(args: argparse.Namespace) -> int:
    from bitseg.server import app
    from bitseg.server.gate import ConfigError, Tokens
    from bitseg.server.sources import load_sources

    sharded = args.shards is not None or args.ray_address is not None
    if not sharded and not args.create and not (Path(args.db) / "data.mdb").exists():
        return _fail(f"no bitseg store at {args.db} (load one with `bitseg load DATASET "
                     "--db DB`, or pass --create to serve a new, empty store)", EXIT_BAD_INPUT)
    taken = port_problem(args.host, args.port)
    if taken is not None:  # before gRPC tries: its own bind error adds a C-core log line
        return _fail(f"cannot listen on {args.host}:{args.port}: {taken}", EXIT_FAILED)
    if args.http is not None and args.http != 0:
        taken = port_problem(args.http_host, args.http)
        if taken is not None:
            return _fail(f"--http: cannot listen on {args.http_host}:{args.http}: {taken}",
                         EXIT_FAILED)
    app.configure_logging()
    try:
        options = app.Options(
            tokens=Tokens.load(args.tokens) if args.tokens else None,
            tls_cert=args.tls_cert, tls_key=args.tls_key, max_streams=args.max_streams,
            stream_idle=args.stream_idle, access_log=args.access_log,
            metrics_port=args.metrics_port, templates=args.templates,
            sources=load_sources(args.sources) if args.sources else None,
            traits_every=args.traits_every, traits=_traits_config(args),
            http_port=args.http, http_host=args.http_host)
        if sharded:  # README: Shards on Ray
            from bitseg.server.shard_service import serve_sharded

            return serve_sharded(args.db, args.host, args.port, args.grace, options,
                                 args.shards, args.ray_address)
        return app.serve(args.db, args.host, args.port, grace=args.grace, options=options)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except OSError as exc:
        return _fail(str(exc), EXIT_FAILED)


def _traits_config(args: argparse.Namespace) -> dict | None:
    """The --traits file's config, checked before the server starts (None: built-in)."""
    from bitseg.index.errors import BitsegError
    from bitseg.index.traits_schedule import load_config
    from bitseg.server.gate import ConfigError

    if args.traits is None:
        return None
    if args.traits_every is None:
        raise ConfigError("--traits needs --traits-every SECONDS")
    try:
        return load_config(args.traits)
    except BitsegError as exc:
        raise ConfigError(f"--traits {exc}") from None


def port_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on host:port (the port taken, an address not of
    this machine), found by binding a plain socket as gRPC would; None when it can."""
    import errno
    import socket

    if port == 0:
        return None
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"unknown host ({exc.strerror})"
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "the port is already in use (is another server running?)"
                return exc.strerror or str(exc)
    return None


# ------------------------------------------------------------------ the parsers
def register(subparsers: Any) -> None:
    """Add the remote commands (and serve) to the `bitseg` parser's subparsers."""
    remote_opts = argparse.ArgumentParser(add_help=False)
    remote_opts.add_argument("--addr", default=os.environ.get("BITSEG_ADDR", DEFAULT_ADDR),
                             help="server address host:port (default: $BITSEG_ADDR or "
                             f"{DEFAULT_ADDR})")
    remote_opts.add_argument("--timeout", type=float, default=30.0,
                             help="seconds to wait for an answer (default 30)")
    remote_opts.add_argument("--tls-ca", metavar="PEM",
                             default=os.environ.get("BITSEG_TLS_CA") or None,
                             help="connect with TLS, trusting this CA (or self-signed "
                             "certificate) file (default: $BITSEG_TLS_CA; none: plaintext)")
    remote_opts.add_argument("--token-file", metavar="FILE",
                             help="send the bearer token in FILE (default: $BITSEG_TOKEN, "
                             "the token itself)")
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
    members.add_argument("--fields", metavar="F,G",
                         help="profile fields to write with each id (comma-separated)")
    members.add_argument("--preview", type=int, metavar="N",
                         help="instead: the first N profiles with all their fields")
    members.set_defaults(func=cmd_members)

    preview = subparsers.add_parser("preview", parents=evaluating,
                                    help="the first profiles of a rule or segment, all fields")
    _add_target(preview)
    preview.add_argument("--limit", type=int, default=10, help="how many (default 10)")
    preview.set_defaults(func=cmd_preview)

    check = subparsers.add_parser("check", parents=evaluating,
                                  help="is a profile in a segment / does it match a rule")
    check.add_argument("profile_id")
    _add_target(check)
    check.add_argument("-q", "--quiet", action="store_true",
                       help="print nothing; exit 0 when it matches, 1 when not (8 for a "
                       "server-side failure; other errors as usual)")
    check.set_defaults(func=cmd_check)

    segments = subparsers.add_parser("segments", parents=evaluating,
                                     help="the segments a profile is in")
    segments.add_argument("profile_id")
    segments.set_defaults(func=cmd_segments)

    explain = subparsers.add_parser("explain", parents=evaluating,
                                    help="a rule in plain words, with the count at every node")
    _add_target(explain)
    explain.set_defaults(func=cmd_explain)

    describe = subparsers.add_parser(
        "describe", parents=[remote_opts],
        help="every field, event type and order field with counts, top values, quantiles")
    describe.add_argument("--top", type=int, default=5, metavar="N",
                          help="top values shown per keyword field (default 5)")
    describe.set_defaults(func=cmd_describe)

    sources = subparsers.add_parser(
        "sources", parents=[remote_opts],
        help="the server's SQL sources: name, host, database, whether each answers")
    sources.set_defaults(func=cmd_sources)

    values = subparsers.add_parser("values", parents=[remote_opts],
                                   help="the most common values of a keyword or bool field")
    values.add_argument("field", metavar="FIELD")
    values.add_argument("--limit", type=int, default=20, metavar="N",
                        help="how many values (default 20)")
    values.set_defaults(func=cmd_values)

    insights = subparsers.add_parser(
        "insights", parents=evaluating,
        help="field distributions, event activity and orders of a rule or segment")
    _add_target(insights)
    insights.add_argument("--fields", metavar="F,G", help="profile fields (default: all)")
    insights.add_argument("--top", type=_positive_int, help="values per keyword field (10)")
    insights.add_argument("--buckets", type=_positive_int, help="histogram buckets (10)")
    insights.set_defaults(func=cmd_insights)

    export = subparsers.add_parser(
        "export", parents=evaluating,
        help="write a rule's or segment's members to a file, or schedule exports",
        description="export (--rule R|--segment S) --fields F,G [--require F] --format "
        "csv|jsonl --out PATH | export schedule SEGMENT --every S --out DIR [...] | "
        "export schedules | export unschedule ID")
    export.add_argument("action", nargs="*", help="schedule SEGMENT | schedules | unschedule ID")
    export.add_argument("--rule", metavar="R", help="rule: a JSON file, - or the JSON text")
    export.add_argument("--segment", metavar="S", help="a segment name")
    export.add_argument("--fields", metavar="F,G", help="profile fields written after the id")
    export.add_argument("--require", metavar="F,G",
                        help="only members having every one of these fields")
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv")
    export.add_argument("--out", metavar="PATH",
                        help="the file (one-off, written here) or directory (scheduled, on "
                        "the server machine)")
    export.add_argument("--every", type=_positive_int, metavar="S", help="seconds (schedule)")
    export.add_argument("--rotate", action="store_true",
                        help="schedule: replace one file instead of numbered files")
    export.set_defaults(func=cmd_export)

    _register_segment(subparsers, remote_opts, as_of)
    from bitseg.server import bulk_cli  # bulk, actions, traits (issue 17)
    bulk_cli.register(subparsers, remote_opts, as_of)

    templates = subparsers.add_parser("templates", parents=[remote_opts],
                                      help="the segment templates, with their parameters")
    templates.set_defaults(func=cmd_templates)

    serve = subparsers.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--db", required=True, help="store directory")
    serve.add_argument("--shards", type=_positive_int, metavar="N",
                       help="serve the sharded store DB (made by `load --shards N`): one "
                       "shard in process, N > 1 as Ray actors (README: Shards on Ray)")
    serve.add_argument("--ray-address", metavar="ADDR",
                       help="with --shards: join this Ray cluster (default: a local runtime)")
    serve.add_argument("--create", action="store_true",
                       help="create an empty store when DB holds none (else refused)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    serve.add_argument("--grace", type=float, default=10.0,
                       help="seconds calls in flight get to finish on shutdown")
    serve.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate "
                       "(chain) file; needs --tls-key")
    serve.add_argument("--tls-key", metavar="PEM", help="the certificate's private key file")
    serve.add_argument("--tokens", metavar="FILE", help="bearer tokens: lines `read TOKEN` "
                       "or `write TOKEN`; without it, every caller may read and write")
    serve.add_argument("--max-streams", type=_positive_int, default=32, metavar="N",
                       help="streaming calls served at once; more get RESOURCE_EXHAUSTED "
                       "(default 32)")
    serve.add_argument("--stream-idle", type=_positive_float, default=60.0, metavar="S",
                       help="end a stream that moves no message for S seconds (default 60)")
    serve.add_argument("--access-log", action="store_true",
                       help="log one line for every call (failed calls are always logged)")
    serve.add_argument("--metrics-port", type=int, metavar="P",
                       help="serve Prometheus metrics at http://HOST:P/metrics (0: any free "
                       "port; the address is printed)")
    serve.add_argument("--sources", metavar="FILE",
                       help="SQL sources for {\"sql\": ...} rules: a JSON or TOML file of "
                       "name -> dsn or dsn_env, statement_timeout, row_limit, ttl")
    serve.add_argument("--templates", metavar="DIR",
                       help="also offer the segment templates of DIR (one JSON file each); "
                       "a bad file stops the start")
    serve.add_argument("--traits-every", type=_positive_float, metavar="S",
                       help="refresh the computed traits every S seconds at as_of = now")
    serve.add_argument("--traits", metavar="FILE",
                       help="the traits config (JSON) for --traits-every; default: the "
                       "built-in one")
    serve.add_argument("--http", type=int, metavar="PORT",
                       help="also serve the browser console and its HTTP JSON API on PORT "
                       "(0: any free port; the address is printed)")
    serve.add_argument("--http-host", default="127.0.0.1", metavar="H",
                       help="the console's address (default 127.0.0.1: this machine only)")
    serve.set_defaults(func=cmd_serve)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


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
    create.add_argument("--rule", metavar="R", help="the rule (a static segment: its source, "
                        "evaluated once at --as-of)")
    create.add_argument("--ids", nargs="+", default=[], metavar="FILE_OR_CSV",
                        help="a static segment's initial members: a file of ids (lines, CSV "
                        "with an id column, or JSON Lines), - for stdin, or id1,id2,...")
    create.add_argument("--refresh-every", type=int, metavar="S",
                        help="a materialized segment: refresh every S seconds")
    create.add_argument("--tag", action="append", default=[], metavar="T",
                        help="tag the segment with T (repeat for more)")
    create.add_argument("--from-template", metavar="T",
                        help="the rule of template T (see `bitseg templates`)")
    create.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a template parameter (repeat for more; unset ones take their "
                        "defaults); a list is a,b,c")
    create.set_defaults(func=cmd_segment_create)

    for action, text in (("tag", "add tags to a segment"),
                         ("untag", "remove tags from a segment")):
        sub = actions.add_parser(action, parents=[remote_opts], help=text)
        sub.add_argument("name")
        sub.add_argument("tags", nargs="+", metavar="TAG")
        sub.set_defaults(func=cmd_segment_tag)

    update = actions.add_parser("update", parents=[remote_opts, as_of],
                                help="change a segment's rule or refresh schedule")
    update.add_argument("name")
    update.add_argument("--rule", metavar="R", help="the new rule (a materialized segment is "
                        "recounted at once)")
    every = update.add_mutually_exclusive_group()
    every.add_argument("--refresh-every", type=int, metavar="S")
    every.add_argument("--no-schedule", action="store_true",
                       help="refresh only on request from now on")
    update.set_defaults(func=cmd_segment_update)

    split = actions.add_parser(
        "split", parents=[remote_opts, as_of],
        help="split a segment (or --rule) into disjoint static segments by sample buckets")
    split.add_argument("name", help="the segment to split (with --rule: the base name)")
    split.add_argument("--salt", required=True,
                       help="the sample salt (docs/rules.md, Random samples)")
    split.add_argument("--into", required=True, metavar="LABEL:PCT,...",
                       help="e.g. a:45,b:45,control:10: NAME-a = buckets 0-45 %%, "
                       "NAME-b = 45-90 %%, NAME-control = 90-100 %%")
    split.add_argument("--rule", metavar="R", help="split this rule instead of a segment")
    split.add_argument("--prefix", help="name the pieces PREFIX-LABEL instead of NAME-LABEL")
    split.set_defaults(func=cmd_segment_split)

    for action, func, text in (("get", cmd_segment_get, "show a segment"),
                               ("delete", cmd_segment_delete, "delete a segment")):
        sub = actions.add_parser(action, parents=[remote_opts], help=text)
        sub.add_argument("name")
        sub.set_defaults(func=func)

    listing = actions.add_parser("list", parents=[remote_opts], help="list the segments")
    listing.add_argument("--tag", metavar="T", help="only the segments tagged T")
    listing.set_defaults(func=cmd_segment_list)

    for action, func, text in (("add", cmd_segment_add, "add profiles to a static segment"),
                               ("remove", cmd_segment_remove,
                                "remove profiles from a static segment")):
        sub = actions.add_parser(action, parents=[remote_opts], help=text)
        sub.add_argument("name")
        sub.add_argument("profile_ids", nargs="*", metavar="PROFILE_ID")
        sub.add_argument("--ids", nargs="+", default=[], metavar="FILE_OR_CSV",
                         help="more ids: a file, - for stdin, or id1,id2,...")
        sub.set_defaults(func=func)

    refresh = actions.add_parser("refresh", parents=[remote_opts, as_of],
                                 help="recount a materialized segment now")
    refresh.add_argument("name")
    refresh.set_defaults(func=cmd_segment_refresh)

    history = actions.add_parser("history", parents=[remote_opts, as_of],
                                 help="a segment's size history")
    history.add_argument("name")
    history.add_argument("--record", action="store_true",
                         help="first record a point: the size now (or at --as-of)")
    history.set_defaults(func=cmd_segment_history)

    overlap = actions.add_parser("overlap", parents=[remote_opts, as_of],
                                 help="pairwise intersection sizes of segments")
    overlap.add_argument("names", nargs="+", metavar="NAME")
    overlap.set_defaults(func=cmd_segment_overlap)

    metrics = actions.add_parser("metrics", parents=[remote_opts, as_of],
                                 help="profiles, orders and revenue of a segment or rule")
    metrics.add_argument("name", nargs="?")
    metrics.add_argument("--rule", metavar="R", help="a rule instead of a segment")
    metrics.add_argument("--amount-field", default="amount",
                         help="the order field that is revenue (default amount)")
    metrics.set_defaults(func=cmd_segment_metrics)
