"""What the Python client raises: one BitsegError, a subclass per gRPC status.

These are client-side classes, apart from the engine's own vocabulary
(bitseg.index.errors): the client knows the server only through its status codes and
messages. Every error keeps the status name in `code` ("NOT_FOUND", ...) and the
server's words in `message`; catch BitsegError for all of them.
"""

from __future__ import annotations

import re


class BitsegError(Exception):
    """A call failed; `code` is the gRPC status name, `message` the server's words."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


ClientError = BitsegError  # the name before typed errors; the same class


class InvalidArgumentError(BitsegError):
    """Bad input: a bad rule, data batch, cursor, as_of, name... (INVALID_ARGUMENT)."""


class InvalidRuleError(InvalidArgumentError):
    """A bad rule; `path` is the JSON path of the offending node ("$.and[1].op")."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        found = _RULE_PATH.match(message)
        self.path = found.group(1) if found else "$"


class NotFoundError(BitsegError):
    """An unknown profile or segment (NOT_FOUND)."""


class AlreadyExistsError(BitsegError):
    """A name that is taken (ALREADY_EXISTS)."""


class FailedPreconditionError(BitsegError):
    """The call does not fit the current state, e.g. deleting a segment others use."""


class UnavailableError(BitsegError):
    """The server cannot be reached, or is shutting down (UNAVAILABLE)."""


class DeadlineExceededError(BitsegError):
    """The call's timeout passed before the answer came (DEADLINE_EXCEEDED)."""


class UnauthenticatedError(BitsegError):
    """No token, or one the server does not know (UNAUTHENTICATED)."""


class PermissionDeniedError(BitsegError):
    """The token may not make this call (PERMISSION_DENIED)."""


class ResourceExhaustedError(BitsegError):
    """The server is full or busy: a full disk, too many streams (RESOURCE_EXHAUSTED)."""


class UnimplementedError(BitsegError):
    """The server does not have this call (UNIMPLEMENTED)."""


class InternalError(BitsegError):
    """The server failed unexpectedly; its log has the details (INTERNAL)."""


_BY_CODE: dict[str, type[BitsegError]] = {
    "INVALID_ARGUMENT": InvalidArgumentError,
    "NOT_FOUND": NotFoundError,
    "ALREADY_EXISTS": AlreadyExistsError,
    "FAILED_PRECONDITION": FailedPreconditionError,
    "UNAVAILABLE": UnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "UNAUTHENTICATED": UnauthenticatedError,
    "PERMISSION_DENIED": PermissionDeniedError,
    "RESOURCE_EXHAUSTED": ResourceExhaustedError,
    "UNIMPLEMENTED": UnimplementedError,
    "INTERNAL": InternalError,
}
# The server words a rule error "invalid rule: $.and[1].op: what was expected".
_RULE_PATH = re.compile(r"invalid rule: (\$\S*?):")


def error_of(code: str, message: str) -> BitsegError:
    """The error class for a status name and message (BitsegError for other codes)."""
    if code == "INVALID_ARGUMENT" and _RULE_PATH.match(message):
        return InvalidRuleError(code, message)
    return _BY_CODE.get(code, BitsegError)(code, message)
