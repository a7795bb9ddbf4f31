"""The resolved scenario file the orchestrator reads: what the emulation really runs.

The orchestrator builds its network (topology, latency and cost model,
workload budgets) from a scenario file exactly as the simulator does, so it must
read the scenario the emulation plays: the same file with the trace swapped in
(`--trace`), the chosen policies, every workload scaled, and every relative
path made absolute (the copy lives in a temporary directory). Written from the
original TOML tables, so keys this module does not know are carried over as they
were.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from cloudlet.fsutil import atomic_write
from cloudlet.sim.scenario import Scenario

# Keys holding paths relative to the scenario file, as (table, key).
_PATH_KEYS = (("mobility", "file"), ("topology", "file"), ("migration", "calibration"))


def resolved_tables(sc: Scenario) -> dict[str, Any]:
    """The TOML tables of `sc` (scaled already) as the emulation plays it."""
    data: dict[str, Any] = tomllib.loads(sc.path.read_text(encoding="utf-8"))
    for table, key in _PATH_KEYS:
        value = data.get(table, {}).get(key)
        if isinstance(value, str):
            p = Path(value).expanduser()
            data[table][key] = str(p if p.is_absolute() else (sc.path.parent / p).resolve())
    scen = data.setdefault("scenario", {})
    scen["name"] = sc.name
    scen["policies"] = list(sc.policies)
    if sc.mobility.model == "trace":
        assert sc.mobility.file is not None
        data["mobility"] = {"model": "trace", "file": str(sc.mobility.file.resolve()),
                            "format": sc.mobility.format, "coords": sc.mobility.coords,
                            "elements": list(sc.mobility.elements)}
        if sc.duration_s is None:
            scen.pop("duration_s", None)
        if sc.area_m is None:
            data.pop("area", None)
    data["workloads"] = [
        {**(data["workloads"][i] if i < len(data.get("workloads", [])) else {}),
         "name": w.name, "share": w.share, "memory_mib": w.memory_mib,
         "overlay_mib": w.overlay_mib, "dirty_rate_mib_s": w.dirty_rate_mib_s,
         "interaction_rate_hz": w.interaction_rate_hz, "budget_ms": w.budget_ms,
         "service_ms": w.service_ms, "jitter_ms": w.jitter_ms}
        for i, w in enumerate(sc.workloads)]
    return data


def write_resolved(sc: Scenario, factor: float, path: Path) -> Path:
    note = f"# Resolved by cloudlet emulate from {sc.path}; workloads scaled by {factor:g}.\n"
    atomic_write(path, (note + dumps(resolved_tables(sc))).encode())
    return path


def dumps(data: dict[str, Any]) -> str:
    """TOML for the shapes a scenario has: tables, arrays of tables, scalars, lists."""
    lines: list[str] = []
    _table(lines, [], data)
    return "\n".join(lines) + "\n"


def _table(lines: list[str], path: list[str], data: dict[str, Any]) -> None:
    subs: list[tuple[str, Any]] = []
    for key, value in data.items():
        tables = isinstance(value, list) and value and all(isinstance(v, dict) for v in value)
        if isinstance(value, dict) or tables:
            subs.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in subs:
        if isinstance(value, dict):
            lines.append("")
            lines.append(f"[{'.'.join(_key(k) for k in [*path, key])}]")
            _table(lines, [*path, key], value)
        else:
            for item in value:
                lines.append("")
                lines.append(f"[[{'.'.join(_key(k) for k in [*path, key])}]]")
                _table(lines, [*path, key], item)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else _value(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
