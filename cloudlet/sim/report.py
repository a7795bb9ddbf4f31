"""What a simulation run leaves behind: JSON, CSV, PNG plots and a terminal table.

The names and keys are a contract (docs/sim.md): scripts read
`summary.json` and the CSV timelines, people look at the plots and the table.
Plots use matplotlib's Agg backend, so a run needs no display.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cloudlet.fsutil import atomic_write
from cloudlet.sim.engine import HIST_BIN_MS, HIST_BINS, TIMELINE_COLUMNS, SimResult

SUMMARY_KEYS = ("within_budget", "p50_ms", "p95_ms", "p99_ms", "migrations", "ping_pongs",
                "bytes_moved", "downtime_s", "interactions")
PLOTS = ("latency_cdf.png", "violations.png", "migrations.png", "map.png")


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def summary(result: SimResult) -> dict[str, Any]:
    sc = result.scenario
    return {
        "scenario": sc.name,
        "file": str(sc.path),
        "seed": sc.seed,
        "step_s": sc.step_s,
        "ticks": result.ticks,
        "duration_s": result.ticks * sc.step_s,
        "cloudlets": result.topology.size,
        "user_steps": result.user_steps,
        "world_wall_s": result.world_wall_s,
        "trace": None if result.trace is None else {
            "file": str(sc.mobility.file), "format": result.trace.format,
            "geo": result.trace.geo, "frames": result.trace.frames,
            "vehicles": result.trace.ids, "max_active": result.trace.max_active},
        "policies": {name: {k: _clean(v) for k, v in p.summary.items()}
                     for name, p in result.policies.items()},
    }


def map_title(result: SimResult) -> str:
    """Says how many of the users the map draws (`[scenario] trajectories` of them)."""
    sc, topo = result.scenario, result.topology
    drawn = int(np.count_nonzero(~np.isnan(result.trajectories[:, :, 0]).all(axis=0)))
    users = max(result.users, drawn)
    who = f"all {users} users" if drawn >= users else (
        f"{drawn} of {users} users (scenario.trajectories)")
    return (f"{sc.name}: {topo.size} cloudlets (access range "
            f"{topo.network.latency.access_range_m:g} m)\ntrajectories of {who}")


def write_outputs(result: SimResult, out: Path, plots: bool = True) -> list[Path]:
    """summary.json, timeline-POLICY.csv per policy and the PNG plots, in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "summary.json"
    atomic_write(path, (json.dumps(summary(result), indent=2) + "\n").encode())
    written.append(path)
    for name, p in result.policies.items():
        path = out / f"timeline-{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(TIMELINE_COLUMNS)
            for row in p.timeline.tolist():
                w.writerow([_fmt(v) for v in row])
        written.append(path)
    if plots:
        written.extend(write_plots(result, out))
    return written


def _fmt(v: float) -> str:
    if math.isnan(v):
        return ""
    return str(int(v)) if v == int(v) else f"{v:.6g}"


def table(result: SimResult) -> str:
    """The terminal table: one row per policy."""
    head = ("policy", "within", "p50 ms", "p95 ms", "p99 ms", "migrations", "ping-pongs",
            "moved GiB", "downtime s", "interactions")
    rows = [head]
    for name, p in result.policies.items():
        s = p.summary
        rows.append((name, f"{100 * s['within_budget']:.1f}%", f"{s['p50_ms']:.1f}",
                     f"{s['p95_ms']:.1f}", f"{s['p99_ms']:.1f}", f"{s['migrations']:,}",
                     f"{s['ping_pongs']:,}", f"{s['bytes_moved'] / (1 << 30):,.1f}",
                     f"{s['downtime_s']:.1f}", f"{s['interactions']:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for k, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:],
                                                                     strict=True)]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _smooth(values: np.ndarray, n: int) -> np.ndarray:
    if n <= 1 or len(values) < n:
        return values
    kernel = np.ones(n) / n
    smoothed: np.ndarray = np.convolve(values, kernel, mode="same")
    return smoothed


