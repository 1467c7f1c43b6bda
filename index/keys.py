"""What every LMDB key layout shares: the separator between the parts of a name.

SEP (U+001F, the unit separator) is a control character, which no field, property or
event type name may hold (types.name_problem), so a key's parts split apart
unambiguously. Keys are bytes; names made as text (event streams) use SEP_TEXT, the
same character.
"""

from __future__ import annotations

SEP = b"\x1f"
SEP_TEXT = SEP.decode()
