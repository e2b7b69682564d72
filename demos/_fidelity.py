"""Meet a fidelity level with the fewest active latents: a search over TopK's ``k``.

At a fixed width, a TopK SAE's quantised FVU falls as ``k`` grows and its description
length rises, so the shortest description with ``FVU_q ≤ t`` is (up to training noise) the
one with the smallest feasible ``k``. :func:`search_k` finds it for several levels at once,
sharing the SAEs it trains between levels: it brackets each level between an infeasible
``k_lo`` and a feasible ``k_hi`` (doubling or halving from a guess), then narrows the bracket
by interpolating ``log k`` linearly in ``FVU_q``, until ``k_hi − k_lo ≤ max(1, rel · k_hi)``.
:func:`dl_at_level` then interpolates ``log DL`` linearly in ``FVU_q`` between the bracket's
two SAEs, the DL at exactly ``FVU_q = t`` (the frontier value used to compare widths).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

Row = dict[str, Any]


def _bracket(cache: dict[int, Row], t: float) -> tuple[int | None, int | None]:
    feasible = [k for k, r in cache.items() if r["fvu_quantized"] <= t]
    hi = min(feasible) if feasible else None
    lo = max((k for k, r in cache.items() if r["fvu_quantized"] > t and (hi is None or k < hi)),
             default=None)
    return lo, hi


def _next_k(cache: dict[int, Row], t: float, width: int, guess: int, rel: float) -> int | None:
    """The next ``k`` to train for level ``t``, or None when the level is settled."""
    lo, hi = _bracket(cache, t)
    if hi is None:  # nothing feasible yet: go up
        if lo is None:
            return min(width, max(1, guess))
        return None if lo >= width else min(width, 2 * lo)
    if lo is None:  # everything tried is feasible: go down
        return None if hi <= 1 else (guess if guess < hi else hi // 2)
    if hi - lo <= max(1, rel * hi):
        return None
    f_lo, f_hi = cache[lo]["fvu_quantized"], cache[hi]["fvu_quantized"]
    frac = (f_lo - t) / (f_lo - f_hi) if f_lo > f_hi else 0.5
    k = round(math.exp(math.log(lo) + frac * (math.log(hi) - math.log(lo))))
    # never the bracket's ends, and a bisection when interpolation would barely move it
    k = min(max(k, lo + 1), hi - 1)
    mid = round(math.sqrt(lo * hi))
    if (k - lo) < 0.1 * (hi - lo) or (hi - k) < 0.1 * (hi - lo):
        k = min(max(mid, lo + 1), hi - 1)
    return k


def search_k(
    probe: Callable[[int], Row],
    width: int,
    levels: Sequence[float],
    guesses: dict[float, int] | None = None,
    rel: float = 0.15,
    cache: dict[int, Row] | None = None,
) -> dict[float, tuple[Row | None, Row | None]]:
    """For each level ``t``: ``(row_lo, row_hi)``, the SAEs with the largest infeasible and
    the smallest feasible ``k`` found (``FVU_q > t`` / ``≤ t``; either is None when every /
    no ``k ≤ width`` meets the level). ``probe(k)`` trains and scores one SAE and returns its
    row (with ``"fvu_quantized"``); every ``k`` is probed at most once. ``guesses``: a
    starting ``k`` per level (e.g. the previous width's answer). ``cache``: rows already
    trained at this width, ``{k: row}`` (filled in place)."""
    if not levels or any(not (0 < t) for t in levels):
        raise ValueError(f"levels={list(levels)!r} must be positive FVU_q thresholds")
    if width < 1 or not (0 < rel < 1):
        raise ValueError(f"width={width} must be >= 1 and rel={rel} in (0, 1)")
    cache = {} if cache is None else cache
    guesses = guesses or {}
    out = {}
    for t in sorted(levels, reverse=True):  # the loosest level first: the smallest k
        lo, hi = _bracket(cache, t)
        guess = guesses.get(t) or hi or (2 * lo if lo else 8)
        while (k := _next_k(cache, t, width, guess, rel)) is not None:
            cache[k] = probe(k)
        lo, hi = _bracket(cache, t)
        out[t] = (cache.get(lo) if lo else None, cache.get(hi) if hi else None)
    return out


def dl_at_level(row_lo: Row | None, row_hi: Row | None, t: float) -> float:
    """``DL`` at exactly ``FVU_q = t``: ``log DL`` interpolated linearly in ``FVU_q`` between
    the bracket's SAEs (the feasible SAE's DL when there is no infeasible one; NaN when no
    SAE meets the level)."""
    if row_hi is None:
        return math.nan
    if row_lo is None:
        return float(row_hi["bits_per_input"])
    f_lo, f_hi = row_lo["fvu_quantized"], row_hi["fvu_quantized"]
    b_lo, b_hi = math.log(row_lo["bits_per_input"]), math.log(row_hi["bits_per_input"])
    frac = (f_lo - t) / (f_lo - f_hi) if f_lo > f_hi else 1.0
    return math.exp(b_lo + frac * (b_hi - b_lo))

