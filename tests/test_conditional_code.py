"""The conditional straight-through code length for hierarchical JumpReLU SAEs: its value is
the exact conditional DL, its costs are that DL's derivatives, its threshold gradient counts
only where a feature can fire, the warm start keeps firing counts, and on data from a known
two-level generator it beats the flat objective."""

from __future__ import annotations

import math

import pytest
import torch

from tl_mdl import (
    SAE,
    HierarchicalSAE,
    HierarchicalSAEConfig,
    hierarchical_dl_report,
    train_hierarchical_sae,
)
from tl_mdl.mdl.hierarchical import hierarchical_code_stats
from tl_mdl.sae.hierarchical import hierarchy_parent_index
from tl_mdl.training.conditional_code import (
    ConditionalCodeLengthObjective,
    conditional_dl_estimate,
)

# 0 = parent A, 1 = parent B, 2 and 3 = children of A (as in test_hierarchical.HAND_Q)
HAND_Q = torch.tensor([[1, 0, 1, 3], [1, 0, 2, 0], [1, 2, 0, 0], [2, 0, 0, 3],
                       [0, 2, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
HAND_PARENTS = torch.tensor([-1, -1, 0, 0])


def test_dl_estimate_is_the_exact_conditional_dl():
    stats = hierarchical_code_stats(HAND_Q, HAND_PARENTS)
    count = (HAND_Q != 0).sum(0).double()
    got = conditional_dl_estimate(count, 8, stats.value_entropy_bits.double(), HAND_PARENTS)
    assert float(got) == pytest.approx(stats.bits_per_input, abs=1e-12)
    # all roots: the flat code
    flat = conditional_dl_estimate(count, 8, stats.value_entropy_bits.double(),
                                   torch.full((4,), -1))
    assert float(flat) == pytest.approx(stats.flat_bits_per_input, abs=1e-12)


def test_costs_are_the_derivatives_of_the_conditional_dl():
    pi = hierarchy_parent_index(2, 3)  # 2 parents, 3 children each
    p = torch.tensor([0.3, 0.2, 0.1, 0.05, 0.02, 0.08, 0.01, 0.03], dtype=torch.float64)
    h = torch.tensor([2.0, 1.5, 0.5, 3.0, 1.0, 0.0, 2.5, 0.7], dtype=torch.float64)
    obj = ConditionalCodeLengthObjective()
    obj.p, obj.h = p, h
    cost = obj._conditional_costs(pi)

    def dl(rates: torch.Tensor) -> float:
        return float(conditional_dl_estimate(rates, 1, h, pi))

    eps = 1e-7
    for i in range(8):
        e = torch.zeros(8, dtype=torch.float64)
        e[i] = eps
        numeric = (dl(p + e) - dl(p - e)) / (2 * eps)
        assert float(cost[i]) == pytest.approx(numeric, rel=1e-6, abs=1e-6), i
    # by hand, child 2 of parent 0 (q = 1/3) and parent 0 (its children q = 1/3, 1/6, 1/15)
    assert float(cost[2]) == pytest.approx(math.log2(2) + 0.5)
    no = -sum(math.log2(1 - q) for q in (1 / 3, 1 / 6, 1 / 15))
    assert float(cost[0]) == pytest.approx(math.log2(0.7 / 0.3) + 2.0 + no)


def _identity_sae(n_parents: int, children: int) -> HierarchicalSAE:
    cfg = HierarchicalSAEConfig(d_in=n_parents * (1 + children), n_parents=n_parents,
                                children_per_parent=children, activation="jumprelu",
                                dtype="float64")
    sae = HierarchicalSAE(cfg)
    with torch.no_grad():  # pre-activations = the input
        sae.W_enc.copy_(torch.eye(cfg.d_sae, dtype=torch.float64))
        sae.W_dec.copy_(torch.eye(cfg.d_sae, dtype=torch.float64))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_threshold_gradient_counts_only_where_a_feature_can_fire():
    sae = _identity_sae(1, 1)  # feature 0 = parent, 1 = its child
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([1.0, 1.0], dtype=torch.float64))
    # child near its threshold (|pre - 1| < 0.05) in 3 rows, parent on in 2 of them;
    # parent near its threshold in 1 row
    x = torch.tensor([[2.0, 1.01], [2.0, 0.98], [0.5, 1.02], [1.03, 0.3], [3.0, 2.0],
                      [0.0, 0.0]], dtype=torch.float64)
    obj = ConditionalCodeLengthObjective()
    grads = []
    for lam in (0.0, 1.0):
        sae.threshold.grad = None
        obj.w = 0.1  # ε (each call sets it to the batch's bin width)
        lat = obj.encode(sae, x)
        loss, _ = obj(sae, x, lat, sae.decode(lat), lam, 0.01)
        loss.backward()
        grads.append(sae.threshold.grad.clone())
    cost = obj._conditional_costs(sae.parent_index)
    want = -cost * torch.tensor([1.0, 2.0], dtype=torch.float64) / (0.1 * 6)
    assert torch.allclose(grads[1] - grads[0], want, rtol=1e-9, atol=1e-12)


def test_warm_start_thresholds_keep_the_parents_firing_counts():
    g = torch.Generator().manual_seed(0)
    cfg = HierarchicalSAEConfig(d_in=12, n_parents=8, children_per_parent=2,
                                activation="jumprelu", dtype="float64")
    sae = HierarchicalSAE(cfg, seed=1)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64)
    obj = ConditionalCodeLengthObjective(warm_start_k=2)
    obj.warm = True
    warm = obj.encode(sae, x)
    assert ((warm[:, :8] > 0).sum(1) <= 2).all()
    counts = (warm[:, :8] > 0).sum(0).clamp(1, 200)
    obj.end_warm_start(sae, x)
    assert not obj.warm
    after = sae.encode(x)
    assert (after[:, :8] > 0).sum(0).tolist() == counts.tolist()
    assert (sae.threshold >= 0).all()


def test_jumprelu_hierarchical_save_load_and_old_configs(tmp_path):
    cfg = HierarchicalSAEConfig(d_in=5, n_parents=2, children_per_parent=2,
                                activation="jumprelu")
    sae = HierarchicalSAE(cfg, seed=2)
    with torch.no_grad():
        sae.threshold.uniform_(0, 0.05)
    sae.save(tmp_path / "h")
    back = HierarchicalSAE.load(tmp_path / "h")
    x = torch.randn(20, 5)
    assert back.cfg.activation == "jumprelu"
    assert torch.equal(back.threshold, sae.threshold) and torch.equal(back.encode(x),
                                                                      sae.encode(x))
    with pytest.raises(ValueError, match="tl_mdl_hierarchical"):
        SAE.load(tmp_path / "h")
    old = HierarchicalSAEConfig(d_in=5, n_parents=2, children_per_parent=2).to_dict()
    for key in ("activation", "jumprelu_init_threshold"):  # a config saved before them
        old.pop(key)
    assert HierarchicalSAEConfig.from_dict(old).activation == "relu"
    with pytest.raises(ValueError, match="activation='gelu'"):
        HierarchicalSAEConfig(d_in=5, n_parents=2, children_per_parent=2, activation="gelu")


# ------------------------------------------------------- a known two-level generator
def two_level(n: int, seed: int, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """``x = codes @ dirs + noise``: 16 orthonormal directions in 24 dimensions, 4 parents
    (each on with probability 0.2, value uniform in [1.5, 2.5]), each with 3 children; where
    its parent is on, one child (uniformly chosen) is on with probability 0.9, value in
    [0.5, 1.5] (below the parent's, as the gate needs). Returns ``(x, dirs)``."""
    P, C, d = 4, 3, 24
    dirs = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(7),
                                       dtype=torch.float64))[0][: P + P * C].float()
    g = torch.Generator().manual_seed(seed)
    on = (torch.rand(n, P, generator=g) < 0.2).float()
    u = (1.5 + torch.rand(n, P, generator=g)) * on
    which = torch.randint(C, (n, P), generator=g)
    kid_on = on * (torch.rand(n, P, generator=g) < 0.9).float()
    kids = torch.zeros(n, P, C).scatter(2, which[..., None], kid_on[..., None])
    v = (0.5 + torch.rand(n, P, C, generator=g)) * kids
    codes = torch.cat([u, v.flatten(1)], 1)
    return codes @ dirs + noise * torch.randn(n, d, generator=g), dirs


