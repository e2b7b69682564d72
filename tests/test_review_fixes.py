"""Regression tests for reviewed bugs: SAE folders saved as a pair, the caller's config left
alone by training, resume checks of the training settings, sweep resume and checkpoints
per grid point, NaN latents in the DL scorer, and ``cfg`` following ``sae.to(...)``."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tl_mdl.sae.model as sae_model
from tl_mdl import (
    SAE,
    HierarchicalSAE,
    HierarchicalSAEConfig,
    SAEConfig,
    description_length,
    sweep,
    train_sae,
)
from tl_mdl.mdl.hierarchical import hierarchical_dl_report
from tl_mdl.training.hierarchical import sweep_hierarchical


def _data(n: int = 256, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(16, d, generator=g)
    active = torch.rand(n, 16, generator=g) < 0.2
    return (active * (torch.rand(n, 16, generator=g) + 0.5)) @ dirs


def _bitwise_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


TRAIN = dict(steps=8, batch_size=64, lr=3e-3, progress=False)


# ------------------------------------------------------------------ 1. save as a pair
def test_unserialisable_metadata_raises_before_touching_the_folder(tmp_path):
    old = SAE(SAEConfig(d_in=4, d_sae=8, activation="topk", k=2), seed=1)
    old.save(tmp_path)
    before = _files(tmp_path)
    new = SAE(SAEConfig(d_in=4, d_sae=8, activation="topk", k=5,
                        metadata={"ok": 1, "scale": np.float32(2.0)}), seed=2)
    with pytest.raises(TypeError, match=r"metadata\.scale.*numpy\.float32.*float\(x\)"):
        new.save(tmp_path)
    assert _files(tmp_path) == before  # bit for bit: nothing written
    assert _bitwise_equal(SAE.load(tmp_path), old)
    with pytest.raises(TypeError, match=r"metadata\.scale"):  # a fresh folder is not made
        new.save(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_weights_carry_the_hash_of_their_config(tmp_path):
    sae = SAE(SAEConfig(d_in=4, d_sae=8, metadata={"a": [1, 2]}), seed=3)
    sae.save(tmp_path)
    text = (tmp_path / "cfg.json").read_text()
    canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    with safe_open(str(tmp_path / "sae_weights.safetensors"), framework="pt") as fh:
        stored = fh.metadata()[sae_model.CFG_HASH_KEY]
    assert stored == hashlib.sha256(canonical.encode()).hexdigest()
    # whitespace and key order do not count; the content does
    (tmp_path / "cfg.json").write_text(json.dumps(json.loads(text)))
    assert _bitwise_equal(SAE.load(tmp_path), sae)


@pytest.mark.parametrize("hierarchical", [False, True])
def test_crash_between_the_two_writes_is_detected(tmp_path, hierarchical):
    if hierarchical:
        old = HierarchicalSAE(HierarchicalSAEConfig(d_in=4, n_parents=2, children_per_parent=1))
        cfg = HierarchicalSAEConfig(d_in=4, n_parents=2, children_per_parent=1, child_topk=1)
        new, cls = HierarchicalSAE(cfg, seed=5), HierarchicalSAE
    else:  # same shapes: the shape check alone cannot see the mix
        old = SAE(SAEConfig(d_in=4, d_sae=8, activation="topk", k=2), seed=1)
        new, cls = SAE(SAEConfig(d_in=4, d_sae=8, activation="topk", k=5), seed=2), SAE
    old.save(tmp_path)
    orig, calls = sae_model.atomic_write, {"n": 0}

    def crash_second(target, write):
        calls["n"] += 1
        if calls["n"] == 2:  # weights replaced, config not yet
            raise KeyboardInterrupt("crash")
        return orig(target, write)

    with mock.patch.object(sae_model, "atomic_write", crash_second):
        with pytest.raises(KeyboardInterrupt):
            new.save(tmp_path)
    with pytest.raises(ValueError, match="different saves.*re-save the SAE"):
        cls.load(tmp_path)
    new.save(tmp_path)  # a complete save repairs the folder
    assert _bitwise_equal(cls.load(tmp_path), new)


def test_folders_without_the_hash_still_load(tmp_path):
    """E.g. written by SAELens: weights without metadata, any cfg.json."""
    sae = SAE(SAEConfig(d_in=4, d_sae=8), seed=4)
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()},
              str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(sae.cfg.to_dict()))
    assert _bitwise_equal(SAE.load(tmp_path), sae)


# ------------------------------------------------------------ 2. the caller's config
@pytest.mark.parametrize("hierarchical", [False, True])
def test_training_leaves_the_callers_config_alone(tmp_path, hierarchical):
    x = _data()
    cfg = (HierarchicalSAEConfig(d_in=8, n_parents=3, children_per_parent=1) if hierarchical
           else SAEConfig(d_in=8, d_sae=16))
    before = copy.deepcopy(cfg)
    a = train_sae(x, cfg, "l1", **TRAIN)
    assert cfg == before and cfg.metadata == {}
    assert a.cfg is not cfg
    b = train_sae(x, cfg, "mdl", **{**TRAIN, "steps": 5, "lr": 5e-3})
    assert cfg == before
    assert {k: a.cfg.metadata["training"][k] for k in ("objective", "lr", "steps")} == {
        "objective": "l1", "lr": 3e-3, "steps": 8}
    assert {k: b.cfg.metadata["training"][k] for k in ("objective", "lr", "steps")} == {
        "objective": "mdl", "lr": 5e-3, "steps": 5}
    # a config carrying an earlier run's metadata resumes that run's checkpoint
    ck = tmp_path / "ck"
    first = train_sae(x, cfg, "l1", checkpoint_dir=ck, checkpoint_every=4, **TRAIN)
    again = train_sae(x, first.cfg, "l1", checkpoint_dir=ck, **{**TRAIN, "steps": 12})
    assert again.cfg.metadata["training"]["steps"] == 12
    assert not _bitwise_equal(again, first)  # trained on from step 8


def test_cfg_of_an_sae_is_a_copy():
    cfg = SAEConfig(d_in=4, d_sae=8)
    sae = SAE(cfg)
    sae.cfg.metadata["x"] = 1
    assert cfg.metadata == {}


# ---------------------------------------------------------------- 3. resume settings
def test_resume_refuses_other_training_settings(tmp_path):
    x, cfg, ck = _data(), SAEConfig(d_in=8, d_sae=16), tmp_path / "ck"
    train_sae(x, cfg, "l1", sparsity=0.01, checkpoint_dir=ck, checkpoint_every=4, **TRAIN)
    for change, field in [({"sparsity": 10.0}, "sparsity"), ({"lr": 1e-2}, "lr"),
                          ({"seed": 1}, "seed"), ({"batch_size": 32}, "batch_size"),
                          ({"lr_decay_frac": 0.0}, "lr_decay_frac")]:
        kw = {**TRAIN, "sparsity": 0.01, **change}
        with pytest.raises(ValueError, match=rf"other settings \({field}=.*checkpoint_dir"):
            train_sae(x, cfg, "l1", checkpoint_dir=ck, **kw)
    with pytest.raises(ValueError, match="objective='l1' there, 'mdl' here"):
        train_sae(x, cfg, "mdl", sparsity=0.01, checkpoint_dir=ck, **TRAIN)
    # resume=False starts over; steps / checkpoint_every / log_every may change
    fresh = train_sae(x, cfg, "l1", sparsity=10.0, checkpoint_dir=ck, resume=False, **TRAIN)
    ref = train_sae(x, cfg, "l1", sparsity=10.0, **TRAIN)
    assert _bitwise_equal(fresh, ref)
    longer = dict(TRAIN, steps=16, log_every=3)
    train_sae(x, cfg, "l1", sparsity=10.0, checkpoint_dir=ck, checkpoint_every=2, **longer)


def test_resume_with_more_steps_before_the_decay_matches_an_uninterrupted_run(tmp_path):
    x, cfg, ck = _data(), SAEConfig(d_in=8, d_sae=16), tmp_path / "ck"
    kw = dict(TRAIN, lr_decay_frac=0.0)
    train_sae(x, cfg, "l1", checkpoint_dir=ck, **kw)
    resumed = train_sae(x, cfg, "l1", checkpoint_dir=ck, **{**kw, "steps": 14})
    assert _bitwise_equal(resumed, train_sae(x, cfg, "l1", **{**kw, "steps": 14}))


def test_sweep_gives_each_grid_point_its_own_checkpoint(tmp_path):
    x = _data()
    table = sweep(x, widths=[16], sparsities=[0.01, 10.0], objective="l1",
                  checkpoint_dir=tmp_path / "ck", **TRAIN)
    for row in table:
        ref = train_sae(x, SAEConfig(d_in=8, d_sae=16), "l1", sparsity=row["sparsity"],
                        **TRAIN)
        assert _bitwise_equal(row["sae"], ref)
        assert (tmp_path / "ck" / f"w16_s{row['sparsity']:g}" / "train_state.json").is_file()
    assert not _bitwise_equal(table[0]["sae"], table[1]["sae"])
    # different widths no longer collide on one checkpoint
    topk = sweep(x, widths=[16, 32], sparsities=[2], objective="topk",
                 checkpoint_dir=tmp_path / "ck_topk", **TRAIN)
    assert [r["width"] for r in topk] == [16, 32]
    # a rerun resumes each point's finished checkpoint: the same SAEs
    again = sweep(x, widths=[16], sparsities=[0.01, 10.0], objective="l1",
                  checkpoint_dir=tmp_path / "ck", **TRAIN)
    assert all(_bitwise_equal(a["sae"], b["sae"]) for a, b in zip(table, again, strict=True))


def test_hierarchical_sweep_gives_each_grid_point_its_own_checkpoint(tmp_path):
    x = _data()
    table = sweep_hierarchical(x, parents=(2,), children=(1,), sparsities=(0.0, 1.0),
                               checkpoint_dir=tmp_path / "ck", **TRAIN)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["p2_c1_s0", "p2_c1_s1"]
    assert not _bitwise_equal(table[0]["sae"], table[1]["sae"])


# ------------------------------------------------------------------ 4. sweep resume
def test_sweep_rerun_reuses_only_rows_with_the_same_settings(tmp_path):
    x = _data()
    kw = dict(widths=[16], sparsities=[2], objective="topk", out_dir=tmp_path, **TRAIN)
    first = sweep(x, tolerance=0.01, **kw)[0]
    same = sweep(x, tolerance=0.01, **kw)[0]
    assert same["train_seconds"] == first["train_seconds"]  # reused as is
    assert same["bits_per_input"] == first["bits_per_input"]
    # another tolerance: the same SAE (not retrained), scored again
    loose = sweep(x, tolerance=0.2, **kw)[0]
    truth = description_length(first["sae"], x, tolerance=0.2)
    assert loose["train_seconds"] == first["train_seconds"]
    assert _bitwise_equal(loose["sae"], first["sae"])
    assert (loose["bin_width"], loose["bits_per_input"]) == (truth.bin_width,
                                                             truth.bits_per_input)
    stored = json.loads((tmp_path / "w16_s2" / "scores.json").read_text())
    assert stored["bin_width"] == truth.bin_width
    assert stored["settings"]["score"]["tolerance"] == 0.2
    # another eval set: scored again on it
    ev = _data(seed=1)
    other = sweep(x, tolerance=0.2, eval_activations=ev, **kw)[0]
    assert other["bits_per_input"] == description_length(first["sae"], ev,
                                                         tolerance=0.2).bits_per_input
    # another objective / learning rate / training data: trained again
    l1 = sweep(x, **{**kw, "objective": "l1"})[0]
    assert l1["objective"] == "l1" and l1["sae"].cfg.activation == "relu"
    fast = sweep(x, **{**kw, "lr": 1e-2})[0]
    ref = train_sae(x, SAEConfig(d_in=8, d_sae=16, activation="topk", k=2), "topk",
                    sparsity=2.0, **{**TRAIN, "lr": 1e-2})
    assert _bitwise_equal(fast["sae"], ref)
    x2 = _data(seed=2)
    moved = sweep(x2, **{**kw, "lr": 1e-2})[0]
    ref2 = train_sae(x2, SAEConfig(d_in=8, d_sae=16, activation="topk", k=2), "topk",
                     sparsity=2.0, **{**TRAIN, "lr": 1e-2})
    assert _bitwise_equal(moved["sae"], ref2)
    # arguments that do not change the SAE keep the row
    kept = sweep(x2, **{**kw, "lr": 1e-2, "log_every": 1, "checkpoint_every": 3})[0]
    assert kept["train_seconds"] == moved["train_seconds"]


def test_sweep_rows_without_settings_are_recomputed(tmp_path):
    x = _data()
    kw = dict(widths=[16], sparsities=[2], objective="topk", out_dir=tmp_path, **TRAIN)
    first = sweep(x, **kw)[0]
    scores = tmp_path / "w16_s2" / "scores.json"
    row = json.loads(scores.read_text())
    del row["settings"]  # as written by an older tl_mdl
    row["bits_per_input"] = -1.0
    scores.write_text(json.dumps(row))
    again = sweep(x, **kw)[0]
    assert again["bits_per_input"] == first["bits_per_input"]
    assert "settings" in json.loads(scores.read_text())
    # an SAE that no longer loads (a truncated file) is trained again
    weights = tmp_path / "w16_s2" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    third = sweep(x, **kw)[0]
    assert _bitwise_equal(third["sae"], first["sae"])
    assert _bitwise_equal(SAE.load(tmp_path / "w16_s2"), first["sae"])


def test_hierarchical_sweep_rerun_checks_settings(tmp_path):
    x = _data()
    kw = dict(parents=(2,), children=(1,), out_dir=tmp_path, **TRAIN)
    first = sweep_hierarchical(x, tolerance=0.05, **kw)[0]
    assert sweep_hierarchical(x, tolerance=0.05, **kw)[0]["train_seconds"] == (
        first["train_seconds"])
    # another eval set: re-scored, not retrained
    x2 = _data(seed=1)
    rescored = sweep_hierarchical(x, tolerance=0.05, eval_activations=x2, **kw)[0]
    truth = hierarchical_dl_report(first["sae"], x2, tolerance=0.05)
    assert rescored["train_seconds"] == first["train_seconds"]
    assert (rescored["bin_width"], rescored["bits_per_input"]) == (truth.bin_width,
                                                                   truth.bits_per_input)
    # another tolerance: the MDL surrogate trains at it, so the SAE is trained again
    loose = sweep_hierarchical(x, tolerance=0.3, **kw)[0]
    assert json.loads((tmp_path / "p2_c1_s0.001" / "scores.json").read_text())[
        "settings"]["score"]["tolerance"] == 0.3
    assert not _bitwise_equal(loose["sae"], first["sae"])
    retrained = sweep_hierarchical(x, tolerance=0.3, **{**kw, "lr": 1e-2})[0]
    assert not _bitwise_equal(retrained["sae"], loose["sae"])


# -------------------------------------------------------------------- 5. NaN latents
@pytest.mark.parametrize("kw", [{}, {"bin_width": 0.1}, {"max_memory_mb": 1e-4}])
def test_nan_latents_name_the_row_feature_and_weights(kw):
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)).abs()
    bad = SAE(SAEConfig(d_in=4, d_sae=8))
    with torch.no_grad():
        bad.W_enc[0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"nan at row 0, feature 2.*W_enc.*W_enc / b_enc"):
        description_length(bad, x, **kw)


@pytest.mark.parametrize("kw", [{}, {"max_memory_mb": 1e-4}])
def test_overflowing_latents_name_the_first_bad_row(kw):
    """Finite weights whose latents overflow to inf on one row (37): in memory and chunked
    (the chunked path counts rows across chunks)."""
    x = torch.full((50, 4), 0.5)
    x[37, 1] = 4.0
    sae = SAE(SAEConfig(d_in=4, d_sae=8, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc[1, 5] = 3e38
    with pytest.raises(ValueError, match=r"inf at row 37, feature 5.*parameters are finite"):
        description_length(sae, x, **kw)


# ------------------------------------------------------------- 6. cfg follows to()
@pytest.mark.parametrize("hierarchical", [False, True])
def test_to_updates_cfg_dtype_and_device(tmp_path, hierarchical):
    cfg = (HierarchicalSAEConfig(d_in=4, n_parents=2, children_per_parent=1) if hierarchical
           else SAEConfig(d_in=4, d_sae=8))
    cls = HierarchicalSAE if hierarchical else SAE
    sae = cls(cfg).to(torch.float64)
    assert sae.cfg.dtype == "float64" and cfg.dtype == "float32"
    sae.save(tmp_path)
    back = cls.load(tmp_path)
    assert back.W_enc.dtype == torch.float64 and back.cfg.dtype == "float64"
    assert _bitwise_equal(back, sae)
    assert sae.half().cfg.dtype == "float16"
    assert sae.to(torch.bfloat16).cfg.dtype == "bfloat16"
    assert sae.to("meta").cfg.device == "meta"
    if hierarchical:
        assert sae.parent_index.dtype == torch.int64


def test_device_names_that_still_fit_are_kept():
    assert sae_model._same_device("cuda", torch.device("cuda", 1))
    assert sae_model._same_device("cuda:1", torch.device("cuda", 1))
    assert not sae_model._same_device("cuda:0", torch.device("cuda", 1))
    assert not sae_model._same_device("cpu", torch.device("meta"))
    sae = SAE(SAEConfig(d_in=4, d_sae=8)).to("cpu")
    assert sae.cfg.device == "cpu"


def test_sweep_trains_the_mdl_surrogate_at_its_tolerance():
    """sweep(tolerance=t) scores at t, and the MDL objective's surrogate trains at t too."""
    x = _data()
    row = sweep(x, widths=[16], sparsities=[1e-3], tolerance=0.05, **TRAIN).rows[0]
    alone = train_sae(x, SAEConfig(d_in=8, d_sae=16), "mdl", sparsity=1e-3, tolerance=0.05,
                      seed=0, **TRAIN)
    assert _bitwise_equal(row["sae"], alone)
    default = train_sae(x, SAEConfig(d_in=8, d_sae=16), "mdl", sparsity=1e-3, seed=0, **TRAIN)
    assert not _bitwise_equal(row["sae"], default)


def test_a_checkpoint_resumes_on_another_device(tmp_path, monkeypatch):
    """A run checkpointed on a GPU (its config says cuda) resumes on the CPU: the device is
    not part of what must match; the result equals an uninterrupted run."""
    import tl_mdl.training.trainer as trainer

    x = _data()
    cfg = SAEConfig(d_in=8, d_sae=16)
    kw = dict(batch_size=64, lr=3e-3, progress=False, lr_decay_frac=0.0)
    train_sae(x, cfg, steps=4, checkpoint_dir=tmp_path, checkpoint_every=4, **kw)
    real = trainer.load_checkpoint

    def from_gpu(path):
        meta, tensors = real(path)
        meta["sae_cfg"]["device"] = "cuda:0"
        return meta, tensors

    monkeypatch.setattr(trainer, "load_checkpoint", from_gpu)
    resumed = train_sae(x, cfg, steps=8, checkpoint_dir=tmp_path, checkpoint_every=4, **kw)
    whole = train_sae(x, cfg, steps=8, **kw)
    assert _bitwise_equal(resumed, whole)
