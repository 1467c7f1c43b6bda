"""A sharded store on disk, and `bitseg load --shards N`.

Layout of a sharded store DB:

    DB/shards.json   {"format": 1, "shards": N, "hash": "blake2b-64-mod"}
    DB/shard-0/ ... DB/shard-{N-1}/   each a complete store, as `bitseg load --db` makes

The manifest is written last, so a folder without one is not (yet) a sharded store.

Loading splits the dataset by shard (loaders/split.py) and loads every shard's part in
its own process, all at once. Into a new DB the shards load beside it (DB/.loading) and
are moved into place, with the manifest, only when every shard has loaded: a failure
leaves no sharded store at DB. Into an existing sharded DB each shard loads as
`bitseg load --db` does (each file one batch, all of it or nothing), so when one shard's
file fails the other shards may have taken theirs; the error names the shard.

The split's copies are plain JSON Lines when the disk under DB has room for them and the
stores (twice the dataset's uncompressed size free), otherwise gzip'd at level 1 (a fifth
of the size; the split then takes longer and each shard decompresses as it reads).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import orjson

from bitseg.index import errors
from bitseg.index.errors import BitsegError, DataError, StoreError
from bitseg.index.shard_key import HASH_NAME
from bitseg.index.store import bulk_space, check_space
from bitseg.loaders.dataset import RESERVE_PER_BYTE
from bitseg.loaders.split import input_bytes, original_line, shard_folder, split_dataset

log = logging.getLogger(__name__)

MANIFEST = "shards.json"
MANIFEST_FORMAT = 1
STAGING = ".loading"


@dataclass(frozen=True)
class Manifest:
    shards: int
    hash: str = HASH_NAME

    def paths(self, db: str | Path) -> list[Path]:
        return [shard_folder(db, s) for s in range(self.shards)]


def read_manifest(db: str | Path) -> Manifest | None:
    """The manifest of a sharded store; None when DB has none; StoreError when it is
    not one this version reads."""
    path = Path(db) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = orjson.loads(path.read_bytes())
        shards, hashed, fmt = data["shards"], data["hash"], data["format"]
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise StoreError(f"{path}: not a shard manifest ({exc})") from None
    if fmt != MANIFEST_FORMAT or hashed != HASH_NAME or not isinstance(shards, int) \
            or shards < 1:
        raise StoreError(f"{path}: format {fmt}, hash {hashed!r}, {shards!r} shards: not "
                         f"a manifest this version reads (format {MANIFEST_FORMAT}, "
                         f"hash {HASH_NAME!r})")
    return Manifest(shards)


def write_manifest(db: str | Path, manifest: Manifest) -> None:
    """Write the manifest atomically (a reader sees the old one or the new one)."""
    path = Path(db) / MANIFEST
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(orjson.dumps({"format": MANIFEST_FORMAT,
                                        "shards": manifest.shards,
                                        "hash": manifest.hash}))
    os.replace(temporary, path)


@dataclass
class ShardedLoad:
    """What `load --shards` did: the sums over shards, and each shard's own."""

    profiles_created: int = 0
    profiles_updated: int = 0
    events: int = 0
    orders: int = 0
    seconds: float = 0.0
    split_seconds: float = 0.0
    profiles_total: int = 0
    per_shard: list[dict[str, Any]] = field(default_factory=list)


