"""The SAE trainer: one readable loop with checkpoints, resume and progress bars."""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import threading
import warnings
from collections.abc import Iterable, Iterator, Sized
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from tl_mdl._io import atomic_write
from tl_mdl.activations.buffer import BatchSource, as_batch_source, batches_from
from tl_mdl.mdl import DEFAULT_TOLERANCE
from tl_mdl.sae import SAE, HierarchicalSAE, HierarchicalSAEConfig, SAEConfig
from tl_mdl.training import distributed as ddp
from tl_mdl.training.objectives import Objective, get_objective

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
META_KEY = "tl_mdl_train_state"


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (saved in checkpoints)."""

    objective: str = "mdl"
    sparsity: float = 0.0  # λ of the penalty (mdl, l1); unused by topk
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


#: TrainConfig fields a resumed run may change: they do not change the steps already taken
#: (``steps`` / ``epochs`` set where training ends; with ``lr_decay_frac > 0`` the decay then
#: follows the new length from the checkpoint on, so the result equals an uninterrupted run
#: of the new length only when the checkpoint lies before the decay of both schedules).
RESUME_MAY_DIFFER = ("steps", "epochs", "checkpoint_every", "log_every")


def _check_resumable(ckpt: Path, meta: dict[str, Any], cfg: Any, tc: TrainConfig) -> None:
    """Raise unless the checkpoint ``meta`` continues this run: the same SAE config (its
    ``metadata`` and ``device`` aside: a run may move, e.g. from a GPU to the CPU) and the
    same training settings but :data:`RESUME_MAY_DIFFER`."""
    saved = replace(type(cfg).from_dict(meta["sae_cfg"]), metadata={}, device=cfg.device)
    if saved != replace(cfg, metadata={}):
        a, b = asdict(saved), asdict(replace(cfg, metadata={}))
        diff = ", ".join(f"{k}={a[k]!r} there, {b[k]!r} here" for k in a if a[k] != b.get(k))
        raise ValueError(
            f"checkpoint in {ckpt} is for a different SAE config ({diff}); pass another "
            "checkpoint_dir, or resume=False to start over (overwriting it)"
        )
    saved_tc, now = meta.get("train_cfg") or {}, asdict(tc)
    diff = [
        f"{k}={saved_tc[k]!r} there, {now[k]!r} here"
        for k in now
        if k in saved_tc and k not in RESUME_MAY_DIFFER and saved_tc[k] != now[k]
    ]
    if diff:
        raise ValueError(
            f"checkpoint in {ckpt} was trained with other settings ({'; '.join(diff)}); "
            "resuming it would mix two runs. Pass another checkpoint_dir, or resume=False "
            "to start over (overwriting it). Only "
            f"{', '.join(RESUME_MAY_DIFFER)} may change on resume"
        )


@dataclass
class TrainResult:
    sae: SAE
    history: list[dict[str, float]] = field(default_factory=list)


class _Batches:
    """Step ``s`` is batch ``s % len`` of pass ``s // len`` of the data as a
    :class:`~tl_mdl.activations.buffer.BatchSource` (see ``as_batch_source``: a Tensor is
    reshuffled each pass from ``(seed, pass)``), so a resumed run sees the batches an
    uninterrupted one would, and resuming in the middle of a pass seeks to it. An iterable
    without ``len()`` is one stream, consumed in order (on resume the first ``s`` batches are
    skipped)."""

    def __init__(self, data: Tensor | Iterable[Tensor], batch_size: int, seed: int):
        self.source = as_batch_source(data, batch_size, seed)
        n = len(self.source) if isinstance(self.source, Sized) else 0
        self.per_epoch: int | None = n if n > 0 else None
        self._pass: tuple[int, Iterator[Tensor]] | None = None

    def get(self, step: int) -> Tensor:
        if self.per_epoch is None:
            epoch, b = 0, step
        else:
            epoch, b = divmod(step, self.per_epoch)
        if self._pass is None or self._pass[0] != epoch:
            if isinstance(self.source, BatchSource):
                it = batches_from(self.source, epoch, b)
            else:
                it = itertools.islice(iter(self.source), b, None)
            self._pass = (epoch, it)
        try:
            return next(self._pass[1])
        except StopIteration:
            raise StopIteration from None


def _check_batch(x: Tensor, d_in: int, step: int) -> None:
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != d_in:
        raise ValueError(
            f"batch at step {step} has shape {tuple(getattr(x, 'shape', ()))}; expected "
            f"[batch, d_in={d_in}]"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"batch at step {step} has dtype {x.dtype}; activations must be floating point "
            "(integer tensors are usually token ids, not activations)"
        )
    if not torch.isfinite(x).all():
        row = int((~torch.isfinite(x)).any(-1).nonzero()[0])
        raise FloatingPointError(
            f"activations of the batch at step {step} contain NaN/Inf (row {row} of the batch); "
            "training stopped, the last checkpoint is kept"
        )


def _check_arguments(**kw: Any) -> None:
    for name in ("batch_size", "epochs", "checkpoint_every", "steps"):
        v = kw[name]
        if name == "steps" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    lr, tol = kw["lr"], kw["tolerance"]
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise ValueError(
            f"tolerance={tol!r} is an absolute FVU increase and must be in (0, 1), e.g. 0.01"
        )


def _lr_lambda(tc: TrainConfig, total: int):
    decay_start = int(total * (1 - tc.lr_decay_frac))

    def f(step: int) -> float:
        if tc.lr_warmup_steps and step < tc.lr_warmup_steps:
            return (step + 1) / tc.lr_warmup_steps
        if step >= decay_start and total > decay_start:
            return max(0.0, (total - step) / (total - decay_start))
        return 1.0

    return f


# ------------------------------------------------------------------ one step
def _loss_and_grads(
    sae: SAE, fn: Objective, x: Tensor, tc: TrainConfig, data_parallel: bool
) -> tuple[Tensor, dict[str, float], Tensor]:
    """Loss of the global batch ``x`` and its gradient in ``.grad``; returns
    ``(loss, parts, latents)``.

    Data-parallel: this rank encodes/decodes only its slice of ``x``; latents and
    reconstructions are gathered so the objective sees the whole batch (its batch statistics
    are global). Backward runs in two parts: the objective's graph on every rank gives the
    gradient w.r.t. the gathered tensors and the objective's direct use of parameters (the
    same on every rank, so scaled by 1/world); each rank backpropagates its own rows through
    the SAE; the sum over ranks is the single-process gradient."""
    if not data_parallel:
        latents = sae.encode(x)
        loss, parts = fn(sae, x, latents, sae.decode(latents), tc.sparsity, tc.tolerance)
        if torch.isfinite(loss):
            loss.backward()
        return loss, parts, latents
    mine = ddp.shard_rows(x.shape[0], ddp.world_size(), ddp.rank())
    lat_mine = sae.encode(x[mine])
    rec_mine = sae.decode(lat_mine)
    latents = ddp.all_gather_rows(lat_mine.detach()).requires_grad_()
    x_hat = ddp.all_gather_rows(rec_mine.detach()).requires_grad_()
    loss, parts = fn(sae, x, latents, x_hat, tc.sparsity, tc.tolerance)
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


def _check_finite_weights(sae: SAE, step: int, when: str) -> None:
    for name, p in sae.named_parameters():
        t = p if when == "weights" else p.grad
        if t is not None and not torch.isfinite(t).all():
            raise FloatingPointError(
                f"{when} of {name} became NaN/Inf at step {step}; training stopped before "
                "writing them (the last checkpoint is kept)"
            )


# ------------------------------------------------------------------ checkpoints
def save_checkpoint(
    path: str | os.PathLike,
    sae: SAE,
    opt: torch.optim.Optimizer,
    step: int,
    tc: TrainConfig,
    history: list[dict[str, float]],
) -> None:
    """Atomically write the training state (weights, Adam moments, step, config) to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    osd = opt.state_dict()
    for idx, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    meta = {
        "step": step,
        "sae_cfg": sae.cfg.to_dict(),
        "train_cfg": asdict(tc),
        "param_groups": osd["param_groups"],
        "history": history,
    }
    text = json.dumps(meta)
    # One file is the checkpoint: the state JSON travels in the safetensors metadata, so a
    # crash between two writes can never pair weights of one step with the step of another.
    # train_state.json is a readable copy written after it.
    atomic_write(
        path / STATE_TENSORS, lambda p: save_file(tensors, str(p), metadata={META_KEY: text})
    )
    atomic_write(path / STATE_JSON, lambda p: p.write_text(text))