def test_hierarchical_mdl_at_a_target_on_a_two_level_generator():
    """Trained at target_fvu 0.1 (8 parents × 3 children for 4 × 3 true ones): the
    held-out quantised FVU meets the target within 0.015, every true parent direction is
    found (best decoder cosine >= 0.9), the code it trains is hierarchical (its conditional
    DL is the report's) and shorter than the same latents coded flat."""
    x, dirs = two_level(8000, 0)
    held, _ = two_level(4000, 1)
    cfg = HierarchicalSAEConfig(d_in=24, n_parents=8, children_per_parent=3, child_topk=1)
    res = train_hierarchical_sae(x, cfg, "mdl", target_fvu=0.1, steps=3000, lr=3e-3,
                                 warm_start_k=2, progress=False, return_history=True)
    sae = res.sae
    assert sae.cfg.activation == "jumprelu" and res.target_fvu == 0.1
    assert sae.cfg.metadata["training"]["objective"] == "hierarchical_mdl"
    rep = hierarchical_dl_report(sae, held, tolerance=0.01)
    assert abs(rep.fvu_quantized - 0.1) <= 0.015
    dec = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    assert (dirs[:4] @ dec.T).max(1).values.min() >= 0.9
    assert rep.bits_per_input < rep.flat_bits_per_input
