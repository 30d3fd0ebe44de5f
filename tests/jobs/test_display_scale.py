"""The per-channel display scale: the fast percentile is numpy's, value for value."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.atlas.scanner import DISPLAY_PERCENTILE, channel_scale, upper_percentile


@pytest.mark.parametrize("n", [1, 2, 7, 8192, 8193, 20_000, 300_001])
@pytest.mark.parametrize("q", [DISPLAY_PERCENTILE, 90.0, 99.99, 100.0])
def test_upper_percentile_is_numpys(n: int, q: float) -> None:
    rng = np.random.default_rng(n)
    for values in (
        np.abs(rng.standard_normal(n)).astype(np.float32),
        # Mostly zeros, as a projection far from its unit: the bound lands on a tie.
        np.where(rng.random(n) < 0.97, 0, rng.random(n)).astype(np.float32),
        np.sort(rng.random(n)).astype(np.float32),  # the strided sample sees only small values
        np.full(n, 0.25, np.float32),
    ):
        assert upper_percentile(values.copy(), q) == float(np.percentile(values, q))


def test_channel_scale() -> None:
    rng = np.random.default_rng(1)
    projections = [rng.standard_normal((3, 40, 30)).astype(np.float32) for _ in range(9)]
    magnitudes = np.abs(np.concatenate([p.ravel() for p in projections]))
    before = [p.copy() for p in projections]
    assert channel_scale(projections) == float(np.percentile(magnitudes, DISPLAY_PERCENTILE))
    assert all(np.array_equal(a, b) for a, b in zip(projections, before, strict=True))  # untouched
    # All but a handful zero: the percentile is 0, the largest magnitude is used instead.
    sparse = [np.zeros((3, 50, 50), np.float32) for _ in range(9)]
    sparse[4][1, 2, 3] = -2.0
    assert channel_scale(sparse) == 2.0
    assert channel_scale([]) == 0.0 and channel_scale([np.zeros((3, 2, 2), np.float32)]) == 0.0
