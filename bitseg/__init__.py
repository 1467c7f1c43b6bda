"""bitseg: a bitmap-index segment server."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from bitseg.client import Client
    from bitseg.errors import (
        AlreadyExistsError,
        BitsegError,
        ClientError,
        DeadlineExceededError,
        InvalidArgumentError,
        InvalidRuleError,
        NotFoundError,
        PermissionDeniedError,
        ResourceExhaustedError,
        UnauthenticatedError,
        UnavailableError,
    )

__all__ = ["AlreadyExistsError", "BitsegError", "Client", "ClientError",
           "DeadlineExceededError", "InvalidArgumentError", "InvalidRuleError",
           "NotFoundError", "PermissionDeniedError", "ResourceExhaustedError",
           "UnauthenticatedError", "UnavailableError", "__version__"]


def __getattr__(name: str) -> Any:
    # The client pulls in grpc: import it on first use, so `import bitseg` stays cheap.
    if name == "Client":
        from bitseg import client

        return client.Client
    if name in __all__:  # the client's errors: bitseg.errors, no grpc
        from bitseg import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'bitseg' has no attribute {name!r}")


def _installed_copy() -> str | None:
    """The installed bitseg package this checkout's folder hides, if there is one.

    A script run from the repo root has the root first on sys.path, so `import bitseg`
    finds this folder, which lacks the parts the install maps in (index/, server/, loaders/
    beside it, the generated v1/). An editable install maps to this very folder: nothing hidden.
    """
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    if not (here.parent / "setup.py").is_file():
        return None  # an installed copy itself, not a checkout
    for entry in sys.path:
        candidate = Path(entry or ".").resolve() / "bitseg"
        if candidate != here and (candidate / "__init__.py").is_file():
            return str(candidate)  # what `import bitseg` would find without this folder
    return None


# Hand the submodules (client, v1, index, ...) over to the installed copy, so the checkout's
# folder does not shadow what was installed.
if (_installed := _installed_copy()) is not None:
    __path__ = [_installed]
