"""Description length of activations under an SAE, with the precision searched: the entry
point. The report is in :mod:`~tl_mdl.mdl.report`, the evaluator of quantised
reconstructions in :mod:`~tl_mdl.mdl.evaluator`, the raw-activation baseline in
:mod:`~tl_mdl.mdl.raw_cost`."""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_mdl.activations.io import load_activations
from tl_mdl.mdl.evaluator import _PROXY_ROWS, _QuantizedFVU, _StreamedQuantizedFVU, encode_all
from tl_mdl.mdl.losses import LossFn, build_model_loss
from tl_mdl.mdl.precision import SearchResult, search_bin_width
from tl_mdl.mdl.quantize import _check_bin_width, total_variance
from tl_mdl.mdl.raw_cost import _raw_cost
from tl_mdl.mdl.report import DLReport
from tl_mdl.sae import SAE

DEFAULT_TOLERANCE = 0.01

__all__ = ["DEFAULT_TOLERANCE", "DEFAULT_MAX_MEMORY_MB", "DLReport", "description_length",
           "encode_all"]


def _finite_extremes(x: Tensor) -> float | None:
    """``max |x|`` when every entry is finite, else None (one pass: NaN propagates)."""
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return max(-lo, hi)


def _as_activations(activations, d_in: int) -> Tensor:
    """``[N, d_in]`` activations, validated (a tensor, or safetensors shard path(s))."""
    return _validated_activations(activations, d_in)[0]


def _validated_activations(activations, d_in: int) -> tuple[Tensor, float]:
    """``[N, d_in]`` activations (validated) and their largest absolute value."""
    if isinstance(activations, (str, os.PathLike, list)):
        activations = load_activations(activations)
    if not isinstance(activations, Tensor):
        raise TypeError(
            f"activations must be a Tensor [N, d_in] or path(s) to safetensors shards, "
            f"got {type(activations).__name__}"
        )
    if activations.ndim < 2 or activations.shape[-1] != d_in:
        raise ValueError(
            f"activations have shape {tuple(activations.shape)} but the SAE has d_in={d_in}; "
            "pass [N, d_in] (or [..., d_in], flattened)"
        )
    x = activations.reshape(-1, d_in)
    if x.shape[0] == 0:
        raise ValueError("activations are empty (N = 0); nothing to describe")
    if not x.is_floating_point():
        raise TypeError(f"activations must be floating point, got {x.dtype}")
    abs_max = _finite_extremes(x)
    if abs_max is None:
        row = int((~torch.isfinite(x)).any(-1).nonzero()[0])
        raise ValueError(f"activations contain NaN/Inf (first bad row {row}); clean them first")
    return x, abs_max


#: ``max_memory_mb=None`` holds all latents at once only up to this size: a SAELens-sized
#: SAE (d_sae 24,576) on 200,000 inputs would need 19.7 GB of dense latents.
DEFAULT_MAX_MEMORY_MB = 4096


#: The share of the memory budget the streamed path may fill with the nonzero latents kept
#: in sparse form between passes (chunks of dense latents take 1/16 of it).
_KEEP_FRACTION = 0.25


def _budget_bytes(max_memory_mb: float | None) -> float:
    """The memory budget in bytes (``None``: ``DEFAULT_MAX_MEMORY_MB``), validated."""
    if max_memory_mb is None:
        max_memory_mb = DEFAULT_MAX_MEMORY_MB
    budget = float(max_memory_mb) * 2**20
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"max_memory_mb must be a finite number > 0, got {max_memory_mb!r}")
    return budget


def _chunk_rows(max_memory_mb: float | None, n: int, d_sae: int) -> int | None:
    """Rows per chunk for a memory budget (None: everything at once fits)."""
    budget = _budget_bytes(max_memory_mb)
    if n * d_sae * 4 <= budget:
        return None
    return max(1, int(budget / (64 * d_sae)))


