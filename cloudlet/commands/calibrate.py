"""`cloudlet calibrate FILE... --out PARAMS.toml`: fit the migration cost model to
live migrations.

Thin, like every command: read migration records (JSON lines, one object per
live migration, or the migration benchmark's results JSON), fit
`cloudlet.placement.calibration`, write the fitted [migration] keys as a TOML
file a scenario includes (`[migration] calibration = "PARAMS.toml"`), and print
the model against each record before and after. Any unusable input is a
`CalibrationError` naming the file and the line.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from cloudlet.errors import CalibrationError, InvalidArgument

MiB = float(1 << 20)
# The daemon's pre-copy stop rule and round limit (cloudlet.migration.source
# PreCopyPolicy; a test keeps them equal): what the records ran with, so the fit
# starts from them instead of the simulator's defaults. Not imported: that module
# needs the VM runtime, and the sim extra does not install it.
DAEMON_STOP_BYTES = 64 * 1024
DAEMON_MAX_ROUNDS = 12


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "calibrate", help="fit the simulator's migration cost model to live migrations",
        description="Fit the pre-copy cost model to migration records (JSON lines: vm, "
                    "source, target, memory_bytes, overlay_bytes, dirty_rate_bytes_s, "
                    "bandwidth_mbit_s, duration_s, downtime_s, wire_bytes, rounds; or "
                    "benchmarks/results/migration.json) and write its [migration] keys "
                    "to --out, for a scenario's `[migration] calibration`.")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--out", metavar="PARAMS.toml", required=True,
                   help="where to write the fitted [migration] keys")
    p.set_defaults(handler=cmd_calibrate)


def read_records(path: Path) -> list[Any]:
    """Records of one file: a benchmark result (one JSON object with "runs") or JSON
    lines. Errors name the file and the line."""
    from cloudlet.placement.calibration import MigrationRecord, records_from_benchmark

    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CalibrationError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"{path}: cannot read: {exc}") from None
    stripped = text.lstrip()
    if stripped.startswith("{") and "\n" in stripped.rstrip():
        # A whole-file JSON object (pretty-printed): the benchmark's results.
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
        if isinstance(whole, dict):
            if "runs" not in whole:
                raise CalibrationError(f"{path}: a JSON object without 'runs': neither "
                                       "migration records nor a migration benchmark result")
            try:
                return list(records_from_benchmark(whole))
            except InvalidArgument as exc:
                raise CalibrationError(f"{path}: {exc.message}") from None
    out: list[Any] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{path}:{number}: not JSON: {exc.msg}") from None
        try:
            out.append(MigrationRecord.from_dict(obj))
        except InvalidArgument as exc:
            raise CalibrationError(f"{path}:{number}: {exc.message}") from None
    return out


def _toml_float(v: float) -> str:
    text = f"{v:.6g}"
    return text if any(c in text for c in ".en") else text + ".0"


def render(result: Any, sources: list[str]) -> str:
    from cloudlet.placement.calibration import CalibrationResult

    assert isinstance(result, CalibrationResult)
    m, b, a = result.model, result.before, result.after

    def pair(c: Any, which: str) -> str:
        return f"{c.p(which, 50):.3f} / {c.p(which, 90):.3f}"

    lines = [
        f"# The pre-copy cost model fitted by `cloudlet calibrate` to {result.n} live "
        "migrations",
        f"# from {', '.join(sources)}.",
        "# Relative error |predicted - measured| / measured, p50 / p90, before -> after:",
        f"#   duration {pair(b, 'duration')} -> {pair(a, 'duration')}",
        f"#   downtime {pair(b, 'downtime')} -> {pair(a, 'downtime')}",
        f"#   wire bytes {pair(b, 'wire_bytes')} -> {pair(a, 'wire_bytes')}",
        "# Include it from a scenario: [migration] calibration = \"THIS_FILE.toml\"",
        "# (keys the scenario sets itself win). Keys: docs/sim.md.",
        "[migration]",
        f"stop_mib = {_toml_float(m.stop_bytes / MiB)}",
        f"max_rounds = {m.max_rounds}",
        f"resume_ms = {_toml_float(m.resume_s * 1000.0)}",
        f"wire_ratio = {_toml_float(m.wire_ratio)}",
        f"setup_s = {_toml_float(m.setup_s)}",
        f"setup_s_per_gib = {_toml_float(m.setup_s_per_gib)}",
        f"send_s_per_gib = {_toml_float(m.send_s_per_gib)}",
    ]
    return "\n".join(lines) + "\n"


def table(result: Any, records: list[Any]) -> str:
    b, a = result.before, result.after
    head = (f"{'vm':>16} {'MiB':>5} {'Mbit/s':>7} {'dirty':>6} | {'total s':>8} "
            f"{'before':>8} {'after':>8} | {'down ms':>8} {'before':>8} {'after':>8} | "
            f"{'rounds':>6} {'after':>5}")
    rows = [head, "-" * len(head)]
    for i, r in enumerate(records):
        rows.append(
            f"{r.vm[:16]:>16} {r.memory_bytes / MiB:>5.0f} {r.bandwidth_mbit_s:>7g} "
            f"{r.dirty_rate_bytes_s / MiB:>6.2f} | {r.duration_s:>8.2f} "
            f"{b.predicted_duration_s[i]:>8.2f} {a.predicted_duration_s[i]:>8.2f} | "
            f"{r.downtime_s * 1000:>8.1f} {b.predicted_downtime_s[i] * 1000:>8.1f} "
            f"{a.predicted_downtime_s[i] * 1000:>8.1f} | {r.rounds:>6} "
            f"{a.predicted_rounds[i]:>5}")
    m = result.model
    rows.append("")
    rows.append(f"fitted: wire_ratio {m.wire_ratio:.4g}, setup_s {m.setup_s:.4g}, "
                f"setup_s_per_gib {m.setup_s_per_gib:.4g}, send_s_per_gib "
                f"{m.send_s_per_gib:.4g}, resume_ms {m.resume_s * 1000:.4g} "
                f"(stop_mib {m.stop_bytes / MiB:g}, max_rounds {m.max_rounds}: the "
                "daemon's pre-copy policy)")
    for name in ("duration", "downtime", "wire_bytes"):
        rows.append(f"{name} error p50/p90: before {_fmt(b.p(name, 50))}/"
                    f"{_fmt(b.p(name, 90))}, after {_fmt(a.p(name, 50))}/"
                    f"{_fmt(a.p(name, 90))}")
    return "\n".join(rows)


def _fmt(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.3f}"


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cloudlet.fsutil import atomic_write
    from cloudlet.placement import PrecopyModel
    from cloudlet.placement.calibration import fit

    records: list[Any] = []
    for name in args.files:
        records.extend(read_records(Path(name)))
    if not records:
        raise CalibrationError(f"no migration records in {', '.join(args.files)}")
    start = PrecopyModel(stop_bytes=float(DAEMON_STOP_BYTES), max_rounds=DAEMON_MAX_ROUNDS)
    result = fit(records, start)
    out = Path(args.out)
    atomic_write(out, render(result, [Path(f).name for f in args.files]).encode())
    print(table(result, records))
    print(f"wrote {out}")
    return 0
