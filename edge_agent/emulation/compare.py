"""The simulator against the emulation: the comparison file, its table, and the
pre-copy model against each measured migration.

`comparison.json` holds, per policy and metric, `{"sim": x, "emulated": y}`.
The migration table compares, for every live migration the emulation made, what
the pre-copy model predicts from that migration's own measured inputs (memory,
overlay, dirty rate) and the path's nominal bandwidth with the duration and
downtime measured, and summarises the errors by their 50th and 90th percentiles
(`cloudlet.placement.calibration.compare` when it is installed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cloudlet.placement import PrecopyModel
from cloudlet.sim.engine import PolicyResult

METRICS = ("within_budget", "p50_ms", "p95_ms", "migrations", "downtime_s")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, np.generic):
        return v.item()
    return v


def comparison(sim: dict[str, PolicyResult], emulated: dict[str, PolicyResult]
               ) -> dict[str, dict[str, dict[str, Any]]]:
    return {name: {m: {"sim": _clean(sim[name].summary[m]),
                       "emulated": _clean(emulated[name].summary[m])} for m in METRICS}
            for name in emulated}


def comparison_table(comp: dict[str, dict[str, dict[str, Any]]],
                     extra: dict[str, dict[str, Any]]) -> str:
    """One row per policy: each metric as sim / emulated; then lost and duplicate calls."""
    head = ("policy", "within (sim/emu)", "p50 ms", "p95 ms", "migrations", "downtime s",
            "lost", "dup")
    rows: list[tuple[str, ...]] = [head]
    for name, m in comp.items():
        rows.append((name, _pair(m, "within_budget", "pct"), _pair(m, "p50_ms", ".1f"),
                     _pair(m, "p95_ms", ".1f"), _pair(m, "migrations", "d"),
                     _pair(m, "downtime_s", ".2f"), str(extra[name].get("lost_calls", "?")),
                     str(extra[name].get("duplicate_calls", "?"))))
    return _render(rows)


def _pair(m: dict[str, dict[str, Any]], key: str, fmt: str) -> str:
    return f"{_fmt(m[key]['sim'], fmt)} / {_fmt(m[key]['emulated'], fmt)}"


def _fmt(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if fmt == "pct":
        return f"{100 * v:.1f}%"
    if fmt == "d":
        return f"{int(v)}"
    return format(v, fmt)


def _render(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0])]
                               + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def predict(records: list[dict[str, Any]], model: PrecopyModel) -> None:
    """Add `predicted_duration_s` and `predicted_downtime_s` to each record."""
    if not records:
        return
    est = model.estimate(
        np.array([r["overlay_bytes"] for r in records], dtype=np.float64),
        np.array([r["memory_bytes"] for r in records], dtype=np.float64),
        np.array([r["dirty_rate_bytes_s"] for r in records], dtype=np.float64),
        np.array([r["bandwidth_mbit_s"] for r in records], dtype=np.float64))
    for r, d, down in zip(records, est.duration_s.tolist(), est.downtime_s.tolist(),
                          strict=True):
        r["predicted_duration_s"] = d
        r["predicted_downtime_s"] = down


def calibration(records: list[dict[str, Any]], model: PrecopyModel) -> dict[str, Any]:
    """Per-migration predicted vs measured, and the errors' p50/p90."""
    try:
        from cloudlet.placement.calibration import compare  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        compare = None
    if compare is not None and records:
        got = compare(records, model)
        return dict(got) if isinstance(got, dict) else {"compare": got}
    predict(records, model)
    out: dict[str, Any] = {"migrations": len(records)}
    for what in ("duration_s", "downtime_s"):
        errs = [abs(r[f"predicted_{what}"] - r[what]) for r in records
                if r.get(what) is not None]
        rel = [abs(r[f"predicted_{what}"] - r[what]) / r[what] for r in records
               if r.get(what)]
        out[what] = {
            "abs_error_p50_s": _q(errs, 0.5), "abs_error_p90_s": _q(errs, 0.9),
            "rel_error_p50": _q(rel, 0.5), "rel_error_p90": _q(rel, 0.9)}
    return out


def _q(values: list[float], q: float) -> float | None:
    return float(np.quantile(values, q)) if values else None


def calibration_table(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    if not records:
        return "no live migrations to compare with the pre-copy model"
    head = ("vm", "source -> target", "MiB", "duration s (model/measured)",
            "downtime ms (model/measured)")
    rows: list[tuple[str, ...]] = [head]
    for r in records:
        rows.append((str(r["vm"])[:10], f"{r['source']} -> {r['target']}",
                     f"{r['wire_bytes'] / (1 << 20):.1f}",
                     f"{_fmt(r.get('predicted_duration_s'), '.2f')} / "
                     f"{_fmt(r.get('duration_s'), '.2f')}",
                     f"{_fmt(_ms(r.get('predicted_downtime_s')), '.1f')} / "
                     f"{_fmt(_ms(r.get('downtime_s')), '.1f')}"))
    lines = [_render(rows)]
    for what in ("duration_s", "downtime_s"):
        s = summary.get(what)
        if isinstance(s, dict):
            lines.append(f"{what}: error p50 {_fmt(s.get('abs_error_p50_s'), '.3f')} s "
                         f"({_fmt(s.get('rel_error_p50'), 'pct')}), p90 "
                         f"{_fmt(s.get('abs_error_p90_s'), '.3f')} s "
                         f"({_fmt(s.get('rel_error_p90'), 'pct')})")
    return "\n".join(lines)


def _ms(v: Any) -> float | None:
    return None if v is None else float(v) * 1000
