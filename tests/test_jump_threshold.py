"""The JumpReLU threshold's straight-through gradient under the mdl objective is the kernel
estimate of the exact loss change of toggling the entries at the threshold: checked
against the loss recomputed entry by entry, and on a 1-D problem whose MSE-optimal
threshold is known in closed form."""

from __future__ import annotations

import math

import torch

from tl_mdl import SAE, SAEConfig
from tl_mdl.training.objectives import batch_fvu, make_objective


def _threshold_grad(sae: SAE, x: torch.Tensor, eps: float, *, curvature: bool = True):
    """``∂(FVU_B)/∂θ`` as the mdl objective computes it (λ = 0: reconstruction only)."""
    # "threshold": the first-order estimator of Rajamanoharan et al. (2024)
    fn = make_objective("mdl", warm_start_frac=0.0,
                        straight_through="jump" if curvature else "threshold")
    fn.w = eps
    sae.zero_grad()
    latents = fn.encode(sae, x)
    loss, _ = fn(sae, x, latents, sae.decode(latents), 0.0, 0.01)
    loss.backward()
    return sae.threshold.grad.clone(), latents.detach()


def test_threshold_gradient_is_the_exact_toggle_cost_of_the_near_entries():
    """``∂θ_i = −(1/ε) Σ_{n: |pre − θ| < ε/2} [FVU(f_{n,i} = θ_i) − FVU(f_{n,i} = 0)]``, each
    term the loss recomputed with that one entry switched (float64: the batch FVU is
    quadratic in each latent, so the identity is exact up to rounding)."""
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=6, d_sae=5, activation="jumprelu", dtype="float64"))
    x = torch.randn(64, 6, dtype=torch.float64)
    with torch.no_grad():  # every feature's threshold inside its pre-activations
        sae.threshold.copy_(sae.encode_pre(x).quantile(0.7, dim=0).clamp_min(0.05))
    eps = 0.4
    grad, latents = _threshold_grad(sae, x, eps)
    exact = torch.zeros(5, dtype=torch.float64)
    with torch.no_grad():
        pre, theta = sae.encode_pre(x), sae.threshold
        near = (pre - theta).abs() < eps / 2
        assert (near & (latents > 0)).any(0).all() and (near & (latents == 0)).any(0).all()
        for n, i in near.nonzero().tolist():
            on, off = latents.clone(), latents.clone()
            on[n, i], off[n, i] = theta[i], 0.0
            exact[i] -= (batch_fvu(x, sae.decode(on)) - batch_fvu(x, sae.decode(off))) / eps
    torch.testing.assert_close(grad, exact, rtol=1e-10, atol=1e-14)
    # the first-order estimator misses the curvature term, far beyond that tolerance
    plain, _ = _threshold_grad(sae, x, eps, curvature=False)
    assert ((plain - exact).abs() > 1e-3 * exact.abs()).all()


def _one_feature_problem(p: float, mu: float, s: float, m: int = 20_000):
    """``x = c e1 + n e2``, ``pre = c + n`` (encoder (1, 1)), decoder row ``e1``: ``c = mu``
    for a fraction ``p`` of the rows, else 0; ``n`` Gaussian(0, s²), laid out on its
    quantiles (no sampling noise) separately for both kinds of row."""
    q = torch.distributions.Normal(0.0, s).icdf((torch.arange(m, dtype=torch.float64) + 0.5) / m)
    k = round(p * m / (1 - p))
    c = torch.cat([torch.full((k,), mu, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)])
    qk = torch.distributions.Normal(0.0, s).icdf((torch.arange(k, dtype=torch.float64) + 0.5) / k)
    n = torch.cat([qk, q])
    x = torch.stack([c, n], 1)
    sae = SAE(SAEConfig(d_in=2, d_sae=1, activation="jumprelu", dtype="float64",
                        apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0], [1.0]]))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0]]))
        sae.b_dec.zero_()
    return sae, x


def _optimal_threshold(p: float, mu: float, s: float) -> float:
    """Switching on an entry at value θ changes the squared error by θ² − 2θc, so
    ``dL/dθ ∝ E[c | pre = θ] − θ/2``, and the MSE-optimal θ is where it turns from
    negative to positive (bisection on the closed form, between the noise and the
    firings)."""
    def excess(t: float) -> float:
        on = p * math.exp(-0.5 * ((t - mu) / s) ** 2)
        off = (1 - p) * math.exp(-0.5 * (t / s) ** 2)
        return mu * on / (on + off) - t / 2
    lo, hi = 0.05, 1.5
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
    return (lo + hi) / 2


def _root(sae: SAE, x: torch.Tensor, eps: float, curvature: bool) -> float:
    """The threshold at which the estimated gradient changes sign (where training rests)."""
    lo, hi = 0.05, 1.5
    for _ in range(40):
        mid = (lo + hi) / 2
        with torch.no_grad():
            sae.threshold.fill_(mid)
        grad, _ = _threshold_grad(sae, x, eps, curvature=curvature)
        lo, hi = (mid, hi) if float(grad) < 0 else (lo, mid)
    return (lo + hi) / 2


