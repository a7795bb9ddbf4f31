"""Reading one TOML table into a frozen settings dataclass, strictly.

`[node]` and `[orchestrator]` are read the same way: every key must be a field,
of the field's own type (an int is taken for a float, nothing else is coerced),
and an error names the file, the table and the key.
"""

from __future__ import annotations

from dataclasses import Field
from typing import Any

from cloudlet.errors import ConfigError

SCALARS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}


def typed_values(data: dict[str, Any], fields: dict[str, Field[Any]], table: str,
                 source: str, *, tables: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The table's values, checked against `fields`; keys in `tables` must be
    sub-tables (their content is the caller's to check)."""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r} in [{table}] "
                          f"(known: {', '.join(sorted(fields))})")
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in tables:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{table}.{key}] must be a table")
            values[key] = dict(value)
            continue
        want = SCALARS[str(fields[key].type)]
        if want is float and type(value) is int:
            value = float(value)
        if type(value) is not want:
            raise ConfigError(f"{source}: [{table}] {key} must be a {want.__name__}, "
                              f"got {type(value).__name__} {value!r}")
        values[key] = value
    return values
