"""Quantisation of latents and the exact description length of an integer code.

Definitions (docs/math.md §1, "Description length"): for latents ``f [N, F]`` and one
shared bin width ``w > 0``, ``q = round(f / w)``; latent ``i`` is *active* on input ``n``
when ``q[n, i] != 0``. With ``p_i`` the fraction of inputs where ``i`` is active and
``H_i`` the entropy (bits) of the nonzero values of ``q[:, i]``,

    DL = Σ_i [ H_b(p_i) + p_i · H_i ]   bits per input.

Writing ``c_i`` for the number of active inputs and ``c_{i,v}`` for how often value ``v``
occurs, ``p_i · H_i = (c_i log2 c_i − Σ_v c_{i,v} log2 c_{i,v}) / N``, which is how it is
computed (one pass over the nonzero entries, no per-feature Python loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor


def _check_bin_width(bin_width: float) -> float:
    w = float(bin_width)
    if not math.isfinite(w) or w <= 0:
        raise ValueError(f"bin_width must be a finite number > 0, got {bin_width!r}")
    return w


def quantize(latents: Float[Tensor, "... d_sae"], bin_width: float) -> Int[Tensor, "... d_sae"]:
    """``q = round(latents / bin_width)`` as int64 (round half to even, like ``torch.round``)."""
    w = _check_bin_width(bin_width)
    if latents.is_complex() or not latents.is_floating_point():
        raise TypeError(f"latents must be a float tensor, got dtype {latents.dtype}")
    if not torch.isfinite(latents).all():
        bad = (~torch.isfinite(latents)).nonzero()[0].tolist()
        raise ValueError(f"latents contain NaN/Inf (first at index {bad}); cannot quantise")
    return torch.round(latents.double() / w).to(torch.int64)


def dequantize(q: Int[Tensor, "... d_sae"], bin_width: float, dtype=torch.float32) -> Tensor:
    """The latents the decoder sees: ``q · bin_width``."""
    return (q.to(torch.float64) * _check_bin_width(bin_width)).to(dtype)


def fvu(x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"]) -> float:
    """Fraction of variance unexplained ``Σ_n‖x_n − x̂_n‖² / Σ_n‖x_n − x̄‖²`` (x̄ the
    per-dimension mean; sums over inputs and dimensions; float64 accumulation).
    ``explained_variance = 1 − fvu``. Inputs of any shape ``[..., d]`` are flattened."""
    x = x.reshape(-1, x.shape[-1])
    x_hat = x_hat.reshape(-1, x_hat.shape[-1])
    if x.shape != x_hat.shape:
        raise ValueError(f"x {tuple(x.shape)} and x_hat {tuple(x_hat.shape)} differ in shape")
    return float(sum_sq(x - x_hat) / total_variance(x))


def sum_sq(t: Tensor) -> float:
    """``Σ t²`` accumulated in float64."""
    return float(t.double().pow(2).sum())


def total_variance(x: Float[Tensor, "n d"]) -> float:
    """``Σ_n ‖x_n − x̄‖²`` in float64, one pass over blocks of rows (float64 temporaries of
    one block only): with ``c = x − k`` for a shift ``k`` (the mean in ``x``'s dtype, so
    ``c`` is small), ``Σ‖c‖² − ‖Σc‖² / N`` (relative error ~1e-15). Raises when it is 0
    (FVU undefined)."""
    x = x.reshape(-1, x.shape[-1])
    n, d = x.shape
    if n == 0:
        raise ValueError("no inputs: activations have N = 0 rows")
    shift = x.mean(0, dtype=x.dtype if x.is_floating_point() else torch.float32).double()
    col_sum = torch.zeros(d, dtype=torch.float64, device=x.device)
    sq = torch.zeros((), dtype=torch.float64, device=x.device)
    for b in x.split(max(1, (1 << 18) // max(d, 1))):
        c = b.to(torch.float64, copy=True).sub_(shift)
        col_sum += c.sum(0)
        c = c.reshape(-1)
        sq += torch.dot(c, c)
    sq = float(sq)
    tv = sq - float(col_sum.dot(col_sum)) / n
    if tv <= 1e-12 * sq:  # 0 up to the rounding of the cancellation
        raise ValueError("activations have zero variance (all inputs identical); FVU is undefined")
    return tv


def binary_entropy(p: Tensor) -> Tensor:
    """``H_b(p) = −p log2 p − (1−p) log2 (1−p)`` elementwise, with ``0 log 0 = 0``."""
    p = p.double()
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2)


def _xlog2x(c: Tensor) -> Tensor:
    c = c.double()
    return torch.special.xlogy(c, c) / math.log(2)


def flatnonzero(t: Tensor) -> Tensor:
    """Indices (int64, ascending) of the nonzero entries of ``t.reshape(-1)``. On CPU this
    is NumPy's ``flatnonzero`` (several times faster than ``torch.nonzero`` there)."""
    flat = t.reshape(-1)
    if flat.device.type == "cpu" and flat.dtype not in (torch.bfloat16, torch.float16):
        return torch.from_numpy(np.flatnonzero(flat.numpy())).to(torch.int64)
    return torch.nonzero(flat).squeeze(1)


@dataclass
class FeatureCode:
    """Per-feature statistics of an integer code ``q [N, F]`` (all tensors ``[F]``)."""

    n_inputs: int
    active_counts: Tensor  # c_i
    p_active: Tensor  # p_i = c_i / N
    value_entropy_bits: Tensor  # H_i (0 where c_i = 0)
    presence_bits: Tensor  # H_b(p_i)
    bits: Tensor  # H_b(p_i) + p_i H_i

    @property
    def bits_per_input(self) -> float:
        return float(self.bits.sum())


