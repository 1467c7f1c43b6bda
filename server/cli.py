"""The `bitseg` command: local commands (load, gen) and the remote ones (commands.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bitseg.index.errors import BitsegError

EXIT_BAD_INPUT = 2


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"bitseg: {message}", file=sys.stderr)
    return code


def cmd_load(args: argparse.Namespace) -> int:
    if args.addr is not None:
        return _load_remote(args)
    if args.shards is not None:
        from bitseg.server.shard_store import load_sharded_command

        return load_sharded_command(args)
    from bitseg.index.engine import Engine
    from bitseg.loaders.dataset import bulk_reserve, load_dataset

    with Engine.open(args.db, bulk=bulk_reserve(args.dataset)) as engine:
        report = load_dataset(args.dataset, engine, progress=not args.quiet)
        total = engine.total()
    if args.json:
        import orjson

        print(orjson.dumps({**report.__dict__, "profiles_total": total}).decode())
    else:
        print(f"loaded {report.profiles_created:,} new and {report.profiles_updated:,} updated "
              f"profiles, {report.events:,} events, {report.orders:,} orders "
              f"in {report.seconds:.1f} s; the store holds {total:,} profiles")
    return 0


def _load_remote(args: argparse.Namespace) -> int:
    """`load --addr`: check the dataset here, then stream it to the server in batches."""
    from bitseg.client import Client, ClientError
    from bitseg.loaders.remote import RemoteLoadError, load_remote

    try:
        with Client(args.addr) as client:
            report = load_remote(args.dataset, client, batch_size=args.batch_size,
                                 progress=not args.quiet)
            total = client.count({"all": True})
    except RemoteLoadError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT if exc.code == "INVALID_ARGUMENT" else 1)
    except ClientError as exc:
        return _fail(f"{args.addr}: {exc.code}: {exc.message}", 1)
    if args.json:
        import orjson

        print(orjson.dumps({**report.__dict__, "profiles_total": total}).decode())
    else:
        print(f"loaded {report.profiles_created:,} new and {report.profiles_updated:,} updated "
              f"profiles, {report.events:,} events, {report.orders:,} orders into "
              f"{args.addr} in {report.batches:,} batches, {report.seconds:.1f} s; "
              f"the store holds {total:,} profiles")
    return 0


def cmd_gen(args: argparse.Namespace) -> int:
    from bitseg.loaders.gen import generate, parse_present

    if args.profiles < 1:
        return _fail("--profiles must be at least 1")
    try:
        present = None if args.present is None else parse_present(args.present)
    except ValueError as exc:
        return _fail(f"--present: {exc}")
    counts = generate(args.out_dir, profiles=args.profiles, seed=args.seed, as_of=present,
                      events_per_profile=args.events_per_profile,
                      orders_per_profile=args.orders_per_profile, gzip=args.gzip,
                      progress=not args.quiet)
    if args.json:
        import orjson

        print(orjson.dumps(counts).decode())
    else:
        print(", ".join(f"{n:,} {what}" for what, n in counts.items()) + f" in {args.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bitseg", description="bitseg: a bitmap-index segment server.")
    parser.add_argument("--version", action="version", version=f"bitseg {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    load = sub.add_parser("load", help="bulk-load a dataset folder into a store")
    load.add_argument("dataset", help="folder with profiles.jsonl (and schema.json, ...)")
    into = load.add_mutually_exclusive_group(required=True)
    into.add_argument("--db", help="store directory (created if missing; no server may "
                      "be serving it)")
    into.add_argument("--addr", metavar="A",
                      help="the address host:port of a running server to load through")
    load.add_argument("--batch-size", type=int, default=10_000, metavar="N",
                      help="with --addr: records per batch, each one transaction "
                      "(default 10,000)")
    load.add_argument("--shards", type=int, metavar="N",
                      help="with --db: split the dataset by profile id into N shard stores "
                      "DB/shard-0 .. DB/shard-{N-1}, loaded in parallel (see README, "
                      "Shards on Ray)")
    load.add_argument("--json", action="store_true", help="print the counts as JSON")
    load.add_argument("--quiet", action="store_true", help="no progress bar")
    load.set_defaults(func=cmd_load)

    gen = sub.add_parser("gen", help="write a synthetic dataset")
    gen.add_argument("out_dir")
    gen.add_argument("--profiles", type=int, required=True)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--events-per-profile", type=float, default=10.0)
    gen.add_argument("--orders-per-profile", type=float, default=2.0)
    gen.add_argument("--gzip", action="store_true", help="write .jsonl.gz files")
    gen.add_argument("--present", metavar="now|T",
                     help="the moment the data leads up to: 'now' or an ISO 8601 time "
                          "(default 2026-11-01T00:00:00Z, so a seed always gives the same bytes)")
    gen.add_argument("--json", action="store_true")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_gen)

    from bitseg.server import commands

    commands.register(sub)
    return parser


def _version() -> str:
    """The installed distribution's version (what pip installed), not a copy in the code."""
    from importlib import metadata

    try:
        return metadata.version("bitseg")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `bitseg`: the list of commands, as a usage error
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return args.func(args)
    except BitsegError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except OSError as exc:
        return _fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))


if __name__ == "__main__":
    sys.exit(main())
