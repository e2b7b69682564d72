"""The SAE trainer's entry point, :func:`train_sae`: its settings are in :mod:`.config`, the
loop in :mod:`.loop`, batches in :mod:`.batching`, checkpoints in :mod:`.checkpointing`,
the stopping rule and the target's multiplier in :mod:`.convergence`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from torch import Tensor

from tl_mdl.mdl import DEFAULT_TOLERANCE
from tl_mdl.sae import SAE, HierarchicalSAEConfig, SAEConfig
from tl_mdl.training.batching import check_activations
from tl_mdl.training.checkpointing import (
    RESUME_MAY_DIFFER,
    STATE_JSON,
    STATE_TENSORS,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from tl_mdl.training.config import (
    DEFAULT_MAX_STEPS,
    NEW_FIELDS,
    TrainConfig,
    TrainResult,
    check_arguments,
    check_aux_k_sae,
)
from tl_mdl.training.loop import Run
from tl_mdl.training.objectives import get_objective


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
    1e-3, l1 0.1). ``straight_through`` (mdl only): the JumpReLU's straight-through
    estimator, ``"jump"`` (default: each entry near its threshold charged its exact toggle
    cost, docs/math.md §5) or ``"threshold"`` (Rajamanoharan et al. 2024's threshold
    gradient). ``warm_start`` (mdl): the TopK warm start's code, ``"batch_topk"``
    (default: the ``k · B`` largest of a batch of ``B`` rows, so rows fire as many as they
    need) or ``"topk"`` (each row's ``k`` largest); ``warm_start_k`` and
    ``warm_start_frac`` set its ``k`` and length. (``hierarchical_mdl`` keeps
    ``"threshold"`` and ``"topk"``, the settings its figures were measured with.)

    Dead latents in TopK training (``"topk"`` only; off by default): ``aux_k="auto"`` (or
    an int) adds Gao et al. 2024's AuxK term: a latent that has not fired for
    ``dead_steps`` (1000) optimiser steps is dead, and each row's residual ``x − x̂`` is
    reconstructed by its ``aux_k`` largest dead pre-activations (``"auto"``: ``d_in //
    2``), the squared error weighted by ``aux_coefficient`` (1/32) over the batch's total
    variance joining the loss (:mod:`tl_mdl.training.auxk`, docs/math.md §5). The history
    then also records ``"aux"`` (the term) and ``"dead"`` (dead latents at that step).

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
    decay). Settings left to the objective's default (``straight_through``, ``warm_start``)
    keep the values the checkpoint's run used, should the default have changed since.
    Non-finite activations or losses stop training with ``FloatingPointError``,
    keeping the last checkpoint; so do non-finite gradients or weights (checked before and
    after each update). Returns the SAE (or a :class:`TrainResult` with the loss history
    when ``return_history=True``); its ``cfg`` is a copy of ``cfg`` with this run's
    settings (those left to the objective's default as it used them) and outcome in
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
    if sparsity is None:
        sparsity = {"mdl": 1e-3, "l1": 0.1}.get(objective, 0.0)
    tc = TrainConfig(
        objective=objective, sparsity=float(sparsity), tolerance=tolerance, steps=steps,
        epochs=1 if epochs is None else epochs, batch_size=batch_size, lr=lr, seed=seed,
        checkpoint_every=checkpoint_every, target_fvu=target_fvu,
        until_converged=steps is None and epochs is None,
        max_steps=DEFAULT_MAX_STEPS if max_steps is None else max_steps, **train_kwargs,
    )
    check_arguments(tc)
    check_aux_k_sae(tc, cfg)
    check_activations(activations, cfg.d_in)
    if objective == "mdl" and isinstance(cfg, SAEConfig) and cfg.activation == "relu":
        cfg = replace(cfg, activation="jumprelu")  # the ReLU SAE with learned thresholds
    run = Run(activations, cfg, tc, checkpoint_dir, resume, distributed)
    result = run.train(progress)
    return result if return_history else result.sae


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
    "NEW_FIELDS",
    "DEFAULT_MAX_STEPS",
]
