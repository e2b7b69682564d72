"""AuxK: reviving dead latents of TopK training (Gao et al. 2024, "Scaling and evaluating
sparse autoencoders", §2.4 and Appendix B.1; SAELens's TopK training SAE has it too).

A latent is *dead* once it has not fired (been among a row's ``k`` kept latents with a
positive value) in any of the last ``dead_steps`` optimiser steps. On a step with dead
latents, each row's main residual ``e = x − x̂`` (detached) is reconstructed by the row's
``aux_k`` largest pre-activations among the dead latents, ReLU'd and decoded without the
bias: ``ê_n = Σ_{j ∈ top-aux_k dead} relu(pre_{n,j}) W_dec[j]``, and

    loss += aux_coefficient · Σ_n ‖e_n − ê_n‖² / Σ_n ‖e_n − ē_batch‖²

the residual's own normalised MSE, as Gao et al.'s code (``normalized_mse(auxk_recons,
(x - recons).detach())``), so ``aux_coefficient`` means what their α = 1/32 means: the
term is unit-free, and it does not fade as the main reconstruction improves (normalised by
the inputs' variance instead, it would weigh about FVU times less).
Its gradient reaches only the dead latents' encoder columns, encoder biases
and decoder rows (and ``b_dec`` through the encoder input): a dead latent learns to point
at what the live ones miss, and fires again. ``aux_k="auto"`` is ``max(1, d_in // 2)``
(Gao et al.'s heuristic, also SAELens's); with fewer dead latents than ``aux_k``, all of
them are used (no rescaling of the term, as in Gao et al.'s code).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tl_mdl._sparse import topk, topk_decode
from tl_mdl.training import distributed as ddp

#: Gao et al.'s AuxK coefficient α (their code's ``auxk_coef``)
DEFAULT_AUX_COEFFICIENT = 1 / 32
#: steps without firing after which a latent counts as dead (SAELens's
#: ``dead_feature_window``)
DEFAULT_DEAD_STEPS = 1000


def resolve_aux_k(aux_k: int | str, d_in: int) -> int:
    """The number of dead latents each row uses: ``aux_k``, or ``max(1, d_in // 2)`` for
    ``"auto"``."""
    return max(1, d_in // 2) if aux_k == "auto" else int(aux_k)


class AuxK:
    """One run's AuxK state: the steps since each latent last fired (training state, saved
    in checkpoints) and the auxiliary term."""

    def __init__(self, d_sae: int, d_in: int, aux_k: int | str, coefficient: float,
                 dead_steps: int, device: torch.device | str = "cpu"):
        self.k = resolve_aux_k(aux_k, d_in)
        self.coefficient = float(coefficient)
        self.dead_steps = int(dead_steps)
        self.since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)

    @classmethod
    def for_run(cls, tc, cfg, device: torch.device | str) -> AuxK | None:
        """The AuxK state of a run with TrainConfig ``tc`` and SAE config ``cfg``: None
        when ``tc.aux_k`` is None (off)."""
        if tc.aux_k is None:
            return None
        return cls(cfg.d_sae, cfg.d_in, tc.aux_k, tc.aux_coefficient, tc.dead_steps, device)

    def dead(self) -> Tensor | None:
        """The dead latents' columns (ascending), None when there are none."""
        idx = torch.nonzero(self.since_fired >= self.dead_steps).squeeze(1)
        return idx if idx.numel() else None

    def record(self, fired: Tensor) -> None:
        """After a step: ``fired [d_sae]`` (bool, or counts summed over ranks) says which
        latents fired on the step's batch."""
        self.since_fired = torch.where(fired.to(self.since_fired.device) > 0,
                                       torch.zeros_like(self.since_fired),
                                       self.since_fired + 1)

    def code(self, pre: Tensor, dead: Tensor) -> tuple[Tensor, Tensor]:
        """``(relu'd values, columns)``, ``[rows, min(aux_k, #dead)]``: each row's largest
        pre-activations among the dead latents (differentiable through ``pre``)."""
        values, j = topk(pre.index_select(1, dead), min(self.k, dead.numel()))
        return torch.relu(values), dead[j]

    def loss(self, W_dec: Tensor, residual: Tensor, values: Tensor, cols: Tensor,
             residual_variance: Tensor) -> Tensor:
        """``coefficient · Σ‖e − ê‖² / residual_variance`` (``residual`` is ``e``, detached;
        ``residual_variance`` is ``Σ‖e − ē‖²`` over the whole batch: under data-parallel
        training ``residual`` holds this rank's rows only)."""
        e_hat = topk_decode(cols, values, W_dec)  # no bias
        return self.coefficient * (residual - e_hat).pow(2).sum() / residual_variance

    def dense_loss_and_grads(self, sae, fn, x: Tensor, lam: float, tolerance: float,
                             data_parallel: bool) -> tuple[Tensor, dict[str, float], Tensor]:
        """The training loop's ``_loss_and_grads`` of the TopK objective ``fn`` with this
        term, with dense latents (off the CPU, or data-parallel: each rank's AuxK term is
        its rows' share, the sum over ranks the whole batch's; which latents fired is summed
        over ranks too); records which latents fired."""
        dead = self.dead()
        rows = (ddp.shard_rows(x.shape[0], ddp.world_size(), ddp.rank()) if data_parallel
                else slice(None))
        pre = sae.encode_pre(x[rows])
        lat_mine = sae.activation(pre)
        rec_mine = sae.decode(lat_mine)
        x_hat_all = (ddp.all_gather_rows(rec_mine.detach()) if data_parallel
                     else rec_mine.detach())
        aux_loss = torch.zeros((), dtype=x_hat_all.dtype, device=x_hat_all.device)
        if dead is not None:
            values, cols = self.code(pre, dead)
            aux_loss = self.loss(sae.W_dec, (x[rows] - rec_mine).detach(), values, cols,
                                 total_variance(x - x_hat_all))
        fired = (lat_mine.detach() > 0).sum(0)
        if not data_parallel:
            loss, parts = fn(sae, x, lat_mine, rec_mine, lam, tolerance)
            loss = loss + aux_loss
            loss.backward()
            latents = lat_mine.detach()
        else:
            latents = ddp.all_gather_rows(lat_mine.detach())
            x_hat = x_hat_all.requires_grad_()
            loss, parts = fn(sae, x, latents, x_hat, lam, tolerance)
            fired = ddp.sum_over_ranks(fired)
            aux_loss = aux_loss + ddp.sum_over_ranks(aux_loss.detach()) - aux_loss.detach()
            loss = loss + aux_loss.detach()
            if torch.isfinite(loss):  # the same on every rank: all skip together
                loss.backward()  # the topk objective: through x_hat only
                pairs = [(rec_mine, x_hat.grad[rows])]
                if aux_loss.requires_grad:  # a step with dead latents
                    pairs.append((aux_loss, torch.ones_like(aux_loss)))
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
                ddp.reduce_gradients(list(sae.parameters()))
        self.record(fired)
        parts = {**parts, "aux": float(aux_loss.detach()),
                 "dead": 0.0 if dead is None else float(dead.numel())}
        return loss, parts, latents

    def state_dict(self) -> dict[str, Tensor]:
        return {"since_fired": self.since_fired}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """From :meth:`state_dict`, or from a checkpoint's tensors (``auxk.since_fired``)."""
        state = {k.removeprefix("auxk."): v for k, v in state.items()}
        if "since_fired" not in state:
            raise ValueError("the checkpoint has no AuxK state (steps since each latent "
                             "fired): it was not written by a run with aux_k; resume it "
                             "with aux_k=None, or pass resume=False to start over")
        self.since_fired = state["since_fired"].to(self.since_fired.device, torch.int64)


def total_variance(x: Tensor) -> Tensor:
    """``Σ‖x − x̄‖²`` over the batch's rows (the batch FVU's denominator, as
    :func:`~.objectives.batch_fvu`; AuxK's, of the residual)."""
    return (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


__all__ = ["AuxK", "DEFAULT_AUX_COEFFICIENT", "DEFAULT_DEAD_STEPS", "resolve_aux_k",
           "total_variance"]
