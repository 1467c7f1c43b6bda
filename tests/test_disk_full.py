"""A full disk: `bitseg load` fails whole with a message (no SIGBUS), and a server answers
RESOURCE_EXHAUSTED "store is full" to a write that does not fit, and goes on reading.

Run on real small tmpfs mounts: the tests run as root (as CI does). Where mounting is not
allowed they fail, saying why, rather than skip: a missing piece must be seen."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from conftest_grpc import ServerProcess, run_cli

from bitseg.client import Client, ClientError


def small_fs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here (these tests need root): "
                    f"{mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture()
def tiny(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB file system."""
    yield from small_fs(tmp_path / "tiny", "16m")


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    lines = (orjson.dumps({"id": f"p{i}", "n": i, "t": "x" * 200}) + b"\n" for i in range(2000))
    (folder / "profiles.jsonl").write_bytes(b"".join(lines))
    return folder


def test_load_on_a_full_disk_fails_whole_with_a_message(tiny: Path, data: Path) -> None:
    store = tiny / "store"
    done = run_cli("load", str(data), "--db", str(store), "--quiet")
    assert done.returncode == 2, (done.returncode, done.stderr)  # not -7 / 135: no SIGBUS
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(store) in lines[0] and "needs" in lines[0] and "MiB free" in lines[0] \
        and "has" in lines[0], lines[0]
    assert not store.exists()  # nothing was created


def test_load_on_a_full_disk_leaves_an_existing_store_unchanged(
        tmp_path: Path, data: Path) -> None:
    for fs in small_fs(tmp_path / "fs", "80m"):
        store = fs / "store"
        first = tmp_path / "first"
        first.mkdir()
        (first / "profiles.jsonl").write_bytes(b'{"id": "a", "n": 1}\n')
        done = run_cli("load", str(first), "--db", str(store), "--quiet")
        assert done.returncode == 0, done.stderr
        before = hashlib.sha256((store / "data.mdb").read_bytes()).hexdigest()
        (fs / "ballast").write_bytes(b"\0" * (60 << 20))  # leaves less than a reserve
        done = run_cli("load", str(data), "--db", str(store), "--quiet")
        assert done.returncode == 2 and "not enough disk space" in done.stderr, done.stderr
        assert hashlib.sha256((store / "data.mdb").read_bytes()).hexdigest() == before


def test_server_answers_resource_exhausted_and_keeps_reading(tmp_path: Path) -> None:
    for fs in small_fs(tmp_path / "fs", "2m"):
        server = ServerProcess(fs / "store")
        try:
            with Client(server.addr, timeout=10) as client:
                client.upsert_profiles([{"id": f"p{i}", "n": i} for i in range(10)])
                big = [{"id": f"q{i}", "t": f"{i}" + "y" * 4000} for i in range(1000)]
                with pytest.raises(ClientError) as full:
                    client.upsert_profiles(big, batch_size=1000)
                assert full.value.code == "RESOURCE_EXHAUSTED", full.value
                assert full.value.message.startswith("store is full"), full.value.message
                assert client.count({"all": True}) == 10
                assert client.count({"field": "n", "op": "gte", "value": 5}) == 5
                assert client.health() == "SERVING"
        finally:
            assert server.stop() == 0, server.stderr()


def test_a_sharded_load_checks_the_space_its_shards_take_together(tmp_path: Path,
                                                                  data: Path) -> None:
    """`load --shards 2` loads its shards at once, each in its own process, and each
    checks for its own space (twice its part and 64 MiB): on 100 MiB, each alone fits and
    both do not. Before they start, the load checks for both: it fails whole with one
    line, exit status 2, and leaves no store (the split it made is gone too)."""
    for fs in small_fs(tmp_path / "fs", "100m"):
        db = fs / "sharded"
        done = run_cli("load", str(data), "--db", str(db), "--shards", "2", "--quiet")
        assert done.returncode == 2, (done.returncode, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "not enough disk space" in lines[0] and str(db) in lines[0] \
            and "MiB free" in lines[0], lines[0]
        assert not db.exists() and list(fs.iterdir()) == []
