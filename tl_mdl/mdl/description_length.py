"""Description length of activations under an SAE, with the precision searched."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_mdl._io import load_activations
from tl_mdl.mdl.losses import LossFn, build_model_loss
from tl_mdl.mdl.precision import SearchResult, search_bin_width
from tl_mdl.mdl.quantize import (
    _check_bin_width,
    feature_code_stats,
    quantize,
    total_variance,
    value_entropy,
)
from tl_mdl.sae import SAE

DEFAULT_TOLERANCE = 0.01
_CHUNK = 8192


@dataclass
class DLReport:
    """Description length of ``N`` activations under an SAE at one precision.

    ``bits_per_input = Σ_i [H_b(p_i) + p_i H_i]`` of the quantised code (DESIGN.md).
    """

    bits_per_input: float
    bin_width: float
    tolerance: float | None
    loss: str
    #: loss with unquantised / quantised latents (FVU, or nats for CE/KL)
    loss_unquantized: float
    loss_quantized: float
    l0: float  # mean number of active (q != 0) latents per input
    l0_unquantized: float  # mean number of nonzero latents before quantisation
    fvu: float  # FVU of the unquantised reconstruction
    fvu_quantized: float  # FVU of decode(q · w)
    bits_per_value: float  # log2(#distinct nonzero q values): a fixed-length value code
    naive_bits: float  # L0 · (bits_per_value + log2 F)
    raw_bits: float  # Σ_d H(round(x_d / w_raw)), per-dimension coding of the activations
    raw_bin_width: float  # coarsest grid w_raw with FVU(x, round(x/w_raw) w_raw) within the
    # FVU tolerance (or, for model losses / fixed widths, the SAE code's own FVU increase)
    n_inputs: int
    d_in: int
    d_sae: int
    #: per-feature table, each ``[F]``: p_active, value_entropy_bits, bits
    features: dict[str, Tensor] = field(repr=False, default_factory=dict)
    search_trace: list[tuple[float, float]] = field(repr=False, default_factory=list)

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.fvu

    @property
    def explained_variance_quantized(self) -> float:
        return 1.0 - self.fvu_quantized

    @property
    def raw_bits_per_float(self) -> float:
        return self.raw_bits / self.d_in

    def summary(self) -> dict[str, Any]:
        """Scalars only (JSON-serialisable)."""
        d = asdict(self)
        d.pop("features")
        d.pop("search_trace")
        d["explained_variance"] = self.explained_variance
        d["raw_bits_per_float"] = self.raw_bits_per_float
        return d

    def feature_rows(self) -> list[dict[str, float]]:
        """One dict per feature: index, p_active, value_entropy_bits, bits."""
        cols = {k: v.tolist() for k, v in self.features.items()}
        return [{"feature": i, **{k: cols[k][i] for k in cols}} for i in range(self.d_sae)]

    def write_feature_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.feature_rows()
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return path

    def __str__(self) -> str:
        return (
            f"DL {self.bits_per_input:.2f} bits/input (w={self.bin_width:.4g}, "
            f"L0 {self.l0:.2f}, FVU {self.fvu:.4f} -> {self.fvu_quantized:.4f}; "
            f"naive {self.naive_bits:.1f}, raw {self.raw_bits:.1f} bits)"
        )


@torch.no_grad()
def encode_all(
    sae: SAE, activations: Float[Tensor, "n d_in"], *, batch_size: int = _CHUNK
) -> Float[Tensor, "n d_sae"]:
    """``sae.encode`` over all rows in chunks, on the SAE's device; returns latents there."""
    dev = sae.W_enc.device
    out = [
        sae.encode(activations[i : i + batch_size].to(dev))
        for i in range(0, activations.shape[0], batch_size)
    ]
    return torch.cat(out)


