"""The raw cost: bits per input to code the activations themselves, each dimension with its
own empirical distribution, at the coarsest grid width within the same FVU tolerance (the
baseline a description length is compared with)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tl_mdl.mdl.evaluator import _KeyCounter, _sq_dist
from tl_mdl.mdl.precision import search_bin_width
from tl_mdl.mdl.quantize import _xlog2x, total_variance, value_entropy

#: elements of the activations sampled for the raw cost's proxy.
_PROXY_ELEMENTS = 1 << 15


def _raw_cost(
    x: Tensor,
    tolerance: float,
    tv: float | None = None,
    abs_max: float | None = None,
    rows: int | None = None,
) -> tuple[float, float]:
    """Bits per input to code the activations themselves, each dimension with its own
    empirical distribution, at the coarsest grid width with FVU ≤ tolerance.

    The FVU of ``round(x/w)·w`` is evaluated on all of ``x`` (float32 rounding error per
    element, float64 sums over rows); an element subsample serves as proxy to bracket the
    search. The code itself is ``round(x.double() / w)``."""
    tv = total_variance(x) if tv is None else tv
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    flat = xf.reshape(-1)
    if abs_max is None:
        lo, hi = torch.aminmax(flat)
        abs_max = max(-float(lo), float(hi))

    def inc(w: float) -> float:
        if rows is not None:  # chunked: temporaries O(rows · d)
            return sum(
                _sq_dist(torch.round(c * (1 / w)).mul_(w), c) for c in xf.split(rows)
            ) / tv
        return _sq_dist(torch.round(xf * (1 / w)).mul_(w), xf) / tv

    proxy = None
    if flat.numel() > 8 * _PROXY_ELEMENTS:
        gen = torch.Generator().manual_seed(0)
        pick = torch.randint(flat.numel(), (_PROXY_ELEMENTS,), generator=gen).to(flat.device)
        sample = flat[pick]
        scale = flat.numel() / _PROXY_ELEMENTS / tv

        def proxy(w: float) -> float:
            err = torch.round(sample * (1 / w)).mul_(w).sub_(sample)
            return float(torch.dot(err, err)) * scale

    guess = math.sqrt(12 * tolerance * tv / x.numel())
    res = search_bin_width(
        inc, tolerance, guess=guess, saturation_width=2 * abs_max + 1e-12, proxy=proxy
    )
    w = res.bin_width
    n, d = xf.shape
    # integer-valued float64 keys  round(x/w) − lo + column · span  (exact below 2^53)
    lo, hi = math.floor(-abs_max / w) - 1, math.ceil(abs_max / w) + 1
    span = hi - lo + 1
    if rows is not None:  # chunked per-dimension value histograms
        if span * d >= 2**62:
            raise ValueError(f"raw bin width {w:g} is too fine for the chunked path")
        counter = _KeyCounter(span * d, max(1 << 24, 4 * rows * d), xf.device)
        col_off = torch.arange(d, dtype=torch.int64, device=xf.device) * span - lo
        for c in xf.split(rows):
            key = torch.round(c.to(torch.float64) / w).to(torch.int64) + col_off
            counter.add(key)
        keys, counts = counter.items()
        per_col = torch.zeros(d, dtype=torch.float64, device=xf.device)
        per_col.index_add_(0, keys // span, _xlog2x(counts))
        return float(((_xlog2x(torch.tensor(float(n))) - per_col.cpu()) / n).sum()), w
    if span * d > max(1 << 24, 4 * flat.numel()) or span * d >= 2**52:
        q = torch.round(xf.to(torch.float64) / w).to(torch.int64)
        return float(value_entropy(q).sum()), w
    offset = torch.arange(d, dtype=torch.float64, device=xf.device) * span - lo
    itype = torch.int32 if span * d < 2**31 else torch.int64  # int32 counts ~3× faster
    key = xf.to(torch.float64, copy=True).div_(w).round_().add_(offset).to(itype)
    counts = torch.bincount(key.reshape(-1), minlength=span * d).view(d, span)
    per_col = _xlog2x(counts).sum(1)
    return float(((_xlog2x(torch.tensor(float(n))) - per_col) / n).sum()), w
