"""One writer per store (CONTRACT §5): a second writing process is refused at open,
naming the store and the PID that holds it, and changes nothing."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import orjson
import pytest
from conftest_grpc import ServerProcess, run_cli

from bitseg.index.engine import Engine
from bitseg.index.errors import StoreError
from bitseg.index.store import LOCK_FILE, Store


def write_dataset(folder: Path, n: int, prefix: str = "p") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = (orjson.dumps({"id": f"{prefix}{i}", "n": i}) + b"\n" for i in range(n))
    (folder / "profiles.jsonl").write_bytes(b"".join(lines))
    return folder


def digest(db: Path) -> str:
    return hashlib.sha256((db / "data.mdb").read_bytes()).hexdigest()


@pytest.fixture()
def db(tmp_path: Path) -> Path:
    """A store of 50 profiles, loaded and closed."""
    path = tmp_path / "store"
    done = run_cli("load", str(write_dataset(tmp_path / "first", 50)), "--db", str(path),
                   "--quiet")
    assert done.returncode == 0, done.stderr
    return path


def test_a_second_writer_in_one_process_is_refused(db: Path) -> None:
    with Engine.open(db):
        with pytest.raises(StoreError) as refused:
            Store(db)
    message = str(refused.value)
    assert str(db) in message and f"PID {os.getpid()}" in message
    with Engine.open(db) as engine:  # released on close
        assert engine.total() == 50


def test_load_into_a_served_store_is_refused_and_changes_nothing(
        tmp_path: Path, db: Path) -> None:
    server = ServerProcess(db)
    try:
        before = run_cli("count", "--rule", '{"all": true}', "--addr", server.addr, "--json")
        assert orjson.loads(before.stdout)["count"] == 50
        second = write_dataset(tmp_path / "second", 20, prefix="q")
        done = run_cli("load", str(second), "--db", str(db), "--quiet")
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert str(db) in lines[0] and f"PID {server.proc.pid}" in lines[0]
        assert "Traceback" not in done.stderr
        after = run_cli("count", "--rule", '{"all": true}', "--addr", server.addr, "--json")
        assert orjson.loads(after.stdout)["count"] == 50
    finally:
        assert server.stop() == 0, server.stderr()
    served = digest(db)
    with Engine.open(db) as engine:
        assert engine.total() == 50
    assert digest(db) == served


def test_a_second_server_is_refused_in_one_line(db: Path) -> None:
    server = ServerProcess(db)
    try:
        done = run_cli("serve", "--db", str(db), "--port", "0", timeout=20)
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert str(db) in lines[0] and f"PID {server.proc.pid}" in lines[0]
    finally:
        assert server.stop() == 0, server.stderr()


@pytest.mark.parametrize("how", ["stop", "kill -9"])
def test_a_new_writer_opens_once_the_holder_is_gone(tmp_path: Path, db: Path,
                                                    how: str) -> None:
    server = ServerProcess(db)
    if how == "stop":
        assert server.stop() == 0, server.stderr()
    else:
        server.stop(signal.SIGKILL)  # the kernel drops the lock with the process
    assert (db / LOCK_FILE).exists()
    done = run_cli("load", str(write_dataset(tmp_path / "more", 10, prefix="m")),
                   "--db", str(db), "--quiet", "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["profiles_total"] == 60


# ------------------------------------------------------------------ serve --create
def test_serve_refuses_a_path_without_a_store(tmp_path: Path) -> None:
    typo = tmp_path / "stroe"
    done = run_cli("serve", "--db", str(typo), "--port", "0", timeout=20)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(typo) in lines[0] and "--create" in lines[0], done.stderr
    assert not typo.exists()


def test_serve_create_starts_an_empty_store(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "new")  # passes --create
    try:
        done = run_cli("count", "--rule", '{"all": true}', "--addr", server.addr, "--json")
        assert orjson.loads(done.stdout)["count"] == 0
    finally:
        assert server.stop() == 0, server.stderr()
    assert (tmp_path / "new" / "data.mdb").exists()


READER = """
import sys
from bitseg.index.engine import Engine
from bitseg.index.errors import StoreError
from bitseg.server.app import create_server
with Engine.open(sys.argv[1], readonly=True) as engine:
    server, port = create_server(engine, "127.0.0.1:0")  # declares the segment field
    server.stop(None)
    print(engine.total())
    try:
        engine.upsert_profiles([{"id": "x1", "n": 1}])
    except StoreError as exc:
        print("refused:", exc)
"""


def test_a_reader_opens_beside_the_writer_and_cannot_write(db: Path) -> None:
    """Engine.open(readonly=True) in another process takes no lock: it answers from the
    store while the writer holds it, and its writes are refused, changing nothing."""
    import subprocess
    import sys

    with Engine.open(db) as writer:
        done = subprocess.run([sys.executable, "-c", READER, str(db)], capture_output=True,
                              text=True, check=False)
        assert done.returncode == 0, done.stderr
        total, refused = done.stdout.strip().splitlines()
        assert total == "50"
        assert refused == f"refused: {db} was opened read-only; nothing was written"
        assert writer.total() == 50
        writer.upsert_profiles([{"id": "late", "n": 1}])  # the writer still writes
        assert writer.total() == 51
