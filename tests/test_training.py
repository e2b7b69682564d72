"""Training, checkpoints/resume, the MDL objective, sweeps and MDL selection."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from builders import SHORT_TRAIN, bitwise_equal, sparse_sums

import tl_mdl
from tl_mdl import (
    SAE,
    HierarchicalSAEConfig,
    SAEConfig,
    description_length,
    select_mdl,
    sweep,
    train_sae,
)
from tl_mdl.training import load_checkpoint, mdl_penalty
from tl_mdl.training.loop import Run
from tl_mdl.training.trainer import STATE_JSON as _STATE_JSON


def sparse_data(n: int = 2048, d: int = 16, n_feat: int = 32, seed: int = 0) -> torch.Tensor:
    """Activations that are sparse sums of ``n_feat`` random directions (a true SAE)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_feat, d, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    active = torch.rand(n, n_feat, generator=g) < 3 / n_feat
    mags = torch.rand(n, n_feat, generator=g) * 2 + 0.5
    return (active * mags) @ dirs


@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return sparse_data()


def test_training_reduces_loss_and_is_deterministic(data):
    cfg = SAEConfig(d_in=16, d_sae=32)
    r1 = train_sae(data, cfg, "l1", sparsity=0.05, steps=60, batch_size=128, lr=3e-3,
                   progress=False, return_history=True)
    r2 = train_sae(data, cfg, "l1", sparsity=0.05, steps=60, batch_size=128, lr=3e-3,
                   progress=False, return_history=True)
    assert r1.history[-1]["fvu"] < r1.history[0]["fvu"]
    for k, v in r1.sae.state_dict().items():
        assert torch.equal(v, r2.sae.state_dict()[k]), k


@pytest.mark.parametrize("objective,act,k", [("topk", "topk", 4), ("mdl", "relu", None)])
def test_resume_reaches_the_same_weights(data, tmp_path, objective, act, k):
    cfg = SAEConfig(d_in=16, d_sae=32, activation=act, k=k)
    kw = dict(steps=40, batch_size=128, lr=3e-3, progress=False, seed=3)
    full = train_sae(data, cfg, objective, **kw)
    # Crash the run at step 20 (checkpoints every 10 steps), then resume to the end.
    ck3 = tmp_path / "ck"

    class Stop(Exception):
        pass

    calls = {"n": 0}
    orig = Run.one_step  # once per step, whichever path computes the step

    def boom(self, x, step):
        calls["n"] += 1
        if calls["n"] == 21:
            raise Stop
        return orig(self, x, step)

    Run.one_step = boom
    try:
        with pytest.raises(Stop):
            train_sae(data, cfg, objective, checkpoint_dir=ck3, checkpoint_every=10, **kw)
    finally:
        Run.one_step = orig
    meta, _ = load_checkpoint(ck3)
    assert meta["step"] == 20
    resumed = train_sae(data, cfg, objective, checkpoint_dir=ck3, checkpoint_every=10, **kw)
    for name, v in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], v, rtol=0, atol=0)


def test_nan_activations_stop_training_and_keep_checkpoint(data, tmp_path):
    bad = data.clone()
    cfg = SAEConfig(d_in=16, d_sae=32)
    ck = tmp_path / "ck"
    train_sae(data, cfg, "l1", steps=10, batch_size=128, checkpoint_dir=ck,
              checkpoint_every=5, progress=False)
    before = (ck / _STATE_JSON).read_text()
    bad[:] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        train_sae(bad, cfg, "l1", steps=20, batch_size=128, checkpoint_dir=tmp_path / "ck_bad",
                  checkpoint_every=5, progress=False)
    assert (ck / _STATE_JSON).read_text() == before


def test_bad_inputs(data):
    cfg = SAEConfig(d_in=16, d_sae=32)
    with pytest.raises(ValueError, match="objective"):
        train_sae(data, cfg, "nope", steps=1, progress=False)
    with pytest.raises(ValueError, match="d_in=16"):
        train_sae(torch.randn(10, 5), cfg, "l1", steps=1, progress=False)
    with pytest.raises(ValueError, match="empty"):
        train_sae(torch.zeros(0, 16), cfg, "l1", steps=1, progress=False)
    with pytest.raises(ValueError, match="activation='topk'"):
        train_sae(data, cfg, "topk", steps=1, progress=False)
    with pytest.raises(ValueError, match="steps="):
        train_sae(iter([data[:8]]), cfg, "l1", progress=False)


