"""Trace replay: mobility read from CSV (`t,id,x,y`) or SUMO FCD XML, streamed.

Real traces beat synthetic models at showing what handoff must cope with, but a
city's SUMO floating-car-data export runs to gigabytes, so nothing here loads a
trace whole: files are read frame by frame (one frame = all rows of one time),
gzip or not (detected by its magic bytes, as SUMO writes `.xml.gz`), and XML is
parsed with `iterparse`, each finished time step cleared from memory.

Replay rules (docs/sim.md):
- A user is present from its first frame to its last, and must appear in every
  frame in between (SUMO writes every vehicle at every step it is in the net);
  an id missing from a frame has left, and its session ends. It starts again, as
  a new session, if the id comes back.
- Positions are the trace's, exactly, at the trace's times; between two frames a
  user stays at its last position (run the scenario at the trace's step).
- SUMO geo output (`--fcd-output.geo`: x = longitude, y = latitude) is projected
  to metres, equirectangular around the trace's bounding box; `coords = "auto"`
  takes a trace as geo when its first coordinates look like degrees with six
  decimals, as SUMO writes them, and as plane metres otherwise (two decimals).
"""

from __future__ import annotations

import csv
import gzip
import heapq
import io
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from cloudlet.errors import ScenarioError
from cloudlet.sim.mobility import Mobility

FloatArray = NDArray[np.float64]

EARTH_RADIUS_M = 6_371_008.8  # mean radius (IUGG): the projection's scale
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Frame:
    """All users of one trace time: their ids and positions (k, 2)."""

    t_s: float
    ids: list[str]
    xy: FloatArray


@dataclass(frozen=True)
class TraceInfo:
    """What one streaming pass over a trace learns (before the run)."""

    format: str
    geo: bool
    t_start_s: float
    t_end_s: float
    step_s: float  # the smallest gap between frames (1.0 for a one-frame trace)
    frames: int
    rows: int
    ids: int
    max_active: int
    bbox: tuple[float, float, float, float]  # in the file's coordinates


