"""The documentation's examples, run: every ```console block of README.md and docs/*.md.

A console block is a shell session: a line starting with `$ ` is a command (continued on
the next lines while a quote is open or the line ends with a backslash), and the lines up to
the next command are what it prints, stdout and stderr together. In the expected text `…`
stands for any text within its line, and a line holding only `…` for any number of lines.

The commands run with bash in a folder holding the demo dataset `data/` (what
`bitseg gen data --profiles 2000 --seed 7 --present 2026-11-29T12:00:00Z` writes), with
`bitseg` on PATH and BITSEG_ADDR naming a server on that data, loaded into `store/`. The
server's clock is held at the dataset's present, so "now" in a rule is the same moment on
every run and the printed numbers can be compared exactly. The blocks run in file order and
share the server and the folder, as a reader typing them one after another would.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest_grpc import READY, START_SECONDS, bitseg_command

ROOT = Path(__file__).resolve().parent.parent
DOCS = (ROOT / "README.md", ROOT / "docs" / "data-format.md", ROOT / "docs" / "rules.md")
PRESENT = "2026-11-29T12:00:00Z"
DEMO = ("gen", "data", "--profiles", "2000", "--seed", "7", "--present", PRESENT, "--quiet")

# `bitseg serve` with the server's clock held at PRESENT (the one thing the test changes).
FROZEN_SERVE = f"""
import sys
from datetime import datetime
from bitseg.server import convert
convert.now = lambda: datetime.fromisoformat({PRESENT.replace("Z", "+00:00")!r})
from bitseg.server.cli import main
sys.exit(main(["serve", *sys.argv[1:]]))
"""


@dataclass(frozen=True)
class Example:
    source: str  # file:line of the command
    command: str
    expected: str


def _complete(command: str) -> bool:
    """Whether a shell command is whole: no quote left open, no trailing backslash."""
    if command.endswith("\\"):
        return False
    try:
        shlex.split(command, comments=True)
    except ValueError:  # "No closing quotation"
        return False
    return True


def examples(path: Path) -> Iterator[Example]:
    """The commands of every ```console block in path, with the output each shows."""
    lines = path.read_text(encoding="utf-8").splitlines()
    number = 0
    while number < len(lines):
        if lines[number].strip() != "```console":
            number += 1
            continue
        end = lines.index("```", number + 1)
        block, first = lines[number + 1:end], number + 2
        at = 0
        while at < len(block):
            line = block[at]
            assert line.startswith("$ "), f"{path.name}:{first + at}: expected a `$ ` command"
            start, command = first + at, line[2:]
            at += 1
            while not _complete(command):
                command += "\n" + block[at]
                at += 1
            output = []
            while at < len(block) and not block[at].startswith("$ "):
                output.append(block[at])
                at += 1
            yield Example(f"{path.relative_to(ROOT)}:{start}", command,
                          "".join(out + "\n" for out in output))
        number = end + 1


def pattern(expected: str) -> re.Pattern[str]:
    """The expected text as a regex: `…` is any text in a line; a lone `…` any lines."""
    parts = []
    for line in expected.splitlines():
        if line == "…":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append(r"[^\n]*".join(re.escape(p) for p in line.split("…")) + r"\n")
    return re.compile("".join(parts))


pytestmark = pytest.mark.slow  # one `bitseg` process per example: about 20 s in all

ALL = [example for doc in DOCS for example in examples(doc)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The folder the commands run in, and their environment."""
    home = tmp_path_factory.mktemp("demo")
    bitseg = bitseg_command()
    subprocess.run([*bitseg, *DEMO], cwd=home, check=True, timeout=120)
    subprocess.run([*bitseg, "load", "data", "--db", "store", "--quiet"], cwd=home, check=True,
                   capture_output=True, timeout=120)
    log = open(home / "serve.log", "w+")  # a file: the server may log every call
    server = subprocess.Popen([sys.executable, "-c", FROZEN_SERVE, "--db", "store",
                               "--host", "127.0.0.1", "--port", "0"], cwd=home,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    try:
        addr = _wait_ready(server, home / "serve.log")
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, "BITSEG_ADDR": addr, "PATH": bin_dir + os.pathsep
               + os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8", "COLUMNS": "100"}
        yield {"cwd": str(home), **env}
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def _wait_ready(server: subprocess.Popen[bytes], log: Path) -> str:
    """Where the server listens (port 0: the kernel chose), from its ready line."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            found = READY.match(line)
            if found:
                return f"{found.group(1)}:{found.group(2)}"
        if server.poll() is not None:
            break
        time.sleep(0.05)
    server.kill()
    raise RuntimeError(f"the server did not start ({server.wait()}):\n" + log.read_text())


def test_the_docs_have_console_examples() -> None:
    sources = {example.source.split(":")[0] for example in ALL}
    assert sources == {"README.md", "docs/data-format.md", "docs/rules.md"}


def test_the_server_clock_is_held_at_the_present(demo: dict[str, str]) -> None:
    env = dict(demo)
    cwd = env.pop("cwd")
    done = subprocess.run(["bitseg", "count", "--json", "--rule", '{"all": true}'], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)
    assert f'"as_of":"{PRESENT}"' in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("example", ALL, ids=[example.source for example in ALL])
def test_example_prints_what_the_docs_show(example: Example, demo: dict[str, str]) -> None:
    env = dict(demo)
    cwd = env.pop("cwd")
    done = subprocess.run(["bash", "-c", "exec 2>&1\n" + example.command], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)
    assert pattern(example.expected).fullmatch(done.stdout), (
        f"{example.source}: $ {example.command}\n--- the docs show:\n{example.expected}"
        f"--- it printed:\n{done.stdout}{done.stderr}")
