"""AuxK dead-latent revival for TopK training (``train_sae(..., aux_k=...)``,
``tl_mdl.training.auxk``): the term's value and gradients on a hand-built SAE, revival of a
deliberately half-dead SAE, ``aux_k=None`` untouched, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from builders import bitwise_equal

from tl_mdl import SAE, SAEConfig, train_sae
from tl_mdl.training import loop, objectives, topk_step
from tl_mdl.training.auxk import AuxK
from tl_mdl.training.config import TrainConfig
from tl_mdl.training.trainer import load_checkpoint

COEF = 1 / 32


def _hand_sae() -> SAE:
    """d_in 4, d_sae 5, k 1 (float64): latents 0-3 read and write the coordinates; latent 4
    reads ``0.1 · Σ x`` (below the largest coordinate of a positive row: it never wins, it
    is dead) and writes ``(0.5, 0.5, 0.5, 0.5)``."""
    sae = SAE(SAEConfig(d_in=4, d_sae=5, activation="topk", k=1, dtype="float64"))
    with torch.no_grad():
        f64 = dict(dtype=torch.float64)
        sae.W_enc.copy_(torch.cat([torch.eye(4, **f64), torch.full((4, 1), 0.1, **f64)], 1))
        sae.W_dec.copy_(torch.cat([torch.eye(4, **f64), torch.full((1, 4), 0.5, **f64)]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _hand_x() -> torch.Tensor:
    return torch.rand(7, 4, generator=torch.Generator().manual_seed(0),
                      dtype=torch.float64) + 0.1


def _grads(sae: SAE, x: torch.Tensor, aux: AuxK | None, sparse: bool, monkeypatch):
    monkeypatch.setattr(topk_step, "applies", lambda s, fn: sparse)
    sae.zero_grad(set_to_none=True)
    tc = TrainConfig(objective="topk")
    loss, parts, _ = loop._loss_and_grads(sae, objectives._topk, x, tc, 0.0, False, aux)
    grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone())
             for n, p in sae.named_parameters()}
    return loss, parts, grads


@pytest.mark.parametrize("sparse", [True, False])  # the sparse TopK step and the dense one
def test_dead_latent_gets_the_aux_gradient_and_the_value_is_the_hand_one(sparse,
                                                                         monkeypatch):
    sae, x = _hand_sae(), _hand_x()
    # by hand: the main code keeps each row's largest coordinate; its residual e is the
    # rest of the row; the dead latent 4 codes relu(0.1 Σx) · (0.5, 0.5, 0.5, 0.5)
    top = x.argmax(1)
    e = x.clone()
    e[torch.arange(7), top] = 0.0
    e_hat = (0.1 * x.sum(1, keepdim=True)).clamp_min(0) * torch.full((1, 4), 0.5,
                                                                     dtype=torch.float64)
    tv = ((x - x.mean(0)) ** 2).sum()
    tv_e = ((e - e.mean(0)) ** 2).sum()  # Gao et al.: the residual's own variance
    fvu, aux_hand = (e ** 2).sum() / tv, COEF * ((e - e_hat) ** 2).sum() / tv_e

    _, plain_parts, plain = _grads(sae, x, None, sparse, monkeypatch)
    aux = AuxK(5, 4, aux_k=1, coefficient=COEF, dead_steps=3)
    aux.since_fired[4] = 3  # latent 4: 3 steps without firing
    loss, parts, with_aux = _grads(sae, x, aux, sparse, monkeypatch)
    assert plain_parts["fvu"] == pytest.approx(float(fvu), rel=1e-12)
    assert parts["aux"] == pytest.approx(float(aux_hand), rel=1e-12)
    assert parts["dead"] == 1.0
    assert float(loss.detach()) == pytest.approx(float(fvu + aux_hand), rel=1e-12)
    # the dead latent's rows: zero gradient without AuxK, nonzero with it
    for name, index in (("W_enc", (slice(None), 4)), ("b_enc", 4), ("W_dec", 4)):
        assert torch.equal(plain[name][index], torch.zeros_like(plain[name][index])), name
        assert (with_aux[name][index] != 0).any(), name
    # and the gradients are those of the hand formula (autograd on a dense copy)
    W_enc, b_enc, W_dec, b_dec = (p.detach().clone().requires_grad_()
                                  for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    pre = (x - b_dec) @ W_enc + b_enc
    keep = torch.zeros(7, 5, dtype=torch.bool)
    keep[torch.arange(7), top] = True
    x_hat = torch.where(keep, pre, 0.0).clamp_min(0) @ W_dec + b_dec
    e_hat = pre[:, 4:].clamp_min(0) @ W_dec[4:]
    r = (x - x_hat).detach()
    total = ((x - x_hat) ** 2).sum() / tv + COEF * ((r - e_hat) ** 2).sum() / tv_e
    total.backward()
    for name, p in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
        torch.testing.assert_close(with_aux[name], p.grad, rtol=1e-12, atol=1e-14, msg=name)
    # the step recorded the firing: latent 4 still dead (4 steps now), the winners reset
    assert aux.since_fired[4] == 4
    assert (aux.since_fired[top] == 0).all()


def test_aux_term_only_on_steps_with_dead_latents(monkeypatch):
    """AuxK with nothing dead yet: the step is bitwise the plain one (aux 0)."""
    sae, x = _hand_sae(), _hand_x()
    for sparse in (True, False):
        loss0, _, plain = _grads(sae, x, None, sparse, monkeypatch)
        aux = AuxK(5, 4, aux_k="auto", coefficient=COEF, dead_steps=3)
        loss1, parts, with_aux = _grads(sae, x, aux, sparse, monkeypatch)
        assert parts["aux"] == 0.0 and parts["dead"] == 0.0
        assert torch.equal(loss0, loss1)
        for name, g in plain.items():
            assert torch.equal(g, with_aux[name]), name
        assert aux.since_fired.tolist() == [int(i not in x.argmax(1)) for i in range(5)]


# ------------------------------------------------------------------- training runs
def _sparse_data() -> torch.Tensor:
    """4096 rows, each a sum of about 3 of 64 known unit directions in 32 dimensions."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(64, 32, generator=g), dim=-1)
    on = torch.rand(4096, 64, generator=g) < 3 / 64
    return (on * (torch.rand(4096, 64, generator=g) + 0.5)) @ dirs


