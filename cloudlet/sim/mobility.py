"""Synthetic mobility models, each one vectorised step for all users per tick.

Placement policies are only as good as the motion they are tried against, so the
simulator offers the three classic models of the mobility literature (Camp,
Boleng and Davies, "A survey of mobility models for ad hoc network research",
2002), with their known statistics tested in tests/test_sim_mobility.py:

- random waypoint: go straight to a uniform random point at a uniform random
  speed, pause, repeat. Density piles up in the middle of the area.
- Gauss-Markov: speed and direction are AR(1) processes around a mean, so motion
  is smooth with a tunable memory (`alpha`); near an edge the mean direction
  turns to the centre.
- Manhattan grid: users drive along the streets of a grid; at each intersection
  they go straight, or turn left or right (`turn_probability`, split evenly).

Every model keeps a structure of arrays and moves all users with array
operations; none loops over users. Trace replay (CSV, SUMO FCD) is in traces.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from numpy.typing import NDArray

from cloudlet.errors import InvalidArgument
from cloudlet.jit import compiled

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


class Mobility(ABC):
    """Users in numbered slots. A slot is active while its user is in the world.

    `advance(t_s)` moves the world to time `t_s` (non-decreasing); `xy` (slots, 2)
    and `active` (slots,) then describe it. Synthetic models keep every slot
    active; trace replay fills and frees slots as vehicles enter and leave.
    """

    xy: FloatArray
    active: BoolArray
    extent_m: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max

    @property
    def slots(self) -> int:
        return len(self.xy)

    @abstractmethod
    def advance(self, t_s: float) -> None: ...

    def names(self, slots: NDArray[np.int64]) -> list[str]:
        """A name for each slot (trace ids for traces)."""
        return [f"u{int(s)}" for s in slots]

    def close(self) -> None:  # noqa: B027 - most models hold nothing to release
        """Release files (trace readers)."""


class _Synthetic(Mobility):
    def __init__(self, users: int, width_m: float, height_m: float,
                 rng: np.random.Generator) -> None:
        if users < 1 or not width_m > 0 or not height_m > 0:
            raise InvalidArgument("a mobility model needs users >= 1 and a positive area")
        self.rng = rng
        self.width_m = width_m
        self.height_m = height_m
        self.extent_m = (0.0, 0.0, width_m, height_m)
        self.active = np.ones(users, dtype=bool)
        self.t_s = 0.0

    def advance(self, t_s: float) -> None:
        dt = t_s - self.t_s
        if dt > 0:
            self.step(dt)
            self.t_s = t_s

    @abstractmethod
    def step(self, dt_s: float) -> None: ...


class RandomWaypoint(_Synthetic):
    """Straight legs to uniform random waypoints at uniform speeds, with pauses."""

    def __init__(self, users: int, width_m: float, height_m: float, rng: np.random.Generator,
                 speed_min_m_s: float = 1.0, speed_max_m_s: float = 15.0,
                 pause_min_s: float = 0.0, pause_max_s: float = 30.0) -> None:
        super().__init__(users, width_m, height_m, rng)
        if not 0 < speed_min_m_s <= speed_max_m_s:
            # A zero minimum speed makes the mean speed decay towards 0 forever
            # (Yoon, Liu and Noble, "Random waypoint considered harmful", 2003).
            raise InvalidArgument("random waypoint needs 0 < speed_min_m_s <= speed_max_m_s")
        self.speed_range = (speed_min_m_s, speed_max_m_s)
        self.pause_range = (pause_min_s, pause_max_s)
        self.xy = self._points(users)
        self.dest = self._points(users)
        self.speed = rng.uniform(*self.speed_range, users)
        self.pause_left = np.zeros(users)

    def _points(self, k: int) -> FloatArray:
        pts: FloatArray = self.rng.uniform((0.0, 0.0), (self.width_m, self.height_m), (k, 2))
        return pts

    def step(self, dt_s: float) -> None:
        paused = self.pause_left > 0
        self.pause_left[paused] -= dt_s
        resume = paused & (self.pause_left <= 0)
        if resume.any():
            self._new_leg(np.flatnonzero(resume))
        moving = ~paused
        vec = self.dest - self.xy
        dist = np.hypot(vec[:, 0], vec[:, 1])
        travel = self.speed * dt_s
        arrive = moving & (travel >= dist)
        go = moving & ~arrive
        frac = np.where(go, travel / np.maximum(dist, 1e-12), 0.0)
        self.xy += vec * frac[:, None]
        self.xy[arrive] = self.dest[arrive]
        if arrive.any():
            idx = np.flatnonzero(arrive)
            self.pause_left[idx] = self.rng.uniform(*self.pause_range, len(idx))
            now = idx[self.pause_left[idx] <= 0]
            if len(now):
                self._new_leg(now)

    def _new_leg(self, idx: NDArray[np.int64]) -> None:
        self.dest[idx] = self._points(len(idx))
        self.speed[idx] = self.rng.uniform(*self.speed_range, len(idx))
        self.pause_left[idx] = 0.0


def _wrap(angle: FloatArray) -> FloatArray:
    wrapped: FloatArray = (angle + np.pi) % (2 * np.pi) - np.pi
    return wrapped


class GaussMarkov(_Synthetic):
    """Speed and direction as AR(1) processes (Liang and Haas, 1999).

    Per step of `dt` seconds, with a = alpha ** dt (alpha is the memory over 1 s):
        s <- a s + (1 - a) mean_speed + sqrt(1 - a^2) speed_std e1
        d <- a d + (1 - a) mean_dir   + sqrt(1 - a^2) direction_std e2
    so the stationary speed has mean `mean_speed_m_s` and deviation
    `speed_std_m_s`, and successive 1 s speeds correlate by `alpha`. Within
    `edge_margin_m` of an edge the mean direction points to the centre; a user
    that still crosses an edge is reflected.
    """

    def __init__(self, users: int, width_m: float, height_m: float, rng: np.random.Generator,
                 mean_speed_m_s: float = 8.0, speed_std_m_s: float = 3.0,
                 direction_std_rad: float = 0.4, alpha: float = 0.85,
                 edge_margin_m: float = 100.0) -> None:
        super().__init__(users, width_m, height_m, rng)
        if not 0.0 <= alpha <= 1.0:
            raise InvalidArgument("alpha must be in [0, 1]")
        self.mean_speed = mean_speed_m_s
        self.speed_std = speed_std_m_s
        self.dir_std = direction_std_rad
        self.alpha = alpha
        self.margin = edge_margin_m
        self.xy = rng.uniform((0.0, 0.0), (width_m, height_m), (users, 2))
        self.speed = np.maximum(rng.normal(mean_speed_m_s, speed_std_m_s, users), 0.0)
        self.mean_dir = rng.uniform(-np.pi, np.pi, users)
        self.direction = self.mean_dir.copy()

    def step(self, dt_s: float) -> None:
        a = self.alpha ** dt_s
        noise = np.sqrt(max(1.0 - a * a, 0.0))
        n = len(self.xy)
        e = self.rng.standard_normal((2, n))
        x, y = self.xy[:, 0], self.xy[:, 1]
        near_edge = ((x < self.margin) | (x > self.width_m - self.margin)
                     | (y < self.margin) | (y > self.height_m - self.margin))
        to_centre = np.arctan2(self.height_m / 2 - y, self.width_m / 2 - x)
        mean_dir = np.where(near_edge, to_centre, self.mean_dir)
        self.speed = np.maximum(
            a * self.speed + (1 - a) * self.mean_speed + noise * self.speed_std * e[0], 0.0)
        target = self.direction + _wrap(mean_dir - self.direction)
        self.direction = _wrap(a * self.direction + (1 - a) * target
                               + noise * self.dir_std * e[1])
        self.xy[:, 0] += self.speed * np.cos(self.direction) * dt_s
        self.xy[:, 1] += self.speed * np.sin(self.direction) * dt_s
        self._reflect()

    def _reflect(self) -> None:
        for axis, hi in ((0, self.width_m), (1, self.height_m)):
            c = self.xy[:, axis]
            low = c < 0
            high = c > hi
            if low.any() or high.any():
                c[low] = -c[low]
                c[high] = 2 * hi - c[high]
                np.clip(c, 0.0, hi, out=c)
                flip = low | high
                if axis == 0:
                    self.direction[flip] = _wrap(np.pi - self.direction[flip])
                else:
                    self.direction[flip] = _wrap(-self.direction[flip])


# Directions on the grid: +x, +y, -x, -y. Left of d is (d + 1) % 4, right (d + 3) % 4.
_DIRS = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])


class ManhattanGrid(_Synthetic):
    """Users drive on the streets of a grid of `block_m` blocks.

    Streets run along x = k block and y = k block inside the area. At each
    intersection a user goes straight with probability 1 - turn_probability and
    turns left or right with turn_probability / 2 each; where that direction
    leaves the grid it picks among the directions that stay on it (a U-turn only
    if none does). Each step, with `speed_change_probability`, a user draws a new
    speed, uniform in [speed_min, speed_max].
    """

    MAX_CROSSINGS = 16  # intersections one user may pass in one step

    def __init__(self, users: int, width_m: float, height_m: float, rng: np.random.Generator,
                 block_m: float = 200.0, speed_min_m_s: float = 1.0,
                 speed_max_m_s: float = 15.0, turn_probability: float = 0.5,
                 speed_change_probability: float = 0.1) -> None:
        super().__init__(users, width_m, height_m, rng)
        nx = int(width_m // block_m)
        ny = int(height_m // block_m)
        if nx < 1 or ny < 1:
            raise InvalidArgument("the Manhattan grid needs at least one block each way")
        self.block = block_m
        self.max_c = np.array([nx * block_m, ny * block_m])
        self.extent_m = (0.0, 0.0, float(self.max_c[0]), float(self.max_c[1]))
        self.speed_range = (speed_min_m_s, speed_max_m_s)
        self.turn_p = turn_probability
        self.change_p = speed_change_probability
        horizontal = rng.random(users) < 0.5
        along = rng.uniform(0.0, 1.0, users)
        xs = np.where(horizontal, along * self.max_c[0], rng.integers(0, nx + 1, users) * block_m)
        ys = np.where(horizontal, rng.integers(0, ny + 1, users) * block_m, along * self.max_c[1])
        self.xy = np.stack([xs, ys], axis=1)
        self.direction = np.where(horizontal, 0, 1) + 2 * (rng.random(users) < 0.5)
        self.speed = rng.uniform(*self.speed_range, users)

    def step(self, dt_s: float) -> None:
        n = len(self.xy)
        change = self.rng.random(n) < self.change_p
        if change.any():
            self.speed[change] = self.rng.uniform(*self.speed_range, int(change.sum()))
        travel = self.speed * dt_s
        idx = np.arange(n)
        for _ in range(self.MAX_CROSSINGS):
            if len(idx) == 0:
                break
            hit = _drive(self.xy, self.direction, travel, idx, float(self.block))
            if len(hit) == 0:
                break
            self._turn(hit)
            idx = hit[travel[hit] > 0]
        _snap(self.xy, self.direction, float(self.block), float(self.max_c[0]),
              float(self.max_c[1]))

    def _turn(self, idx: NDArray[np.int64]) -> None:
        d = self.direction[idx]
        u = self.rng.random(len(idx))
        half = self.turn_p / 2
        want = np.where(u < half, (d + 1) % 4, np.where(u < self.turn_p, (d + 3) % 4, d))
        # Valid directions at each of these intersections (stay on the grid).
        p = self.xy[idx]
        ok = np.stack([p[:, 0] < self.max_c[0] - 1e-6, p[:, 1] < self.max_c[1] - 1e-6,
                       p[:, 0] > 1e-6, p[:, 1] > 1e-6], axis=1)
        rows = np.arange(len(idx))
        bad = ~ok[rows, want]
        if bad.any():
            # The wish leaves the grid: straight if it can, else a turn (either,
            # at random), a U-turn only at a dead end.
            r = rows[bad]
            db = d[bad]
            flip = self.rng.random(len(r)) < 0.5
            first = np.where(flip, (db + 1) % 4, (db + 3) % 4)
            second = np.where(flip, (db + 3) % 4, (db + 1) % 4)
            choice = np.where(ok[r, db], db,
                              np.where(ok[r, first], first,
                                       np.where(ok[r, second], second, (db + 2) % 4)))
            want[bad] = choice
        self.direction[idx] = want



@compiled
def _drive(xy: FloatArray, direction: NDArray[np.int64], travel: FloatArray,
           idx: NDArray[np.int64], block: float) -> NDArray[np.int64]:
    """Move users `idx` along their streets by their `travel` (metres left this step),
    no further than the next intersection: those that reach it stop there, snapped to
    it (no drift off the streets over an hour), with `travel` reduced by the way
    driven; the rest drive it all. Returns the users at an intersection, in order."""
    hit = np.empty(len(idx), dtype=np.int64)
    n_hit = 0
    for j in range(len(idx)):
        i = idx[j]
        d = direction[i]
        axis = d % 2
        c = xy[i, axis] / block
        nxt = np.floor(c + 1e-9) + 1.0 if d < 2 else np.ceil(c - 1e-9) - 1.0
        dist = np.abs(nxt - c) * block
        dx, dy = _DIRS[d, 0], _DIRS[d, 1]
        if travel[i] >= dist:
            xy[i, 0] = np.round((xy[i, 0] + dx * dist) / block) * block
            xy[i, 1] = np.round((xy[i, 1] + dy * dist) / block) * block
            travel[i] -= dist
            hit[n_hit] = i
            n_hit += 1
        else:
            xy[i, 0] += dx * travel[i]
            xy[i, 1] += dy * travel[i]
            travel[i] = 0.0
    return hit[:n_hit]


@compiled
def _snap(xy: FloatArray, direction: NDArray[np.int64], block: float, max_x: float,
          max_y: float) -> None:
    """Keep the coordinate across each user's street exactly on it, and every user
    inside the grid."""
    for i in range(len(xy)):
        across = 1 - direction[i] % 2
        xy[i, across] = np.round(xy[i, across] / block) * block
        xy[i, 0] = min(max(xy[i, 0], 0.0), max_x)
        xy[i, 1] = min(max(xy[i, 1], 0.0), max_y)
