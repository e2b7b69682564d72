"""SAE folders: save/load round trips (tl_mdl and SAELens), file errors, a GPU save loading
on a CPU, and the two files saved as a pair (the weights carry their config's hash)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from builders import (
    SAE_ACT_IDS,
    SAE_ACTS,
    assert_close_f32,
    bitwise_equal,
    dot_scale,
    float64_inputs,
    float64_sae,
    require_sae_lens,
)
from safetensors import safe_open
from safetensors.torch import save_file

import tl_mdl.sae.files as sae_files
from tl_mdl.sae import SAE, HierarchicalSAE, HierarchicalSAEConfig, SAEConfig
from tl_mdl.sae.files import CFG_FILENAME, CFG_HASH_KEY, WEIGHTS_FILENAME

# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("activation, kw", SAE_ACTS, ids=SAE_ACT_IDS)
def test_save_load_round_trip_bitwise(tmp_path, activation, kw):
    sae = float64_sae(activation, hook_name="blocks.1.hook_resid_post", **kw)
    sae.cfg.metadata["trained_on"] = "unit test"
    folder = sae.save(tmp_path / "sae")
    loaded = SAE.load(folder)
    assert loaded.cfg == sae.cfg
    sd, sd2 = sae.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd2[k].dtype == sd[k].dtype
        assert torch.equal(sd[k], sd2[k]), k
    x = float64_inputs(n=16)
    with torch.no_grad():
        assert torch.equal(sae.encode(x), loaded.encode(x))
        assert torch.equal(sae(x), loaded(x))


def test_save_load_float32_and_dtype_override(tmp_path):
    sae = SAE(SAEConfig(d_in=4, d_sae=8), seed=5)
    SAE.load(sae.save(tmp_path / "a"))
    loaded = SAE.load(tmp_path / "a", dtype="float64")
    assert loaded.W_enc.dtype == torch.float64
    assert torch.equal(loaded.W_enc, sae.W_enc.double())


@pytest.mark.parametrize("activation, kw", SAE_ACTS, ids=SAE_ACT_IDS)
def test_sae_lens_loads_tl_mdl_save(tmp_path, activation, kw):
    sae_lens = require_sae_lens()
    sae = float64_sae(activation, **kw).to(torch.float32)
    sae.cfg.dtype = "float32"
    folder = sae.save(tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    x = float64_inputs(n=9).float()
    with torch.no_grad():
        # SAELens's op order vs ours: GEMMs of length d_in (encode) and d_sae (decode)
        f = sae.encode(x)
        enc = dot_scale(x, sae.W_enc) + float(sae.b_enc.abs().max())
        dec = dot_scale(f, sae.W_dec) + float(sae.b_dec.abs().max())
        d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
        assert_close_f32(theirs.encode(x), f, terms=d_in, scale=enc)
        assert_close_f32(theirs.decode(f), sae.decode(f), terms=d_sae, scale=dec)
        assert_close_f32(theirs(x), sae(x), terms=d_in + d_sae,
                         scale=dec + enc * float(sae.W_dec.abs().max()) * d_sae)


def test_save_is_atomic_no_temp_files(tmp_path):
    sae = float64_sae("relu")
    folder = tmp_path / "sae"
    sae.save(folder)
    sae.save(folder)  # overwrite in place
    assert sorted(p.name for p in folder.iterdir()) == sorted([CFG_FILENAME, WEIGHTS_FILENAME])


def test_load_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=CFG_FILENAME):
        SAE.load(tmp_path / "nothing_here")
    folder = float64_sae("relu").save(tmp_path / "sae")
    (folder / WEIGHTS_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILENAME):
        SAE.load(folder)


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_load_truncated_weights(tmp_path, keep):
    folder = float64_sae("relu").save(tmp_path / "sae")
    w = folder / WEIGHTS_FILENAME
    data = w.read_bytes()
    w.write_bytes(data[: keep if keep >= 0 else len(data) - 1])
    with pytest.raises(ValueError, match=WEIGHTS_FILENAME):
        SAE.load(folder)


def test_load_foreign_weights_file(tmp_path):
    folder = float64_sae("relu").save(tmp_path / "sae")
    (folder / WEIGHTS_FILENAME).write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 4)
    with pytest.raises(ValueError, match=WEIGHTS_FILENAME):
        SAE.load(folder)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2, 3]", '{"d_in": 4}', "\xff\xfe"])
def test_load_invalid_cfg_json(tmp_path, text):
    folder = float64_sae("relu").save(tmp_path / "sae")
    (folder / CFG_FILENAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=CFG_FILENAME):
        SAE.load(folder)


def test_load_shape_mismatch(tmp_path):
    folder = float64_sae("relu", d_in=6).save(tmp_path / "sae")
    other = float64_sae("relu", d_in=5)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()},
              str(folder / WEIGHTS_FILENAME))
    with pytest.raises(ValueError, match=WEIGHTS_FILENAME) as e:
        SAE.load(folder)
    assert CFG_FILENAME in str(e.value)


def test_load_missing_tensor(tmp_path):
    folder = float64_sae("jumprelu").save(tmp_path / "sae")
    sd = float64_sae("relu").state_dict()  # no 'threshold'
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / WEIGHTS_FILENAME))
    with pytest.raises(ValueError, match="threshold"):
        SAE.load(folder)


def test_sae_saved_on_a_gpu_loads_on_cpu_with_a_warning(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the saved device is usable")
    sae = SAE(SAEConfig(d_in=4, d_sae=8), seed=0)
    sae.cfg.device = "cuda"  # as if saved from a GPU
    sae.save(tmp_path)
    with pytest.warns(UserWarning, match="saved on device 'cuda', which is not available"):
        back = SAE.load(tmp_path)
    assert back.W_enc.device.type == "cpu" and back.cfg.device == "cpu"
    assert torch.equal(back.W_enc, sae.W_enc)


# --------------------------------------- save as a pair: the weights carry their config's hash
def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_unserialisable_metadata_raises_before_touching_the_folder(tmp_path):
    old = SAE(SAEConfig(d_in=4, d_sae=8, activation="topk", k=2), seed=1)
    old.save(tmp_path)
    before = _files(tmp_path)
    new = SAE(SAEConfig(d_in=4, d_sae=8, activation="topk", k=5,
                        metadata={"ok": 1, "scale": np.float32(2.0)}), seed=2)
    with pytest.raises(TypeError, match=r"metadata\.scale.*numpy\.float32.*float\(x\)"):
        new.save(tmp_path)
    assert _files(tmp_path) == before  # bit for bit: nothing written
    assert bitwise_equal(SAE.load(tmp_path), old)
    with pytest.raises(TypeError, match=r"metadata\.scale"):  # a fresh folder is not made
        new.save(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_weights_carry_the_hash_of_their_config(tmp_path):
    sae = SAE(SAEConfig(d_in=4, d_sae=8, metadata={"a": [1, 2]}), seed=3)
    sae.save(tmp_path)
    text = (tmp_path / "cfg.json").read_text()
    canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    with safe_open(str(tmp_path / "sae_weights.safetensors"), framework="pt") as fh:
        stored = fh.metadata()[CFG_HASH_KEY]
    assert stored == hashlib.sha256(canonical.encode()).hexdigest()
    # whitespace and key order do not count; the content does
    (tmp_path / "cfg.json").write_text(json.dumps(json.loads(text)))
    assert bitwise_equal(SAE.load(tmp_path), sae)


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
    orig, calls = sae_files.atomic_write, {"n": 0}

    def crash_second(target, write):
        calls["n"] += 1
        if calls["n"] == 2:  # weights replaced, config not yet
            raise KeyboardInterrupt("crash")
        return orig(target, write)

    with mock.patch.object(sae_files, "atomic_write", crash_second):
        with pytest.raises(KeyboardInterrupt):
            new.save(tmp_path)
    with pytest.raises(ValueError, match="different saves.*re-save the SAE"):
        cls.load(tmp_path)
    new.save(tmp_path)  # a complete save repairs the folder
    assert bitwise_equal(cls.load(tmp_path), new)


def test_folders_without_the_hash_still_load(tmp_path):
    """E.g. written by SAELens: weights without metadata, any cfg.json."""
    sae = SAE(SAEConfig(d_in=4, d_sae=8), seed=4)
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()},
              str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(sae.cfg.to_dict()))
    assert bitwise_equal(SAE.load(tmp_path), sae)