def has_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / STATE_TENSORS).is_file()


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(meta, tensors)`` of the checkpoint in ``path`` (meta: step, configs, history)."""
    path = Path(path)
    try:
        with safe_open(str(path / STATE_TENSORS), framework="pt") as fh:
            text = (fh.metadata() or {}).get(META_KEY)
        tensors = load_file(str(path / STATE_TENSORS))
        if text is None:  # written before the metadata copy existed
            text = (path / STATE_JSON).read_text()
        meta = json.loads(text)
    except (OSError, json.JSONDecodeError, SafetensorError, ValueError) as e:
        raise ValueError(
            f"checkpoint in {path} is unreadable ({e}); delete it to start over"
        ) from e
    return meta, tensors


# ------------------------------------------------------------------------ train
def train_sae(
    activations: Tensor | Iterable[Tensor],
    cfg: SAEConfig | HierarchicalSAEConfig,
    objective: str = "mdl",
    *,
    sparsity: float | None = None,
    steps: int | None = None,
    epochs: int = 1,
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

    Objectives (see :mod:`tl_mdl.training.objectives`): ``"mdl"`` (FVU + λ·DL surrogate),
    ``"l1"`` (FVU + λ·decoder-norm-weighted L1), ``"topk"`` (FVU; needs ``activation="topk"``).
    ``sparsity`` is λ (defaults: mdl 1e-3, l1 0.1).

    With ``checkpoint_dir``, the full training state is written atomically every
    ``checkpoint_every`` steps and on Ctrl-C; with ``resume=True`` a run restarts from it and
    reaches the same weights as an uninterrupted run (Tensor input: batches are a function of
    ``(seed, step)``). A checkpoint of another SAE config or other training settings raises
    ``ValueError`` (use another ``checkpoint_dir``, or ``resume=False`` to overwrite it);
    only ``steps``, ``epochs``, ``checkpoint_every`` and ``log_every`` may change, e.g. to
    train further (see :data:`RESUME_MAY_DIFFER` for the learning-rate decay). Non-finite
    activations or losses stop training with ``FloatingPointError``, keeping the last
    checkpoint; so do non-finite gradients or weights (checked before and after each
    update). Returns the SAE (or a :class:`TrainResult` with the loss history when
    ``return_history=True``); its ``cfg`` is a copy of ``cfg`` with this run's settings in
    ``metadata["training"]`` (``cfg`` itself is not changed).

    Data-parallel (``distributed=None``: whenever a ``torch.distributed`` process group with
    several ranks is initialised, e.g. under ``torchrun``; see
    :mod:`tl_mdl.training.distributed`): every rank passes the same ``activations`` and
    arguments; each step's global batch of ``batch_size`` rows is split across ranks, the
    loss uses global batch statistics and gradients are summed, so the weights equal
    single-process training up to float reduction order. Rank 0 alone writes checkpoints;
    every rank returns the same SAE.
    """
    get_objective(objective)  # validates the name early
    _check_arguments(batch_size=batch_size, steps=steps, epochs=epochs, lr=lr,
                     tolerance=tolerance, checkpoint_every=checkpoint_every)
    if sparsity is None:
        sparsity = {"mdl": 1e-3, "l1": 0.1}.get(objective, 0.0)
    if isinstance(activations, Tensor):
        if activations.ndim != 2 or activations.shape[1] != cfg.d_in:
            raise ValueError(
                f"activations have shape {tuple(activations.shape)}; expected [N, d_in={cfg.d_in}]"
            )
        if activations.shape[0] == 0:
            raise ValueError("activations are empty (N = 0); nothing to train on")
        if not activations.is_floating_point():
            raise TypeError(
                f"activations have dtype {activations.dtype}; expected a floating-point [N, d_in]"
            )
    tc = TrainConfig(
        objective=objective,
        sparsity=float(sparsity),
        tolerance=tolerance,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        checkpoint_every=checkpoint_every,
        **train_kwargs,
    )
    batches = _Batches(activations, batch_size, seed)
    if tc.steps is None:
        if batches.per_epoch is None:
            raise ValueError("steps= is required when activations are an iterable of batches")
        tc.steps = tc.epochs * batches.per_epoch
    total = int(tc.steps)

    data_parallel = ddp.is_distributed() if distributed is None else bool(distributed)
    if data_parallel and not ddp.is_distributed():
        raise RuntimeError(
            "distributed=True needs an initialised torch.distributed process group with "
            "several ranks (run under torchrun and call tl_mdl.training.distributed."
            "init_distributed())"
        )
    writer = not data_parallel or ddp.is_main_process()  # rank 0 alone writes checkpoints
    sae = (HierarchicalSAE if isinstance(cfg, HierarchicalSAEConfig) else SAE)(cfg, seed=seed)
    opt = torch.optim.Adam(sae.parameters(), lr=tc.lr)
    history: list[dict[str, float]] = []
    start = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and resume and has_checkpoint(ckpt):
        meta, tensors = load_checkpoint(ckpt)
        _check_resumable(ckpt, meta, cfg, tc)
        sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        osd = {"state": {}, "param_groups": meta["param_groups"]}
        for k, v in tensors.items():
            if k.startswith("opt."):
                _, idx, name = k.split(".", 2)
                osd["state"].setdefault(int(idx), {})[name] = v
        opt.load_state_dict(osd)
        start, history = int(meta["step"]), list(meta["history"])
    else:
        _init_b_dec(sae, activations if isinstance(activations, Tensor) else None)
    if data_parallel:
        ddp.broadcast_parameters(sae)
    lr_at = _lr_lambda(tc, total)
    fn = get_objective(objective)

    def checkpoint(step: int) -> None:
        if ckpt is not None and writer:
            save_checkpoint(ckpt, sae, opt, step, tc, history)

    bar = tqdm(
        range(start, total),
        initial=start,
        total=total,
        disable=not progress,
        desc=f"train {objective} d_sae={cfg.d_sae}",
        leave=False,
    )
    done = start  # completed optimiser steps
    with _StopRequests() as stop:
        try:
            for step in bar:
                requested = stop.requested
                if data_parallel:  # every rank stops at the same step
                    requested = ddp.any_rank(requested, sae.W_enc.device)
                if requested:  # Ctrl-C / SIGTERM: stop at a step boundary, keep state
                    checkpoint(done)
                    raise KeyboardInterrupt(
                        f"training interrupted at step {done}"
                        + (f"; resume from {ckpt}" if ckpt else "")
                    )
                try:
                    x = batches.get(step)  # the global batch (the same on every rank)
                except StopIteration:
                    warnings.warn(
                        f"the activations ran out after {step} batches, before steps={total}; "
                        f"training stopped at step {step} (the learning-rate schedule was set "
                        f"for {total} steps). Pass steps <= {step}, or activations that can "
                        "be iterated again (a Tensor, an ActivationStore, a list)",
                        RuntimeWarning, stacklevel=2,
                    )
                    break
                _check_batch(x, cfg.d_in, step)
                x = x.to(sae.W_enc.device, sae.W_enc.dtype)
                if step == 0 and not isinstance(activations, Tensor):
                    _init_b_dec(sae, x)
                opt.zero_grad(set_to_none=True)
                loss, parts, latents = _loss_and_grads(sae, fn, x, tc, data_parallel)
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"loss became {float(loss.detach())} at step {step} ({parts}); "
                        "training stopped"
                        + (f", last checkpoint kept in {ckpt}" if ckpt else "")
                    )
                _check_finite_weights(sae, step, "gradients")
                for group in opt.param_groups:  # schedule is a pure function of the step
                    group["lr"] = tc.lr * lr_at(step)
                opt.step()
                _check_finite_weights(sae, step, "weights")
                done = step + 1
                if step % tc.log_every == 0 or done == total:
                    rec = {
                        "step": step,
                        "loss": float(loss.detach()),
                        **parts,
                        "l0": float((latents != 0).sum(-1).float().mean()),
                    }
                    history.append(rec)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in rec.items() if k != "step"})
                if done % tc.checkpoint_every == 0:
                    checkpoint(done)
        finally:
            bar.close()
    checkpoint(done)
    if data_parallel:
        dist.barrier()  # the final checkpoint exists when any rank returns
    sae.cfg.metadata["training"] = asdict(tc)  # this run's settings (sae.cfg is the SAE's own)
    return TrainResult(sae, history) if return_history else sae


@torch.no_grad()
def _init_b_dec(sae: SAE, x: Tensor | None) -> None:
    """``b_dec`` ← the mean of (up to 16k rows of) the data, so encoders start centred."""
    if x is None or x.shape[0] == 0:
        return
    sample = x[:16384].to(sae.b_dec.device, torch.float64)
    if torch.isfinite(sample).all():
        sae.b_dec.copy_(sample.mean(0).to(sae.b_dec.dtype))


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
    "RESUME_MAY_DIFFER",
]
