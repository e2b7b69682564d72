"""Training objectives, each next to its math. All reconstruction terms are the batch FVU
``Σ‖x − x̂‖² / Σ‖x − x̄_batch‖²`` so coefficients are unit-free across datasets.

``mdl`` — for a JumpReLU SAE (what ``train_sae(objective="mdl")`` trains), straight-through
estimates of the exact code length with a TopK warm start: see
:mod:`tl_mdl.training.code_length` and ``docs/math.md`` §5. For other SAEs (ReLU, hierarchical)
the smooth surrogate below of the description length
``DL = Σ_i [H_b(p_i) + p_i H_i]`` bits/input at bin width ``w``:

* ``w`` is the width at which uniform rounding noise (variance ``w²/12`` per active latent)
  would use up the FVU ``tolerance``: ``w² = 12 · tol · Σ‖x − x̄‖² / Σ_{n,a active} ‖W_dec[a]‖²``
  (no gradient through ``w``). It is invariant to rescaling latents against decoder rows,
  so the surrogate cannot be gamed by shrinking latents.
* soft presence ``s_{n,i} = σ((f_{n,i} − w/2) / (w/4)) · [f_{n,i} > 0]`` (a latent is active
  when it rounds to a nonzero bin, i.e. ``f ≥ w/2``);
  ``p̂_i = mean_n s_{n,i}``; presence bits ``Σ_i H_b(p̂_i)``.
* value bits ``(1/B) Σ_{n,i} s_{n,i} · log2(1 + f_{n,i}/w)``: the differential-entropy
  approximation ``H(round(f/w)) ≈ E[log2(f/w)] + const`` of the value stream, smoothed at 0.

``loss = FVU + λ · DL_surrogate`` (λ = ``sparsity``).

``l1`` — ``FVU + λ · mean_n Σ_i f_{n,i} ‖W_dec[i]‖ / rms(x − x̄)``.

``topk`` — ``FVU`` (sparsity is the architecture's ``k``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_mdl.mdl import DEFAULT_TOLERANCE
from tl_mdl.sae import SAE

_LN2 = math.log(2.0)


def batch_fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Differentiable batch FVU ``Σ‖x − x̂‖² / Σ‖x − x̄‖²``."""
    tv = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return (x - x_hat).pow(2).sum() / tv


def surrogate_bin_width(
    sae: SAE, x: Tensor, latents: Tensor, tolerance: float = DEFAULT_TOLERANCE
) -> Tensor:
    """The bin width at which uniform rounding noise uses up ``tolerance`` (detached)."""
    with torch.no_grad():
        tv = (x - x.mean(0)).pow(2).sum()
        active = (latents > 0).sum(0).to(x.dtype)
        energy = (active * sae.W_dec.pow(2).sum(1)).sum().clamp_min(1e-12)
        return torch.sqrt(12 * tolerance * tv / energy)


def mdl_penalty(
    latents: Float[Tensor, "batch d_sae"],
    sae: SAE,
    x: Float[Tensor, "batch d_in"] | None = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    bin_width: float | Tensor | None = None,
) -> Tensor:
    """Differentiable description-length surrogate in bits per input (see module docstring).
    Needs ``x`` unless ``bin_width`` is given."""
    if bin_width is None:
        if x is None:
            raise ValueError("mdl_penalty needs the batch x (or an explicit bin_width)")
        bin_width = surrogate_bin_width(sae, x, latents, tolerance)
    w = torch.as_tensor(bin_width, dtype=latents.dtype, device=latents.device)
    pos = latents > 0
    s = torch.sigmoid((latents - w / 2) / (w / 4)) * pos
    p = s.mean(0).clamp(1e-6, 1 - 1e-6)
    presence = -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p)).sum()
    values = (s * torch.log1p(latents.clamp_min(0) / w)).sum(-1).mean() / _LN2
    return presence + values


def l1_penalty(latents: Tensor, sae: SAE, x: Tensor) -> Tensor:
    """``mean_n Σ_i f_{n,i} ‖W_dec[i]‖`` in units of the batch's RMS deviation."""
    rms = (x - x.mean(0)).pow(2).sum(-1).mean().sqrt().clamp_min(1e-12)
    return (latents * sae.W_dec.norm(dim=-1)).sum(-1).mean() / rms


#: ``objective(sae, x, latents, x_hat, sparsity, tolerance) -> (loss, parts)``. A registry
#: entry may also be a class: it is instantiated once per training run (a stateful
#: objective, e.g. with running statistics; see :func:`make_objective`).
Objective = Callable[..., tuple[Tensor, dict[str, float]]]


def smooth_mdl(sae, x, latents, x_hat, sparsity, tolerance):
    """``FVU + λ · mdl_penalty`` (the smooth surrogate, module docstring)."""
    rec = batch_fvu(x, x_hat)
    dl = mdl_penalty(latents, sae, x, tolerance=tolerance)
    return rec + sparsity * dl, {"fvu": float(rec.detach()), "dl_bits": float(dl.detach())}


def _l1(sae, x, latents, x_hat, sparsity, tolerance):
    rec = batch_fvu(x, x_hat)
    pen = l1_penalty(latents, sae, x)
    return rec + sparsity * pen, {"fvu": float(rec.detach()), "l1": float(pen.detach())}


def _topk(sae, x, latents, x_hat, sparsity, tolerance):
    if sae.cfg.activation != "topk":
        raise ValueError(
            f"objective='topk' needs an SAE with activation='topk' (got "
            f"{sae.cfg.activation!r}); set SAEConfig(activation='topk', k=...)"
        )
    rec = batch_fvu(x, x_hat)
    return rec, {"fvu": float(rec.detach())}


_mdl = smooth_mdl  # the name older code imported


def register_objective(name: str, fn: Objective | type) -> None:
    """Add a training objective ``fn(sae, x, latents, x_hat, sparsity, tolerance)`` (or a
    class whose instances are such callables; one instance per run)."""
    OBJECTIVES[name] = fn


def get_objective(name: str) -> Objective | type:
    if name not in OBJECTIVES:
        raise ValueError(f"objective={name!r} is unknown; use one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def make_objective(name: str, **settings: Any) -> Objective:
    """The callable for one training run: the registered function itself, or a new
    instance of a registered class (``settings`` go to its ``from_settings`` when it has
    one)."""
    entry = get_objective(name)
    if isinstance(entry, type):
        maker = getattr(entry, "from_settings", None)
        return maker(**settings) if maker is not None else entry()
    return entry


# Imported last: code_length builds on batch_fvu and surrogate_bin_width above.
from tl_mdl.training.code_length import CodeLengthObjective  # noqa: E402

OBJECTIVES: dict[str, Objective | type] = {
    "mdl": CodeLengthObjective, "l1": _l1, "topk": _topk,
}
