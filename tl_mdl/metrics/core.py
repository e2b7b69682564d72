"""SAE metrics, defined once.

* ``fvu(x, x̂) = Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖²`` with ``x̄`` the per-dimension mean over
  all inputs (sums over inputs and dimensions; float64) — :func:`tl_mdl.mdl.fvu`, re-exported.
* ``explained_variance = 1 − fvu``. This is the conventional R² (SAELens #443): numerator and
  denominator are summed separately over all inputs, *not* a per-input ratio averaged; and
  the variance is about the dataset mean per dimension, *not* about zero (SAELens #659).
  Predicting ``x̄`` for every input explains 0; a perfect reconstruction explains 1.
* ``l0 = mean_n #{i : f_{n,i} ≠ 0}``; feature frequency ``p_i = mean_n [f_{n,i} ≠ 0]``;
  dead fraction ``mean_i [p_i = 0]``; dense fraction ``mean_i [p_i > threshold]``.
* ``ce_loss`` = mean next-token negative log-likelihood (nats); ``ce_loss_recovered =
  (CE_zero − CE_spliced) / (CE_zero − CE_clean)`` (1: as good as clean, 0: as bad as
  zero-ablating the activation).
* ``kl_divergence(p, q) = mean over positions of Σ_v p_v (log p_v − log q_v)`` (nats), with
  ``p``, ``q`` the softmax of the logits.
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_mdl.mdl import fvu

__all__ = [
    "fvu", "explained_variance", "l0", "feature_frequency", "dead_fraction", "dense_fraction",
    "ce_loss", "ce_loss_recovered", "kl_divergence",
]


def explained_variance(x: Float[Tensor, "n d"], x_hat: Float[Tensor, "n d"]) -> float:
    """``1 − fvu(x, x̂)`` (conventional R², variance about the per-dimension mean)."""
    return 1.0 - fvu(x, x_hat)


def _flat(latents: Tensor) -> Tensor:
    if latents.ndim < 1:
        raise ValueError("latents must be [..., d_sae]")
    return latents.reshape(-1, latents.shape[-1])


def l0(latents: Float[Tensor, "... d_sae"]) -> float:
    """Mean number of nonzero latents per input."""
    f = _flat(latents)
    if f.shape[0] == 0:
        raise ValueError("latents have no inputs (N = 0)")
    return float(torch.count_nonzero(f)) / f.shape[0]


def feature_frequency(latents: Float[Tensor, "... d_sae"]) -> Float[Tensor, " d_sae"]:
    """Fraction of inputs on which each latent is nonzero, ``[d_sae]`` (float64)."""
    f = _flat(latents)
    if f.shape[0] == 0:
        raise ValueError("latents have no inputs (N = 0)")
    return (f != 0).sum(0).double() / f.shape[0]


def dead_fraction(latents: Float[Tensor, "... d_sae"]) -> float:
    """Fraction of latents never active on these inputs."""
    return float((feature_frequency(latents) == 0).double().mean())


def dense_fraction(latents: Float[Tensor, "... d_sae"], threshold: float = 0.1) -> float:
    """Fraction of latents active on more than ``threshold`` of the inputs."""
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    return float((feature_frequency(latents) > threshold).double().mean())


def ce_loss(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]) -> float:
    """Mean next-token cross-entropy (nats): ``−mean log softmax(logits[:, t])[tokens[:, t+1]]``."""
    if logits.shape[:2] != tokens.shape or tokens.shape[1] < 2:
        raise ValueError(
            f"logits {tuple(logits.shape)} must be [batch, pos, vocab] with tokens "
            f"{tuple(tokens.shape)} = [batch, pos], pos >= 2"
        )
    logp = logits[:, :-1].double().log_softmax(-1)
    return float(-logp.gather(-1, tokens[:, 1:, None].to(logp.device)).mean())


def kl_divergence(
    logits_p: Float[Tensor, "... vocab"], logits_q: Float[Tensor, "... vocab"]
) -> float:
    """Mean over positions of ``KL(softmax(logits_p) ‖ softmax(logits_q))`` in nats."""
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logit shapes differ: {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}")
    lp = logits_p.double().log_softmax(-1)
    lq = logits_q.double().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def ce_loss_recovered(ce_clean: float, ce_spliced: float, ce_zero: float) -> float:
    """``(CE_zero − CE_spliced) / (CE_zero − CE_clean)``; NaN when zero-ablation does not change
    the loss (the ratio is undefined)."""
    denom = ce_zero - ce_clean
    if denom == 0:
        return math.nan
    return (ce_zero - ce_spliced) / denom
