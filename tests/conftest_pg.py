"""A real PostgreSQL server for the tests of SQL sources: initdb into a temp dir, started
on a free port of 127.0.0.1, stopped and removed at the end of the session.

Imported explicitly (not a conftest.py):
    from conftest_pg import postgres as pg_fixture  # noqa: F401  (the `postgres` fixture)
The fixture is named `postgres` whatever it is imported as; the alias keeps ruff from
reading each test's `postgres` argument as a redefinition of the import.

The binaries come from the Debian package (`make pg` installs it). Without them the
fixture fails, never skips: the SQL tests are part of `make test`.

initdb refuses to run as root, so when the tests run as root (CI does) the server runs
as the `postgres` OS user that the package creates; a developer's own user runs it
directly.
"""

from __future__ import annotations

import atexit
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

READER = "bitseg_reader"
START_SECONDS = 30
INSTALL_HINT = "run `make pg` (it installs the Debian package `postgresql`)"


def find_bindir() -> Path:
    """The folder holding initdb and pg_ctl: pg_config's, else the newest Debian one."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if found.returncode == 0:
            candidates.append(Path(found.stdout.strip()))
    # Debian keeps the server binaries off PATH, one folder per major version.
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted((Path(d) for d in debian),
                         key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0,
                         reverse=True)
    for folder in candidates:
        if (folder / "initdb").exists() and (folder / "pg_ctl").exists():
            return folder
    pytest.fail(f"PostgreSQL server binaries (initdb, pg_ctl) not found via pg_config "
                f"--bindir or in /usr/lib/postgresql/*/bin: {INSTALL_HINT}", pytrace=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Postgres:
    """One throwaway cluster. `dsn` is the superuser's, `readonly_dsn` the reader role's."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        self.root = Path(tempfile.mkdtemp(prefix="bitseg-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.password = secrets.token_hex(12)
        self.running = False
        self.startup_seconds = 0.0
        self.watchdog: subprocess.Popen[bytes] | None = None
        if self.as_root:
            # The server's user must own its data dir and reach the socket dir.
            subprocess.run(["chown", "postgres:postgres", str(self.root)], check=True,
                           capture_output=True)

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    @property
    def readonly_dsn(self) -> str:
        return (f"host=127.0.0.1 port={self.port} user={READER} password={self.password} "
                f"dbname=postgres")

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.root,
                              timeout=START_SECONDS)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}):\n"
                               f"{done.stdout}{done.stderr}{self.log_tail()}")
        return done

    def log_tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "server log:\n" + "\n".join(self.log.read_text(errors="replace")
                                           .splitlines()[-lines:])

    def init(self) -> None:
        """initdb, the test settings and the auth rules; the reader role once started."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                  "--locale=C", "--no-sync", "--auth-local=trust", "--auth-host=scram-sha-256")
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            "fsync": "off",                 # a throwaway cluster: speed over durability
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "password_encryption": "'scram-sha-256'",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n# bitseg tests\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        # Loopback only: the superuser is trusted for setup, every other role gives
        # its password, as a source's role would.
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n")

    def watch(self) -> None:
        """A detached shell that stops the server and removes its files once this process
        is gone, however it ended: atexit and fixture teardown do not run on a kill
        (pytest under `timeout`, CI stopping a run)."""
        stop = [str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data), "-m", "immediate"]
        if self.as_root:
            stop = ["runuser", "-u", "postgres", "--", *stop]
        script = ('owner=$1; dir=$2; shift 2; '
                  'while kill -0 "$owner" 2>/dev/null; do sleep 1; done; '
                  '"$@" >/dev/null 2>&1; rm -rf "$dir"')
        self.watchdog = subprocess.Popen(
            ["sh", "-c", script, "bitseg-pg-watchdog", str(os.getpid()), str(self.root),
             *stop], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)

    def start(self) -> None:
        """Start (or restart after stop()) on the same port and data dir; waits for ready."""
        started = time.perf_counter()
        self._run("pg_ctl", "start", "-D", str(self.data), "-l", str(self.log),
                  "-w", "-t", str(START_SECONDS))
        self.running = True
        self.startup_seconds = time.perf_counter() - started

    def stop(self) -> None:
        """Stop now (fast shutdown: open sessions are ended, as in an outage)."""
        if self.running:
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w",
                      "-t", str(START_SECONDS))
            self.running = False

    def create_reader(self) -> None:
        """A read-only login role with SELECT on every table of public, present and future."""
        self.sql(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
            sql.Identifier(READER), sql.Literal(self.password)))
        for statement in (
            "GRANT CONNECT ON DATABASE postgres TO {r}",
            "GRANT USAGE ON SCHEMA public TO {r}",
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO {r}",
            "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO {r}",
            "ALTER ROLE {r} SET default_transaction_read_only = on",
        ):
            self.sql(sql.SQL(statement).format(r=sql.Identifier(READER)))

    def sql(self, text: str | sql.Composable, *params: object) -> list[tuple] | None:
        """Run one statement as the superuser (autocommit); its rows if it returns any."""
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cursor = conn.execute(text, params or None)
            return cursor.fetchall() if cursor.description is not None else None

    def close(self) -> None:
        """Stop the server (immediately) and remove its files; safe to call twice."""
        if self.running:
            try:
                self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
            finally:
                self.running = False
        shutil.rmtree(self.root, ignore_errors=True)
        if self.watchdog is not None:  # nothing left for it to do
            self.watchdog.kill()
            self.watchdog.wait()
            self.watchdog = None


_shared: Postgres | None = None
_users = 0


def _open() -> Postgres:
    """The session's server, started on first use. Each test module that imports the
    fixture gets its own fixture definition, so the server itself is shared here."""
    global _shared
    if _shared is None:
        if os.geteuid() == 0 and subprocess.run(["id", "postgres"],
                                                capture_output=True).returncode != 0:
            pytest.fail(f"running as root, but there is no `postgres` OS user to run the "
                        f"server as: {INSTALL_HINT}", pytrace=False)
        server = Postgres(find_bindir())
        atexit.register(server.close)  # if the session dies before its teardown
        try:
            server.init()
            server.watch()
            server.start()
            server.create_reader()
        except BaseException:
            server.close()
            raise
        _shared = server
    elif not _shared.running:
        _shared.start()  # a test stopped it and failed before starting it again
    return _shared


@pytest.fixture(scope="session", name="postgres")
def postgres() -> Iterator[Postgres]:
    """A running PostgreSQL for the whole session (see the module docstring)."""
    global _shared, _users
    server = _open()
    _users += 1
    try:
        yield server
    finally:
        _users -= 1
        if _users == 0:
            _shared = None
            server.close()