def test_threshold_rests_at_the_known_mse_optimum():
    """``p = 0.3``, ``mu = 1``, ``s = 0.2``: θ* = 0.4887. With a window ``ε = 0.2`` (about a
    bin width, as in training) the exact toggle cost rests within 0.002 of θ* (what is left
    is the window's smoothing, second order in ε); the first-order estimator rests 0.02
    below it, since it charges the entries just under θ a gradient taken at 0 and those
    just over it one taken at their value. Both agree with θ* as ε → 0."""
    p, mu, s = 0.3, 1.0, 0.2
    star = _optimal_threshold(p, mu, s)
    assert abs(star - 0.4887) < 1e-4
    sae, x = _one_feature_problem(p, mu, s)
    exact, plain = _root(sae, x, 0.2, True), _root(sae, x, 0.2, False)
    assert abs(exact - star) < 0.002, (exact, star)
    assert star - plain > 0.015, (plain, star)
    for curvature in (True, False):
        assert abs(_root(sae, x, 0.02, curvature) - star) < 0.002


def test_pre_activation_gets_the_jump_cost_near_the_threshold():
    """``∂pre_{n,i} = g [active] + (1/ε)[near] (FVU(f = θ) − FVU(f = 0) + push_i)``: the
    reconstruction's exact toggle cost (recomputed entry by entry) plus the price the
    objective puts on one firing, mirrored from the threshold's gradient since
    ``[pre > θ]`` depends on ``pre − θ`` alone."""
    from tl_mdl.training.code_length import _JumpCode, jump_curvature

    torch.manual_seed(1)
    sae = SAE(SAEConfig(d_in=5, d_sae=4, activation="jumprelu", dtype="float64"))
    x = torch.randn(32, 5, dtype=torch.float64)
    pre = sae.encode_pre(x).detach().requires_grad_()
    theta = pre.detach().quantile(0.6, dim=0).clamp_min(0.05)
    eps, push = 0.5, torch.tensor([0.0, 0.01, 0.02, 0.03], dtype=torch.float64)
    box: dict = {"jump": {}}
    latents = _JumpCode.apply(pre, theta, eps, box)
    box["jump"].update(hess=jump_curvature(sae, x), push=push)
    batch_fvu(x, sae.decode(latents)).backward()
    with torch.no_grad():
        base = latents.detach()
        expected = torch.zeros_like(base)
        g = 2 * (sae.decode(base) - x) @ sae.W_dec.T / (x - x.mean(0)).pow(2).sum()
        expected += g * (base > 0)
        near = (pre - theta).abs() < eps / 2
        assert near.sum() >= 20
        for n, i in near.nonzero().tolist():
            on, off = base.clone(), base.clone()
            on[n, i], off[n, i] = theta[i], 0.0
            jump = batch_fvu(x, sae.decode(on)) - batch_fvu(x, sae.decode(off))
            expected[n, i] += (jump + push[i]) / eps
    torch.testing.assert_close(pre.grad, expected, rtol=1e-10, atol=1e-14)


def test_a_child_whose_parent_is_off_gets_no_jump_gradient():
    """Hierarchical SAE, ``"jump"``: a child can fire only where its parent does, so where
    the parent never fires its threshold and pre-activations get nothing, whatever its
    pre-activations; its sibling under a firing parent does get the jump's gradient."""
    from tl_mdl.sae.hierarchical import HierarchicalSAE, HierarchicalSAEConfig
    from tl_mdl.training.conditional_code import ConditionalCodeLengthObjective

    torch.manual_seed(0)
    cfg = HierarchicalSAEConfig(d_in=6, n_parents=2, children_per_parent=2,
                                activation="jumprelu", dtype="float64")
    sae = HierarchicalSAE(cfg)
    x = torch.randn(48, 6, dtype=torch.float64)
    with torch.no_grad():
        pre = sae.encode_pre(x)
        theta = pre.quantile(0.5, dim=0).clamp_min(0.05)
        theta[1] = pre[:, 1].max() + 1.0  # parent 1 never fires
        sae.threshold.copy_(theta)
    fn = ConditionalCodeLengthObjective(warm_start_frac=0.0, straight_through="jump")
    fn.w = 0.6
    pre_grads = []
    sae.W_enc.register_hook(pre_grads.append)
    latents = fn.encode(sae, x)
    loss, _ = fn(sae, x, latents, sae.decode(latents), 1e-3, 0.01)
    loss.backward()
    children_of_1 = [2 + 1 * 2, 2 + 1 * 2 + 1]
    assert torch.equal(sae.threshold.grad[children_of_1], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(pre_grads[0][:, children_of_1], torch.zeros(6, 2, dtype=torch.float64))
    assert (sae.threshold.grad[[2, 3]] != 0).all()


def test_train_sae_takes_the_estimator_as_a_keyword():
    """``train_sae(..., straight_through="jump")`` reaches the objective (the weights differ
    from the default estimator's after the same steps); a bad value or another objective
    is a clear error naming it."""
    import pytest

    from tl_mdl import train_sae

    torch.manual_seed(0)
    x = torch.randn(512, 8)
    cfg = SAEConfig(d_in=8, d_sae=16)
    kw = dict(steps=12, batch_size=64, progress=False, warm_start_frac=0.0)
    a = train_sae(x, cfg, "mdl", **kw)
    b = train_sae(x, cfg, "mdl", straight_through="jump", **kw)
    c = train_sae(x, cfg, "mdl", straight_through="threshold", **kw)
    assert torch.equal(a.threshold, b.threshold)  # the default is "jump", bitwise
    assert not torch.equal(a.threshold, c.threshold)
    with pytest.raises(ValueError, match="straight_through='exact'"):
        train_sae(x, cfg, "mdl", straight_through="exact", **kw)
    with pytest.raises(ValueError, match="objective='l1'"):
        train_sae(x, cfg, "l1", straight_through="jump", **kw)
