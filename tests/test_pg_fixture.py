"""The PostgreSQL fixture the SQL-source tests stand on: a real server, a read-only role,
and an outage that can be switched on and off."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from conftest_pg import READER, find_bindir
from conftest_pg import postgres as pg_fixture  # noqa: F401  (the `postgres` fixture)
from psycopg import errors


def test_server_answers_on_its_port(postgres):
    assert postgres.sql("SELECT current_user, inet_server_port()") == [("postgres",
                                                                         postgres.port)]
    assert f"port={postgres.port}" in postgres.dsn
    assert 0 < postgres.startup_seconds < 30


def test_reader_selects_future_tables_but_cannot_write(postgres):
    # created after the role: reached through ALTER DEFAULT PRIVILEGES
    postgres.sql("CREATE TABLE fixture_vip (id text PRIMARY KEY)")
    postgres.sql("INSERT INTO fixture_vip VALUES (%s), (%s)", "u1", "ü'2")
    try:
        with psycopg.connect(postgres.readonly_dsn, autocommit=True) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (READER,)
            rows = conn.execute("SELECT id FROM fixture_vip WHERE id <> %s ORDER BY id",
                                ("x",)).fetchall()
            assert rows == [("u1",), ("ü'2",)]
            with pytest.raises(errors.ReadOnlySqlTransaction):
                conn.execute("INSERT INTO fixture_vip VALUES ('u3')")
            with pytest.raises(errors.ReadOnlySqlTransaction):
                conn.execute("WITH x AS (INSERT INTO fixture_vip VALUES ('u4') RETURNING id)"
                             " SELECT id FROM x")
            # Even with the read-only default switched off, the role has no write grant.
            conn.execute("SET default_transaction_read_only = off")
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute("INSERT INTO fixture_vip VALUES ('u5')")
        assert postgres.sql("SELECT count(*) FROM fixture_vip") == [(2,)]
    finally:
        postgres.sql("DROP TABLE fixture_vip")


def test_reader_needs_its_password(postgres):
    wrong = postgres.readonly_dsn.replace(postgres.password, "not-the-password")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5)


def test_stop_and_start_keep_port_and_data(postgres):
    postgres.sql("CREATE TABLE fixture_outage (id text)")
    postgres.sql("INSERT INTO fixture_outage VALUES ('kept')")
    port = postgres.port
    postgres.stop()
    try:
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(postgres.readonly_dsn, connect_timeout=2)
    finally:
        postgres.start()
    assert postgres.port == port
    with psycopg.connect(postgres.readonly_dsn) as conn:
        assert conn.execute("SELECT id FROM fixture_outage").fetchall() == [("kept",)]
    postgres.sql("DROP TABLE fixture_outage")


def test_missing_binaries_fail_with_the_install_hint(monkeypatch):
    monkeypatch.setattr("conftest_pg.shutil.which", lambda name: None)
    monkeypatch.setattr("conftest_pg.glob.glob", lambda pattern: [])
    with pytest.raises(pytest.fail.Exception, match="make pg"):
        find_bindir()


def test_a_killed_session_leaves_no_server(tmp_path):
    """SIGKILL skips teardown and atexit: the watchdog stops the server and removes it."""
    (tmp_path / "test_hold.py").write_text(
        "import time\n"
        "from conftest_pg import postgres as pg_fixture  # noqa: F401\n\n"
        "def test_hold(postgres):\n"
        "    print('HOLD', postgres.port, postgres.root, flush=True)\n"
        "    time.sleep(60)\n")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    session = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-s", "-p",
                                "no:cacheprovider", str(tmp_path / "test_hold.py")],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert session.stdout is not None
        line = next(line for line in session.stdout if line.startswith("HOLD"))
        _, port, root = line.split()
        dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres"
        psycopg.connect(dsn, connect_timeout=5).close()  # it is up
    finally:
        session.kill()
        session.wait()
    deadline = time.monotonic() + 15
    while Path(root).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(root).exists(), f"{root} is still there 15 s after the kill"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn, connect_timeout=2)