class _QuantizedFVU:
    """``w -> FVU(x, decode(round(f/w)·w)) − FVU(x, decode(f))`` with latents ``f``
    encoded once; each call is one (chunked) decode GEMM of the quantised code."""

    def __init__(self, sae: SAE, x: Tensor, latents: Tensor):
        self.sae, self.latents = sae, latents
        self.resid = x.to(latents.device, sae.W_dec.dtype) - sae.b_dec  # x − b_dec
        self.tv = total_variance(x)
        self.fvu = self._sse(latents) / self.tv

    @torch.no_grad()
    def _sse(self, codes: Tensor) -> float:
        sse = 0.0
        for i in range(0, codes.shape[0], _CHUNK):
            err = self.resid[i : i + _CHUNK] - codes[i : i + _CHUNK] @ self.sae.W_dec
            sse += float(err.double().pow(2).sum())
        return sse

    def quantized_fvu(self, w: float) -> float:
        codes = (torch.round(self.latents.double() / w) * w).to(self.latents.dtype)
        return self._sse(codes) / self.tv

    def __call__(self, w: float) -> float:
        return self.quantized_fvu(w) - self.fvu

    def guess(self, tolerance: float) -> float:
        """Width where uniform rounding noise (variance w²/12 per active latent) would
        use up the tolerance: ``w² / 12 · Σ_{n,a active} ‖W_dec[a]‖² = tol · TV``."""
        active = (self.latents != 0).sum(0).double()
        energy = float((active * self.sae.W_dec.double().pow(2).sum(1)).sum())
        return math.sqrt(12 * tolerance * self.tv / energy) if energy > 0 else 1.0


def _raw_cost(x: Tensor, tolerance: float) -> tuple[float, float]:
    """Bits per input to code the activations themselves, each dimension with its own
    empirical distribution, at the coarsest grid width with FVU ≤ tolerance."""
    xd = x.double()
    tv = total_variance(x)

    def inc(w: float) -> float:
        return float((xd - torch.round(xd / w) * w).pow(2).sum()) / tv

    guess = math.sqrt(12 * tolerance * tv / x.numel())
    res = search_bin_width(
        inc, tolerance, guess=guess, saturation_width=2 * float(xd.abs().max()) + 1e-12
    )
    q = torch.round(xd / res.bin_width).to(torch.int64)
    return float(value_entropy(q).sum()), res.bin_width


def _as_activations(activations, d_in: int) -> Tensor:
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
    if not torch.isfinite(x).all():
        row = int((~torch.isfinite(x)).any(-1).nonzero()[0])
        raise ValueError(f"activations contain NaN/Inf (first bad row {row}); clean them first")
    return x


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
) -> DLReport:
    """Description length (bits per input) of ``activations [N, d_in]`` written in the SAE's
    latents, quantised at one shared bin width.

    With ``bin_width=None`` the precision is searched: the coarsest grid width (see
    :mod:`tl_mdl.mdl.precision`) whose quantised reconstruction raises the loss by at most
    ``tolerance`` over the unquantised one. ``loss`` is ``"fvu"`` (default; absolute FVU
    increase), a model-based loss ``"kl"`` / ``"ce"`` (nats per token, with ``model``,
    ``hook_name`` and ``tokens``; built by ``tl_mdl.hooks``), or any callable
    ``bin_width | None -> loss``.
    """
    if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance <= 0:
        raise ValueError(f"tolerance must be a finite number > 0, got {tolerance!r}")
    if loss == "fvu" and tolerance >= 1:
        raise ValueError(
            f"tolerance={tolerance} is an absolute FVU increase and must be < 1 "
            "(e.g. 0.01 = one percent of the variance)"
        )
    x = _as_activations(activations, sae.cfg.d_in)
    latents = encode_all(sae, x)
    fq = _QuantizedFVU(sae, x, latents)
    saturation = 2 * float(latents.abs().max()) + 1e-12

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
            increase, tolerance, guess=fq.guess(tolerance), saturation_width=saturation
        )
    else:
        w = _check_bin_width(bin_width)
        res = SearchResult(w, float(increase(w)), [])
        tolerance = None  # type: ignore[assignment]
    w = res.bin_width

    q = quantize(latents, w)
    stats = feature_code_stats(q)
    nz = q[q != 0]
    n_levels = int(torch.unique(nz).numel()) if nz.numel() else 0
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
        raw_bits, raw_w = _raw_cost(x, raw_tol)
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
        l0_unquantized=float((latents != 0).sum()) / stats.n_inputs,
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