CFG = SAEConfig(d_in=32, d_sae=128, activation="topk", k=3)
RUN = dict(steps=400, batch_size=128, lr=3e-3, progress=False)


def test_aux_k_revives_a_half_dead_sae(monkeypatch):
    """Half the latents start with encoder columns shrunk 20x: they never win a top-k.
    Without AuxK they stay dead (measured: 64/128 latents never fire on the data after 400
    steps); with aux_k='auto' (16) and dead_steps=10, the 64 are dead at step 10 and
    15/128 (12%) never fire at the end (aux_k=4: 16/128; seed 0, float32, one
    thread). The test asks for half without, and under 25% with."""
    real = loop.init_b_dec

    def kill_half(sae, x):
        real(sae, x)
        with torch.no_grad():
            sae.W_enc[:, ::2] *= 0.05

    monkeypatch.setattr(loop, "init_b_dec", kill_half)
    x = _sparse_data()
    dead = {}
    for aux_k in (None, "auto"):
        kw = {} if aux_k is None else dict(aux_k=aux_k, dead_steps=10)
        r = train_sae(x, CFG, "topk", return_history=True, log_every=5, **RUN, **kw)
        dead[aux_k] = float((r.sae.encode(x) > 0).any(0).logical_not().float().mean())
        if aux_k is not None:
            counts = {h["step"]: h["dead"] for h in r.history}
            assert counts[5] == 0.0  # nothing is dead before dead_steps
            assert counts[10] == 64.0  # then the shrunk half (measured)
            assert r.sae.cfg.metadata["training"]["aux_k"] == "auto"
    assert dead[None] == 0.5
    assert dead["auto"] < 0.25


def test_aux_k_none_is_the_old_training():
    x = _sparse_data()[:1024]
    kw = dict(RUN, steps=12)
    old = train_sae(x, CFG, "topk", **kw)
    assert bitwise_equal(train_sae(x, CFG, "topk", aux_k=None, **kw), old)
    # AuxK on, but no latent can be dead within the run: bitwise the same weights too
    assert bitwise_equal(train_sae(x, CFG, "topk", aux_k="auto", dead_steps=100, **kw), old)
    # with latents dead after 2 steps it trains otherwise
    assert not bitwise_equal(train_sae(x, CFG, "topk", aux_k="auto", dead_steps=2, **kw), old)


