"""bitseg: a bitmap-index segment server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from bitseg.client import Client, ClientError

__all__ = ["Client", "ClientError", "__version__"]


def __getattr__(name: str) -> Any:
    # The client pulls in grpc: import it on first use, so `import bitseg` stays cheap.
    if name in ("Client", "ClientError"):
        from bitseg import client

        return getattr(client, name)
    raise AttributeError(f"module 'bitseg' has no attribute {name!r}")