@torch.no_grad()
def description_length(
    sae: SAE,
    activations: Float[Tensor, "n d_in"] | str | os.PathLike,
    *,
    bin_width: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    loss: str | LossFn = "fvu",
    model: Any = None,
    hook_name: str | None = None,
    tokens: Tensor | None = None,
    raw_cost: bool = True,
    max_memory_mb: float | None = None,
) -> DLReport:
    """Description length (bits per input) of ``activations [N, d_in]`` written in the SAE's
    latents, quantised at one shared bin width.

    With ``bin_width=None`` the precision is searched: the coarsest grid width (see
    :mod:`tl_mdl.mdl.precision`) whose quantised reconstruction raises the loss by at most
    ``tolerance`` over the unquantised one. ``loss`` is ``"fvu"`` (default; absolute FVU
    increase), a model-based loss ``"kl"`` / ``"ce"`` (nats per token, with ``model``,
    ``hook_name`` and ``tokens``; built by ``tl_mdl.hooks``), or any callable
    ``bin_width | None -> loss``.

    ``max_memory_mb`` bounds memory: when the latents ``[N, d_sae]`` (4 bytes each) would
    take more than that, the inputs are processed in chunks of rows whose latents take at
    most a quarter of it (the rest is for temporaries), re-encoding every chunk on each
    pass (the unquantised error, each exact evaluation of the search, the final code
    statistics) unless the nonzero latents, kept in sparse form, fit in a quarter of the
    budget (then the inputs are encoded once); counts are merged across chunks, so the
    report is the same as without it (up to float summation order). Default ``None``: all
    latents held at once (fastest) when they take at most ``DEFAULT_MAX_MEMORY_MB`` (4096),
    else chunked within that budget.
    """
    if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance <= 0:
        raise ValueError(f"tolerance must be a finite number > 0, got {tolerance!r}")
    if loss == "fvu" and tolerance >= 1:
        raise ValueError(
            f"tolerance={tolerance} is an absolute FVU increase and must be < 1 "
            "(e.g. 0.01 = one percent of the variance)"
        )
    x, x_abs_max = _validated_activations(activations, sae.cfg.d_in)
    rows = _chunk_rows(max_memory_mb, x.shape[0], sae.cfg.d_sae)
    tv = total_variance(x)
    if rows is None:
        fq = _QuantizedFVU(sae, x, encode_all(sae, x), tv)
    else:
        keep = _KEEP_FRACTION * _budget_bytes(max_memory_mb)
        fq = _StreamedQuantizedFVU(sae, x, rows, tv, keep)
    saturation = 2 * fq.abs_max + 1e-12

    if callable(loss):
        loss_fn, loss_name = loss, getattr(loss, "__name__", "custom")
    elif loss == "fvu":
        loss_fn, loss_name = None, "fvu"
    elif isinstance(loss, str):
        loss_fn = build_model_loss(loss, sae=sae, model=model, hook_name=hook_name, tokens=tokens)
        loss_name = loss
    else:
        raise TypeError(f"loss must be 'fvu', 'kl', 'ce' or a callable, got {loss!r}")

    if loss_fn is None:
        base = fq.fvu
        increase = fq
    else:
        base = float(loss_fn(None))

        def increase(w: float) -> float:
            return float(loss_fn(w)) - base

    if bin_width is None:
        res = search_bin_width(
            increase,
            tolerance,
            guess=fq.guess(tolerance),
            saturation_width=saturation,
            proxy=fq.proxy if loss_fn is None and fq.n > 2 * _PROXY_ROWS else None,
        )
    else:
        w = _check_bin_width(bin_width)
        res = SearchResult(w, float(increase(w)), [])
        tolerance = None  # type: ignore[assignment]
    w = res.bin_width

    stats, n_levels = fq.code_stats(w)
    bits_per_value = math.log2(n_levels) if n_levels > 1 else 0.0
    l0 = float(stats.active_counts.sum()) / stats.n_inputs
    fvu_quantized = fq.quantized_fvu(w) if loss_fn is not None else fq.fvu + res.loss_increase
    if raw_cost:
        # Same fidelity as the SAE code: the FVU tolerance, or (for model-based losses and
        # fixed widths) the FVU increase the SAE's code actually incurs at w.
        raw_tol = (
            tolerance
            if (tolerance is not None and loss_name == "fvu")
            else max(fvu_quantized - fq.fvu, 1e-6)
        )
        raw_bits, raw_w = _raw_cost(x, raw_tol, tv, x_abs_max, rows)
    else:
        raw_bits, raw_w = float("nan"), float("nan")
    return DLReport(
        bits_per_input=stats.bits_per_input,
        bin_width=w,
        tolerance=tolerance,
        loss=loss_name,
        loss_unquantized=base,
        loss_quantized=base + res.loss_increase,
        l0=l0,
        l0_unquantized=fq.n_nonzero / stats.n_inputs,
        fvu=fq.fvu,
        fvu_quantized=fvu_quantized,
        bits_per_value=bits_per_value,
        naive_bits=l0 * (bits_per_value + math.log2(sae.cfg.d_sae)),
        raw_bits=raw_bits,
        raw_bin_width=raw_w,
        n_inputs=stats.n_inputs,
        d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae,
        features={
            "p_active": stats.p_active,
            "value_entropy_bits": stats.value_entropy_bits,
            "bits": stats.bits,
        },
        search_trace=res.trace,
    )