def load_sharded(dataset: str | Path, db: str | Path, shards: int,
                 compress: bool | None = None) -> ShardedLoad:
    """Split the dataset and load it into the N shards of DB (see the module doc);
    `compress` gzips the split's copies, None decides by the free disk."""
    started = time.perf_counter()
    db = Path(db)
    existing = read_manifest(db)
    if existing is not None and existing.shards != shards:
        raise BitsegError(f"{db} holds {existing.shards} shards; load it with --shards "
                          f"{existing.shards}")
    if existing is None and (db / "data.mdb").exists():
        raise BitsegError(f"{db} is an unsharded store; load it without --shards")
    fresh = existing is None
    made_db = not db.exists()
    work = db / STAGING
    if work.exists():
        shutil.rmtree(work)  # what a load that died left behind
    split_to = work / "split"
    if compress is None:
        compress = _short_of_disk(db, input_bytes(dataset), shards)
    try:
        split = split_dataset(dataset, shards, split_to, compress)
        split_seconds = time.perf_counter() - started
        stores = [shard_folder(work if fresh else db, s) for s in range(shards)]
        reserves = [RESERVE_PER_BYTE * n for n in split.shard_bytes]  # not from .gz sizes
        # each shard's load checks the space it needs (store.check_space), but they run
        # at once: each alone would find room that the other takes
        check_space(db, sum(bulk_space(r) for r in reserves))
        results = _load_all([shard_folder(split_to, s) for s in range(shards)], stores,
                            reserves)
        failed = [(s, r) for s, r in enumerate(results) if r["ok"] is False]
        if failed:
            shard, result = failed[0]
            raise _rebuilt(result, dataset, shard, shards, fresh)
        if fresh:
            for s, store in enumerate(stores):
                os.replace(store, shard_folder(db, s))
            write_manifest(db, Manifest(shards))
    except BaseException:
        if made_db:  # a new store that failed leaves nothing behind
            shutil.rmtree(db, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = ShardedLoad(split_seconds=round(split_seconds, 3))
    for result in results:
        shard_report = result["report"]
        report.profiles_created += shard_report["profiles_created"]
        report.profiles_updated += shard_report["profiles_updated"]
        report.events += shard_report["events"]
        report.orders += shard_report["orders"]
        report.profiles_total += result["total"]
        report.per_shard.append({**shard_report, "profiles_total": result["total"]})
    report.seconds = round(time.perf_counter() - started, 3)
    return report


def _short_of_disk(db: Path, dataset_bytes: int, shards: int) -> bool:
    """Whether the disk under db lacks room for an uncompressed split (the dataset's size)
    and the space the shards' loads check for together (store.bulk_space of each one's
    reserve, see load_sharded), the dataset taken as split evenly."""
    existing = next(p for p in (db, *db.resolve().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    loads = shards * bulk_space(RESERVE_PER_BYTE * dataset_bytes // shards)
    if free >= dataset_bytes + loads:
        return False
    log.info("the split's copies are gzip'd: %.1f GB free under %s, the dataset is "
             "about %.1f GB", free / 1e9, existing, dataset_bytes / 1e9)
    return True


def _load_all(parts: list[Path], stores: list[Path], reserves: list[int]
              ) -> list[dict[str, Any]]:
    """Load every part into its store, each in its own (spawned) process, at once."""
    if len(parts) == 1:  # no process to start for one shard
        return [load_part(str(parts[0]), str(stores[0]), reserves[0])]
    with ProcessPoolExecutor(max_workers=len(parts), mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(load_part, str(p), str(s), r)
                   for p, s, r in zip(parts, stores, reserves, strict=True)]
        return [f.result() for f in futures]


def load_part(part: str, store: str, reserve: int | None = None) -> dict[str, Any]:
    """One shard's load (run in a worker process): its report, or its error as data
    (bitseg's errors do not all survive pickling with their fields). `reserve`: the
    bytes to reserve for it, by default estimated from its files' sizes."""
    from bitseg.index.engine import Engine
    from bitseg.loaders.dataset import bulk_reserve, load_dataset

    try:
        with Engine.open(store, bulk=reserve or bulk_reserve(part)) as engine:
            report = load_dataset(part, engine)
            total = engine.total()
    except BitsegError as exc:
        return {"ok": False, "kind": type(exc).__name__, "message": str(exc),
                "reason": getattr(exc, "reason", None), "field": getattr(exc, "field", None),
                "file": getattr(exc, "file", None), "line": getattr(exc, "line", None)}
    return {"ok": True, "report": {k: v for k, v in report.__dict__.items()
                                   if k != "file_seconds"}, "total": total}


def _rebuilt(result: dict[str, Any], dataset: str | Path, shard: int, shards: int,
             fresh: bool) -> BitsegError:
    """The error a shard's load reported, naming the input's line where it can."""
    kept = ("nothing was loaded into any shard" if fresh
            else "other shards may have loaded their part of the file")
    if result["kind"] == "DataError" and result["file"] and result["line"]:
        found = original_line(dataset, shard, shards, result["file"], result["line"])
        if found is not None:
            return DataError(f"{result['reason']} (shard {shard}; {kept})",
                             field=result["field"], file=found[0], line=found[1])
    kind = getattr(errors, result["kind"], BitsegError)
    message = f"shard {shard}: {result['message']} ({kept})"
    if kind is DataError:
        return DataError(message)
    made = kind.__new__(kind)  # not every error's __init__ takes one message
    Exception.__init__(made, message)
    return made


def load_sharded_command(args: Any) -> int:
    """`bitseg load DATASET --db DB --shards N`: load, then print what was loaded."""
    import sys

    if args.db is None:
        print("bitseg: --shards goes with --db (a server loads through its own shards)",
              file=sys.stderr)
        return 2
    if args.shards < 1:
        print("bitseg: --shards must be at least 1", file=sys.stderr)
        return 2
    report = load_sharded(args.dataset, args.db, args.shards)
    if args.json:
        print(orjson.dumps(report.__dict__).decode())
    else:
        print(f"loaded {report.profiles_created:,} new and {report.profiles_updated:,} "
              f"updated profiles, {report.events:,} events, {report.orders:,} orders into "
              f"{args.shards} shards in {report.seconds:.1f} s (split {report.split_seconds:.1f}"
              f" s); the store holds {report.profiles_total:,} profiles")
    return 0
