"""Profiles as rows for export and preview: selected fields of many profiles at once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from bitseg.index import types as T
from bitseg.index.errors import BitsegError
from bitseg.index.profiles import decode_row
from bitseg.index.store import u32

if TYPE_CHECKING:
    from bitseg.index.engine import Engine


def check_fields(engine: Engine, fields: Sequence[str]) -> list[str]:
    """The requested profile fields, in order, without repeats; unknown ones are an error."""
    known = engine.schema.profiles
    out: list[str] = []
    for name in fields:
        if name == "id" or name in out:
            continue
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise BitsegError(f"fields: unknown profile field {name!r} (known fields: {listed})")
        out.append(name)
    return out


def profile_rows(engine: Engine, dense: np.ndarray,
                 fields: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """{"id": …, field: display value} per dense id, in order; `fields` None means every
    field the profile has, a list means exactly those (a missing value is None)."""
    types = engine.schema.profiles
    names = engine.ids.externals(dense)
    rows: list[dict[str, Any]] = []
    with engine.store.read() as txn:
        for external, pid in zip(names, dense.tolist(), strict=True):
            raw = engine.store.get(txn, "rows", u32(pid))
            row = decode_row(raw, types) if raw is not None else {}
            if fields is None:
                shown = {k: T.display(types[k], v) for k, v in row.items()}
            else:
                shown = {k: None if row.get(k) is None else T.display(types[k], row[k])
                         for k in fields}
            rows.append({"id": external, **shown})
    return rows
