"""AccessIndex.nearest with a hint (where each position was attached a moment ago)
answers exactly what it answers without one, bit for bit: a hint only decides how
much work an answer takes."""

from __future__ import annotations

import numpy as np
import pytest

from cloudlet.placement import AccessIndex


def _layouts() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    grid = np.stack(np.meshgrid(np.arange(10) * 500.0, np.arange(10) * 500.0,
                                indexing="ij"), -1).reshape(-1, 2)
    return [rng.uniform(0, 5000, (60, 2)), grid,  # a grid: ties on every cell border
            np.array([[100.0, 100.0]]),  # one cloudlet
            np.array([[0.0, 0.0], [0.0, 0.0], [800.0, 0.0]])]  # two at one place


@pytest.mark.parametrize("layout", range(4))
def test_a_hint_changes_nothing_in_the_answer(layout: int) -> None:
    pos = _layouts()[layout]
    index = AccessIndex(pos, extent_m=(0.0, 0.0, 5000.0, 5000.0))
    rng = np.random.default_rng(layout)
    xy = np.concatenate([
        rng.uniform(-200, 5200, (4000, 2)),
        rng.uniform(-50_000, 50_000, (50, 2)),  # off the raster: brute force
        np.repeat(np.arange(0, 5001, 250.0), 2).reshape(-1, 2),  # on borders and corners
    ])
    plain, plain_d = index.nearest(xy)
    for hint in (plain,  # the right answer as the hint
                 rng.integers(-1, len(pos), len(xy)),  # wrong or missing guesses
                 np.full(len(xy), -1)):
        got, got_d = index.nearest(xy, hint.copy())
        assert np.array_equal(got, plain)
        assert np.array_equal(got_d, plain_d)

