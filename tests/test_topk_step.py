"""The TopK objective's sparse step (``tl_mdl.training.topk_step``) computes what the dense
path computes: the same forward code bit for bit, gradients equal up to float summation
order (bounded by the sums of absolute terms), and the same training trajectory in
float64 to rounding."""

from __future__ import annotations

import pytest
import torch

from tl_mdl import SAE, SAEConfig, train_sae
from tl_mdl.sae import HierarchicalSAE, HierarchicalSAEConfig
from tl_mdl.training import loop, objectives, topk_step
from tl_mdl.training.objectives import batch_fvu

EPS32 = torch.finfo(torch.float32).eps


def _data(n: int, d_in: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(4 * d_in, d_in, generator=g)
    on = torch.rand(n, 4 * d_in, generator=g) < 0.05
    x = (on * torch.rand(n, 4 * d_in, generator=g)) @ D + 0.3
    return x.to(dtype)


def _sae(d_in: int, d_sae: int, k: int, dtype: str = "float32") -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=k, dtype=dtype), seed=1)
    with torch.no_grad():
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=torch.Generator().manual_seed(2)))
    return sae


def _dense_grads(sae: SAE, x: torch.Tensor):
    sae.zero_grad(set_to_none=True)
    latents = sae.encode(x)
    loss = batch_fvu(x, sae.decode(latents))
    loss.backward()
    return latents.detach(), loss.detach(), {n: p.grad.clone() for n, p in
                                             sae.named_parameters()}


@pytest.mark.parametrize("k", [4, 16])  # torch.topk and the two-pass top-k
def test_sparse_step_gradients_match_the_dense_ones(k: int) -> None:
    d_in, d_sae, n = 24, 512, 300
    sae, x = _sae(d_in, d_sae, k), _data(n, d_in, seed=3)
    latents, loss_d, dense = _dense_grads(sae, x)
    sae.zero_grad(set_to_none=True)
    loss, parts, values = topk_step.loss_and_grads(sae, objectives._topk, x, 0.0, 0.01)
    # the code itself is bitwise the dense encode's
    assert torch.equal(values.sort(-1).values, latents.topk(k, -1).values.sort(-1).values)
    assert float((values != 0).sum(-1).float().mean()) == float(
        (latents != 0).sum(-1).float().mean())
    assert loss.item() == pytest.approx(loss_d.item(), rel=64 * EPS32)
    assert parts["fvu"] == pytest.approx(float(loss_d), rel=64 * EPS32)
    # bound on a float32 sum's rounding: (terms) · eps · Σ|terms|; Σ|terms| by the dense
    # products of absolute values (the decoder's output gradient g_out = 2 (x̂ − x) / TV)
    with torch.no_grad():
        x_in = (x - sae.b_dec).abs()
        g_out = (2 * (sae.decode(latents) - x) / (x - x.mean(0)).pow(2).sum()).abs()
        g_lat = g_out @ sae.W_dec.abs().T * (latents != 0)
        scale = {
            "W_dec": latents.abs().T @ g_out,
            "b_dec": g_out.sum(0) + sae.W_enc.abs() @ g_lat.sum(0),
            "W_enc": x_in.T @ g_lat,
            "b_enc": g_lat.sum(0),
        }
    terms = n * k + d_sae
    for name, p in sae.named_parameters():
        bound = 4 * terms * EPS32 * scale[name] + 1e-30
        assert ((p.grad - dense[name]).abs() <= bound).all(), name


def test_sparse_step_trains_the_dense_trajectory_in_float64(monkeypatch) -> None:
    d_in, d_sae, k = 16, 256, 16
    x = _data(2000, d_in, seed=5, dtype=torch.float64)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=k, dtype="float64")
    kw = dict(steps=40, batch_size=128, progress=False, return_history=True, log_every=5)
    calls = []
    real = topk_step.loss_and_grads
    monkeypatch.setattr(topk_step, "loss_and_grads",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = train_sae(x, cfg, "topk", **kw)
    assert len(calls) == 40
    monkeypatch.setattr(topk_step, "applies", lambda sae, fn: False)
    dense = train_sae(x, cfg, "topk", **kw)
    # rounding (eps64 ~ 2e-16) grown by 40 Adam steps of lr 1e-3 stays far below 1e-9
    for (name, p), q in zip(fast.sae.named_parameters(), dense.sae.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)
    assert [h["l0"] for h in fast.history] == [h["l0"] for h in dense.history]
    for a, b in zip(fast.history, dense.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-9)


def test_sparse_step_applies_only_to_the_stock_topk_objective() -> None:
    sae = _sae(8, 64, 4)
    assert topk_step.applies(sae, objectives._topk)
    assert not topk_step.applies(sae, objectives._l1)
    assert not topk_step.applies(sae, lambda *a: None)
    relu = SAE(SAEConfig(d_in=8, d_sae=64))
    assert not topk_step.applies(relu, objectives._topk)
    hier = HierarchicalSAE(HierarchicalSAEConfig(d_in=8, n_parents=4, children_per_parent=4))
    assert not topk_step.applies(hier, objectives._topk)


def test_a_replaced_sae_method_sends_training_to_the_dense_path(monkeypatch) -> None:
    sae = _sae(8, 64, 4)
    seen = []
    orig = SAE.decode
    monkeypatch.setattr(SAE, "decode", lambda self, f: seen.append(1) or orig(self, f))
    assert not topk_step.applies(sae, objectives._topk)
    train_sae(_data(256, 8, seed=1), SAEConfig(d_in=8, d_sae=64, activation="topk", k=4),
              "topk", steps=3, batch_size=64, progress=False)
    assert len(seen) >= 3


@pytest.mark.parametrize("objective,act,k", [("topk", "topk", 16), ("l1", "relu", None)])
def test_fused_adam_trains_the_unfused_trajectory_in_float64(monkeypatch, objective, act,
                                                             k) -> None:
    x = _data(1000, 16, seed=7, dtype=torch.float64)
    cfg = SAEConfig(d_in=16, d_sae=256, activation=act, k=k, dtype="float64")
    kw = dict(steps=30, batch_size=128, progress=False)
    fused = train_sae(x, cfg, objective, **kw)
    monkeypatch.setattr(loop, "_adam", lambda params, lr: torch.optim.Adam(params, lr=lr))
    plain = train_sae(x, cfg, objective, **kw)
    assert fused.cfg.metadata["training"]["steps_taken"] == 30
    for (name, p), q in zip(fused.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("method", ["encode", "activation", "decode"])
def test_a_method_replaced_on_the_instance_sends_training_to_the_dense_path(method) -> None:
    sae = _sae(8, 64, 4)
    orig = getattr(sae, method)
    setattr(sae, method, lambda t: 2 * orig(t))
    assert not topk_step.applies(sae, objectives._topk)
