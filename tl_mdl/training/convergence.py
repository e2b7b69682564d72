"""When training has converged: the plateau rule on held-out values, and the fidelity
target's multiplier (dual ascent). Both are plain state machines over numbers, so they
are tested on hand-built curves and saved in checkpoints as JSON."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class PlateauRule:
    """Converged at an evaluation when the best held-out value of the last ``patience``
    evaluations is not at least ``min_improvement`` (a fraction) below the best of all
    evaluations before them, i.e. ``min(last patience) > (1 - min_improvement) ·
    min(earlier)`` (values are losses, positive, lower is better). Needs more than
    ``patience`` evaluations; a non-finite value never counts as an improvement."""

    patience: int = 10
    min_improvement: float = 0.005
    values: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or (
                self.patience < 1):
            raise ValueError(f"patience must be an int >= 1, got {self.patience!r}")
        if not 0 <= self.min_improvement < 1:
            raise ValueError(
                f"min_improvement must be a fraction in [0, 1), got {self.min_improvement!r}")

    def update(self, value: float) -> bool:
        """Record one evaluation; True when the run has converged."""
        self.values.append(float(value) if math.isfinite(value) else math.inf)
        if len(self.values) <= self.patience:
            return False
        before = min(self.values[: -self.patience])
        recent = min(self.values[-self.patience :])
        return not recent < before - self.min_improvement * abs(before)

    @property
    def best(self) -> float:
        return min(self.values, default=math.inf)


@dataclass
class FidelityTarget:
    """The multiplier λ of ``FVU + λ·penalty`` adapted so that the quantised FVU on
    held-out data approaches ``target``: a PI controller on ``log λ`` (the "PID
    Lagrangian" of Stooke et al. 2020, here in velocity form).

    The quantised FVU is ``FVU + tolerance`` at most (the precision search allows that
    increase), so the unquantised held-out FVU is steered to ``target − tolerance``.
    Every step, with ``e = (goal − ema) / goal`` the relative slack (``ema`` a running
    mean of the batch FVU, weight ``1 − smoothing``; ``goal = target − tolerance − gap``,
    ``gap`` = held-out FVU − ``ema``, a running mean over evaluations, corrects for the
    difference between training batches and held-out rows)::

        log λ += rate · e + gain · (e − e_previous)

    The integral term (``rate``) alone is dual ascent: λ grows while the FVU is below the
    goal (buy bits back) and shrinks while above. It reacts to the FVU with a delay (the
    weights follow λ at the optimiser's pace, the running mean lags), so alone it
    overshoots: at width 512 on MNIST λ kept growing while the FVU was already racing
    past the goal, the SAE collapsed to L0 ≈ 2 and did not come back within the budget.
    The proportional term (``gain``) takes λ back as soon as the FVU moves towards or past
    the goal, which damps the loop. Anti-windup: λ does not go below the value at which
    the penalty is ``1e-3`` of the goal (``floor_frac``; below it the penalty changes
    nothing, and winding λ further down only delays its return)."""

    target: float
    tolerance: float
    log_lam: float
    rate: float = 0.01
    gain: float = 2.0
    smoothing: float = 0.98
    floor_frac: float = 1e-3
    ema: float | None = None
    gap: float = 0.0
    evaluations: int = 0
    error: float | None = None

    @property
    def lam(self) -> float:
        return math.exp(self.log_lam)

    @property
    def goal(self) -> float:
        return max(self.target - self.tolerance - self.gap, 1e-6)

    def step(self, batch_fvu: float, penalty: float | None = None) -> None:
        """One training step's batch FVU (and the penalty's value, for the floor)."""
        if not math.isfinite(batch_fvu):
            return
        s = self.smoothing
        self.ema = batch_fvu if self.ema is None else s * self.ema + (1 - s) * batch_fvu
        e = (self.goal - self.ema) / self.goal
        de = 0.0 if self.error is None else e - self.error
        self.error = e
        self.log_lam += self.rate * e + self.gain * de
        if penalty is not None and math.isfinite(penalty) and penalty > 0:
            floor = math.log(self.floor_frac * self.goal / penalty)
            self.log_lam = max(self.log_lam, floor)
        self.log_lam = min(max(self.log_lam, -50.0), 50.0)

    def heldout(self, fvu: float) -> None:
        """Calibrate against the held-out FVU (call at each evaluation)."""
        if self.ema is None or not math.isfinite(fvu):
            return
        self.evaluations += 1
        w = max(1 / self.evaluations, 0.2)
        self.gap = (1 - w) * self.gap + w * (fvu - self.ema)

    def state(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["PlateauRule", "FidelityTarget"]
