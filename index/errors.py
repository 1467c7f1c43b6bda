"""The one error vocabulary of bitseg; server/ maps each class to a gRPC status."""

from __future__ import annotations


class BitsegError(Exception):
    """Base of every error bitseg raises on purpose."""


class RuleError(BitsegError):
    """A rule is malformed; `path` is the JSON path of the offending node ($.and[1].op)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.reason = message


class NotFound(BitsegError):
    """An unknown segment or profile."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} not found")
        self.kind = kind
        self.name = name


class AlreadyExists(BitsegError):
    """A name that must be unique is taken."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} already exists")
        self.kind = kind
        self.name = name


class DataError(BitsegError):
    """A record that does not fit the schema; names where it came from when known."""

    def __init__(
        self, message: str, *, field: str | None = None, file: str | None = None,
        line: int | None = None,
    ) -> None:
        self.reason = message
        self.field = field
        self.file = file
        self.line = line
        super().__init__(self._render())

    def located(self, file: str | None, line: int | None) -> DataError:
        """The same error, with the file and line it came from."""
        return DataError(self.reason, field=self.field, file=file, line=line)

    def _render(self) -> str:
        where = []
        if self.file is not None:
            where.append(self.file)
        if self.line is not None:
            where.append(f"line {self.line}" if self.file is not None else f"record {self.line}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason


class SchemaError(BitsegError):
    """A schema declaration that is malformed or contradicts the stored one."""


class StoreError(BitsegError):
    """The store cannot be opened or is not a bitseg store."""


class StoreFull(StoreError):
    """The disk (or a bulk load's reserved space) has no room for a write; nothing of
    it was applied."""


class PartUnavailable(Exception):
    """A part of a sharded store did not answer (a shard's process died): neither the
    caller's fault nor a bug, and asked again later it may answer. Not a BitsegError:
    nothing about the request is wrong."""


class SourceUnavailable(BitsegError):
    """An external SQL source (a {"sql": ...} rule's) does not answer; names the source."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"source {source!r} is unavailable: {reason}")
        self.source = source
        self.reason = reason
