"""The SAE trainer: one readable loop with checkpoints, resume, progress bars, a
convergence rule and a fidelity target. Batches come from :mod:`.batching`, checkpoints
from :mod:`.checkpointing`, the stopping rule and the target's multiplier from
:mod:`.convergence`."""

from __future__ import annotations

import math
import os
import signal
import threading
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from tl_mdl.mdl import DEFAULT_TOLERANCE
from tl_mdl.sae import SAE, HierarchicalSAE, HierarchicalSAEConfig, SAEConfig
from tl_mdl.training import distributed as ddp
from tl_mdl.training.batching import (
    Batches,
    check_activations,
    check_batch,
    init_b_dec,
    split_heldout,
)
from tl_mdl.training.checkpointing import (
    RESUME_MAY_DIFFER,
    STATE_JSON,
    STATE_TENSORS,
    check_resumable,
    has_checkpoint,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from tl_mdl.training.convergence import FidelityTarget, PlateauRule
from tl_mdl.training.objectives import Objective, get_objective, make_objective

#: the default cap on steps when training runs until converged
DEFAULT_MAX_STEPS = 20_000


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (saved in checkpoints)."""

    objective: str = "mdl"
    sparsity: float = 0.0  # λ of the penalty (mdl, l1; the start value with target_fvu)
    tolerance: float = DEFAULT_TOLERANCE  # FVU tolerance the mdl surrogate's bin width uses
    steps: int | None = None  # total optimiser steps; default epochs × (N // batch_size)
    epochs: int = 1
    batch_size: int = 256
    lr: float = 1e-3
    lr_warmup_steps: int = 0
    lr_decay_frac: float = 0.2  # linear decay to 0 over the last fraction of steps
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    target_fvu: float | None = None  # adapt λ so the held-out quantised FVU meets it
    until_converged: bool = False  # stop by the plateau rule (no steps= / epochs= given)
    max_steps: int = DEFAULT_MAX_STEPS  # cap when until_converged
    eval_every: int = 100  # held-out evaluation period (until_converged or target_fvu)
    patience: int = 10  # plateau rule: evaluations without improvement
    min_improvement: float = 0.005  # plateau rule: relative improvement that counts
    warm_start_frac: float = 0.2  # mdl on JumpReLU: fraction of steps trained as TopK
    warm_start_k: int | None = None  # its k (default clamp(d_sae // 8, 1, 64))


#: TrainConfig fields added after checkpoints and sweep folders already existed: a stored
#: config without them means their defaults
NEW_FIELDS = ("target_fvu", "until_converged", "max_steps", "eval_every", "patience",
              "min_improvement", "warm_start_frac", "warm_start_k")


@dataclass
class TrainResult:
    """What :func:`train_sae` returns with ``return_history=True``.

    ``converged``: True when the plateau rule stopped training, False when the cap did
    (a warning was given), None for an explicit ``steps=`` / ``epochs=`` budget.
    ``steps``: optimiser steps taken. ``sparsity``: the final λ (adapted with
    ``target_fvu``). ``heldout_fvu``: the last held-out FVU (None without held-out
    evaluations); ``heldout_fvu_quantized`` its quantised estimate ``fvu + tolerance``."""

    sae: SAE
    history: list[dict[str, float]] = field(default_factory=list)
    converged: bool | None = None
    steps: int = 0
    sparsity: float | None = None
    target_fvu: float | None = None
    heldout_fvu: float | None = None
    heldout_fvu_quantized: float | None = None


def _check_arguments(tc: TrainConfig) -> None:
    for name in ("batch_size", "epochs", "checkpoint_every", "steps", "max_steps",
                 "eval_every", "patience"):
        v = getattr(tc, name)
        if name == "steps" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    lr, tol = tc.lr, tc.tolerance
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(
            f"tolerance={tol!r} is an absolute FVU increase and must be in (0, 1), e.g. 0.01"
        )
    t = tc.target_fvu
    if t is not None:
        if tc.objective == "topk":
            raise ValueError(
                "target_fvu adapts the multiplier λ of a sparsity penalty; objective='topk' "
                "has none (its sparsity is k). Use objective='mdl' (or 'l1'), or choose k")
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not tol < t < 1:
            raise ValueError(
                f"target_fvu={t!r} cannot be met: it is a quantised FVU, which is the FVU "
                f"plus up to tolerance={tol:g} from quantising, so it must lie in "
                f"({tol:g}, 1). Pass e.g. target_fvu=0.15, or a smaller tolerance")
    if not 0 <= tc.warm_start_frac < 1:
        raise ValueError(f"warm_start_frac must be in [0, 1), got {tc.warm_start_frac!r}")


def _lr_factor(tc: TrainConfig, step: int, decay_start: int | None, total: int) -> float:
    """Warmup, constant, then linear decay to 0 from ``decay_start`` to ``total``."""
    if tc.lr_warmup_steps and step < tc.lr_warmup_steps:
        return (step + 1) / tc.lr_warmup_steps
    if decay_start is not None and step >= decay_start and total > decay_start:
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


# ------------------------------------------------------------------ one step
def _loss_and_grads(
    sae: SAE, fn: Objective, x: Tensor, tc: TrainConfig, lam: float, data_parallel: bool
) -> tuple[Tensor, dict[str, float], Tensor]:
    """Loss of the global batch ``x`` and its gradient in ``.grad``; returns
    ``(loss, parts, latents)``.

    Data-parallel: this rank encodes/decodes only its slice of ``x``; latents and
    reconstructions are gathered so the objective sees the whole batch (its batch statistics
    are global). Backward runs in two parts: the objective's graph on every rank gives the
    gradient w.r.t. the gathered tensors and the objective's direct use of parameters (the
    same on every rank, so scaled by 1/world); each rank backpropagates its own rows through
    the SAE; the sum over ranks is the single-process gradient."""
    encode = getattr(fn, "encode", None) or (lambda s, v: s.encode(v))
    if not data_parallel:
        latents = encode(sae, x)
        loss, parts = fn(sae, x, latents, sae.decode(latents), lam, tc.tolerance)
        loss.backward()  # a non-finite loss is caught with the gradients, before the update
        return loss, parts, latents
    mine = ddp.shard_rows(x.shape[0], ddp.world_size(), ddp.rank())
    lat_mine = encode(sae, x[mine])
    rec_mine = sae.decode(lat_mine)
    latents = ddp.all_gather_rows(lat_mine.detach()).requires_grad_()
    x_hat = ddp.all_gather_rows(rec_mine.detach()).requires_grad_()
    loss, parts = fn(sae, x, latents, x_hat, lam, tc.tolerance)
    if torch.isfinite(loss):  # the same on every rank: all skip together
        loss.backward()
        for p in sae.parameters():
            if p.grad is not None:
                p.grad.div_(ddp.world_size())
        pairs = [(t, g.grad[mine]) for t, g in ((lat_mine, latents), (rec_mine, x_hat))
                 if g.grad is not None]  # e.g. topk's loss does not use the latents
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        ddp.reduce_gradients(list(sae.parameters()))
    return loss, parts, latents.detach()


def _all_finite(tensors: list[Tensor]) -> bool:
    """One check for many tensors: the norms of all of them, finite together (a norm is
    NaN/Inf when an element is; it can also overflow, so a False is re-checked element
    by element before anything is reported)."""
    if not tensors:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())


def _check_step(sae: SAE, x: Tensor, loss: Tensor, parts: dict, step: int,
                ckpt: Path | None) -> None:
    """Raise ``FloatingPointError`` (naming the cause) when the batch, the loss or a
    gradient is non-finite; one fused check when all is well."""
    grads = [p.grad for p in sae.parameters() if p.grad is not None]
    if _all_finite([x, loss.detach().reshape(1), *grads]):
        return
    check_batch(x, sae.cfg.d_in, step)
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"loss became {float(loss.detach())} at step {step} ({parts}); training stopped"
            + (f", last checkpoint kept in {ckpt}" if ckpt else "")
        )
    _check_finite_weights(sae, step, "gradients")


def _check_finite_weights(sae: SAE, step: int, when: str) -> None:
    for name, p in sae.named_parameters():
        t = p if when == "weights" else p.grad
        if t is not None and not torch.isfinite(t).all():
            raise FloatingPointError(
                f"{when} of {name} became NaN/Inf at step {step}; training stopped before "
                "writing them (the last checkpoint is kept)"
            )


# ------------------------------------------------------------------------ train
def train_sae(
    activations: Tensor | Iterable[Tensor],
    cfg: SAEConfig | HierarchicalSAEConfig,
    objective: str = "mdl",
    *,
    sparsity: float | None = None,
    target_fvu: float | None = None,
    steps: int | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    resume: bool = True,
    progress: bool = True,
    return_history: bool = False,
    distributed: bool | None = None,
    **train_kwargs: Any,
) -> SAE | TrainResult:
    """Train an SAE on ``activations`` (a Tensor ``[N, d_in]``, or any iterable of
    ``[batch, d_in]`` tensors such as ``tl_mdl.ActivationStore``) with Adam.

    Objectives (see :mod:`tl_mdl.training.objectives`): ``"mdl"`` (FVU + λ·code length;
    trains a JumpReLU SAE: a config with the default ``activation="relu"`` is trained as
    ``"jumprelu"``, the ReLU SAE with learned thresholds, and the returned SAE's ``cfg``
    says so; :mod:`tl_mdl.training.code_length`), ``"l1"`` (FVU + λ·decoder-norm-weighted
    L1), ``"topk"`` (FVU; needs ``activation="topk"``). ``sparsity`` is λ (defaults: mdl
    1e-3, l1 0.1).

    Fidelity target: ``target_fvu=t`` (objectives with a λ) minimises the penalty subject
    to a quantised FVU ``<= t`` on held-out rows: λ is adapted during training by dual
    ascent (:class:`~tl_mdl.training.convergence.FidelityTarget`; ``sparsity`` is then its
    start value) and the final λ is ``TrainResult.sparsity``. A target above what the
    SAE reaches warns with the best held-out value reached.

    Budget: an explicit ``steps=`` or ``epochs=`` is followed exactly (warm starts
    included). Without either, training runs until converged: every ``eval_every`` (100)
    steps the objective is evaluated on held-out rows (a Tensor: ``min(N // 10, 4096)``
    rows drawn from ``seed``, not trained on; fewer than 100 rows: the training rows; an
    iterable: its first batch, also trained on), and training has converged at the first
    evaluation where the best value of the last ``patience`` (10) evaluations is not
    ``min_improvement`` (0.5%) below the best of the evaluations before them. The value is
    the held-out loss (the FVU for ``"topk"``); with ``target_fvu`` it is the held-out
    penalty times ``max(1, (FVU + tolerance) / t)``. The learning rate then decays
    linearly to 0 over ``lr_decay_frac / (1 − lr_decay_frac)`` times the steps taken
    (the same shape as a fixed budget's schedule). ``max_steps`` (default 20,000) caps it
    all: a run that has not converged by ``(1 − lr_decay_frac) · max_steps`` decays, stops
    at ``max_steps`` and warns. ``TrainResult.converged`` and ``.steps`` report it.

    With ``checkpoint_dir``, the full training state is written atomically every
    ``checkpoint_every`` steps and on Ctrl-C; with ``resume=True`` a run restarts from it and
    reaches the same weights as an uninterrupted run (Tensor input: batches are a function of
    ``(seed, step)``). A checkpoint of another SAE config or other training settings raises
    ``ValueError`` (use another ``checkpoint_dir``, or ``resume=False`` to overwrite it);
    only ``steps``, ``epochs``, ``max_steps``, ``checkpoint_every`` and ``log_every`` may
    change, e.g. to train further (see :data:`RESUME_MAY_DIFFER` for the learning-rate
    decay). Non-finite activations or losses stop training with ``FloatingPointError``,
    keeping the last checkpoint; so do non-finite gradients or weights (checked before and
    after each update). Returns the SAE (or a :class:`TrainResult` with the loss history
    when ``return_history=True``); its ``cfg`` is a copy of ``cfg`` with this run's
    settings and outcome in ``metadata["training"]`` (``cfg`` itself is not changed).

    Data-parallel (``distributed=None``: whenever a ``torch.distributed`` process group with
    several ranks is initialised, e.g. under ``torchrun``; see
    :mod:`tl_mdl.training.distributed`): every rank passes the same ``activations`` and
    arguments; each step's global batch of ``batch_size`` rows is split across ranks, the
    loss uses global batch statistics and gradients are summed, so the weights equal
    single-process training up to float reduction order. Rank 0 alone writes checkpoints;
    every rank returns the same SAE.
    """
    get_objective(objective)  # validates the name early
    if sparsity is None:
        sparsity = {"mdl": 1e-3, "l1": 0.1}.get(objective, 0.0)
    tc = TrainConfig(
        objective=objective, sparsity=float(sparsity), tolerance=tolerance, steps=steps,
        epochs=1 if epochs is None else epochs, batch_size=batch_size, lr=lr, seed=seed,
        checkpoint_every=checkpoint_every, target_fvu=target_fvu,
        until_converged=steps is None and epochs is None,
        max_steps=DEFAULT_MAX_STEPS if max_steps is None else max_steps, **train_kwargs,
    )
    _check_arguments(tc)
    check_activations(activations, cfg.d_in)
    if objective == "mdl" and isinstance(cfg, SAEConfig) and cfg.activation == "relu":
        cfg = replace(cfg, activation="jumprelu")  # the ReLU SAE with learned thresholds
    run = _Run(activations, cfg, tc, checkpoint_dir, resume, distributed)
    result = run.train(progress)
    return result if return_history else result.sae


class _Run:
    """One training run's state: the SAE, optimiser, objective, schedule, held-out rows,
    plateau rule and fidelity target, and the loop over steps."""

    def __init__(self, activations, cfg, tc: TrainConfig, checkpoint_dir, resume, distributed):
        self.tc, self.cfg = tc, cfg
        self.data_parallel = ddp.is_distributed() if distributed is None else bool(distributed)
        if self.data_parallel and not ddp.is_distributed():
            raise RuntimeError(
                "distributed=True needs an initialised torch.distributed process group with "
                "several ranks (run under torchrun and call tl_mdl.training.distributed."
                "init_distributed())"
            )
        watch = tc.until_converged or tc.target_fvu is not None
        rows = heldout = None
        if watch and isinstance(activations, Tensor):
            rows, heldout = split_heldout(activations.shape[0], tc.seed)
        self.batches = Batches(activations, tc.batch_size, tc.seed, rows)
        if tc.steps is None and self.batches.per_epoch is None:
            raise ValueError("steps= is required when activations are an iterable of batches")
        self.heldout: Tensor | None = None
        if watch:
            if isinstance(activations, Tensor):
                self.heldout = activations if heldout is None else activations[heldout]
            else:  # its first batch (also trained on)
                self.heldout = Batches(activations, tc.batch_size, tc.seed).get(0)
        if tc.until_converged:
            self.total, self.decay_start = tc.max_steps, None
        else:
            self.total = int(tc.steps if tc.steps is not None
                             else tc.epochs * self.batches.per_epoch)
            self.decay_start = int(self.total * (1 - tc.lr_decay_frac))
        self.writer = not self.data_parallel or ddp.is_main_process()
        self.sae = (HierarchicalSAE if isinstance(cfg, HierarchicalSAEConfig) else SAE)(
            cfg, seed=tc.seed)
        self.fn = make_objective(tc.objective, warm_start_frac=tc.warm_start_frac,
                                 warm_start_k=tc.warm_start_k)
        warm_k = getattr(self.fn, "warm_k", lambda s: None)(self.sae)
        self.warm_end: int | None = None  # the step the warm start ends at (when known)
        self.warm = warm_k is not None
        if self.warm and not tc.until_converged:
            self.warm_end = int(tc.warm_start_frac * self.total)
            self.warm = self.warm_end > 0
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=tc.lr)
        self.history: list[dict[str, float]] = []
        self.plateau = PlateauRule(tc.patience, tc.min_improvement)
        self.target = (None if tc.target_fvu is None else
                       FidelityTarget(tc.target_fvu, tc.tolerance, math.log(max(tc.sparsity,
                                                                                1e-12))))
        self.converged: bool | None = None
        self.last_eval: dict[str, float] = {}
        self.start = 0
        self.ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if self.ckpt is not None and resume and has_checkpoint(self.ckpt):
            self._resume()
        elif isinstance(activations, Tensor):
            init_b_dec(self.sae, activations if rows is None else activations[rows[:16384]])
        self.first_batch_inits = not isinstance(activations, Tensor) and self.start == 0
        if hasattr(self.fn, "warm"):
            self.fn.warm = self.warm
        if self.data_parallel:
            ddp.broadcast_parameters(self.sae)

    # ------------------------------------------------------------------ state
    def _loop_state(self) -> dict[str, Any]:
        return {
            "decay_start": self.decay_start, "total": self.total, "warm": self.warm,
            "warm_end": self.warm_end, "plateau": self.plateau.values,
            "target": None if self.target is None else self.target.state(),
            "converged": self.converged, "last_eval": self.last_eval,
        }

    def _resume(self) -> None:
        assert self.ckpt is not None
        meta, tensors = load_checkpoint(self.ckpt)
        check_resumable(self.ckpt, meta, self.cfg, self.tc)
        objective_state = restore(self.sae, self.opt, meta, tensors)
        if objective_state and hasattr(self.fn, "load_state_dict"):
            self.fn.load_state_dict(objective_state)
        self.start, self.history = int(meta["step"]), list(meta["history"])
        loop = meta.get("loop") or {}
        if loop:
            if self.tc.until_converged:
                self.decay_start, self.total = loop["decay_start"], loop["total"]
                if self.decay_start is None:
                    self.total = self.tc.max_steps
            self.warm, self.warm_end = loop["warm"], loop["warm_end"]
            self.plateau.values = list(loop["plateau"])
            if self.target is not None and loop.get("target"):
                self.target = FidelityTarget(**loop["target"])
            self.converged, self.last_eval = loop["converged"], loop["last_eval"]

    def checkpoint(self, step: int) -> None:
        if self.ckpt is not None and self.writer:
            state = self.fn.state_dict() if hasattr(self.fn, "state_dict") else None
            save_checkpoint(self.ckpt, self.sae, self.opt, step, self.tc, self.history,
                            loop_state=self._loop_state(), objective_state=state)

    @property
    def lam(self) -> float:
        return self.tc.sparsity if self.target is None else self.target.lam

    # ------------------------------------------------------------ held-out rule
    @torch.no_grad()
    def evaluate(self) -> float:
        """The held-out value the plateau rule watches (see :func:`train_sae`)."""
        assert self.heldout is not None
        x = self.heldout.to(self.sae.W_enc.device, self.sae.W_enc.dtype)
        encode = getattr(self.fn, "encode", None) or (lambda s, v: s.encode(v))
        latents = encode(self.sae, x)
        loss, parts = self.fn(self.sae, x, latents, self.sae.decode(latents), self.lam,
                              self.tc.tolerance)
        fvu = float(parts.get("fvu", loss))
        self.last_eval = {"fvu": fvu, "loss": float(loss)}
        if self.target is None or self.warm:
            return float(loss)
        self.target.heldout(fvu)
        penalty = (float(loss) - fvu) / self.lam if self.lam > 0 else fvu
        return penalty * max(1.0, (fvu + self.tc.tolerance) / self.target.target)

    def after_evaluation(self, done: int, x: Tensor) -> None:
        """Apply the plateau rule after ``done`` steps: end the warm start, or start the
        learning-rate decay."""
        stalled = self.plateau.update(self.evaluate())
        if self.warm and self.warm_end is None:
            if stalled or done >= self.tc.warm_start_frac * self.tc.max_steps:
                self.end_warm_start(done, x)
            return
        if self.tc.until_converged and self.decay_start is None:
            cap = int((1 - self.tc.lr_decay_frac) * self.tc.max_steps)
            if stalled or done >= cap:
                self.converged = bool(stalled)
                self.decay_start = done
                frac = self.tc.lr_decay_frac
                extra = math.ceil(done * frac / (1 - frac)) if frac > 0 else 0
                self.total = min(done + extra, self.tc.max_steps)

    def end_warm_start(self, done: int, x: Tensor) -> None:
        self.fn.end_warm_start(self.sae, x)
        self.fn.warm = self.warm = False
        self.warm_end = done
        self.plateau.values = []
        self.opt.state.clear()  # the TopK phase's moments do not fit the new objective

    # -------------------------------------------------------------------- loop
    def train(self, progress: bool) -> TrainResult:
        tc, sae = self.tc, self.sae
        bar = tqdm(total=self.total, initial=self.start, disable=not progress, leave=False,
                   desc=f"train {tc.objective} d_sae={self.cfg.d_sae}")
        done = step = self.start  # completed optimiser steps
        with _StopRequests() as stop:
            try:
                while step < self.total:
                    self.check_stop(stop, done)
                    try:
                        x = self.batches.get(step)  # the global batch (same on every rank)
                    except StopIteration:
                        self.ran_out(step)
                        break
                    check_batch(x, sae.cfg.d_in, step, finite=False)  # with the gradients
                    x = x.to(sae.W_enc.device, sae.W_enc.dtype)
                    if self.first_batch_inits and step == 0:
                        init_b_dec(sae, x)
                    if self.warm and self.warm_end is not None and step >= self.warm_end:
                        self.end_warm_start(step, x)
                    rec = self.one_step(x, step)
                    done = step = step + 1
                    bar.update(1)
                    if self.heldout is not None and done % tc.eval_every == 0:
                        self.after_evaluation(done, x)
                        bar.total = self.total
                    if rec:
                        self.history.append(rec)
                        bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k != "step"})
                    if done % tc.checkpoint_every == 0:
                        self.checkpoint(done)
            finally:
                bar.close()
        return self.finish(done)

    def one_step(self, x: Tensor, step: int) -> dict[str, float]:
        tc, sae = self.tc, self.sae
        self.opt.zero_grad(set_to_none=True)
        loss, parts, latents = _loss_and_grads(sae, self.fn, x, tc, self.lam,
                                               self.data_parallel)
        _check_step(sae, x, loss, parts, step, self.ckpt)
        for group in self.opt.param_groups:  # schedule is a pure function of the step
            group["lr"] = tc.lr * _lr_factor(tc, step, self.decay_start, self.total)
        self.opt.step()
        if hasattr(self.fn, "after_step"):
            self.fn.after_step(sae)
        if not _all_finite(list(sae.parameters())):
            _check_finite_weights(sae, step, "weights")
        if self.target is not None and not self.warm:
            self.target.step(parts.get("fvu", math.nan))
        if step % tc.log_every == 0 or step + 1 == self.total:
            rec = {"step": step, "loss": float(loss.detach()), **parts,
                   "l0": float((latents != 0).sum(-1).float().mean())}
            if self.target is not None:
                rec["sparsity"] = self.lam
            return rec
        return {}

    def check_stop(self, stop: _StopRequests, done: int) -> None:
        requested = stop.requested
        if self.data_parallel:  # every rank stops at the same step
            requested = ddp.any_rank(requested, self.sae.W_enc.device)
        if requested:  # Ctrl-C / SIGTERM: stop at a step boundary, keep state
            self.checkpoint(done)
            raise KeyboardInterrupt(
                f"training interrupted at step {done}"
                + (f"; resume from {self.ckpt}" if self.ckpt else "")
            )

    def ran_out(self, step: int) -> None:
        warnings.warn(
            f"the activations ran out after {step} batches, before steps={self.total}; "
            f"training stopped at step {step} (the learning-rate schedule was set "
            f"for {self.total} steps). Pass steps <= {step}, or activations that can "
            "be iterated again (a Tensor, an ActivationStore, a list)",
            RuntimeWarning, stacklevel=4,
        )

    def finish(self, done: int) -> TrainResult:
        tc, sae = self.tc, self.sae
        if self.heldout is not None and done % tc.eval_every != 0 and done > 0:
            self.evaluate()  # the held-out figures describe the returned weights
        self.checkpoint(done)
        if self.data_parallel:
            dist.barrier()  # the final checkpoint exists when any rank returns
        if hasattr(self.fn, "finish"):
            self.fn.finish(sae)
        fvu = self.last_eval.get("fvu")
        fvu_q = None if fvu is None else fvu + tc.tolerance
        if tc.until_converged and self.converged is False:
            warnings.warn(
                f"training stopped at max_steps={tc.max_steps} before the held-out loss "
                f"stopped improving (held-out FVU {fvu:.4g}); pass a larger max_steps= to "
                "train to convergence", RuntimeWarning, stacklevel=4)
        if tc.target_fvu is not None and fvu_q is not None and fvu_q > tc.target_fvu + 0.015:
            warnings.warn(
                f"target_fvu={tc.target_fvu:g} was not met: the held-out quantised FVU is "
                f"about {fvu_q:.4g} (FVU {fvu:.4g} + tolerance {tc.tolerance:g}), with λ "
                f"down to {self.lam:.3g}. The SAE is too narrow (or trained too briefly) "
                "for this fidelity: pass a larger d_sae, more steps, or a higher target",
                RuntimeWarning, stacklevel=4)
        outcome = {"converged": self.converged, "steps_taken": done,
                   "final_sparsity": self.lam, "heldout_fvu": fvu}
        sae.cfg.metadata["training"] = {**asdict(tc), **outcome}
        return TrainResult(sae, self.history, self.converged, done, self.lam, tc.target_fvu,
                           fvu, fvu_q)


class _StopRequests:
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (main thread only), so
    an interrupt never lands in the middle of an optimiser update. A second Ctrl-C raises
    immediately."""

    def __enter__(self) -> _StopRequests:
        self.requested = False
        self._old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


__all__ = [
    "train_sae",
    "TrainConfig",
    "TrainResult",
    "save_checkpoint",
    "load_checkpoint",
    "has_checkpoint",
    "RESUME_MAY_DIFFER",
    "STATE_JSON",
    "STATE_TENSORS",
]
