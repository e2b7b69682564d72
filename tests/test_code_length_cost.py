"""The mdl objective's straight-through code length on dense masks: the same numbers as its
formula and as the SAE's own JumpReLU gradient, NaN detection kept, and its work per step
bounded by counting passes over ``[batch, d_sae]`` tensors (no timings in tests)."""

from __future__ import annotations

import collections

import pytest
import torch
from builders import f32_tolerance, random_sae
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tl_mdl import SAEConfig, train_sae
from tl_mdl.sae.model import _JumpReLUFn
from tl_mdl.training.code_length import CodeLengthObjective, _JumpCode
from tl_mdl.training.objectives import make_objective


def _straddling(n: int = 300, f: int = 40, seed: int = 0):
    """Pre-activations around thresholds, about half of them within ``eps/2`` of theirs,
    some exactly at ``θ`` and at ``θ ± eps/2`` (the masks' edges)."""
    g = torch.Generator().manual_seed(seed)
    theta = 0.2 + torch.rand(f, generator=g)
    eps = 0.25
    pre = theta + 0.3 * torch.randn(n, f, generator=g)
    pre[0] = theta
    pre[1] = theta + eps / 2
    pre[2] = theta - eps / 2
    return pre, theta, eps, torch.randn(n, f, generator=g)


def test_jump_code_is_its_formula():
    pre, theta, eps, g = _straddling()
    pre.requires_grad_()
    theta.requires_grad_()
    box: dict = {}
    out = _JumpCode.apply(pre, theta, eps, box)
    out.backward(g)
    with torch.no_grad():
        d = pre - theta  # the same float32 differences the masks are read from
        active, near = d > 0, d.abs() < eps / 2
    assert 0.3 < near.double().mean() < 0.7
    assert torch.equal(out, torch.where(active, pre, 0).detach())
    assert torch.equal(pre.grad, torch.where(active, g, 0))
    assert torch.equal(box["active"], active.float()) and torch.equal(box["near"], near.float())
    # θ: −(θ/ε) Σ_n g·near, a float32 sum of n terms (any order) against float64
    s = (g.double() * near).sum(0)
    expected = -(theta.detach().double() / eps) * s
    scale = float((theta.detach().double() / eps * (g.double().abs() * near).sum(0)).max())
    tol = f32_tolerance(expected, terms=pre.shape[0] + 3, scale=scale)
    torch.testing.assert_close(theta.grad.double(), expected, atol=tol, rtol=0)


def test_jump_code_matches_the_sae_jumprelu_gradient():
    """The SAE's own JumpReLU straight-through (another kernel, the same formula) at the
    same bandwidth: latents and input gradient bitwise, threshold gradient to rounding."""
    pre, theta, eps, g = _straddling(seed=1)
    grads = []
    for fn in (lambda p, t: _JumpCode.apply(p, t, eps, {}),
               lambda p, t: _JumpReLUFn.apply(p, t, eps)):
        p, t = pre.clone().requires_grad_(), theta.clone().requires_grad_()
        out = fn(p, t)
        out.backward(g)
        grads.append((out.detach(), p.grad, t.grad))
    (o1, p1, t1), (o2, p2, t2) = grads
    assert torch.equal(o1, o2) and torch.equal(p1, p2)
    scale = float((theta / eps * g.abs().sum(0)).max())
    tol = f32_tolerance(t2, terms=pre.shape[0] + 3, scale=scale)
    torch.testing.assert_close(t1, t2, atol=tol, rtol=0)


class _CountPasses(TorchDispatchMode):
    """Counts the ops that read or write a tensor of exactly ``size`` elements, by name."""

    VIEWS = {"t", "expand", "detach", "view", "unbind", "transpose", "alias", "_unsafe_view",
             "empty_like", "empty", "as_strided"}

    def __init__(self, size: int):
        super().__init__()
        self.size, self.ops = size, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        tensors = tree_flatten((args, kwargs, out))[0]
        if name not in self.VIEWS and any(
                isinstance(t, torch.Tensor) and t.numel() == self.size for t in tensors):
            self.ops[name] += 1
        return out


def _step_ops(objective: str, activation: str, **settings) -> collections.Counter:
    n, d_sae, d_in = 64, 96, 16  # n · d_sae differs from every other size in the step
    sae = random_sae(d_in, activation, d_sae=d_sae)
    x = torch.randn(n, d_in, generator=torch.Generator().manual_seed(0))
    fn = make_objective(objective, warm_start_frac=0.0, **settings)
    encode = getattr(fn, "encode", None) or (lambda s, v: s.encode(v))
    for _ in range(2):  # the second step runs with the running statistics set
        with _CountPasses(n * d_sae) as count:
            latents = encode(sae, x)
            loss, _ = fn(sae, x, latents, sae.decode(latents), 0.1, 0.01)
            loss.backward()
    return count.ops


@pytest.mark.parametrize("straight_through,extra", [("threshold", 4), ("jump", 6)])
def test_an_mdl_step_costs_a_few_passes_more_than_an_l1_step(straight_through, extra):
    """The MDL step's work over ``[batch, d_sae]``: the 6 GEMMs both objectives do, and a
    few elementwise passes more than L1's (masks, their column sums and the value
    statistics; ``"jump"`` two more, for the toggle cost); nothing lists entries
    (``nonzero`` and gathers cost several passes each)."""
    mdl = _step_ops("mdl", "jumprelu", straight_through=straight_through)
    l1 = _step_ops("l1", "relu")
    gemms = ("mm", "addmm")
    assert sum(mdl[k] for k in gemms) == sum(l1[k] for k in gemms) == 6
    listing = {"nonzero", "index", "index_add", "index_put", "bincount", "scatter", "gather"}
    assert not listing & set(mdl), mdl
    passes = {k: sum(v for op, v in ops.items() if op not in gemms)
              for k, ops in (("mdl", mdl), ("l1", l1))}
    # 14 ("threshold") and 16 ("jump") against 10 today; at 2048 x 2048 (d_in 128) a pass
    # takes ~2 ms, a GEMM ~20 ms and the nonzero this code no longer calls ~10 ms
    assert passes["mdl"] <= passes["l1"] + extra, (mdl, l1)


def test_nan_in_a_batch_still_stops_mdl_training():
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    x[300, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="row"):
        train_sae(x, SAEConfig(d_in=8, d_sae=16), "mdl", steps=6, batch_size=512,
                  warm_start_frac=0.0, progress=False)


def test_objective_statistics_come_from_the_masks():
    """Counts and near counts the objective reads from the masks equal the ones recomputed
    from the latents and pre-activations (exact integers)."""
    sae = random_sae(8, "jumprelu", d_sae=24)
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(2))
    obj = CodeLengthObjective(warm_start_frac=0.0)
    obj.w = 0.3
    latents = obj.encode(sae, x)
    box = obj._box
    with torch.no_grad():  # the pre-activations as encode computes them
        xin = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
        d = torch.addmm(sae.b_enc, xin, sae.W_enc) - sae.threshold
    assert torch.equal(box["active"].sum(0), (latents > 0).sum(0).float())
    assert torch.equal(box["near"].sum(0), (d.abs() < 0.15).sum(0).float())
