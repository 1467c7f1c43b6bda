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


def cmd_gen(args: argparse.Namespace) -> int:
    from bitseg.loaders.gen import generate

    if args.profiles < 1:
        return _fail("--profiles must be at least 1")
    counts = generate(args.out_dir, profiles=args.profiles, seed=args.seed,
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    load = sub.add_parser("load", help="bulk-load a dataset folder into a store")
    load.add_argument("dataset", help="folder with profiles.jsonl (and schema.json, ...)")
    load.add_argument("--db", required=True, help="store directory (created if missing)")
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
    gen.add_argument("--json", action="store_true")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_gen)

    from bitseg.server import commands

    commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
