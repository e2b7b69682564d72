"""The MDL objective with a fidelity target, training until converged, and the frontier:
known answers from hand-built curves, hand-built tables and a known sparse dictionary."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from tl_mdl import (
    SAEConfig,
    description_length,
    latent_description_length,
    quantize,
    sweep,
    train_sae,
)
from tl_mdl.mdl import frontier_bits_at, pareto_frontier
from tl_mdl.training import load_checkpoint
from tl_mdl.training.convergence import FidelityTarget, PlateauRule


def _directions(spread: bool) -> torch.Tensor:
    """24 unit directions in 16 dimensions (fixed). A random draw has pairs at cosine
    0.66-0.71; ``spread=True`` then descends the frame potential ``Σ_{i≠j} cos⁸`` to a
    largest |cosine| of 0.18 (still 24 directions in 16 dimensions: superposed)."""
    g0 = torch.Generator().manual_seed(1234)
    d = torch.randn(24, 16, generator=g0)
    d = d / d.norm(dim=-1, keepdim=True)
    if spread:
        d.requires_grad_(True)
        opt = torch.optim.Adam([d], lr=0.01)
        for _ in range(2000):
            u = d / d.norm(dim=-1, keepdim=True)
            loss = ((u @ u.T - torch.eye(24)) ** 8).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        d = (d / d.norm(dim=-1, keepdim=True)).detach()
    return d


_DIRECTIONS: dict[bool, torch.Tensor] = {}


def dictionary_data(n: int, seed: int, noise: float = 0.05, spread: bool = True):
    """``x = c @ D + noise``: 24 unit directions in 16 dimensions (:func:`_directions`),
    feature ``i`` on with probability ``p_i`` (0.2 down to 0.03) and value uniform in
    [0.5, 1.5] when on. Returns ``(x, codes, D, p)``."""
    if spread not in _DIRECTIONS:
        _DIRECTIONS[spread] = _directions(spread)
    d = _DIRECTIONS[spread]
    p = torch.linspace(0.2, 0.03, 24)
    g = torch.Generator().manual_seed(seed)
    codes = (torch.rand(n, 24, generator=g) < p) * (0.5 + torch.rand(n, 24, generator=g))
    return codes @ d + noise * torch.randn(n, 16, generator=g), codes, d, p


@pytest.fixture(scope="module")
def known():
    x, _, d, p = dictionary_data(8192, 0)
    held, codes, _, _ = dictionary_data(4096, 1)
    return x, held, codes, d, p


@pytest.fixture(scope="module")
def trained(known):
    x = known[0]
    return train_sae(x, SAEConfig(d_in=16, d_sae=32), "mdl", target_fvu=0.1, steps=2500,
                     lr=3e-3, progress=False, return_history=True)


# ------------------------------------------------------------------ the plateau rule
def test_plateau_rule_stops_a_plateau_and_not_a_descent():
    descent = [math.exp(-0.02 * i) for i in range(300)]  # 2% per evaluation, for ever
    rule = PlateauRule(patience=10, min_improvement=0.005)
    assert not any(rule.update(v) for v in descent)
    # 40 evaluations of descent, then flat: stops exactly `patience` evaluations later
    curve = [math.exp(-0.05 * i) for i in range(40)] + [math.exp(-0.05 * 39)] * 30
    rule = PlateauRule(patience=10, min_improvement=0.005)
    stops = [i for i, v in enumerate(curve) if rule.update(v)]
    assert stops[0] == 39 + 10
    # a noisy plateau (±2% around 1) stops too; a rise stops at once after patience
    g = torch.Generator().manual_seed(0)
    noisy = (1 + 0.02 * (2 * torch.rand(60, generator=g) - 1)).tolist()
    rule = PlateauRule(patience=10)
    assert any(rule.update(v) for v in noisy)
    rule = PlateauRule(patience=3)
    assert [rule.update(v) for v in [1.0, 2.0, 3.0, 4.0]] == [False, False, False, True]
    # improving by just more than the threshold per window keeps going
    slow = [0.994 ** i for i in range(100)]  # 0.6% per evaluation
    rule = PlateauRule(patience=1, min_improvement=0.005)
    assert not any(rule.update(v) for v in slow)


def test_plateau_rule_rejects_bad_settings():
    with pytest.raises(ValueError, match="patience"):
        PlateauRule(patience=0)
    with pytest.raises(ValueError, match="min_improvement"):
        PlateauRule(min_improvement=1.5)


def test_fidelity_target_moves_lambda_towards_the_target():
    ft = FidelityTarget(target=0.2, tolerance=0.01, log_lam=0.0)
    for _ in range(50):
        ft.step(0.05)  # far better than needed: buy bits back, λ grows
    assert ft.lam > 1
    ft = FidelityTarget(target=0.2, tolerance=0.01, log_lam=0.0)
    for _ in range(50):
        ft.step(0.5)  # worse than the target: λ shrinks
    assert ft.lam < 1
    ft.heldout(0.6)  # held-out rows are worse than the batches: aim lower
    assert ft.goal < 0.2 - 0.01


# ------------------------------------------------------------- converging by default
def test_default_budget_trains_to_convergence_on_small_data():
    """The issue's call: 2,048 rows, no steps= or epochs=. It used to run one epoch (8 steps)
    and return FVU 0.98; it must end converged, with a low FVU. (lr=1e-2 only to keep the
    test short: ~2,400 steps instead of ~4,500 at the default lr.)"""
    g = torch.Generator().manual_seed(0)
    dirs = torch.randn(48, 32, generator=g)
    acts = ((torch.rand(2048, 48, generator=g) < 0.06) * torch.rand(2048, 48, generator=g)
            ) @ dirs
    cfg = SAEConfig(d_in=32, d_sae=64, activation="topk", k=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged run does not warn
        r = train_sae(acts, cfg, "mdl", lr=1e-2, progress=False, return_history=True)
    assert r.converged is True
    assert r.steps > 500
    assert r.heldout_fvu < 0.35
    assert r.sae.cfg.metadata["training"]["converged"] is True
    # explicit budgets win, and say nothing about convergence
    fixed = train_sae(acts, cfg, "mdl", steps=8, progress=False, return_history=True)
    assert fixed.steps == 8 and fixed.converged is None


def test_a_run_stopped_by_the_cap_warns():
    x = dictionary_data(2048, 0)[0]
    with pytest.warns(RuntimeWarning, match="max_steps=30 before the held-out loss"):
        r = train_sae(x, SAEConfig(d_in=16, d_sae=32, activation="topk", k=3), "topk",
                      max_steps=30, eval_every=5, progress=False, return_history=True)
    assert r.converged is False and r.steps == 30


def test_converged_and_targeted_training_resumes_exactly(tmp_path):
    x = dictionary_data(2048, 0)[0]
    kw = dict(target_fvu=0.2, max_steps=120, eval_every=10, patience=2, lr=3e-3,
              progress=False, return_history=True)
    cfg = SAEConfig(d_in=16, d_sae=32)
    whole = train_sae(x, cfg, "mdl", **kw)

    class Stop(Exception):
        pass

    from tl_mdl.training.loop import Run

    real = Run.one_step

    def crash(self, xb, step):
        if step == 47:
            raise Stop
        return real(self, xb, step)

    Run.one_step = crash
    try:
        with pytest.raises(Stop):
            train_sae(x, cfg, "mdl", checkpoint_dir=tmp_path, checkpoint_every=20, **kw)
    finally:
        Run.one_step = real
    assert load_checkpoint(tmp_path)[0]["step"] == 40
    resumed = train_sae(x, cfg, "mdl", checkpoint_dir=tmp_path, checkpoint_every=20, **kw)
    assert resumed.steps == whole.steps and resumed.sparsity == whole.sparsity
    for name, v in whole.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], v), name


# ------------------------------------------------------------------ the fidelity target
def test_target_fvu_is_met_on_heldout_data(known, trained):
    """Held-out rows from the same generator: the quantised FVU lands within 0.015 of the
    target."""
    held = known[1]
    rep = description_length(trained.sae, held, tolerance=0.01)
    assert abs(rep.fvu_quantized - 0.1) <= 0.015
    assert trained.sae.cfg.activation == "jumprelu"  # the default config, trained as JumpReLU
    assert trained.target_fvu == 0.1 and trained.sparsity > 0


def test_mdl_at_a_target_recovers_the_known_dictionary(known, trained):
    """Matched decoder cosine >= 0.95 for every feature with p >= 0.1; the description
    length is within 10% of the generating code's at the same precision. The generating
    code is one code meeting the target (its quantised FVU is ~0.03 < 0.1): an MDL-trained
    SAE should need no more bits than it, up to the finite-training slack (10%), and it
    cannot save many more than that by dropping detail the target allows, because the
    rarest features (p = 0.03) carry few bits. The directions are spread (largest |cosine|
    0.18): with a random draw the known answer is not the only shortest code (next
    test)."""
    _, held, codes, d, p = known
    sae = trained.sae
    dec = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    best_cos = (d @ dec.T).max(1).values
    assert best_cos[p >= 0.1].min() >= 0.95
    rep = description_length(sae, held, tolerance=0.01)
    true_bits = float(latent_description_length(quantize(codes, rep.bin_width)))
    assert abs(rep.bits_per_input - true_bits) <= 0.1 * true_bits


def test_overlapping_features_may_merge_into_an_equally_short_code():
    """A random draw of the 24 directions has pairs at cosine 0.66-0.67 (features 11 and
    13 each with feature 5 here). Dropping a frequent feature costs its share of the
    variance, ~0.04-0.05 of FVU; writing it with its partner's latent costs only the part
    off that direction, 1 - 0.67² = 55% of it (~0.024), while saving its presence and value
    bits. The target 0.1 leaves ~0.07 above the generating code's FVU_q, so a code that
    merges such a pair meets the target in about as few bits as the generating code (both
    estimators found such codes: 15.6-15.8 bits against its 16.6): the dictionary is then
    not the only shortest answer, and recovery cannot be asked of it. What can be asked:
    the MDL-trained code meets the target in no more bits than the generating code (+2%
    for finite training), whichever of the equally short codes it finds."""
    x, _, _, _ = dictionary_data(8192, 0, spread=False)
    held, codes, d, _ = dictionary_data(4096, 1, spread=False)
    cos = (d @ d.T - torch.eye(24)).abs()
    assert cos[13, 5] > 0.65 and cos[11, 5] > 0.65
    sae = train_sae(x, SAEConfig(d_in=16, d_sae=32), "mdl", target_fvu=0.1, steps=2500,
                    lr=3e-3, progress=False)
    rep = description_length(sae, held, tolerance=0.01)
    true_bits = float(latent_description_length(quantize(codes, rep.bin_width)))
    assert rep.fvu_quantized <= 0.1 + 0.015
    assert rep.bits_per_input <= 1.02 * true_bits


def test_unmeetable_targets_are_refused_or_warned():
    x = dictionary_data(2048, 0)[0]
    cfg = SAEConfig(d_in=16, d_sae=32)
    for bad in (0, 0.01, 0.005, 1.0, -0.1):
        with pytest.raises(ValueError, match="target_fvu=.* cannot be met"):
            train_sae(x, cfg, "mdl", target_fvu=bad, steps=5, progress=False)
    with pytest.raises(ValueError, match="objective='topk' has none"):
        train_sae(x, SAEConfig(d_in=16, d_sae=32, activation="topk", k=2), "topk",
                  target_fvu=0.2, steps=5, progress=False)
    # two features cannot describe 24 to FVU 0.05: a warning names what was reached
    with pytest.warns(RuntimeWarning, match=r"target_fvu=0.05 was not met: the held-out "
                                            r"quantised FVU is about 0\.[3-9]"):
        train_sae(x, SAEConfig(d_in=16, d_sae=2), "mdl", target_fvu=0.05, steps=300,
                  lr=3e-3, progress=False)


# ---------------------------------------------------------------------- the frontier
ROWS = [
    {"name": "a", "fvu_quantized": 0.10, "bits_per_input": 100.0},
    {"name": "b", "fvu_quantized": 0.20, "bits_per_input": 50.0},
    {"name": "c", "fvu_quantized": 0.15, "bits_per_input": 120.0},  # beaten by a
    {"name": "d", "fvu_quantized": 0.30, "bits_per_input": 25.0},
    {"name": "e", "fvu_quantized": 0.30, "bits_per_input": 30.0},  # beaten by d
    {"name": "f", "fvu_quantized": 0.20, "bits_per_input": 50.0},  # equal to b: b stays
]


def test_pareto_frontier_and_log_interpolation():
    assert [r["name"] for r in pareto_frontier(ROWS)] == ["a", "b", "d"]
    assert frontier_bits_at(ROWS, 0.10) == 100.0
    assert frontier_bits_at(ROWS, 0.30) == 25.0
    # halfway between a and b in FVU: the geometric mean of their bits
    assert frontier_bits_at(ROWS, 0.15) == pytest.approx(math.sqrt(100.0 * 50.0), rel=1e-12)
    assert frontier_bits_at(ROWS, 0.05) is None and frontier_bits_at(ROWS, 0.35) is None


def test_sweep_over_targets_and_its_frontier_plot(tmp_path):
    x = dictionary_data(2048, 0)[0]
    table = sweep(x, widths=[8, 32], objective="mdl", target_fvus=[0.3, 0.15], steps=150,
                  lr=3e-3, progress=False, out_dir=tmp_path / "sw")
    assert [(r["width"], r["target_fvu"]) for r in table] == [
        (8, 0.3), (8, 0.15), (32, 0.3), (32, 0.15)]
    assert (tmp_path / "sw" / "w32_t0.15" / "cfg.json").is_file()
    for r in table:
        assert r["sparsity"] == r["sae"].cfg.metadata["training"]["final_sparsity"]
    front = table.frontier()
    assert 1 <= len(front) <= 4
    assert [r["fvu_quantized"] for r in front] == sorted(r["fvu_quantized"] for r in front)
    png = table.plot_frontier(tmp_path / "frontier.png")
    assert png.stat().st_size > 1000
    assert "target_fvu" in (tmp_path / "sw" / "sweep.csv").read_text().splitlines()[0]