def feature_code_stats(q: Int[Tensor, "n d_sae"]) -> FeatureCode:
    """Per-feature presence and value entropies of an integer code ``q [N, F]``."""
    if q.ndim != 2:
        raise ValueError(f"q must be an integer code of shape [N, F], got {tuple(q.shape)}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(
            f"q must be an integer tensor (got {q.dtype}); quantise latents first with "
            "tl_mdl.quantize(latents, bin_width)"
        )
    n, f = q.shape
    if n == 0:
        raise ValueError("q has N = 0 inputs; the description length per input is undefined")
    flat = q.reshape(-1)
    idx = flatnonzero(flat)
    return sparse_code_stats(n, f, idx % f, flat[idx].to(torch.int64))


def _pair_entropy_terms(keys: Int[Tensor, " m"], n_groups: int, n_keys: int) -> Tensor:
    """``Σ_v c_{g,v} log2 c_{g,v}`` per group ``g`` for ``m`` (group, value) pairs packed
    into int64 ``keys = g · span + v`` in ``[0, n_keys)``, ``span = n_keys // n_groups``."""
    out = torch.zeros(n_groups, dtype=torch.float64)
    if keys.numel() == 0:
        return out
    if n_keys <= max(1 << 22, 4 * keys.numel()):  # dense counting: O(m + n_keys)
        pair_counts = torch.bincount(keys, minlength=n_keys)
        present = flatnonzero(pair_counts)
        span = n_keys // n_groups
        out.index_add_(0, present // span, _xlog2x(pair_counts[present]))
    else:  # sparse key space: sort-based counting
        uniq, pair_counts = torch.unique(keys, return_counts=True)
        out.index_add_(0, uniq // (n_keys // n_groups), _xlog2x(pair_counts))
    return out


def sparse_code_stats(
    n: int, f: int, cols: Int[Tensor, " m"], values: Int[Tensor, " m"]
) -> FeatureCode:
    """:func:`feature_code_stats` of the ``[n, f]`` code whose nonzero entries are
    ``values`` (int64, all ``!= 0``) in columns ``cols``; every other entry is 0. Counting
    is a ``bincount`` over (feature, value) keys (no sort) when the key range is small."""
    if n <= 0:
        raise ValueError("q has N = 0 inputs; the description length per input is undefined")
    cols = cols.to(torch.int64)
    values = values.to(torch.int64)
    counts = torch.bincount(cols, minlength=f)
    per_feature_pair = torch.zeros(f, dtype=torch.float64)  # Σ_v c_iv log2 c_iv
    if cols.numel():
        vmin = int(values.min())
        span = int(values.max()) - vmin + 1
        if span <= (2**62) // f:  # count (feature, value) pairs through one int64 key
            per_feature_pair = _pair_entropy_terms(cols * span + (values - vmin), f, f * span)
        else:  # astronomically wide value range: unique over (feature, value) rows
            uniq, pair_counts = torch.unique(
                torch.stack([cols, values], 1), dim=0, return_counts=True
            )
            per_feature_pair.index_add_(0, uniq[:, 0], _xlog2x(pair_counts))
    return code_stats_from_counts(n, counts, per_feature_pair)


def code_stats_from_counts(n: int, counts: Tensor, per_feature_pair: Tensor) -> FeatureCode:
    """:class:`FeatureCode` from per-feature active counts ``c_i`` (int64 ``[F]``) and
    ``Σ_v c_{i,v} log2 c_{i,v}`` (float64 ``[F]``) over ``n`` inputs (e.g. accumulated over
    chunks of inputs)."""
    counts_d = counts.double()
    p = counts_d / n
    # p_i H_i = (c_i log2 c_i − Σ_v c_iv log2 c_iv) / N ;  H_i = that / p_i.
    p_h = (_xlog2x(counts_d) - per_feature_pair) / n
    p_h = p_h.clamp_min(0.0)  # exact 0 up to rounding when a feature has one value
    h = torch.where(counts > 0, p_h / p.clamp_min(1e-300), torch.zeros_like(p_h))
    hb = binary_entropy(p)
    return FeatureCode(
        n_inputs=n,
        active_counts=counts,
        p_active=p,
        value_entropy_bits=h,
        presence_bits=hb,
        bits=hb + p_h,
    )


def latent_description_length(q: Int[Tensor, "n d_sae"]) -> float:
    """Bits per input of the integer latent code ``q [N, F]``:
    ``Σ_i [H_b(p_i) + p_i · H_i]`` (presence stream + value stream per feature)."""
    return feature_code_stats(q).bits_per_input


def value_entropy(q: Int[Tensor, "n d"] | Float[Tensor, "n d"]) -> Tensor:
    """Per-column entropy (bits) of all values of ``q`` (zeros included): the cost of
    coding each column with its own empirical distribution. Used for the raw cost. A float
    ``q`` must hold integer values (e.g. ``round(x / w)`` before conversion)."""
    n, d = q.shape
    lo, hi = torch.aminmax(q)
    span = int(hi) - int(lo) + 1
    key = (q - lo).to(torch.int64) + torch.arange(d, dtype=torch.int64, device=q.device) * span
    per_col = _pair_entropy_terms(key.reshape(-1), d, d * span)
    return (_xlog2x(torch.tensor(float(n))) - per_col) / n