def test_resume_with_aux_k_is_bitwise(tmp_path):
    """A run with AuxK checkpointed at step 20 and resumed to step 40 ends on the weights of
    an uninterrupted 40-step run (the steps since each latent fired are in the checkpoint;
    no learning-rate decay, so both schedules agree)."""
    x = _sparse_data()[:2048]
    kw = dict(RUN, steps=40, aux_k=8, dead_steps=3, seed=3, lr_decay_frac=0.0)
    full = train_sae(x, CFG, "topk", return_history=True, **kw)
    assert any(h["dead"] > 0 for h in full.history if h["step"] > 20)
    ck = tmp_path / "ck"
    train_sae(x, CFG, "topk", checkpoint_dir=ck, checkpoint_every=10, **{**kw, "steps": 20})
    meta, tensors = load_checkpoint(ck)
    assert meta["step"] == 20 and tensors["auxk.since_fired"].dtype == torch.int64
    assert (tensors["auxk.since_fired"] >= 3).any()  # dead latents at the checkpoint
    resumed = train_sae(x, CFG, "topk", checkpoint_dir=ck, checkpoint_every=10, **kw)
    assert bitwise_equal(resumed, full.sae)
    # resuming with other AuxK settings is refused
    with pytest.raises(ValueError, match="dead_steps=3 there, 4 here"):
        train_sae(x, CFG, "topk", checkpoint_dir=ck, **{**kw, "dead_steps": 4})


def test_bad_aux_k_settings():
    x = _sparse_data()[:256]
    relu = SAEConfig(d_in=32, d_sae=64)
    one = dict(steps=1, progress=False)
    with pytest.raises(ValueError, match="aux_k='auto' revives .* objective='l1'"):
        train_sae(x, relu, "l1", aux_k="auto", **one)
    with pytest.raises(ValueError, match="aux_k=.* objective='mdl'"):
        train_sae(x, relu, "mdl", aux_k=4, **one)
    with pytest.raises(ValueError, match="activation='topk'.*got SAEConfig with "
                                         "activation='jumprelu'"):
        train_sae(x, SAEConfig(d_in=32, d_sae=64, activation="jumprelu"), "topk",
                  aux_k="auto", **one)
    for bad in (0, -3, True, 2.5, "half"):
        with pytest.raises(ValueError, match=f"aux_k={bad!r} must be 'auto'"):
            train_sae(x, CFG, "topk", aux_k=bad, **one)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="aux_coefficient must be a finite number >= 0"):
            train_sae(x, CFG, "topk", aux_k="auto", aux_coefficient=bad, **one)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="dead_steps must be a positive int"):
            train_sae(x, CFG, "topk", aux_k="auto", dead_steps=bad, **one)
    with pytest.raises(ValueError, match="aux_coefficient=0.1 is a setting of AuxK"):
        train_sae(x, CFG, "topk", aux_coefficient=0.1, **one)


def test_checkpoint_from_before_auxk_resumes_without_and_refuses_aux_k(tmp_path):
    """A checkpoint written before AuxK existed (no aux_k / aux_coefficient / dead_steps in
    its training config, no ``auxk.`` tensors) is a run without AuxK: it resumes as one, and
    resuming it with aux_k is refused with the settings named, before anything is loaded."""
    from safetensors.torch import save_file

    from tl_mdl.training.checkpointing import META_KEY, STATE_TENSORS

    x = _sparse_data()[:1024]
    kw = dict(RUN, steps=20, lr_decay_frac=0.0)
    ck = tmp_path / "ck"
    train_sae(x, CFG, "topk", checkpoint_dir=ck, checkpoint_every=10, **{**kw, "steps": 10})
    meta, tensors = load_checkpoint(ck)
    for name in ("aux_k", "aux_coefficient", "dead_steps"):
        del meta["train_cfg"][name]
    save_file(tensors, str(ck / STATE_TENSORS), metadata={META_KEY: json.dumps(meta)})
    with pytest.raises(ValueError, match="aux_k=None there, 'auto' here"):
        train_sae(x, CFG, "topk", checkpoint_dir=ck, aux_k="auto", **kw)
    resumed = train_sae(x, CFG, "topk", checkpoint_dir=ck, **kw)
    assert bitwise_equal(resumed, train_sae(x, CFG, "topk", **kw))
