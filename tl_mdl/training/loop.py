"""The training loop: one run's state (SAE, optimiser, objective, schedule, held-out rows,
plateau rule, fidelity target) and its steps, with the fused NaN/Inf checks and the
Ctrl-C handling. :func:`tl_mdl.train_sae` builds a :class:`Run` and calls ``train``."""

from __future__ import annotations

import math
import signal
import threading
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from tl_mdl.sae import SAE, HierarchicalSAE, HierarchicalSAEConfig
from tl_mdl.training import distributed as ddp
from tl_mdl.training import topk_step
from tl_mdl.training.auxk import AuxK
from tl_mdl.training.batching import Batches, check_batch, init_b_dec, split_heldout
from tl_mdl.training.checkpointing import (
    check_resumable,
    has_checkpoint,
    kept_objective_settings,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from tl_mdl.training.config import OBJECTIVE_SETTINGS, TrainConfig, TrainResult, warm_start_limit
from tl_mdl.training.convergence import FidelityTarget, PlateauRule
from tl_mdl.training.objectives import Objective, make_objective


def _lr_factor(tc: TrainConfig, step: int, decay_start: int | None, total: int) -> float:
    """Warmup, constant, then linear decay to 0 from ``decay_start`` to ``total``."""
    if tc.lr_warmup_steps and step < tc.lr_warmup_steps:
        return (step + 1) / tc.lr_warmup_steps
    if decay_start is not None and step >= decay_start and total > decay_start:
        return max(0.0, (total - step) / (total - decay_start))
    return 1.0


# ------------------------------------------------------------------ one step
def _loss_and_grads(
    sae: SAE, fn: Objective, x: Tensor, tc: TrainConfig, lam: float, data_parallel: bool,
    aux: AuxK | None = None,
) -> tuple[Tensor, dict[str, float], Tensor]:
    """Loss of the global batch ``x`` and its gradient in ``.grad``; returns
    ``(loss, parts, latents)``.

    Data-parallel: this rank encodes/decodes only its slice of ``x``; latents and
    reconstructions are gathered so the objective sees the whole batch (its batch statistics
    are global). Backward runs in two parts: the objective's graph on every rank gives the
    gradient w.r.t. the gathered tensors and the objective's direct use of parameters (the
    same on every rank, so scaled by 1/world); each rank backpropagates its own rows through
    the SAE; the sum over ranks is the single-process gradient.

    ``latents`` may be the code's nonzero values only (``[batch, k]``, the sparse TopK
    step): the caller uses them for the L0. ``aux``: AuxK (:mod:`.auxk`) adds its term."""
    if not data_parallel and topk_step.applies(sae, fn):  # no dense latents (see there)
        return topk_step.loss_and_grads(sae, fn, x, lam, tc.tolerance, aux=aux)
    if aux is not None:
        return aux.dense_loss_and_grads(sae, fn, x, lam, tc.tolerance, data_parallel)
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


def _adam(params: list[Tensor], lr: float) -> torch.optim.Adam:
    """Adam, fused where torch has the kernel for the parameters' device and dtype: one pass
    over each parameter instead of seven, and no parameter-sized temporaries (same update
    up to float rounding)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr)


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


class Run:
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
        watch = tc.until_converged or tc.target_fvu is not None or tc.track_heldout
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
        # only when given: registered objectives' from_settings predate these settings
        extra = {name: getattr(tc, name) for name in OBJECTIVE_SETTINGS
                 if getattr(tc, name) is not None}
        self.fn = make_objective(tc.objective, warm_start_frac=tc.warm_start_frac,
                                 warm_start_k=tc.warm_start_k, **extra)
        if self.data_parallel and hasattr(self.fn, "sharded"):
            self.fn.sharded = True  # its encode sees this rank's rows of each batch
        warm_k = getattr(self.fn, "warm_k", lambda s: None)(self.sae)
        self.warm_end: int | None = None  # the step the warm start ends at (when known)
        self.warm = warm_k is not None
        if self.warm and not tc.until_converged:
            self.warm_end = int(tc.warm_start_frac * self.total)
            self.warm = self.warm_end > 0
        self.aux = AuxK.for_run(tc, cfg, self.sae.W_enc.device)
        self.opt = _adam(list(self.sae.parameters()), tc.lr)
        self.history: list[dict[str, float]] = []
        self.plateau = PlateauRule(tc.patience, tc.min_improvement)
        self.target = (None if tc.target_fvu is None else
                       FidelityTarget(tc.target_fvu, tc.tolerance, math.log(max(tc.sparsity,
                                                                                1e-12))))
        self.converged: bool | None = None
        self.evaluations: list[dict[str, float]] = []
        self.converged_at: int | None = None
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
            "evaluations": self.evaluations, "converged_at": self.converged_at,
            "objective_settings": self.objective_settings(),
        }

    def objective_settings(self) -> dict[str, str]:
        """The values of :data:`OBJECTIVE_SETTINGS` this run's objective uses (a
        TrainConfig's None is the objective's default); empty for objectives without them."""
        return {name: getattr(self.fn, name) for name in OBJECTIVE_SETTINGS
                if isinstance(getattr(self.fn, name, None), str)}

    def _resume(self) -> None:
        assert self.ckpt is not None
        meta, tensors = load_checkpoint(self.ckpt)
        check_resumable(self.ckpt, meta, self.cfg, self.tc)
        for name, value in kept_objective_settings(self.ckpt, meta, self.objective_settings(),
                                                   self.tc).items():
            setattr(self.fn, name, value)
        objective_state = restore(self.sae, self.opt, meta, tensors)
        if objective_state and hasattr(self.fn, "load_state_dict"):
            self.fn.load_state_dict(objective_state)
        if self.aux is not None:
            self.aux.load_state_dict(tensors)
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
            self.evaluations = list(loop.get("evaluations", []))
            self.converged_at = loop.get("converged_at")

    def checkpoint(self, step: int) -> None:
        if self.ckpt is not None and self.writer:
            state = self.fn.state_dict() if hasattr(self.fn, "state_dict") else None
            save_checkpoint(self.ckpt, self.sae, self.opt, step, self.tc, self.history,
                            loop_state=self._loop_state(), objective_state=state,
                            aux_state=None if self.aux is None else self.aux.state_dict())

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
        sharded = getattr(self.fn, "sharded", False)
        if sharded:  # every rank evaluates all held-out rows: nothing to gather
            self.fn.sharded = False
        try:
            latents = encode(self.sae, x)
        finally:
            if sharded:
                self.fn.sharded = True
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
        warm = self.warm
        value = self.evaluate()
        stalled = self.plateau.update(value)
        self.evaluations.append({"step": done, "value": value, "warm": float(warm),
                                 "fvu": self.last_eval["fvu"]})
        if stalled and not warm and self.converged_at is None:
            self.converged_at = done
        if self.warm and self.warm_end is None:
            if stalled or done >= warm_start_limit(self.tc.warm_start_frac, self.tc.max_steps,
                                                   self.tc.warm_start_max_steps):
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
                                               self.data_parallel, self.aux)
        _check_step(sae, x, loss, parts, step, self.ckpt)
        for group in self.opt.param_groups:  # schedule is a pure function of the step
            group["lr"] = tc.lr * _lr_factor(tc, step, self.decay_start, self.total)
        self.opt.step()
        if hasattr(self.fn, "after_step"):
            self.fn.after_step(sae)
        if not _all_finite(list(sae.parameters())):
            _check_finite_weights(sae, step, "weights")
        if self.target is not None and not self.warm:
            self.target.step(parts.get("fvu", math.nan), parts.get("dl_bits", parts.get("l1")))
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
        sae.cfg.metadata["training"] = {**asdict(tc), **self.objective_settings(), **outcome}
        return TrainResult(sae, self.history, self.converged, done, self.lam, tc.target_fvu,
                           fvu, fvu_q, self.evaluations, self.converged_at)


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


__all__ = ["Run"]
