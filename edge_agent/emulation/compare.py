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

from cloudlet.errors import InvalidArgument
from cloudlet.placement import PrecopyModel
from cloudlet.placement.calibration import MigrationRecord, compare
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


def source_sharing(records: list[dict[str, Any]], samples: int = 50) -> None:
    """Set each record's `source_sharing`: how many migrations left its source at
    once, averaged over its own time (`t_s` is when it ended). The cost model
    shares the source's send work between them, as the simulator does."""
    spans: list[tuple[float, float] | None] = []
    for r in records:
        end, dur = r.get("t_s"), r.get("duration_s")
        if isinstance(end, int | float) and isinstance(dur, int | float) and dur > 0:
            spans.append((float(end) - float(dur), float(end)))
        else:
            spans.append(None)
    for r, span in zip(records, spans, strict=True):
        if span is None:
            continue
        at = [span[0] + (k + 0.5) * (span[1] - span[0]) / samples for k in range(samples)]
        counts = [sum(1 for o, s in zip(records, spans, strict=True) if s is not None
                      and o.get("source") == r.get("source") and s[0] <= t < s[1])
                  for t in at]
        r["source_sharing"] = max(1.0, sum(counts) / samples)


def calibration(records: list[dict[str, Any]], model: PrecopyModel) -> dict[str, Any]:
    """Per-migration predicted vs measured (added to each record as `predicted_*`),
    and the relative errors' p50/p90 (cloudlet.placement.calibration.compare)."""
    source_sharing(records)
    usable = []
    for r in records:
        try:
            MigrationRecord.from_dict(r)
        except InvalidArgument:
            continue
        usable.append(r)
    out: dict[str, Any] = {"migrations": len(records), "compared": len(usable)}
    if not usable:
        return out
    comp = compare(usable, model)
    for r, d, down in zip(usable, comp.predicted_duration_s.tolist(),
                          comp.predicted_downtime_s.tolist(), strict=True):
        r["predicted_duration_s"] = d
        r["predicted_downtime_s"] = down
    for which in ("duration", "downtime", "wire_bytes"):
        out[f"{which}_error_p50"] = _clean(comp.p(which, 50))
        out[f"{which}_error_p90"] = _clean(comp.p(which, 90))
    return out


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
    for which in ("duration", "downtime"):
        lines.append(f"{which}: |relative error| p50 "
                     f"{_fmt(summary.get(f'{which}_error_p50'), 'pct')}, p90 "
                     f"{_fmt(summary.get(f'{which}_error_p90'), 'pct')} "
                     f"({summary.get('compared', 0)} migrations)")
    return "\n".join(lines)


def _ms(v: Any) -> float | None:
    return None if v is None else float(v) * 1000
