"""One training run's settings (:class:`TrainConfig`, saved in checkpoints), what it
returns (:class:`TrainResult`), and the checks of the settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tl_mdl.mdl import DEFAULT_TOLERANCE
from tl_mdl.sae import SAE, SAEConfig
from tl_mdl.training.auxk import DEFAULT_AUX_COEFFICIENT, DEFAULT_DEAD_STEPS

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
    #: until converged: the warm start also ends after this many steps (its plateau rule or
    #: ``warm_start_frac · max_steps`` may end it sooner), so a larger cap does not lengthen
    #: it: measured on the LM study's residual (target 0.15), 2,000 warm steps gave 28.8
    #: bits against 34.6 with 4,000 (and 30.7 / 34.9 with 1,000 / 500); docs/math.md §5
    warm_start_max_steps: int = 2000
    warm_start_k: int | None = None  # its k (default clamp(d_sae // 8, 1, 64))
    #: mdl: the JumpReLU's straight-through estimator, "jump" (each near entry charged its
    #: exact toggle cost; docs/math.md §5) or "threshold"; None: the objective's default
    straight_through: str | None = None
    #: mdl: the warm start's code, "topk" (k per row) or "batch_topk" (k per row on
    #: average over the batch); None: the objective's default
    warm_start: str | None = None
    track_heldout: bool = False  # hold out rows and evaluate them even with a fixed budget
    #: topk: AuxK dead-latent revival (Gao et al. 2024; tl_mdl.training.auxk): None (off),
    #: "auto" (d_in // 2) or the number of dead latents reconstructing each row's residual
    aux_k: int | str | None = None
    aux_coefficient: float = DEFAULT_AUX_COEFFICIENT  # its term's weight (normalised MSE)
    dead_steps: int = DEFAULT_DEAD_STEPS  # steps without firing after which a latent is dead


def warm_start_limit(warm_start_frac: float, max_steps: int,
                     warm_start_max_steps: int) -> float:
    """Until converged: the step by which the warm start ends at the latest (its plateau
    rule may end it sooner), ``min(warm_start_frac · max_steps, warm_start_max_steps)``."""
    return min(warm_start_frac * max_steps, warm_start_max_steps)


#: TrainConfig fields added after checkpoints and sweep folders already existed: a stored
#: config without them means their defaults
NEW_FIELDS = ("target_fvu", "until_converged", "max_steps", "eval_every", "patience",
              "min_improvement", "warm_start_frac", "warm_start_k", "track_heldout",
              "warm_start_max_steps",
              "straight_through", "warm_start", "aux_k", "aux_coefficient", "dead_steps")

#: TrainConfig fields whose None means "the objective's own default" (an attribute of the
#: objective of that name). A default may change between tl_mdl versions, so a run records
#: the values it used (checkpoint, ``metadata["training"]``) and a resumed run keeps them.
OBJECTIVE_SETTINGS = ("straight_through", "warm_start")
#: their values (the MDL objectives check them too)
STRAIGHT_THROUGHS = ("jump", "threshold")
WARM_STARTS = ("batch_topk", "topk")
_CHOICES = {"straight_through": STRAIGHT_THROUGHS, "warm_start": WARM_STARTS}
#: what they were in runs whose checkpoints predate ``warm_start`` (and the record): the
#: ``mdl`` objectives' defaults until 2026-12-04
LEGACY_OBJECTIVE_SETTINGS = {"straight_through": "threshold", "warm_start": "topk"}


@dataclass
class TrainResult:
    """What :func:`train_sae` returns with ``return_history=True``.

    ``converged``: True when the plateau rule stopped training, False when the cap did
    (a warning was given), None for an explicit ``steps=`` / ``epochs=`` budget.
    ``steps``: optimiser steps taken. ``sparsity``: the final λ (adapted with
    ``target_fvu``). ``heldout_fvu``: the last held-out FVU (None without held-out
    evaluations); ``heldout_fvu_quantized`` its quantised estimate ``fvu + tolerance``.
    ``evaluations``: one ``{"step", "value", "fvu", "warm"}`` per held-out evaluation
    (``value`` is what the plateau rule watches). ``converged_at``: the first step at which
    the plateau rule held (after the warm start, if any), None if it never did; with a
    fixed budget and ``track_heldout=True`` it says whether the budget was enough."""

    sae: SAE
    history: list[dict[str, float]] = field(default_factory=list)
    converged: bool | None = None
    steps: int = 0
    sparsity: float | None = None
    target_fvu: float | None = None
    heldout_fvu: float | None = None
    heldout_fvu_quantized: float | None = None
    evaluations: list[dict[str, float]] = field(default_factory=list)
    converged_at: int | None = None


def check_arguments(tc: TrainConfig) -> None:
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
    for name, choices in (
        ("straight_through", "'jump' (the default) or 'threshold'"),
        ("warm_start", "'batch_topk' (the default: k per row on average over the batch) or "
                       "'topk' (each row's k largest)"),
    ):
        value = getattr(tc, name)
        if value is None:
            continue
        if value not in _CHOICES[name]:
            raise ValueError(f"{name}={value!r} is unknown; use {choices} (objective='mdl')")
        if tc.objective not in ("mdl", "hierarchical_mdl"):
            raise ValueError(f"{name}={value!r} is a setting of objective='mdl', not of "
                             f"objective={tc.objective!r}; drop it")
    if not 0 <= tc.warm_start_frac < 1:
        raise ValueError(f"warm_start_frac must be in [0, 1), got {tc.warm_start_frac!r}")
    if isinstance(tc.warm_start_max_steps, bool) or not isinstance(
            tc.warm_start_max_steps, int) or tc.warm_start_max_steps < 0:
        raise ValueError("warm_start_max_steps must be an int >= 0 (steps after which the "
                         f"warm start ends at the latest), got {tc.warm_start_max_steps!r}")
    _check_aux_k(tc)


def _check_aux_k(tc: TrainConfig) -> None:
    a, c, d = tc.aux_k, tc.aux_coefficient, tc.dead_steps
    if a is None:
        for name, value, default in (("aux_coefficient", c, DEFAULT_AUX_COEFFICIENT),
                                     ("dead_steps", d, DEFAULT_DEAD_STEPS)):
            if value != default:
                raise ValueError(f"{name}={value!r} is a setting of AuxK, which is off "
                                 "(aux_k=None); pass aux_k='auto' (or an int) to turn it on, "
                                 f"or drop {name}")
        return
    if a != "auto" and (isinstance(a, bool) or not isinstance(a, int) or a <= 0):
        raise ValueError(f"aux_k={a!r} must be 'auto' (d_in // 2 dead latents a row, Gao et "
                         "al.'s choice), a positive int, or None (off)")
    if tc.objective != "topk":
        raise ValueError(
            f"aux_k={a!r} revives dead latents of TopK training (objective='topk'), not of "
            f"objective={tc.objective!r}; use objective='topk' with SAEConfig("
            "activation='topk', k=...), or drop aux_k")
    if (isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c)
            or c < 0):
        raise ValueError(f"aux_coefficient must be a finite number >= 0, got {c!r} "
                         "(Gao et al. use 1/32)")
    if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
        raise ValueError(f"dead_steps must be a positive int (optimiser steps without firing "
                         f"after which a latent counts as dead), got {d!r}")


def check_aux_k_sae(tc: TrainConfig, cfg: object) -> None:
    """AuxK needs a plain SAE with ``activation='topk'`` (checked before training)."""
    if tc.aux_k is None:
        return
    activation = getattr(cfg, "activation", None)
    if not isinstance(cfg, SAEConfig) or activation != "topk":
        raise ValueError(
            f"aux_k={tc.aux_k!r} needs an SAE with activation='topk' (got "
            f"{type(cfg).__name__} with activation={activation!r}); pass "
            "SAEConfig(activation='topk', k=...), or drop aux_k")


__all__ = ["TrainConfig", "TrainResult", "NEW_FIELDS", "warm_start_limit", "OBJECTIVE_SETTINGS",
           "LEGACY_OBJECTIVE_SETTINGS", "STRAIGHT_THROUGHS", "WARM_STARTS", "DEFAULT_MAX_STEPS",
           "check_arguments", "check_aux_k_sae"]