def open_trace(path: Path) -> IO[bytes]:
    """The file's bytes, gunzipped when it is gzip (whatever its name says)."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot open trace: {exc}") from None
    head = f.read(2)
    f.seek(0)
    if head == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    return f


def detect_format(path: Path) -> str:
    with open_trace(path) as f:
        try:
            head = f.read(512)
        except (OSError, EOFError) as exc:
            raise ScenarioError(f"{path}: cannot read trace: {exc}") from None
    return "fcd" if head.lstrip().startswith(b"<") else "csv"


def read_csv_frames(path: Path) -> Iterator[Frame]:
    """Frames of a `t,id,x,y` CSV (header optional), rows sorted by time."""
    with open_trace(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        reader = csv.reader(text)
        t_cur: float | None = None
        ids: list[str] = []
        xs: list[float] = []
        ys: list[float] = []
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if line == 1 and row[0].strip().lower() in ("t", "time", "t_s"):
                continue
            if len(row) < 4:
                raise ScenarioError(f"{path}: line {line}: expected t,id,x,y (got {row!r})")
            try:
                t = float(row[0])
                x = float(row[2])
                y = float(row[3])
            except ValueError:
                raise ScenarioError(
                    f"{path}: line {line}: t, x and y must be numbers (got {row!r})") from None
            if t_cur is not None and t < t_cur:
                raise ScenarioError(
                    f"{path}: line {line}: time goes backwards ({t:g} after {t_cur:g}); "
                    "rows must be sorted by t")
            if t_cur is not None and t != t_cur:
                yield Frame(t_cur, ids, np.column_stack([xs, ys]).astype(np.float64))
                ids, xs, ys = [], [], []
            t_cur = t
            ids.append(row[1].strip())
            xs.append(x)
            ys.append(y)
        if t_cur is not None:
            yield Frame(t_cur, ids, np.column_stack([xs, ys]).astype(np.float64))


def read_fcd_frames(path: Path, elements: Iterable[str] = ("vehicle", "person")
                    ) -> Iterator[Frame]:
    """Frames of a SUMO FCD export (`<timestep time=..><vehicle id x y/>...`), streamed."""
    with open_trace(path) as f:
        try:
            yield from _fcd_frames(path, ET.iterparse(f, events=("start", "end")),
                                   set(elements))
        except ET.ParseError as exc:
            raise ScenarioError(f"{path}: not valid FCD XML: {exc}") from None
        except (OSError, EOFError) as exc:
            raise ScenarioError(f"{path}: cannot read trace: {exc}") from None


def _fcd_frames(path: Path, events: Iterator[tuple[str, Any]], wanted: set[str]
                ) -> Iterator[Frame]:
    """One frame per `<timestep>`, of its `wanted` elements; each timestep is
    cleared once read, so a long trace streams in constant memory."""
    root: ET.Element | None = None
    t_cur = 0.0
    ids: list[str] = []
    xs: list[float] = []
    ys: list[float] = []
    for event, elem in events:
        if event == "start":
            if root is None:
                root = elem
            elif elem.tag == "timestep":
                t_cur = _attr_float(path, elem, "time")
                ids, xs, ys = [], [], []
            continue
        if elem.tag in wanted:
            ids.append(_fcd_id(path, elem, t_cur))
            xs.append(_attr_float(path, elem, "x"))
            ys.append(_attr_float(path, elem, "y"))
        elif elem.tag == "timestep":
            yield Frame(t_cur, ids, np.column_stack([xs, ys]).astype(np.float64)
                        if ids else np.zeros((0, 2)))
            elem.clear()
            if root is not None:
                root.clear()


def _fcd_id(path: Path, elem: ET.Element, t_s: float) -> str:
    ident = elem.get("id")
    if ident is None:
        raise ScenarioError(f"{path}: a <{elem.tag}> at t={t_s:g} has no id")
    return ident


def _attr_float(path: Path, elem: ET.Element, name: str) -> float:
    value = elem.get(name)
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ScenarioError(
            f"{path}: <{elem.tag} id={elem.get('id')!r}>: attribute {name!r} must be a number "
            f"(got {value!r})") from None


def read_frames(path: Path, fmt: str, elements: Iterable[str]) -> Iterator[Frame]:
    return read_csv_frames(path) if fmt == "csv" else read_fcd_frames(path, elements)


def _looks_geo(path: Path, fmt: str, elements: Iterable[str]) -> bool:
    """The first coordinate: degrees written with >= 5 decimals (SUMO geo) or not."""
    wanted = set(elements)
    with open_trace(path) as f:
        if fmt == "csv":
            for i, line in enumerate(io.TextIOWrapper(f, encoding="utf-8")):
                parts = line.strip().split(",")
                if i == 0 and parts[0].strip().lower() in ("t", "time", "t_s"):
                    continue
                if len(parts) >= 4:
                    return _degrees(parts[2].strip(), parts[3].strip())
            return False
        try:
            for _event, elem in ET.iterparse(f, events=("end",)):
                if elem.tag in wanted:
                    return _degrees(elem.get("x", ""), elem.get("y", ""))
        except ET.ParseError:
            return False
    return False


def _degrees(x: str, y: str) -> bool:
    try:
        fx, fy = float(x), float(y)
    except ValueError:
        return False
    decimals = len(x.partition(".")[2])
    return abs(fx) <= 180 and abs(fy) <= 90 and decimals >= 5


def scan_trace(path: Path, fmt: str = "auto", coords: str = "auto",
               elements: Iterable[str] = ("vehicle", "person")) -> TraceInfo:
    """One streaming pass: time span, step, bounding box, ids, most users at once."""
    if not path.is_file():
        raise ScenarioError(f"{path}: no such trace file")
    if fmt == "auto":
        fmt = detect_format(path)
    elements = tuple(elements)
    geo = coords == "geo" or (coords == "auto" and _looks_geo(path, fmt, elements))
    t0 = math.inf
    t1 = -math.inf
    prev = None
    step = math.inf
    frames = rows = max_active = 0
    seen: set[str] = set()
    lo = np.array([math.inf, math.inf])
    hi = np.array([-math.inf, -math.inf])
    for fr in read_frames(path, fmt, elements):
        frames += 1
        rows += len(fr.ids)
        t0 = min(t0, fr.t_s)
        t1 = max(t1, fr.t_s)
        if prev is not None and fr.t_s > prev:
            step = min(step, fr.t_s - prev)
        prev = fr.t_s
        max_active = max(max_active, len(fr.ids))
        seen.update(fr.ids)
        if len(fr.ids):
            lo = np.minimum(lo, fr.xy.min(axis=0))
            hi = np.maximum(hi, fr.xy.max(axis=0))
    if rows == 0:
        raise ScenarioError(f"{path}: the trace has no positions")
    return TraceInfo(format=fmt, geo=geo, t_start_s=t0, t_end_s=t1,
                     step_s=step if math.isfinite(step) else 1.0, frames=frames, rows=rows,
                     ids=len(seen), max_active=max_active,
                     bbox=(float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])))


class GeoProjection:
    """Longitude/latitude to metres: equirectangular around the trace's box.

    Over a city (tens of km) its distance error is well under 1%: fine for
    access ranges of hundreds of metres, and it needs no projection library.
    """

    def __init__(self, bbox: tuple[float, float, float, float]) -> None:
        self.lon0, self.lat0 = bbox[0], bbox[1]
        lat_mid = math.radians((bbox[1] + bbox[3]) / 2)
        self.kx = EARTH_RADIUS_M * math.cos(lat_mid) * math.pi / 180
        self.ky = EARTH_RADIUS_M * math.pi / 180

    def __call__(self, lonlat: FloatArray) -> FloatArray:
        out = np.empty_like(lonlat)
        out[:, 0] = (lonlat[:, 0] - self.lon0) * self.kx
        out[:, 1] = (lonlat[:, 1] - self.lat0) * self.ky
        return out


class TraceMobility(Mobility):
    """Replays a trace into slots: an id takes the lowest free slot when it enters.

    A slot freed in one `advance` is reused only from the next one on, so the
    simulator always sees a tick with the slot inactive and ends that session
    before another starts in it.
    """

    def __init__(self, path: Path, info: TraceInfo,
                 elements: Iterable[str] = ("vehicle", "person")) -> None:
        self.path = path
        self.info = info
        self.project = GeoProjection(info.bbox) if info.geo else None
        lo = np.array(info.bbox[:2])
        hi = np.array(info.bbox[2:])
        if self.project is not None:
            lo = self.project(lo[None, :])[0]
            hi = self.project(hi[None, :])[0]
        self.extent_m = (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))
        cap = max(info.max_active, 1)
        self.xy = np.zeros((cap, 2))
        self.active = np.zeros(cap, dtype=bool)
        self.slot_of: dict[str, int] = {}
        self.id_of: list[str | None] = [None] * cap
        self.free: list[int] = list(range(cap))
        self.cooling: list[int] = []
        self._frames = read_frames(path, info.format, elements)
        self._next: Frame | None = self._read()
        self.frames_read = 0

    def _read(self) -> Frame | None:
        fr = next(self._frames, None)
        if fr is not None and self.project is not None and len(fr.ids):
            fr = Frame(fr.t_s, fr.ids, self.project(fr.xy))
        return fr

    @property
    def finished(self) -> bool:
        return self._next is None

    def advance(self, t_s: float) -> None:
        """Apply every frame up to trace time `info.t_start_s + t_s`."""
        for s in self.cooling:
            heapq.heappush(self.free, s)
        self.cooling = []
        t_abs = self.info.t_start_s + t_s + 1e-9
        while self._next is not None and self._next.t_s <= t_abs:
            self._apply(self._next)
            self._next = self._read()

    def _apply(self, fr: Frame) -> None:
        self.frames_read += 1
        present = set(fr.ids)
        for ident in [i for i in self.slot_of if i not in present]:
            gone = self.slot_of.pop(ident)
            self.id_of[gone] = None
            self.active[gone] = False
            self.cooling.append(gone)
        slots = np.empty(len(fr.ids), dtype=np.int64)
        for k, ident in enumerate(fr.ids):
            s = self.slot_of.get(ident)
            if s is None:
                s = self._take()
                self.slot_of[ident] = s
                self.id_of[s] = ident
            slots[k] = s
        self.active[slots] = True
        self.xy[slots] = fr.xy

    def _take(self) -> int:
        if not self.free:
            # More users at once than the scan saw (it cannot happen for the same
            # file; be safe): grow the arrays.
            old = len(self.xy)
            self.xy = np.concatenate([self.xy, np.zeros((old, 2))])
            self.active = np.concatenate([self.active, np.zeros(old, dtype=bool)])
            self.id_of.extend([None] * old)
            for s in range(old, 2 * old):
                heapq.heappush(self.free, s)
        return heapq.heappop(self.free)

    def names(self, slots: NDArray[np.int64]) -> list[str]:
        return [self.id_of[int(s)] or f"slot{int(s)}" for s in slots]

    def close(self) -> None:
        close: Any = getattr(self._frames, "close", None)
        if close is not None:
            close()


def write_fcd(frames: Iterable[Frame], path: Path, geo: bool = False) -> None:
    """Write frames as SUMO writes FCD (gzip when the name ends in .gz): for tests
    and for making the sample trace in configs/sim/ without SUMO installed."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    fmt = "{:.6f}" if geo else "{:.2f}"
    with opener(path, "wt", encoding="utf-8") as f:
        f.write('<?xml version="1.0" encoding="UTF-8"?>\n\n')
        f.write('<fcd-export xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
                'xsi:noNamespaceSchemaLocation="http://sumo.dlr.de/xsd/fcd_file.xsd">\n')
        for fr in frames:
            f.write(f'    <timestep time="{fr.t_s:.2f}">\n')
            for ident, (x, y) in zip(fr.ids, fr.xy.tolist(), strict=True):
                f.write(f'        <vehicle id="{ident}" x="{fmt.format(x)}" '
                        f'y="{fmt.format(y)}" angle="0.00" type="DEFAULT_VEHTYPE" '
                        f'speed="0.00" pos="0.00" lane="e0_0" slope="0.00"/>\n')
            f.write("    </timestep>\n")
        f.write("</fcd-export>\n")
