"""Build step: the gRPC stubs in bitseg/v1 are generated from proto/ whenever the package is
built (wheel, sdist's wheel, `pip install .`, `pip install -e .`), so they are never committed.

Everything else about the package is declared in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build_py import build_py
from setuptools.command.egg_info import egg_info

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"
PROTOS = ("bitseg/v1/bitseg.proto",)
STUBS = ROOT / "bitseg" / "v1"


def generate_stubs() -> None:
    """Runs grpc_tools' protoc over proto/ into bitseg/v1 (the _pb2, _pb2_grpc and .pyi files)."""
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # only without build isolation, in an env lacking the dev extra
        raise SystemExit("bitseg: building needs grpcio-tools (pip install grpcio-tools)") from exc
    # protoc's own well-known types (google/protobuf/*.proto) ship inside grpc_tools.
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    STUBS.mkdir(parents=True, exist_ok=True)
    (STUBS / "__init__.py").touch()
    args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
            f"--python_out={ROOT}", f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}",
            *(str(PROTO_ROOT / name) for name in PROTOS)]
    if protoc.main(args) != 0:
        raise SystemExit(f"bitseg: protoc failed on {', '.join(PROTOS)}")


class BuildProto(Command):
    """`python setup.py build_proto`: regenerate the stubs only."""

    description = "generate the gRPC stubs in bitseg/v1 from proto/"
    user_options: list[tuple[str, str | None, str]] = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        generate_stubs()


class BuildPyWithStubs(build_py):
    """build_py (also run by editable installs) that first generates the stubs."""

    def run(self) -> None:
        generate_stubs()
        super().run()


class EggInfoWithStubs(egg_info):
    """egg_info lists the package files, so bitseg/v1 must exist before it looks."""

    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_proto": BuildProto, "build_py": BuildPyWithStubs,
                "egg_info": EggInfoWithStubs})
