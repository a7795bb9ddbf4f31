"""What a sweep leaves in its directory: the run cache, two CSVs and the plots.

The names and columns are a contract (docs/sim.md): `results.csv` has one row per
run and policy, `summary.csv` one per grid point and policy with each metric's
mean and 95% confidence interval over the seeds, and `METRIC-vs-KEY.png` plots a
metric against a grid key, one line (and band) per policy and per combination of
the other keys. Numbers are written as Python's `repr` writes them, the shortest
text that reads back as the same float, so two sweeps that agree bit for bit
write the same bytes.

The cache holds one JSON file per finished run, named by its cache key and
written whole or not at all (`atomic_write`), so a sweep stopped at any moment
resumes from the runs it finished.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cloudlet.fsutil import atomic_write
from cloudlet.sim.sweep import CI_LEVEL, METRICS, Metrics, Run, SummaryRow, Sweep, Value

CACHE_DIR = "cache"


def cache_file(out: Path, key: str) -> Path:
    return out / CACHE_DIR / f"{key}.json"


def read_cached(out: Path, run: Run, policies: Sequence[str]) -> Metrics | None:
    """A finished run's metrics, or None when it has none (or an unreadable or
    incomplete file, which is recomputed rather than trusted)."""
    try:
        doc = json.loads(cache_file(out, run.key).read_bytes())
    except (OSError, ValueError):
        return None
    metrics = doc.get("metrics") if isinstance(doc, dict) else None
    if not isinstance(metrics, dict):
        return None
    for p in policies:
        if not isinstance(metrics.get(p), dict) or set(metrics[p]) != set(METRICS):
            return None
        if not all(v is None or (isinstance(v, int | float) and not isinstance(v, bool))
                   for v in metrics[p].values()):
            return None  # a number where the run wrote one, or recompute
    return {p: metrics[p] for p in policies}


def write_cached(out: Path, keys: Sequence[str], run: Run, metrics: Metrics) -> None:
    doc = {"key": run.key, "point": dict(zip(keys, run.point, strict=True)),
           "seed": run.seed, "metrics": metrics}
    atomic_write(cache_file(out, run.key), (json.dumps(doc, indent=1) + "\n").encode())


def cell(v: Value | None) -> str:
    """A CSV cell: exact for floats, empty for a missing or non-finite value."""
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    return str(v)


def results_csv(sweep: Sweep, runs: Sequence[Run], results: dict[str, Metrics]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*sweep.keys, "seed", "policy", *METRICS])
    for run in runs:
        for policy in sweep.policies:
            m = results[run.key][policy]
            w.writerow([*(cell(v) for v in run.point), run.seed, policy,
                        *(cell(m[k]) for k in METRICS)])
    return buf.getvalue()


def summary_columns(sweep: Sweep) -> list[str]:
    cols = [*sweep.keys, "policy", "seeds"]
    for m in METRICS:
        cols += [f"{m}_mean", f"{m}_ci_low", f"{m}_ci_high"]
    return cols


def summary_csv(sweep: Sweep, rows: Sequence[SummaryRow]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(summary_columns(sweep))
    for row in rows:
        cells = [*(cell(v) for v in row.point), row.policy, str(row.seeds)]
        for m in METRICS:
            s = row.stats[m]
            cells += [cell(s.mean), cell(s.low), cell(s.high)]
        w.writerow(cells)
    return buf.getvalue()


def write_tables(out: Path, sweep: Sweep, runs: Sequence[Run], results: dict[str, Metrics],
                 rows: Sequence[SummaryRow], meta: dict[str, Any]) -> list[Path]:
    """results.csv, summary.csv and sweep.json (`meta`), in `out`."""
    paths = [out / "results.csv", out / "summary.csv", out / "sweep.json"]
    atomic_write(paths[0], results_csv(sweep, runs, results).encode())
    atomic_write(paths[1], summary_csv(sweep, rows).encode())
    atomic_write(paths[2], (json.dumps(meta, indent=2) + "\n").encode())
    return paths


def plot_name(metric: str, key: str) -> str:
    return f"{metric}-vs-{key}.png"


def write_plots(out: Path, sweep: Sweep, rows: Sequence[SummaryRow]) -> list[Path]:
    """One PNG per metric and grid key of two values or more: the metric's mean
    against the key's values with its confidence band; a policy keeps its colour
    throughout, and each combination of the other keys' values its line style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colours = {p: cycle[i % len(cycle)] for i, p in enumerate(sweep.policies)}
    styles = ("-", "--", ":", "-.")
    written = []
    for i, (key, values) in enumerate(sweep.grid):
        if len(values) < 2:
            continue  # a key held at one value is a setting, not an axis
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        xs = [float(v) if numeric else float(j) for j, v in enumerate(values)]
        x_of = {json.dumps(v): x for v, x in zip(values, xs, strict=True)}
        # Lines: a policy and one combination of the other keys' values.
        lines: dict[tuple[str, tuple[Value, ...]], list[SummaryRow]] = {}
        for row in rows:
            rest = row.point[:i] + row.point[i + 1:]
            lines.setdefault((row.policy, rest), []).append(row)
        rests = list(dict.fromkeys(rest for _, rest in lines))
        others = sweep.keys[:i] + sweep.keys[i + 1:]
        fixed = {k for k, vs in sweep.grid if len(vs) < 2}  # the same on every line
        for metric in METRICS:
            fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
            for (policy, rest), line in lines.items():
                line = sorted(line, key=lambda r: x_of[json.dumps(r.point[i])])
                x = [x_of[json.dumps(r.point[i])] for r in line]
                stats = [r.stats[metric] for r in line]
                label = policy + "".join(f", {k}={v}" for k, v in zip(others, rest,
                                                                      strict=True)
                                         if k not in fixed)
                colour = colours[policy]
                ax.plot(x, [s.mean for s in stats], marker="o", color=colour,
                        linestyle=styles[rests.index(rest) % len(styles)], label=label)
                ax.fill_between(x, [s.low for s in stats], [s.high for s in stats],
                                color=colour, alpha=0.15, linewidth=0)
            if not numeric:
                ax.set_xticks(xs, [str(v) for v in values])
            ax.set_xlabel(key)
            ax.set_ylabel(metric)
            ax.set_title(f"{sweep.name}: {metric} against {key}\n"
                         f"mean over {len(sweep.seeds)} seeds, {100 * CI_LEVEL:g}% "
                         f"confidence band", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / plot_name(metric, key)
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written
