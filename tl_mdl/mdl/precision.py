"""The precision search: the coarsest bin width whose quantised reconstruction stays within
``tolerance`` of the unquantised one.

Bin widths live on a fixed geometric grid ``w_j = 2^(j / STEPS_PER_OCTAVE)`` (8 steps per
octave, ≈9% apart), the same for every SAE and dataset, so results are reproducible and
comparable. The loss increase grows with ``w`` (up to noise); the search brackets the
threshold by exponential stepping from an analytic guess, then bisects on the grid. The
returned width meets the tolerance and its next-coarser grid neighbour does not (or it is
the width at which every latent quantises to zero).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

STEPS_PER_OCTAVE = 8
_J_MIN, _J_MAX = -60 * STEPS_PER_OCTAVE, 60 * STEPS_PER_OCTAVE


def grid_width(j: int) -> float:
    """The ``j``-th bin width of the grid, ``2^(j / 8)``."""
    return 2.0 ** (j / STEPS_PER_OCTAVE)


def grid_index(w: float) -> int:
    """Index of the grid width nearest ``w`` (in log scale)."""
    return int(round(STEPS_PER_OCTAVE * math.log2(w)))


@dataclass
class SearchResult:
    bin_width: float
    loss_increase: float
    #: every (bin_width, loss_increase) evaluated, in order.
    trace: list[tuple[float, float]] = field(default_factory=list)
    #: True when every latent quantises to zero at ``bin_width`` and that still meets the
    #: tolerance (nothing coarser can change the code).
    saturated: bool = False


def search_bin_width(
    loss_increase: Callable[[float], float],
    tolerance: float,
    *,
    guess: float,
    saturation_width: float | None = None,
    proxy: Callable[[float], float] | None = None,
) -> SearchResult:
    """Coarsest grid width ``w`` with ``loss_increase(w) <= tolerance``.

    Args:
        loss_increase: ``w -> loss(quantised at w) − loss(unquantised)``.
        tolerance: the largest allowed increase (> 0).
        guess: where to start (e.g. the uniform-noise estimate ``w²/12`` per active latent).
        saturation_width: a width at which every latent quantises to zero; the search never
            goes coarser than the first grid point at or above it.
        proxy: an optional cheap estimate of ``loss_increase`` (e.g. on a subsample). It
            only moves the starting point: the search first brackets the threshold on the
            proxy, rescales the proxy by ``loss_increase / proxy`` at that point and brackets
            again, then runs the exact search from there. With a good proxy the exact loss is
            evaluated about twice (the answer and its coarser neighbour); the result is the
            same kind of answer as without it: ``loss_increase(w) <= tolerance`` and (unless
            saturated) ``loss_increase`` at the next-coarser grid width ``> tolerance``.
    """
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a finite number > 0, got {tolerance!r}")
    trace: list[tuple[float, float]] = []
    cache: dict[int, float] = {}

    def value(j: int) -> float:
        if j not in cache:
            w = grid_width(j)
            v = float(loss_increase(w))
            if math.isnan(v):
                raise ValueError(f"loss is NaN at bin_width={w:g}; check activations and SAE")
            cache[j] = v
            trace.append((w, v))
        return cache[j]

    j_sat = (
        _J_MAX
        if saturation_width is None
        else min(_J_MAX, math.ceil(STEPS_PER_OCTAVE * math.log2(max(saturation_width, 1e-300))))
    )
    if not (guess > 0 and math.isfinite(guess)):
        guess = 1.0
    j = min(max(grid_index(guess), _J_MIN), j_sat)
    if proxy is not None:
        j = _proxy_start(proxy, value, tolerance, j, j_sat)
    return _bracket(lambda j: value(j) <= tolerance, value, j, j_sat, tolerance, trace)


def _proxy_start(
    proxy: Callable[[float], float],
    value: Callable[[int], float],
    tolerance: float,
    j: int,
    j_sat: int,
) -> int:
    """Starting grid index from a proxy of the loss, calibrated by one exact evaluation."""
    pcache: dict[int, float] = {}

    def pval(j: int) -> float:
        if j not in pcache:
            v = float(proxy(grid_width(j)))
            pcache[j] = v if math.isfinite(v) else math.inf
        return pcache[j]

    try:
        j0 = _bracket(lambda j: pval(j) <= tolerance, pval, j, j_sat, tolerance, None)
    except ValueError:
        return j
    e0, p0 = value(j0), pval(j0)
    if not (e0 > 0 and p0 > 0 and math.isfinite(e0)):
        return j0
    scale = e0 / p0
    try:
        return _bracket(lambda j: scale * pval(j) <= tolerance, pval, j0, j_sat, tolerance, None)
    except ValueError:
        return j0


def _bracket(
    ok: Callable[[int], bool],
    value: Callable[[int], float],
    j: int,
    j_sat: int,
    tolerance: float,
    trace: list[tuple[float, float]] | None,
):
    """Exponential stepping from ``j`` then bisection on the grid. Returns a
    :class:`SearchResult` when ``trace`` is given, else the grid index found."""

    def done(lo: int, saturated: bool = False):
        if trace is None:
            return lo
        return SearchResult(grid_width(lo), value(lo), trace, saturated=saturated)

    if ok(j):
        lo, step, hi = j, 1, None
        while hi is None:
            if lo >= j_sat:
                return done(lo, saturated=True)
            cand = min(lo + step, j_sat)
            if ok(cand):
                lo, step = cand, step * 2
            else:
                hi = cand
    else:
        hi, step, lo = j, 1, None
        while lo is None:
            cand = max(hi - step, _J_MIN)
            if cand == hi:  # the finest grid width fails too
                raise ValueError(
                    f"no bin width >= {grid_width(_J_MIN):.3g} meets tolerance={tolerance:g}; "
                    f"the loss increase at the finest width tried was {value(hi):.3g}. "
                    "Raise the tolerance."
                )
            if ok(cand):
                lo = cand
            else:
                hi, step = cand, step * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return done(lo)
