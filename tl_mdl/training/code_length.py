"""The ``mdl`` objective for JumpReLU SAEs: straight-through estimates of the exact code
length, with a TopK warm start.

The description length scored by :func:`tl_mdl.description_length` is
``DL = Σ_i [H_b(p_i) + p_i H_i]`` bits per input at bin width ``w`` (``p_i`` the firing
rate of feature ``i``, ``H_i`` the entropy of its quantised nonzero values). Its
derivative with respect to one more firing of feature ``i`` is

* presence: ``∂ H_b(p_i) / ∂ p_i = log2((1 − p_i) / p_i)`` bits (a rare feature's firing
  costs more; clamped at 0 for ``p_i > 1/2``),
* values: ``H_i``, estimated as the entropy of a Gaussian of the feature's active values
  at bin width ``w``: ``max(0, ½ log2(2πe σ_i²) − log2 w)``,

so each firing costs ``c_i = log2((1 − p_i)/p_i) + H_i`` bits, with ``p_i`` and ``H_i``
running means over steps (weight 0.01 per step; no gradient through them). The penalty
is ``Σ_i c_i · [f_{n,i} > 0]`` averaged over the batch; its value is reported as the batch
estimate ``Σ_i H_b(p̂_i) + p̂_i H_i`` of the DL. ``[f > 0] = [pre > θ_i]`` has no gradient;
its straight-through estimate moves the threshold (Rajamanoharan et al. 2024, "Jumping
Ahead"): ``∂/∂θ_i ≈ −(1/ε) Σ_n K((pre_{n,i} − θ_i)/ε)`` with a rectangle kernel ``K`` of
width ``ε`` (counted on the pre-activations when this objective encoded the batch; from
latents alone, from the active side, ``2 · #{θ_i < f ≤ θ_i + ε/2}``, as latents carry
no value below the threshold). ``ε = w``, the bin width at which
uniform rounding noise uses up the precision ``tolerance`` (see
:func:`~tl_mdl.training.objectives.surrogate_bin_width`): the precision the search will
choose, so thresholds move on the scale the code resolves. The reconstruction's gradient
to ``θ`` uses the same ``ε``: with ``straight_through="jump"`` (the default) each entry
near its threshold is charged the exact loss change of switching it (to ``θ`` and to the
pre-activations, :class:`_JumpCode`); with ``"threshold"``, the SAE's own JumpReLU
straight-through gradient.

``loss = FVU + λ · penalty``; with ``target_fvu`` the trainer adapts λ (dual ascent, see
:class:`~tl_mdl.training.convergence.FidelityTarget`).

Warm start: the first ``warm_start_frac`` of the steps train the same weights on a
TopK-style code (``warm_start``: ``"batch_topk"``, the default, the ``k · B`` largest of
a batch of ``B`` rows; or ``"topk"``, each row's ``k`` largest; ``k = warm_start_k``,
default ``clamp(d_sae // 8, 1, 64)``), reconstruction only; then each threshold is set
to the quantile of its pre-activations that keeps its warm-start firing rate, and
training continues as JumpReLU with the code-length penalty. Without it a JumpReLU SAE
trained from scratch under a code-length cost loses most of its features (a rarely
firing feature's firings are the most expensive, so it never recovers). After every step
decoder rows are scaled to unit norm (output-preserving: the encoder and the thresholds
take the scale) and thresholds are kept ``>= 0``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from tl_mdl._sparse import topk
from tl_mdl.sae import SAE
from tl_mdl.training.config import STRAIGHT_THROUGHS, WARM_STARTS
from tl_mdl.training.objectives import batch_fvu, smooth_mdl

_TWO_PI_E = 2 * math.pi * math.e


def default_warm_start_k(d_sae: int) -> int:
    return max(1, min(d_sae // 8, 64))


def warm_code(pre: Tensor, k: int, kind: str, sharded: bool = False) -> Tensor:
    """The warm start's latents of pre-activations ``pre [B, F]``: ``pre`` where chosen
    (and positive), 0 elsewhere; differentiable in the chosen entries. ``kind``
    (:data:`~tl_mdl.training.config.WARM_STARTS`): ``"topk"``, each row's ``k`` largest; or
    ``"batch_topk"``, the ``k · B`` largest positive entries of the batch of ``B`` rows
    (BatchTopK, Bussmann et al. 2024: ``k`` active per row on average). ``sharded``: ``pre``
    is this rank's share of the batch's rows (data-parallel training), and BatchTopK
    chooses over the whole batch."""
    if kind == "topk":
        values, idx = topk(pre, k)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(values))
    flat = pre.detach().reshape(-1)
    rows = torch.tensor([pre.shape[0]], device=pre.device)
    if sharded:
        dist.all_reduce(rows)
    n = k * int(rows)
    candidates = flat.topk(min(n, flat.numel()), sorted=False).values
    if sharded:  # the batch's n largest are among the union of each rank's n largest
        from tl_mdl.training.distributed import all_gather_rows

        candidates = all_gather_rows(candidates[:, None]).squeeze(1)
    if candidates.numel() == 0:
        return torch.zeros_like(pre)
    tau = candidates.topk(min(n, candidates.numel())).values[-1]  # the n-th largest
    keep = (flat >= tau) & (flat > 0)  # a tie at tau keeps every tied entry
    return pre * keep.view_as(pre).to(pre.dtype)


def jump_curvature(sae: Any, x: Tensor) -> Tensor:
    """``∂²FVU_B/∂f_{n,i}² = 2 ‖W_dec[i]‖² / Σ_n ‖x_n − x̄‖²`` (detached, per feature): the
    batch FVU is quadratic in each latent, so with the gradient this gives the exact loss
    change of switching a latent on or off."""
    with torch.no_grad():
        tv = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
        return (2 * sae.W_dec.pow(2).sum(1) / tv).to(sae.threshold.dtype)


class _JumpCode(torch.autograd.Function):
    """JumpReLU ``f = pre · [pre > θ]`` that also leaves, in ``box``, what the code length
    needs: the float masks ``active = [pre > θ]`` and ``near = [|pre − θ| < ε/2]`` and the
    per-feature count of near entries, so the objective reads its statistics without
    another pass over the latents.

    Backward (``docs/math.md`` §5, "The jump's straight-through gradient"): switching entry
    ``(n, i)`` on at the threshold changes the loss by exactly

        J = θ_i g + H_i θ_i (θ_i/2 − f) + push_i

    for a loss quadratic in each latent, ``g = ∂L/∂f`` (at the entry's present value
    ``f``: ``pre`` if active, else 0), ``H_i = ∂²L/∂f_i²`` and ``push_i`` the rest of the
    loss's price of one firing (``λ`` times its code length over the batch's rows): the
    objective writes ``hess`` and ``push`` into ``box["jump"]`` once it has built the loss
    (absent: 0). ``[pre > θ]`` depends on ``pre − θ`` alone, so its rectangle-kernel
    straight-through estimate gives each near entry ``+J/ε`` towards ``pre`` (besides
    ``g`` where active) and ``θ_i`` the reconstruction's part, ``−(1/ε) Σ_n near · (J −
    push_i)`` (the code length's part reaches ``θ`` through :class:`_Presence`). Near
    entries count only where the feature can fire (``box["can_fire"]``, e.g. a child
    where its parent fires).

    Both masks are dense float ``[B, F]`` tensors, written by the comparisons directly
    (``out=``; ``near`` reuses the buffer of ``pre − θ``): a quarter to a half of all
    entries lie within ``ε/2`` of the threshold while training (``ε`` is the bin width),
    where listing them (``nonzero``, then gathering and scattering the gradient) costs
    several times more than one dense multiply-and-sum, and index pairs (16 bytes) more
    memory than a float. (Floats, not booleans: on CPU, products and sums of boolean
    ``[B, F]`` tensors convert them first, several times slower.)"""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, eps: float, box: dict) -> Tensor:
        d = pre - threshold
        active = torch.gt(d, 0, out=torch.empty_like(d))
        near = torch.lt(d.abs_(), eps / 2, out=d)
        near_f = near * box["can_fire"] if "can_fire" in box else near
        out = pre * active
        near_count = near_f.sum(0)
        ctx.eps, ctx.jump = eps, box.get("jump")
        if ctx.jump is None:  # the threshold-only estimator (CodeLengthObjective docs)
            ctx.save_for_backward(active, near, threshold)
        else:  # out is the latents, which the decoder keeps for its gradient anyway
            ctx.save_for_backward(active, near_f, threshold, out, near_count)
        box.update(active=active, near=near, near_count=near_count)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        if ctx.jump is None:
            active, near, threshold = ctx.saved_tensors
            return g * active, -(threshold / ctx.eps) * (g * near).sum(0), None, None
        active, near, threshold, out, near_count = ctx.saved_tensors
        eps = ctx.eps
        zero = torch.zeros_like(threshold)
        hess, push = ctx.jump.get("hess", zero), ctx.jump.get("push", zero)
        # t = near · J / ε, one entry at a time, in three fused passes
        t = torch.addcmul((0.5 * hess * threshold * threshold + push) / eps, g,
                          threshold / eps)
        t.addcmul_(out, -(hess * threshold / eps)).mul_(near)
        g_theta = push * near_count / eps - t.sum(0)
        return torch.addcmul(t, g, active), g_theta, None, None


class _Presence(torch.autograd.Function):
    """Value: the batch DL estimate ``Σ_i H_b(p̂_i) + p̂_i H_i``; gradient to the thresholds:
    ``−cost_i · #near_i / (ε B)`` (the straight-through estimate of ``∂p̂_i/∂θ_i`` times the
    cost of a firing)."""

    @staticmethod
    def forward(ctx, threshold: Tensor, p: Tensor, near: Tensor, cost: Tensor,
                value_bits: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(near, cost)
        ctx.scale = scale
        hb = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2)
        return (hb + p * value_bits).sum()

    @staticmethod
    def backward(ctx, g: Tensor):
        near, cost = ctx.saved_tensors
        return -g * ctx.scale * cost * near, None, None, None, None, None


class CodeLengthObjective:
    """The ``mdl`` objective (module docstring). A JumpReLU :class:`~tl_mdl.SAE` gets the
    straight-through code length; any other SAE (ReLU, hierarchical) the smooth surrogate
    :func:`~tl_mdl.training.objectives.mdl_penalty`."""

    decay = 0.99

    @classmethod
    def from_settings(cls, warm_start_frac: float = 0.2, warm_start_k: int | None = None,
                      straight_through: str | None = None, warm_start: str | None = None,
                      **_: Any) -> CodeLengthObjective:
        return cls(warm_start_frac, warm_start_k, straight_through, warm_start)

    #: the JumpReLU's straight-through estimator: ``"threshold"`` (thresholds only, first
    #: order, as in Rajamanoharan et al. 2024) or ``"jump"`` (the exact toggle cost, to the
    #: thresholds and the pre-activations: :class:`_JumpCode`, ``docs/math.md`` §5). The
    #: class default applies wherever no ``straight_through=`` is given.
    straight_through = "jump"
    #: the warm start's code (:data:`WARM_STARTS`); the class default applies wherever no
    #: ``warm_start=`` is given. BatchTopK: a per-row TopK with ``k`` above an input's own
    #: number of features makes it fire filler latents (dense, or rotated mixtures of
    #: features), which ``"jump"`` then keeps (docs/math.md §5, "Warm start")
    warm_start = "batch_topk"

    def __init__(self, warm_start_frac: float = 0.2, warm_start_k: int | None = None,
                 straight_through: str | None = None, warm_start: str | None = None):
        if straight_through not in (None, *STRAIGHT_THROUGHS):
            raise ValueError(f"straight_through={straight_through!r} is unknown; use one of "
                             f"{STRAIGHT_THROUGHS}")
        if warm_start not in (None, *WARM_STARTS):
            raise ValueError(f"warm_start={warm_start!r} is unknown; use one of {WARM_STARTS}")
        if straight_through is not None:
            self.straight_through = straight_through
        if warm_start is not None:
            self.warm_start = warm_start
        self.warm_start_frac, self.warm_start_k = warm_start_frac, warm_start_k
        self.p: Tensor | None = None  # running firing rates [d_sae]
        self.h: Tensor | None = None  # running value bits per firing [d_sae]
        self.w: float | None = None  # the last bin width
        self.warm = False
        #: data-parallel training: ``encode`` sees this rank's rows of each batch (the
        #: trainer sets it)
        self.sharded = False
        self._box: dict[str, Any] = {}  # the masks of the latents encode returned last
        self._firing_cost: Tensor | None = None  # bits of one more firing, per feature

    # ------------------------------------------------------------------ the trainer's hooks
    @staticmethod
    def applies(sae: Any) -> bool:
        return isinstance(sae, SAE) and sae.cfg.activation == "jumprelu"

    def warm_k(self, sae: Any) -> int | None:
        """The TopK warm start's ``k`` (None: no warm start for this SAE)."""
        if not self.applies(sae) or self.warm_start_frac <= 0:
            return None
        k = self.warm_start_k or default_warm_start_k(sae.cfg.d_sae)
        return min(k, sae.cfg.d_sae)

    def encode(self, sae: Any, x: Tensor) -> Tensor:
        if self.warm:
            return warm_code(sae.encode_pre(x), self.warm_k(sae), self.warm_start,
                             self.sharded)
        if not self.applies(sae):
            return sae.encode(x)
        eps = sae.jumprelu_bandwidth if self.w is None else self.w
        x = x.to(sae.W_enc.dtype)
        if sae.cfg.apply_b_dec_to_input:
            x = x - sae.b_dec
        box = self._new_box()
        latents = _JumpCode.apply(torch.addmm(sae.b_enc, x, sae.W_enc), sae.threshold, eps, box)
        self._box = {"latents": latents, "eps": eps, **box}
        return latents

    def _new_box(self) -> dict[str, Any]:
        """The box _JumpCode fills; with ``"jump"`` it carries the dict the loss writes
        the curvature and the firing price into."""
        return {"jump": {}} if self.straight_through == "jump" else {}

    @torch.no_grad()
    def end_warm_start(self, sae: Any, x: Tensor) -> None:
        """Thresholds that keep each feature's warm-start firing rate on batch ``x``."""
        pre = sae.encode_pre(x)
        n = pre.shape[0]
        rate = (warm_code(pre, self.warm_k(sae), self.warm_start) > 0).to(pre.dtype).mean(0)
        rate = rate.clamp(1.0 / n, 0.5)
        order = pre.sort(0).values
        row = ((1 - rate) * n).long().clamp(0, n - 1)
        sae.threshold.copy_(order.gather(0, row[None]).squeeze(0).clamp_min(0))
        self.p = rate.clone()
        self.warm = False

    @torch.no_grad()
    def after_step(self, sae: Any) -> None:
        if self.applies(sae) and not self.warm:
            sae.set_decoder_norm_to_unit_norm()
            sae.threshold.clamp_(min=0)

    def finish(self, sae: Any) -> None:
        self._box = {}

    def state_dict(self) -> dict[str, Tensor]:
        out = {"warm": torch.tensor(float(self.warm))}
        if self.w is not None:
            out["w"] = torch.tensor(self.w, dtype=torch.float64)
        if self.p is not None and self.h is not None:
            out.update(p=self.p, h=self.h)
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.warm = bool(state["warm"].item())
        self.w = float(state["w"].item()) if "w" in state else None
        self.p, self.h = state.get("p"), state.get("h")

    # ------------------------------------------------------------------------ the loss
    def __call__(self, sae, x, latents, x_hat, sparsity, tolerance):
        rec = batch_fvu(x, x_hat)
        if self.warm:
            return rec, {"fvu": float(rec.detach())}
        if not self.applies(sae):
            return self._fallback(sae, x, latents, x_hat, sparsity, tolerance)
        box, self._box = self._box, {}
        # held-out evaluations run without gradients and leave the running means alone
        dl, bits = self._dl(sae, x, latents, box, tolerance, torch.is_grad_enabled())
        if "jump" in box:  # the loss's price of a firing, for _JumpCode's backward
            box["jump"].update(hess=jump_curvature(sae, x),
                               push=sparsity * self._firing_cost / latents.shape[0])
        return rec + sparsity * dl, {"fvu": float(rec.detach()), "dl_bits": bits}

    @staticmethod
    def _fallback(sae, x, latents, x_hat, sparsity, tolerance):
        """The loss for an SAE the straight-through code does not apply to."""
        return smooth_mdl(sae, x, latents, x_hat, sparsity, tolerance)

    def _one_sided_near(self, sae, latents) -> tuple[float, Tensor, Tensor]:
        """``(ε, active, #near_i)`` for latents encoded elsewhere (no masks at hand): the
        one-sided kernel on the active side, doubled."""
        eps = sae.jumprelu_bandwidth if self.w is None else self.w
        active = latents > 0
        return eps, active, 2 * (active & (latents <= sae.threshold + eps / 2)).sum(0)

    def _dl(self, sae, x, latents, box: dict, tolerance, update: bool
            ) -> tuple[Tensor, float]:
        """The batch's code length with its straight-through gradient, and its value."""
        with torch.no_grad():
            if box.get("latents") is latents:  # encoded here: the masks are at hand
                eps, count, near_count = box["eps"], box["active"].sum(0), box["near_count"]
            elif "near" in box and dist.is_initialized():  # latents gathered across
                # ranks, each rank encoded its own rows: sum the ranks' near counts
                eps, count, near_count = box["eps"], (latents > 0).sum(0), box["near"].sum(0)
                dist.all_reduce(near_count)
            else:  # latents from elsewhere: the one-sided kernel on the latents
                eps, active, near_count = self._one_sided_near(sae, latents)
                count = active.sum(0)
            cost, value_bits, w = self._costs(sae, x, latents, count.to(latents.dtype),
                                              tolerance, update)
        n = latents.shape[0]
        p = count.to(latents.dtype) / n
        dl = _Presence.apply(sae.threshold, p, near_count.to(latents.dtype), cost, value_bits,
                             1.0 / (eps * n))
        return dl, float(dl.detach())

    def _costs(self, sae, x, latents, count, tolerance, update: bool
               ) -> tuple[Tensor, Tensor, float]:
        tv = (x - x.mean(0)).pow(2).sum()
        energy = (count * sae.W_dec.pow(2).sum(1)).sum().clamp_min(1e-12)
        w = float(torch.sqrt(12 * tolerance * tv / energy))  # = surrogate_bin_width
        n = latents.shape[0]
        mean = latents.sum(0) / count.clamp_min(1)
        sq = (latents * latents).sum(0)
        var = (sq / count.clamp_min(1) - mean.pow(2)).clamp_min(1e-30)
        h_batch = (0.5 * torch.log2(_TWO_PI_E * var) - math.log2(w)).clamp_min(0)
        if self.p is None or self.h is None:
            self.p = ((count + 0.5) / (n + 1)).to(torch.float32)
            self.h = h_batch.to(torch.float32)
        d = self.decay
        if update:
            self.p = d * self.p + (1 - d) * (count / n).to(self.p)
            self.h = torch.where(count >= 2, d * self.h + (1 - d) * h_batch.to(self.h), self.h)
            self.w = w
        p = self.p.clamp(1e-6, 0.5)
        cost = torch.log2((1 - p) / p) + self.h
        self._firing_cost = cost.to(latents.dtype)
        return cost.to(latents.dtype), self.h.to(latents.dtype), w


__all__ = ["CodeLengthObjective", "default_warm_start_k", "warm_code"]