def test_iterable_of_batches(data):
    batches = [data[i : i + 128] for i in range(0, 1024, 128)]
    sae = train_sae(batches, SAEConfig(d_in=16, d_sae=32), "l1", steps=8, progress=False)
    assert isinstance(sae, SAE)


def test_mdl_penalty_is_scale_invariant_and_differentiable(data):
    sae = SAE(SAEConfig(d_in=16, d_sae=32), seed=1)
    x = data[:256]
    f = sae.encode(x)
    p1 = mdl_penalty(f, sae, x)
    with torch.no_grad():  # scale latents down and decoder up: same reconstruction
        sae.W_enc *= 0.5
        sae.b_enc *= 0.5
        sae.W_dec *= 2.0
    f2 = sae.encode(x)
    p2 = mdl_penalty(f2, sae, x)
    torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-4)
    p2.backward()
    assert sae.W_enc.grad is not None and torch.isfinite(sae.W_enc.grad).all()


def test_mdl_objective_lowers_measured_dl(data):
    """λ > 0 on the DL surrogate gives a shorter measured description than λ = 0."""
    cfg = SAEConfig(d_in=16, d_sae=64)
    kw = dict(steps=300, batch_size=128, lr=3e-3, progress=False, seed=0)
    plain = train_sae(data, cfg, "mdl", sparsity=0.0, **kw)
    mdl = train_sae(data, cfg, "mdl", sparsity=3e-3, **kw)
    dl_plain = description_length(plain, data, tolerance=0.01)
    dl_mdl = description_length(mdl, data, tolerance=0.01)
    assert dl_mdl.bits_per_input < 0.8 * dl_plain.bits_per_input
    assert dl_mdl.fvu_quantized < 0.2


def test_sweep_select_and_resume(data, tmp_path):
    out = tmp_path / "sw"
    kw = dict(widths=[8, 32], sparsities=[2, 4], objective="topk", out_dir=out, steps=40,
              batch_size=128, lr=3e-3, progress=False)
    table = sweep(data, **kw)
    assert len(table) == 4
    rows = list(table)
    for r in rows:
        assert r["bits_per_input"] > 0 and 0 <= r["fvu_quantized"]
        assert (out / f"w{r['width']}_s{r['sparsity']:g}" / "cfg.json").is_file()
    assert (out / "sweep.csv").read_text().count("\n") == 5
    tol = sorted(r["fvu_quantized"] for r in rows)[2]
    best = table.select(tol)
    ok = [r for r in rows if r["fvu_quantized"] <= tol]
    assert best["bits_per_input"] == min(r["bits_per_input"] for r in ok)
    assert select_mdl(rows, tol) is best["sae"]
    with pytest.raises(ValueError, match="no SAE meets"):
        select_mdl(rows, 1e-9)
    # resume: a second call loads instead of training
    again = sweep(data, **kw)
    assert [r["bits_per_input"] for r in again] == [r["bits_per_input"] for r in rows]
    assert json.loads((out / "w8_s2" / "scores.json").read_text())["width"] == 8


def test_topk_k_larger_than_width_is_skipped(data):
    table = sweep(data, widths=[4], sparsities=[2, 8], objective="topk", steps=5,
                  progress=False)
    assert [r["sparsity"] for r in table] == [2]


def test_public_names():
    for name in ("SAE", "SAEConfig", "quantize", "latent_description_length",
                 "description_length", "train_sae", "sweep", "select_mdl", "codec"):
        assert hasattr(tl_mdl, name), name


