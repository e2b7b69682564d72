"""The fidelity target's controller on hand-built FVU sequences, and held-out tracking under
a fixed budget (``track_heldout``, ``TrainResult.converged_at``)."""

from __future__ import annotations

import math

import torch

from tl_mdl import SAEConfig, train_sae
from tl_mdl.training.convergence import FidelityTarget


def test_lambda_backs_off_while_the_fvu_races_towards_the_goal():
    """The FVU rises from 0.05 to just below the goal (0.24) within 200 steps, as after a
    λ that was too large: pure dual ascent (gain 0) keeps raising λ all the way (the error
    is still positive), the proportional term brings it back below where it started."""
    rising = [0.05 + 0.18 * i / 199 for i in range(200)]
    ends = {}
    for gain in (0.0, 2.0):
        ft = FidelityTarget(target=0.25, tolerance=0.01, log_lam=0.0, rate=0.01, gain=gain,
                            smoothing=0.0)
        for f in rising:
            ft.step(f)
            assert ft.ema == f  # smoothing 0: the batch FVU itself
        ends[gain] = ft.log_lam
    # gain 0: Σ rate·e with e = (0.24 − f)/0.24 > 0 at every step
    expected = sum(0.01 * (0.24 - f) / 0.24 for f in rising)
    assert math.isclose(ends[0.0], expected, rel_tol=1e-12)
    # gain 2 adds 2·(e_last − e_first) = 2·(0.23 − 0.05)·(−1/0.24) = −1.5
    assert math.isclose(ends[2.0], expected - 1.5, rel_tol=1e-12)
    assert ends[2.0] < 0 < ends[0.0]


def test_lambda_does_not_wind_down_below_where_the_penalty_matters():
    """FVU far above the goal for a long time: λ falls, but not below the value at which
    λ·penalty is floor_frac of the goal (lower changes nothing and only delays the return)."""
    ft = FidelityTarget(target=0.25, tolerance=0.01, log_lam=0.0, smoothing=0.0)
    for _ in range(20_000):
        ft.step(0.9, 40.0)
    assert math.isclose(ft.lam, 1e-3 * 0.24 / 40.0, rel_tol=1e-9)
    old = FidelityTarget(target=0.25, tolerance=0.01, log_lam=0.0, smoothing=0.0)
    for _ in range(20_000):
        old.step(0.9)  # no penalty given: only the ±50 bound on log λ
    assert old.log_lam == -50.0


def _data(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(12, 8, generator=g)
    codes = (torch.rand(n, 12, generator=g) < 0.2) * torch.rand(n, 12, generator=g)
    return codes @ d + 0.3 * torch.randn(n, 8, generator=g)  # a noise floor: plateaus


def test_fixed_budget_tracks_heldout_when_asked():
    x = _data()
    cfg = SAEConfig(d_in=8, d_sae=16, activation="topk", k=3)
    kw = dict(steps=2000, lr=1e-2, eval_every=50, progress=False, return_history=True)
    plain = train_sae(x, cfg, "topk", **kw)
    assert plain.evaluations == [] and plain.converged_at is None
    res = train_sae(x, cfg, "topk", track_heldout=True, **kw)
    assert [e["step"] for e in res.evaluations] == list(range(50, 2001, 50))
    # converged_at is the first evaluation at which the plateau rule held on these values
    vals = [e["value"] for e in res.evaluations]
    first = next(i for i in range(10, len(vals))
                 if not min(vals[i - 9 : i + 1]) < 0.995 * min(vals[: i - 9]))
    assert res.converged_at == res.evaluations[first]["step"] < 2000
    assert res.sae.cfg.metadata["training"]["track_heldout"] is True
