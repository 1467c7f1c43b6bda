"""The `bitseg bulk`, `bitseg actions` and `bitseg traits` commands (issue 17): bulk
actions on the members of a rule or segment, their audit entries, computed traits."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from bitseg.server.commands import (
    EXIT_OK,
    InputError,
    _add_target,
    _print_json,
    _target,
    remote,
)

if TYPE_CHECKING:
    from bitseg.client import Client

VERBS = {"set": "set", "unset": "removed", "add": "added", "remove": "removed"}


def value_of(text: str | None) -> Any:
    """A VALUE argument: JSON when it reads as JSON (3, true, ["a"], "x"), else the text
    itself (so `DE` is the string "DE", and `'"34"'` the string "34")."""
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _show(value: Any) -> str:
    return orjson.dumps(value).decode()


@remote
def cmd_bulk(args: argparse.Namespace, client: Client) -> int:
    if args.verb == "unset" and args.value is not None:
        raise InputError("bulk unset takes a FIELD and no VALUE")
    if args.verb != "unset" and args.value is None:
        raise InputError(f"bulk {args.verb} needs a FIELD and a VALUE")
    done = client.bulk_action(args.verb, args.field, value_of(args.value), **_target(args),
                              dry_run=args.dry_run, as_of=args.as_of)
    if args.json:
        _print_json(done)
        return EXIT_OK
    what = {"set": f"{args.field} = {_show(value_of(args.value))}", "unset": args.field,
            "add": f"{_show(value_of(args.value))} to {args.field}",
            "remove": f"{_show(value_of(args.value))} from {args.field}"}[args.verb]
    if done["dry_run"]:
        print(f"dry run: {args.verb} {what} would change {done['changed']:,} of "
              f"{done['members']:,} members (nothing changed)")
    else:
        print(f"{args.verb} {what}: changed {done['changed']:,} of {done['members']:,} "
              f"members (action {done['entry']['id']})")
    return EXIT_OK


@remote
def cmd_actions(args: argparse.Namespace, client: Client) -> int:
    entries = client.actions(args.limit or 0)
    if args.json:
        _print_json(entries)
        return EXIT_OK
    for e in entries:
        target = f"segment {e['segment']}" if e["segment"] is not None else \
            f"rule {_show(e['rule']) if not isinstance(e['rule'], str) else e['rule']}"
        value = "" if e["value"] is None else " " + _show(e["value"])
        print(f"{e['id']:>4}  {e['time']}  {e['action']} {e['field']}{value}  on {target}: "
              f"{e['changed']:,} of {e['members']:,} changed")
    return EXIT_OK


@remote
def cmd_traits_refresh(args: argparse.Namespace, client: Client) -> int:
    config = None
    if args.config is not None:
        try:
            config = Path(args.config).read_text()
        except OSError as exc:
            raise InputError(f"--config {args.config}: {exc.strerror or exc}") from None
    report = client.refresh_traits(as_of=args.as_of, config=config)
    if args.json:
        _print_json(report)
        return EXIT_OK
    print(f"traits as of {report['as_of'].isoformat().replace('+00:00', 'Z')}: "
          f"{report['profiles']:,} profiles written")
    for name in sorted(report["holders"]):
        print(f"  {name:<20} {report['holders'][name]:>10,} with a value  "
              f"{report['changed'][name]:>10,} changed")
    return EXIT_OK


def register(subparsers: Any, remote_opts: argparse.ArgumentParser,
             as_of: argparse.ArgumentParser) -> None:
    bulk = subparsers.add_parser(
        "bulk", parents=[remote_opts, as_of],
        help="set, unset, add or remove a field on every member of a rule or segment",
        description="bulk set|unset|add|remove (--rule R|--segment S) FIELD [VALUE] "
        "[--dry-run]. VALUE is read as JSON when it is JSON (3, true, [\"a\"]), else as "
        "text; add and remove take one keyword of a multi-valued field.")
    bulk.add_argument("verb", choices=tuple(VERBS), metavar="set|unset|add|remove")
    bulk.add_argument("field", metavar="FIELD")
    bulk.add_argument("value", nargs="?", metavar="VALUE")
    _add_target(bulk)
    bulk.add_argument("--dry-run", action="store_true",
                      help="only count the profiles that would change")
    bulk.set_defaults(func=cmd_bulk)

    actions = subparsers.add_parser("actions", parents=[remote_opts],
                                    help="the audit entries of bulk actions, newest first")
    actions.add_argument("--limit", type=int, metavar="N", help="at most N entries")
    actions.set_defaults(func=cmd_actions)

    traits = subparsers.add_parser("traits", help="computed traits")
    verbs = traits.add_subparsers(dest="traits_action", required=True, metavar="ACTION")
    refresh = verbs.add_parser("refresh", parents=[remote_opts, as_of],
                               help="recompute the computed traits now")
    refresh.add_argument("--config", metavar="FILE",
                         help="a traits config (JSON); default: the built-in one")
    refresh.set_defaults(func=cmd_traits_refresh)