def write_plots(result: SimResult, out: Path) -> list[Path]:
    """The PNG plots of `PLOTS`, written into `out`; a policy keeps its colour
    across them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(result.policies, plt.rcParams["axes.prop_cycle"].by_key()["color"],
                       strict=False))
    return [_PLOTTERS[name](result, colours, out / name) for name in PLOTS]


def _plot_latency_cdf(result: SimResult, colours: dict[str, str], path: Path) -> Path:
    """Latency CDF per policy, budgets marked."""
    import matplotlib.pyplot as plt

    sc = result.scenario
    budgets = sorted({w.budget_ms for w in sc.workloads})
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    x = (np.arange(HIST_BINS) + 0.5) * HIST_BIN_MS
    top = 1.0
    for name, p in result.policies.items():
        h = p.latency_hist
        total = h.sum()
        if total <= 0:
            continue
        cdf = np.cumsum(h[:HIST_BINS]) / total
        ax.plot(x, cdf, label=f"{name} ({100 * p.summary['within_budget']:.1f}% within)",
                color=colours[name])
        # The p95 sets the scale: a p99 inflated by a few long downtimes would
        # squash the part of the curve around the budget that matters.
        top = max(top, p.summary["p95_ms"] if math.isfinite(p.summary["p95_ms"]) else 0)
    for k, b in enumerate(budgets):
        ax.axvline(b, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"budget {b:g} ms", (b, 0.03 + 0.22 * k), rotation=90, color="grey",
                    fontsize=8, xytext=(3, 0), textcoords="offset points")
    ax.set_xlim(0, min(max(top * 1.4, max(budgets) * 2.0), HIST_BINS * HIST_BIN_MS))
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("interaction latency (ms)")
    ax.set_ylabel("share of interactions")
    ax.set_title(f"{sc.name}: interaction latency CDF")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


_COLUMN = {c: i for i, c in enumerate(TIMELINE_COLUMNS)}


def _minutes(result: SimResult) -> np.ndarray:
    minutes: np.ndarray = np.arange(result.ticks) * result.scenario.step_s / 60.0
    return minutes


def _plot_violations(result: SimResult, colours: dict[str, str], path: Path) -> Path:
    """Budget violations over time (share of interactions, one-minute moving mean)."""
    import matplotlib.pyplot as plt

    sc = result.scenario
    t_min = _minutes(result)
    window = max(round(60.0 / sc.step_s), 1)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for name, p in result.policies.items():
        tl = p.timeline
        inter = _smooth(tl[:, _COLUMN["interactions"]], window)
        within = _smooth(tl[:, _COLUMN["within_budget"]], window)
        share = np.where(inter > 0, 1.0 - within / np.maximum(inter, 1e-12), np.nan)
        ax.plot(t_min, 100 * share, label=name, color=colours[name], linewidth=1.2)
    ax.set_xlabel("time (min)")
    ax.set_ylabel("interactions over budget (%, 1-min mean)")
    ax.set_title(f"{sc.name}: budget violations over time")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_migrations(result: SimResult, colours: dict[str, str], path: Path) -> Path:
    """Migrations over time (cumulative), ping-pongs dashed. Policies often make the
    same moves at first: each line is drawn narrower than the one before, on top of
    it, so one that runs along another still shows (as a stripe inside it)."""
    import matplotlib.pyplot as plt

    t_min = _minutes(result)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    widths = np.linspace(4.0, 1.2, max(len(result.policies), 1))
    for k, (name, p) in enumerate(result.policies.items()):
        tl = p.timeline
        started = np.cumsum(tl[:, _COLUMN["migrations_started"]])
        ax.plot(t_min, started, label=f"{name} ({int(started[-1]) if len(started) else 0})",
                color=colours[name], linewidth=float(widths[k]), zorder=2 + k,
                drawstyle="steps-post")
        pp = np.cumsum(tl[:, _COLUMN["ping_pongs"]])
        if pp[-1] > 0:
            ax.plot(t_min, pp, color=colours[name], linestyle="--", linewidth=1,
                    label=f"{name}: ping-pongs")
    ax.set_xlabel("time (min)")
    ax.set_ylabel("migrations started (cumulative)")
    ax.set_title(f"{result.scenario.name}: migrations over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_map(result: SimResult, colours: dict[str, str], path: Path) -> Path:
    """A map: cloudlets, access ranges, backhaul, trajectories."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    topo = result.topology
    fig, ax = plt.subplots(figsize=(7, 7), dpi=110)
    traj = result.trajectories
    for k in range(traj.shape[1]):
        ax.plot(traj[:, k, 0], traj[:, k, 1], linewidth=0.7, alpha=0.6)
    nodes = topo.node_position_m
    for a, b in zip(topo.link_a.tolist(), topo.link_b.tolist(), strict=True):
        ax.plot(nodes[[a, b], 0], nodes[[a, b], 1], color="black", linewidth=0.8, alpha=0.5,
                zorder=2)
    rng_m = topo.network.latency.access_range_m
    for (cx, cy) in topo.position_m.tolist():
        ax.add_patch(Circle((cx, cy), rng_m, color="tab:blue", alpha=0.06, zorder=1))
    ax.scatter(topo.position_m[:, 0], topo.position_m[:, 1], marker="s", s=40,
               color="tab:red", edgecolor="black", zorder=3, label="cloudlet")
    if len(nodes) > topo.size:
        ax.scatter(nodes[topo.size:, 0], nodes[topo.size:, 1], marker="D", s=50,
                   color="black", zorder=3, label="core router")
    if topo.size <= 16:
        for name, (cx, cy) in zip(topo.names, topo.position_m.tolist(), strict=True):
            ax.annotate(name, (cx, cy), xytext=(5, 5), textcoords="offset points",
                        fontsize=8, zorder=4)
    x0, y0, x1, y1 = result.extent_m
    pad = 0.03 * max(x1 - x0, y1 - y0, 1.0)
    ax.set_xlim(x0 - pad, x1 + pad)
    ax.set_ylim(y0 - pad, y1 + pad)
    ax.set_aspect("equal")
    ax.set_xlabel("x (m)")
    ax.set_ylabel("y (m)")
    ax.set_title(map_title(result), fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


_PLOTTERS: dict[str, Callable[[SimResult, dict[str, str], Path], Path]] = {
    "latency_cdf.png": _plot_latency_cdf, "violations.png": _plot_violations,
    "migrations.png": _plot_migrations, "map.png": _plot_map,
}


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
