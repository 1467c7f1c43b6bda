"""Field declarations of the three collections: what type each field has."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from bitseg.index.errors import SchemaError
from bitseg.index.types import TYPES

SECTIONS = ("profiles", "events", "orders")
RESERVED = {"profiles": {"id"}, "events": {"profile", "event", "ts"},
            "orders": {"id", "profile", "ts", "items"}}


def _frozen(d: Mapping[str, str] | None = None) -> Mapping[str, str]:
    return MappingProxyType(dict(d or {}))


@dataclass(frozen=True)
class Schema:
    """Immutable: every change returns a new Schema."""

    profiles: Mapping[str, str] = field(default_factory=_frozen)
    events: Mapping[str, str] = field(default_factory=_frozen)
    orders: Mapping[str, str] = field(default_factory=_frozen)

    def section(self, name: str) -> Mapping[str, str]:
        return getattr(self, name)

    def with_fields(self, section: str, added: Mapping[str, str]) -> Schema:
        """A copy with new fields in one section (callers check they are new)."""
        merged = {**self.section(section), **added}
        return Schema(**{**self._sections(), section: _frozen(merged)})

    def declare(self, declared: Any, *, source: str = "schema") -> Schema:
        """Merge a user declaration ({"profiles": {field: type}, ...}); conflicts are errors."""
        if not isinstance(declared, dict):
            raise SchemaError(f"{source}: expected an object with keys {', '.join(SECTIONS)}")
        result = self
        for section, fields in declared.items():
            if section not in SECTIONS:
                raise SchemaError(f"{source}: unknown section {section!r} "
                                  f"(expected one of {', '.join(SECTIONS)})")
            if not isinstance(fields, dict):
                raise SchemaError(f"{source}: {section} must map field names to types")
            added = {}
            for name, type_ in fields.items():
                where = f"{source}: {section}.{name}"
                if type_ not in TYPES:
                    raise SchemaError(f"{where}: unknown type {type_!r} "
                                      f"(expected one of {', '.join(TYPES)})")
                if name in RESERVED[section] or not name:
                    raise SchemaError(f"{where}: {name!r} is a reserved name")
                known = result.section(section).get(name)
                if known is not None and known != type_:
                    raise SchemaError(f"{where}: declared {type_} but the store has it as {known}")
                added[name] = type_
            result = result.with_fields(section, added)
        return result

    def to_json(self) -> dict[str, dict[str, str]]:
        return {name: dict(fields) for name, fields in self._sections().items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Mapping[str, str]]) -> Schema:
        return cls(**{name: _frozen(data.get(name)) for name in SECTIONS})

    def _sections(self) -> dict[str, Mapping[str, str]]:
        return {name: self.section(name) for name in SECTIONS}