# ----------------------------------------------------- the caller's config and resume settings
@pytest.mark.parametrize("hierarchical", [False, True])
def test_training_leaves_the_callers_config_alone(tmp_path, hierarchical):
    x = sparse_sums()
    cfg = (HierarchicalSAEConfig(d_in=8, n_parents=3, children_per_parent=1) if hierarchical
           else SAEConfig(d_in=8, d_sae=16))
    before = copy.deepcopy(cfg)
    a = train_sae(x, cfg, "l1", **SHORT_TRAIN)
    assert cfg == before and cfg.metadata == {}
    assert a.cfg is not cfg
    b = train_sae(x, cfg, "mdl", **{**SHORT_TRAIN, "steps": 5, "lr": 5e-3})
    assert cfg == before
    assert {k: a.cfg.metadata["training"][k] for k in ("objective", "lr", "steps")} == {
        "objective": "l1", "lr": 3e-3, "steps": 8}
    assert {k: b.cfg.metadata["training"][k] for k in ("objective", "lr", "steps")} == {
        "objective": "mdl", "lr": 5e-3, "steps": 5}
    # a config carrying an earlier run's metadata resumes that run's checkpoint
    ck = tmp_path / "ck"
    first = train_sae(x, cfg, "l1", checkpoint_dir=ck, checkpoint_every=4, **SHORT_TRAIN)
    again = train_sae(x, first.cfg, "l1", checkpoint_dir=ck, **{**SHORT_TRAIN, "steps": 12})
    assert again.cfg.metadata["training"]["steps"] == 12
    assert not bitwise_equal(again, first)  # trained on from step 8


def test_resume_refuses_other_training_settings(tmp_path):
    x, cfg, ck = sparse_sums(), SAEConfig(d_in=8, d_sae=16), tmp_path / "ck"
    train_sae(x, cfg, "l1", sparsity=0.01, checkpoint_dir=ck, checkpoint_every=4, **SHORT_TRAIN)
    for change, field in [({"sparsity": 10.0}, "sparsity"), ({"lr": 1e-2}, "lr"),
                          ({"seed": 1}, "seed"), ({"batch_size": 32}, "batch_size"),
                          ({"lr_decay_frac": 0.0}, "lr_decay_frac")]:
        kw = {**SHORT_TRAIN, "sparsity": 0.01, **change}
        with pytest.raises(ValueError, match=rf"other settings \({field}=.*checkpoint_dir"):
            train_sae(x, cfg, "l1", checkpoint_dir=ck, **kw)
    with pytest.raises(ValueError, match="objective='l1' there, 'mdl' here"):
        train_sae(x, cfg, "mdl", sparsity=0.01, checkpoint_dir=ck, **SHORT_TRAIN)
    # resume=False starts over; steps / checkpoint_every / log_every may change
    fresh = train_sae(x, cfg, "l1", sparsity=10.0, checkpoint_dir=ck, resume=False, **SHORT_TRAIN)
    ref = train_sae(x, cfg, "l1", sparsity=10.0, **SHORT_TRAIN)
    assert bitwise_equal(fresh, ref)
    longer = dict(SHORT_TRAIN, steps=16, log_every=3)
    train_sae(x, cfg, "l1", sparsity=10.0, checkpoint_dir=ck, checkpoint_every=2, **longer)


def test_resume_with_more_steps_before_the_decay_matches_an_uninterrupted_run(tmp_path):
    x, cfg, ck = sparse_sums(), SAEConfig(d_in=8, d_sae=16), tmp_path / "ck"
    kw = dict(SHORT_TRAIN, lr_decay_frac=0.0)
    train_sae(x, cfg, "l1", checkpoint_dir=ck, **kw)
    resumed = train_sae(x, cfg, "l1", checkpoint_dir=ck, **{**kw, "steps": 14})
    assert bitwise_equal(resumed, train_sae(x, cfg, "l1", **{**kw, "steps": 14}))


def test_a_checkpoint_resumes_on_another_device(tmp_path, monkeypatch):
    """A run checkpointed on a GPU (its config says cuda) resumes on the CPU: the device is
    not part of what must match; the result equals an uninterrupted run."""
    import tl_mdl.training.loop as loop  # where the run loads its checkpoint

    x = sparse_sums()
    cfg = SAEConfig(d_in=8, d_sae=16)
    kw = dict(batch_size=64, lr=3e-3, progress=False, lr_decay_frac=0.0,
              warm_start_frac=0.0)  # schedules of 4 and 8 steps: same from step 4 on
    train_sae(x, cfg, steps=4, checkpoint_dir=tmp_path, checkpoint_every=4, **kw)
    real = loop.load_checkpoint

    def from_gpu(path):
        meta, tensors = real(path)
        meta["sae_cfg"]["device"] = "cuda:0"
        return meta, tensors

    monkeypatch.setattr(loop, "load_checkpoint", from_gpu)
    resumed = train_sae(x, cfg, steps=8, checkpoint_dir=tmp_path, checkpoint_every=4, **kw)
    whole = train_sae(x, cfg, steps=8, **kw)
    assert bitwise_equal(resumed, whole)

