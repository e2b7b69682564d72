"""The ``mdl`` objective for hierarchical JumpReLU SAEs: straight-through estimates of the
exact *conditional* code length (docs/math.md §6), with a TopK warm start.

The description length :func:`~tl_mdl.hierarchical_dl_report` scores is, per input,

    roots:     H_b(p_a)            + p_a · H_a
    children:  p_a · H_b(q_i)      + p_i · H_i        (q_i = p_i / p_a, a = parent of i)

(``p`` firing rates, ``H`` the entropy of a feature's quantised nonzero values at bin width
``w``). Its derivatives give the cost, in bits, of one more firing:

* child ``i``: ``∂/∂p_i = log2((1 − q_i) / q_i) + H_i`` (its presence is coded only where
  its parent fires, at probability ``q_i``);
* parent ``a``: ``∂/∂p_a = log2((1 − p_a) / p_a) + H_a + Σ_{i child of a} −log2(1 − q_i)``
  (``H_b(q) − q H_b'(q) = −log2(1 − q)``: where the parent fires, each child must say
  whether it fires too).

Presence terms are clamped at 0 (``p, q <= 1/2``) as in the flat objective; ``p``, ``H``
are the flat objective's running means (:class:`~tl_mdl.training.code_length.
CodeLengthObjective`, which this class extends: same bin width ``w``, value-bit estimate,
straight-through threshold gradient ``−cost_i · #near_i / (w B)``, unit-norm decoder,
``target_fvu`` dual ascent in the training loop). ``#near_i`` counts the rows with
``|pre_i − θ_i| < w/2`` where feature ``i`` can fire at all: everywhere for a parent, only
where its parent fires for a child (elsewhere the gate keeps the child at 0 whatever
``θ_i``). The loss is ``FVU + λ · DL`` with DL's value the batch estimate of the
conditional DL above.

Warm start: the first ``warm_start_frac`` of the steps train the same weights with the
``warm_start_k`` largest parents and the gate (each child ``min(ReLU, parent)``, at most
``k_c = child_topk`` per parent, or ``C``), reconstruction only; the default
``clamp(F // (8 (1 + k_c)), 1, min(64, P))`` keeps at most the flat default's ``F // 8``
latents (fewer leave the MDL phase too far from a fidelity target to recover); then
each parent's threshold keeps its warm firing count on the batch, and each child's keeps
its warm count among the rows where its parent fires.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tl_mdl.sae.hierarchical import HierarchicalSAE
from tl_mdl.training.code_length import (
    CodeLengthObjective,
    _JumpCode,
    default_warm_start_k,
    warm_code,
)


def _bits_hb(p: Tensor) -> Tensor:
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2)


def conditional_dl_estimate(count: Tensor, n: int, value_bits: Tensor,
                            parent_index: Tensor) -> Tensor:
    """The conditional DL (bits per input) of firing counts ``count [F]`` over ``n`` rows
    with value bits per firing ``value_bits [F]`` under ``parent_index [F]``."""
    p = count / n
    child = parent_index >= 0
    pa = torch.where(child, p[parent_index.clamp_min(0)], torch.ones_like(p))
    q = torch.where(pa > 0, p / pa.clamp_min(1e-30), torch.zeros_like(p)).clamp(0, 1)
    return (pa * _bits_hb(q) + p * value_bits).sum()


class ConditionalCodeLengthObjective(CodeLengthObjective):
    """The ``hierarchical_mdl`` objective (module docstring). A hierarchical JumpReLU SAE
    gets the straight-through conditional code length; a ReLU hierarchical SAE the older
    smooth surrogate :func:`~tl_mdl.training.hierarchical.hierarchical_mdl_penalty`."""

    #: the settings its figures (README, docs/mnist_mdl.md) were measured with; the flat
    #: objective's defaults were changed after them
    straight_through = "threshold"
    warm_start = "topk"

    @staticmethod
    def applies(sae: Any) -> bool:
        return isinstance(sae, HierarchicalSAE) and sae.cfg.activation == "jumprelu"

    def warm_k(self, sae: Any) -> int | None:
        if not self.applies(sae) or self.warm_start_frac <= 0:
            return None
        c = sae.cfg
        kids = min(c.child_topk or c.children_per_parent, c.children_per_parent)
        # the flat default's latent count, d_sae // 8, with each parent bringing its kids
        k = self.warm_start_k or default_warm_start_k(c.d_sae // (1 + kids))
        return min(k, c.n_parents)

    def _warm_latents(self, sae: HierarchicalSAE, pre: Tensor, sharded: bool = False
                      ) -> Tensor:
        n_par = sae.cfg.n_parents
        parents = warm_code(pre[:, :n_par], self.warm_k(sae), self.warm_start, sharded)
        return sae.gate(torch.cat([parents, torch.relu(pre[:, n_par:])], dim=-1))

    def encode(self, sae: Any, x: Tensor) -> Tensor:
        if self.warm:
            return self._warm_latents(sae, sae.encode_pre(x), self.sharded)
        if not self.applies(sae):
            return sae.encode(x)
        eps = sae.jumprelu_bandwidth if self.w is None else self.w
        pre = sae.encode_pre(x)
        with torch.no_grad():  # a child can fire only where its parent does
            pi = sae.parent_index
            parent = pi.clamp_min(0)
            can_fire = torch.where(pi >= 0, pre[:, parent] > sae.threshold[parent],
                                   True).to(pre.dtype)
        box = {**self._new_box(), "can_fire": can_fire}
        latents = sae.gate(_JumpCode.apply(pre, sae.threshold, eps, box))
        self._box = {"latents": latents, "eps": eps, **box}
        return latents

    @torch.no_grad()
    def end_warm_start(self, sae: Any, x: Tensor) -> None:
        """Thresholds that keep each feature's warm firing count on batch ``x`` (a child's
        among the rows where its parent fires)."""
        pre = sae.encode_pre(x)
        n = pre.shape[0]
        active = self._warm_latents(sae, pre) > 0
        pi = sae.parent_index
        child = pi >= 0
        eligible = torch.where(child, active[:, pi.clamp_min(0)], torch.ones_like(active))
        count = active.sum(0)
        count = torch.where(child, count, count.clamp(1, n // 2))
        order = pre.masked_fill(~eligible, -math.inf).sort(0, descending=True).values
        theta = order.gather(0, count.clamp(max=n - 1)[None]).squeeze(0)
        sae.threshold.copy_(theta.clamp_min(0))
        self.p = (count.to(torch.float32) / n).clamp_min(1.0 / n)
        self.warm = False

    def _near(self, sae, latents: Tensor, box: dict) -> tuple[float, Tensor]:
        """``(ε, #near_i)`` counted where feature ``i`` can fire (module docstring)."""
        if box.get("latents") is latents:  # encoded here: counted where each can fire
            return box["eps"], box["near_count"]
        # latents from elsewhere: the one-sided kernel on the active side
        eps, _, near = self._one_sided_near(sae, latents)
        return eps, near

    @staticmethod
    def _fallback(sae, x, latents, x_hat, sparsity, tolerance):
        from tl_mdl.training.hierarchical import smooth_hierarchical_mdl
        return smooth_hierarchical_mdl(sae, x, latents, x_hat, sparsity, tolerance)

    def _dl(self, sae, x, latents, box: dict, tolerance, update: bool
            ) -> tuple[Tensor, float]:
        with torch.no_grad():
            eps, near = self._near(sae, latents, box)
            count = (latents > 0).sum(0).to(latents.dtype)
            _, value_bits, _ = self._costs(sae, x, latents, count, tolerance, update)
            cost = self._conditional_costs(sae.parent_index).to(latents.dtype)
            self._firing_cost = cost
            n = latents.shape[0]
            value = conditional_dl_estimate(count, n, value_bits, sae.parent_index)
        # value: the batch DL estimate; gradient to θ: −cost · #near / (ε n)
        st = -(cost * near.to(latents.dtype) * sae.threshold).sum() / (eps * n)
        return value + st - st.detach(), float(value)

    def _conditional_costs(self, parent_index: Tensor) -> Tensor:
        """Bits of one more firing of each feature (module docstring), from the running
        rates ``self.p`` and value bits ``self.h``."""
        assert self.p is not None and self.h is not None
        p = self.p.clamp(1e-6, 1.0)
        child = parent_index >= 0
        pa = torch.where(child, p[parent_index.clamp_min(0)], torch.ones_like(p))
        q = (p / pa).clamp(1e-6, 1 - 1e-6)
        rate = torch.where(child, q, p).clamp(max=0.5)
        cost = torch.log2((1 - rate) / rate) + self.h
        no_bits = torch.where(child, -torch.log2(1 - q), torch.zeros_like(q))
        return cost.index_add(0, parent_index[child], no_bits[child])


__all__ = ["ConditionalCodeLengthObjective", "conditional_dl_estimate"]
