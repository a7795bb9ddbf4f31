"""Fit the pre-copy cost model to live migrations, and say how far off it is.

A placer prices a move with `PrecopyModel`; the simulator runs whole cities on
it. Both are only as good as its parameters, so they are fitted to what real
migrations between real daemons measured (the daemon's `MigrationStats`, the
benchmark's runs): one record per migration, the keys of `MigrationRecord`.

What is fitted, and how. The wire ratio first: `r` is the median over records
of measured wire bytes over the state bytes the model's rounds carry
(`PrecopyModel.volumes`): compressibility belongs to a VM's memory, and a median
is not dragged by a few records of very different memory (sparse memory that
zstd shrinks 35x) the way a mean is. Then the four time terms
`x = (setup_s, setup_s_per_gib, send_s_per_gib, resume_s)`. The model is linear
in them, given the bytes:

    duration_s - W / B     = setup_s + setup_s_per_gib * M + c * W + resume_s
    downtime_s - r F / B   =                                 c * r F + resume_s

(M memory, W the record's measured wire bytes, F the stop-and-copy round's state
bytes as the model's rounds give them, in GiB where multiplied by a per-GiB term;
B the link in bytes/s; c = send_s_per_gib). The duration row uses the measured
wire bytes, not the model's, so a record's compressibility does not leak into
the time terms. Each record gives both rows, each divided by its measured value,
so least squares minimises relative errors and a 2-minute migration does not
drown a 1-second one; rows are then reweighted (Tukey's biweight, `TUKEY_C`,
by iteratively reweighted least squares, starting from the rows the link term
alone does not already over-predict) so that a row no parameter can explain
(memory that compresses 35x, a guest dirtying faster than the link) drops out
of the fit instead of setting it: its relative error is large anyway and it is
reported with the others. Non-negativity is by clipping: solve, pin the most
negative term to 0, solve again without it (an active set of at most four
steps, like NNLS on so few columns). The rounds depend on `c` and `r` (they set
how much is dirtied meanwhile), so the two steps alternate until the parameters
settle (or `MAX_ITERATIONS`), keeping the best iterate by the model's own
relative errors (the same biweight loss). `stop_bytes` and `max_rounds` are protocol settings, not
fitted: they come from the starting model.

Limits, said plainly. The model is the closed form at a constant bandwidth: a
link whose rate varied during a migration shows as error, not as a parameter.
Setup is linear in memory, but a checkpoint's cost depends on how dense the
memory is (sparse 256 MiB checkpoints in 0.2 s, dense in 2 s): records of one
kind fit that kind. With fewer records than terms (or records that do not vary
memory, bandwidth or dirty rate) the terms are not identifiable: lstsq then
picks the smallest-norm split, which predicts the records fine and tells little
about each term. Loopback has no link rate; give it a large bandwidth
(`LOOPBACK_MBIT_S`) and the source's own throughput lands in `send_s_per_gib`.
One wire ratio serves every record: records of memory that compresses very
differently keep a large error on time and bytes after the fit, and say so.
Errors are relative: `(predicted - measured) / measured`, reported as p50 and
p90 of their absolute values; a record with a measured value of 0 has none.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cloudlet.errors import InvalidArgument
from cloudlet.placement.cost import GiB, PrecopyModel

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

# The link rate given to loopback runs: far above what the source's send path
# sustains (~700 Mbit/s on the benchmark machine), so the link term is ~0 and the
# round time falls to send_s_per_gib.
LOOPBACK_MBIT_S = 10_000.0
# Alternations between the wire ratio and the time terms: they settle in a few
# (the rounds change little once c is near); more only costs time.
MAX_ITERATIONS = 50
# Tukey's biweight cut-off on a relative error: a row off by more than its own
# measurement gets no weight (the model cannot explain it; it must not set the
# parameters), rows within a few tens of per cent count nearly as squares.
TUKEY_C = 1.0
IRLS_PASSES = 20
REQUIRED_KEYS = ("vm", "source", "target", "memory_bytes", "overlay_bytes",
                 "dirty_rate_bytes_s", "bandwidth_mbit_s", "duration_s", "downtime_s",
                 "wire_bytes", "rounds")
# The fitted model's fields, in the order of x above (resume_s is part of it).
TIME_TERMS = ("setup_s", "setup_s_per_gib", "send_s_per_gib", "resume_s")


@dataclass(frozen=True)
class MigrationRecord:
    """One live migration as measured. `rounds` counts every round, the final
    stop-and-copy one included (as `MigrationStats` does); `downtime_s` is the
    pause as users see it (the destination's `arrival_downtime_ms`) when known."""

    vm: str
    source: str
    target: str
    memory_bytes: float
    overlay_bytes: float
    dirty_rate_bytes_s: float
    bandwidth_mbit_s: float
    duration_s: float
    downtime_s: float
    wire_bytes: float
    rounds: int
    # How many migrations left the source at once, averaged over this one's time
    # (1: alone); they share its send work (cost.py). Optional in a record.
    source_sharing: float = 1.0
    predicted_duration_s: float | None = None
    predicted_downtime_s: float | None = None

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> MigrationRecord:
        """Check and convert one JSON object; `InvalidArgument` names the bad key."""
        if not isinstance(obj, Mapping):
            raise InvalidArgument(f"a record must be a JSON object (got {type(obj).__name__})")
        missing = [k for k in REQUIRED_KEYS if k not in obj]
        if missing:
            raise InvalidArgument(f"record lacks key(s) {', '.join(missing)}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in obj or (obj[f.name] is None and f.name.startswith("predicted")):
                continue
            v = obj[f.name]
            if f.name in ("vm", "source", "target"):
                if not isinstance(v, str):
                    raise InvalidArgument(f"key {f.name!r} must be a string (got {v!r})")
                values[f.name] = v
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or v != v \
                    or v in (float("inf"), float("-inf")):
                raise InvalidArgument(f"key {f.name!r} must be a finite number (got {v!r})")
            if f.name == "rounds":
                if not isinstance(v, int) or v < 1:
                    raise InvalidArgument(f"key 'rounds' must be an integer >= 1 (got {v!r})")
                values[f.name] = v
                continue
            if v < 0 or (f.name in ("duration_s", "bandwidth_mbit_s", "memory_bytes")
                         and v <= 0) or (f.name == "source_sharing" and v < 1):
                raise InvalidArgument(f"key {f.name!r} out of range (got {v!r})")
            values[f.name] = float(v)
        rec = cls(**values)
        if rec.overlay_bytes > rec.memory_bytes:
            raise InvalidArgument(f"overlay_bytes ({rec.overlay_bytes:g}) exceeds "
                                  f"memory_bytes ({rec.memory_bytes:g})")
        return rec

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None}


@dataclass(frozen=True, eq=False)
class Comparison:
    """A model set against records: one entry per record in each array."""

    model: PrecopyModel
    measured_duration_s: FloatArray
    predicted_duration_s: FloatArray
    measured_downtime_s: FloatArray
    predicted_downtime_s: FloatArray
    measured_wire_bytes: FloatArray
    predicted_wire_bytes: FloatArray
    measured_rounds: IntArray
    predicted_rounds: IntArray  # every round, stop-and-copy included, like the records

    @property
    def n(self) -> int:
        return len(self.measured_duration_s)

    @property
    def duration_error(self) -> FloatArray:
        """Relative: (predicted - measured) / measured; NaN where measured is 0."""
        return _relative(self.predicted_duration_s, self.measured_duration_s)

    @property
    def downtime_error(self) -> FloatArray:
        return _relative(self.predicted_downtime_s, self.measured_downtime_s)

    @property
    def wire_bytes_error(self) -> FloatArray:
        return _relative(self.predicted_wire_bytes, self.measured_wire_bytes)

    def p(self, which: str, q: float) -> float:
        """Percentile `q` (0-100) of |relative error| of `which`: duration, downtime,
        wire_bytes. NaN when no record has one."""
        err = np.abs(getattr(self, f"{which}_error"))
        err = err[np.isfinite(err)]
        return float(np.percentile(err, q)) if len(err) else float("nan")

    @property
    def duration_error_p50(self) -> float:
        return self.p("duration", 50)

    @property
    def duration_error_p90(self) -> float:
        return self.p("duration", 90)

    @property
    def downtime_error_p50(self) -> float:
        return self.p("downtime", 50)

    @property
    def downtime_error_p90(self) -> float:
        return self.p("downtime", 90)


@dataclass(frozen=True, eq=False)
class CalibrationResult:
    """`model` is the fitted one; `before` sets the starting model against the
    records, `after` the fitted one (`after.predicted_*` per record)."""

    model: PrecopyModel
    n: int
    before: Comparison
    after: Comparison
    iterations: int

    @property
    def params(self) -> dict[str, float]:
        """The fitted parameters, model units (seconds, ratio)."""
        return {k: float(getattr(self.model, k)) for k in ("wire_ratio", *TIME_TERMS)}


def _relative(pred: FloatArray, meas: FloatArray) -> FloatArray:
    with np.errstate(divide="ignore", invalid="ignore"):
        out: FloatArray = np.where(meas > 0, (pred - meas) / meas, np.nan)
    return out


def as_records(records: Iterable[MigrationRecord | Mapping[str, Any]]) -> list[MigrationRecord]:
    return [r if isinstance(r, MigrationRecord) else MigrationRecord.from_dict(r)
            for r in records]


class _Columns:
    def __init__(self, records: Sequence[MigrationRecord]) -> None:
        def col(name: str) -> FloatArray:
            return np.array([float(getattr(r, name)) for r in records], dtype=np.float64)
        self.memory = col("memory_bytes")
        self.overlay = col("overlay_bytes")
        self.dirty = col("dirty_rate_bytes_s")
        self.bandwidth = col("bandwidth_mbit_s")
        self.duration = col("duration_s")
        self.downtime = col("downtime_s")
        self.wire = col("wire_bytes")
        self.rounds = np.array([r.rounds for r in records], dtype=np.int64)
        self.sharing = col("source_sharing")


def _compare(cols: _Columns, model: PrecopyModel) -> Comparison:
    est = model.estimate(cols.overlay, cols.memory, cols.dirty, cols.bandwidth, cols.sharing)
    return Comparison(
        model=model, measured_duration_s=cols.duration, predicted_duration_s=est.duration_s,
        measured_downtime_s=cols.downtime, predicted_downtime_s=est.downtime_s,
        measured_wire_bytes=cols.wire, predicted_wire_bytes=est.wire_bytes,
        measured_rounds=cols.rounds, predicted_rounds=est.rounds + 1)


def compare(records: Iterable[MigrationRecord | Mapping[str, Any]],
            model: PrecopyModel) -> Comparison:
    """`model`'s predictions for each record, beside what the record measured."""
    recs = as_records(records)
    if not recs:
        raise InvalidArgument("no migration records to compare with")
    return _compare(_Columns(recs), model)


def _biweight_loss(err: FloatArray) -> FloatArray:
    u = np.minimum(np.abs(err[np.isfinite(err)]) / TUKEY_C, 1.0)
    out: FloatArray = (TUKEY_C ** 2 / 6.0) * (1.0 - (1.0 - u * u) ** 3)
    return out


def _biweight(res: FloatArray) -> FloatArray:
    u = np.abs(res) / TUKEY_C
    out: FloatArray = np.where(u < 1.0, (1.0 - u * u) ** 2, 0.0)
    return out


def _objective(c: Comparison) -> float:
    return float(_biweight_loss(c.duration_error).sum()
                 + _biweight_loss(c.downtime_error).sum())


def _nonnegative_lstsq(a: FloatArray, b: FloatArray) -> FloatArray:
    """Least squares with x >= 0 by clipping: pin the most negative term, re-solve."""
    free = np.ones(a.shape[1], dtype=bool)
    x = np.zeros(a.shape[1])
    for _ in range(a.shape[1]):
        x = np.zeros(a.shape[1])
        if not free.any():
            break
        sol, *_ = np.linalg.lstsq(a[:, free], b, rcond=None)
        x[free] = sol
        if (x >= 0).all():
            break
        free[int(np.argmin(x))] = False
    return np.maximum(x, 0.0)


def _fit_wire_ratio(cols: _Columns, model: PrecopyModel) -> float:
    vol = model.volumes(cols.overlay, cols.memory, cols.dirty, cols.bandwidth, cols.sharing)
    state = vol.precopy_bytes + vol.final_bytes
    ok = (cols.wire > 0) & (state > 0)
    if not ok.any():
        return model.wire_ratio
    return float(np.median(cols.wire[ok] / state[ok]))


def _fit_times(cols: _Columns, model: PrecopyModel) -> PrecopyModel:
    vol = model.volumes(cols.overlay, cols.memory, cols.dirty, cols.bandwidth, cols.sharing)
    link_s_per_byte = 1.0 / (np.maximum(cols.bandwidth, 1e-9) * (1e6 / 8.0))
    final_wire = model.wire_ratio * vol.final_bytes
    m = len(cols.duration)
    ones, zeros = np.ones(m), np.zeros(m)
    # The source's send work is shared by the migrations it sends at once.
    a_dur = np.column_stack([ones, cols.memory / GiB, cols.sharing * cols.wire / GiB, ones])
    b_dur = cols.duration - link_s_per_byte * cols.wire
    a_down = np.column_stack([zeros, zeros, cols.sharing * final_wire / GiB, ones])
    b_down = cols.downtime - link_s_per_byte * final_wire
    rows_a, rows_b = [a_dur / cols.duration[:, None]], [b_dur / cols.duration]
    has_down = cols.downtime > 0
    if has_down.any():
        w = cols.downtime[has_down]
        rows_a.append(a_down[has_down] / w[:, None])
        rows_b.append(b_down[has_down] / w)
    a, b = np.concatenate(rows_a), np.concatenate(rows_b)
    # Start without the rows the link alone over-predicts by more than their
    # measurement (|b| > 1 at x = 0: no term >= 0 can help them); equal weights
    # would let one such row set the first solution, and IRLS start from there.
    weight = _biweight(b)
    x = np.zeros(a.shape[1])
    for _ in range(IRLS_PASSES):
        root = np.sqrt(weight)
        x = _nonnegative_lstsq(a * root[:, None], b * root)
        res = np.abs(a @ x - b)
        new = _biweight(res)
        if np.allclose(new, weight, rtol=1e-6, atol=1e-9):
            break
        weight = new
    setup_s, setup_s_per_gib, send_s_per_gib, resume_s = (float(v) for v in x)
    return replace(model, setup_s=setup_s, setup_s_per_gib=setup_s_per_gib,
                   send_s_per_gib=send_s_per_gib, resume_s=resume_s)


def fit(records: Iterable[MigrationRecord | Mapping[str, Any]],
        start: PrecopyModel | None = None) -> CalibrationResult:
    """Fit wire_ratio, setup_s, setup_s_per_gib, send_s_per_gib and resume_s to
    `records` (the method is in the module docstring); `start` gives the protocol
    settings (stop_bytes, max_rounds) and the "before" column (default: defaults)."""
    recs = as_records(records)
    if not recs:
        raise InvalidArgument("no migration records to fit")
    cols = _Columns(recs)
    start = start or PrecopyModel()
    before = _compare(cols, start)
    model = start
    best, best_obj, used = start, _objective(before), 0
    for i in range(MAX_ITERATIONS):
        ratio = _fit_wire_ratio(cols, model)
        nxt = _fit_times(cols, replace(model, wire_ratio=max(ratio, 1e-6)))
        obj = _objective(_compare(cols, nxt))
        if obj < best_obj:
            best, best_obj, used = nxt, obj, i + 1
        settled = all(abs(getattr(nxt, k) - getattr(model, k))
                      <= 1e-9 * max(1.0, abs(getattr(model, k)))
                      for k in ("wire_ratio", *TIME_TERMS))
        model = nxt
        if settled:
            break
    return CalibrationResult(model=best, n=len(recs), before=before,
                             after=_compare(cols, best), iterations=used)


def records_from_benchmark(results: Mapping[str, Any]) -> list[MigrationRecord]:
    """The live runs of benchmarks/results/migration.json as records.

    Bandwidth is the case's link rate (`LOOPBACK_MBIT_S` on loopback), the dirty
    rate what the guest achieved while the migrate call ran, the downtime the
    destination's `arrival_downtime_ms` (what users see).
    """
    runs = results.get("runs")
    if not isinstance(runs, list):
        raise InvalidArgument("not a migration benchmark result (no 'runs' list)")
    out = []
    for i, run in enumerate(runs):
        if not isinstance(run, Mapping):
            raise InvalidArgument(f"runs[{i}] is not an object")
        try:
            answer = run.get("live_answer") or {}
            link = run["link_mbit"]
            out.append(MigrationRecord.from_dict({
                "vm": str(answer.get("vm_id") or answer.get("vm") or f"run{i}"),
                "source": f"src{i}", "target": str(answer.get("to") or f"dst{i}"),
                "memory_bytes": run["memory_bytes"], "overlay_bytes": run["overlay_bytes"],
                "dirty_rate_bytes_s": run["dirty_mib_s_during"] * float(1 << 20),
                "bandwidth_mbit_s": LOOPBACK_MBIT_S if link is None else link,
                "duration_s": run["total_s"], "downtime_s": run["downtime_ms"] / 1000.0,
                "wire_bytes": run["bytes_sent"], "rounds": run["rounds"]}))
        except KeyError as exc:
            raise InvalidArgument(f"runs[{i}] lacks key {exc.args[0]!r}") from None
        except (InvalidArgument, TypeError) as exc:
            raise InvalidArgument(f"runs[{i}]: {exc}") from None
    return out
