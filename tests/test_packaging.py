"""The package as a user gets it: built from a clean copy of the checkout (no generated stubs),
installed as a wheel into a fresh venv, then run.

The build is the real one (`python -m build`, isolated: pip fetches setuptools and grpcio-tools
from the index as build-system.requires says), so this test needs the package index. To stay
quick, the fresh venv borrows the test venv's installed dependencies through a .pth file
instead of downloading them again; the wheel itself goes in with `pip install --no-deps`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What a fresh clone does not have: generated, installed or local state.
NOT_IN_A_CLONE = (".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", "demo",
                  ".pytest_cache", ".hypothesis", ".benchmarks", ".bench-data", ".ruff_cache",
                  "v1")  # bitseg/v1: the stubs (proto/bitseg/v1 is kept below)


def _clean_copy(dest: Path) -> Path:
    """The checkout's sources as a fresh clone has them: proto/, no bitseg/v1 stubs."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*NOT_IN_A_CLONE), symlinks=True)
    shutil.copytree(ROOT / "proto" / "bitseg" / "v1", dest / "proto" / "bitseg" / "v1")
    assert not (dest / "bitseg" / "v1").exists()
    return dest


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `python -m build` makes from a clean copy (sdist first, the wheel from it)."""
    src = _clean_copy(tmp_path_factory.mktemp("clone") / "bitseg")
    out = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--outdir", out, src)
    (built,) = out.glob("bitseg-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no pip of its own) holding the wheel; dependencies borrowed, see above."""
    home = tmp_path_factory.mktemp("venv")
    _run(sys.executable, "-m", "venv", "--without-pip", home)
    python = home / "bin" / "python"
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    (Path(purelib.stdout.strip()) / "borrowed-deps.pth").write_text(
        sysconfig.get_path("purelib") + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
         wheel)
    return home


@pytest.mark.slow
def test_the_wheel_carries_the_generated_stubs_and_the_license(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for stub in ("bitseg_pb2.py", "bitseg_pb2_grpc.py", "bitseg_pb2.pyi", "__init__.py"):
        assert f"bitseg/v1/{stub}" in names
    for package in ("index", "server", "loaders"):
        assert f"bitseg/{package}/__init__.py" in names
    shipped = sorted(p.name for p in (Path(__file__).parents[1] / "server" / "console_static")
                     .iterdir())
    assert shipped and all(f"bitseg/server/console_static/{name}" in names for name in shipped)
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in names)


@pytest.mark.slow
def test_the_installed_command_works(venv: Path, tmp_path: Path) -> None:
    bitseg = venv / "bin" / "bitseg"
    assert _run(bitseg, "--version").stdout == "bitseg 0.1.0\n"
    _run(bitseg, "gen", tmp_path / "data", "--profiles", "300", "--seed", "1", "--quiet")
    loaded = _run(bitseg, "load", tmp_path / "data", "--db", tmp_path / "store", "--quiet")
    assert "the store holds 300 profiles" in loaded.stdout


@pytest.mark.slow
def test_a_script_in_the_repo_root_uses_the_installed_package(venv: Path, tmp_path: Path
                                                              ) -> None:
    # The checkout's own bitseg/ folder comes first on sys.path for a script in the repo root;
    # it must not hide the installed package (the checkout has no index/ or stubs under it).
    repo = _clean_copy(tmp_path / "checkout")
    (repo / "where.py").write_text(
        "import bitseg.index.engine, bitseg.v1.bitseg_pb2\n"
        "from bitseg import Client\n"
        "print(bitseg.index.engine.__file__)\n"
        "print(bitseg.v1.bitseg_pb2.__file__)\n")
    done = _run(venv / "bin" / "python", "where.py", cwd=repo)
    site = str(venv.resolve())
    assert [line.startswith(site) for line in done.stdout.splitlines()] == [True, True]


def test_bare_bitseg_lists_the_commands_and_exits_2() -> None:
    done = subprocess.run([sys.executable, "-m", "bitseg.server.cli"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stdout == ""
    for command in ("load", "gen", "serve", "count", "members", "segment"):
        assert f"\n    {command} " in done.stderr


def test_version_comes_from_the_installed_metadata() -> None:
    from importlib import metadata

    done = subprocess.run([sys.executable, "-m", "bitseg.server.cli", "--version"],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"bitseg {metadata.version('bitseg')}\n")
