"""SAE config, forward math, save/load (tl_mdl and SAELens), and file errors."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from builders import bitwise_equal
from safetensors import safe_open
from safetensors.torch import save_file

import tl_mdl.sae.model as sae_model
from tl_mdl.sae import SAE, HierarchicalSAE, HierarchicalSAEConfig, SAEConfig, identity_sae
from tl_mdl.sae.model import CFG_FILENAME, WEIGHTS_FILENAME

ACTS = [("relu", {}), ("topk", {"k": 3}), ("jumprelu", {})]
ACT_IDS = [a for a, _ in ACTS]


def make_sae(activation: str, d_in: int = 6, d_sae: int = 10, seed: int = 0, **kw) -> SAE:
    """A float64 SAE with every parameter random (nonzero biases, random thresholds)."""
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, dtype="float64", **kw)
    sae = SAE(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
            if name == "threshold":
                p.copy_(p.abs() * 0.5)
    return sae


def inputs(n: int = 7, d_in: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"activation": "topk"}, "k"),
        ({"activation": "topk", "k": 0}, "k"),
        ({"activation": "topk", "k": 11}, "k"),
        ({"activation": "topk", "k": 2.0}, "k"),
        ({"activation": "relu", "k": 3}, "k=3"),
        ({"activation": "jumprelu", "k": 3}, "k=3"),
        ({"activation": "gelu"}, "gelu"),
        ({"activation": "ReLU"}, "ReLU"),
        ({"d_in": 0}, "d_in"),
        ({"d_in": -3}, "d_in"),
        ({"d_sae": 0}, "d_sae"),
        ({"d_in": 2.0}, "d_in"),
        ({"d_sae": True}, "d_sae"),
        ({"dtype": "float8"}, "float8"),
    ],
)
def test_config_validation_errors(kwargs, match):
    base = {"d_in": 4, "d_sae": 10}
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        SAEConfig(**base)


def test_config_accepts_torch_dtype_and_valid_topk():
    cfg = SAEConfig(d_in=4, d_sae=10, activation="topk", k=10, dtype=torch.float64)
    assert cfg.dtype == "float64" and cfg.torch_dtype == torch.float64
    assert cfg.architecture == "topk"
    assert SAEConfig(d_in=4, d_sae=10).architecture == "standard"
    assert SAEConfig(d_in=4, d_sae=10, activation="jumprelu").architecture == "jumprelu"


def test_sae_needs_config():
    with pytest.raises(TypeError, match="SAEConfig"):
        SAE({"d_in": 4, "d_sae": 8})  # type: ignore[arg-type]


@pytest.mark.parametrize("activation, kw", ACTS, ids=ACT_IDS)
def test_config_dict_round_trip(activation, kw):
    cfg = SAEConfig(
        d_in=5,
        d_sae=9,
        activation=activation,
        hook_name="blocks.0.hook_resid_pre",
        dtype="float64",
        apply_b_dec_to_input=False,
        metadata={"note": "x", "nested": [1, 2]},
        **kw,
    )
    d = cfg.to_dict()
    assert d["architecture"] == cfg.architecture
    assert ("k" in d) == (activation == "topk")
    d2 = json.loads(json.dumps(d))  # JSON-serialisable
    assert SAEConfig.from_dict(d2) == cfg


def test_config_from_dict_rejects_unknown_architecture_and_normalisation():
    d = SAEConfig(d_in=4, d_sae=8).to_dict()
    d.pop("activation")
    d["architecture"] = "gated"
    with pytest.raises(ValueError, match="gated"):
        SAEConfig.from_dict(d)
    d = SAEConfig(d_in=4, d_sae=8).to_dict()
    d["normalize_activations"] = "expected_average_only_in"
    with pytest.raises(ValueError, match="normalize_activations"):
        SAEConfig.from_dict(d)


# ---------------------------------------------------------------- forward math


def test_relu_encode_decode_formula():
    sae = make_sae("relu")
    x = inputs()
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        f = sae.encode(x)
        torch.testing.assert_close(sae.encode_pre(x), pre, rtol=0, atol=1e-12)
        torch.testing.assert_close(f, torch.clamp(pre, min=0), rtol=0, atol=1e-12)
        assert (f > 0).any() and (f == 0).any()
        torch.testing.assert_close(sae.decode(f), f @ sae.W_dec + sae.b_dec, rtol=0, atol=1e-12)
        torch.testing.assert_close(sae(x), sae.decode(f), rtol=0, atol=0)


def test_apply_b_dec_to_input_false():
    sae = make_sae("relu", apply_b_dec_to_input=False)
    x = inputs()
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc
        torch.testing.assert_close(sae.encode(x), pre.clamp_min(0), rtol=0, atol=1e-12)


def test_topk_formula_and_exactly_k_nonzeros():
    sae = make_sae("topk", d_sae=10, k=3)
    x = inputs(n=20)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        f = sae.encode(x)
        # hand-written top-k: keep the k largest pre-activations, then ReLU
        ref = torch.zeros_like(pre)
        for n in range(pre.shape[0]):
            idx = sorted(range(pre.shape[1]), key=lambda i: -float(pre[n, i]))[:3]
            for i in idx:
                ref[n, i] = max(float(pre[n, i]), 0.0)
        torch.testing.assert_close(f, ref, rtol=0, atol=1e-12)
        assert ((f != 0).sum(-1) <= 3).all()

        # with all pre-activations positive: exactly k nonzeros, at the top-k positions
        sae.b_enc.add_(100.0)
        pre = sae.encode_pre(x)
        assert (pre > 0).all()
        f = sae.encode(x)
        assert ((f != 0).sum(-1) == 3).all()
        top = pre.topk(3, dim=-1).indices
        assert torch.equal((f != 0), torch.zeros_like(f, dtype=torch.bool).scatter(-1, top, True))
        torch.testing.assert_close(f.gather(-1, top), pre.gather(-1, top), rtol=0, atol=0)


def test_jumprelu_formula():
    sae = make_sae("jumprelu")
    x = inputs(n=30)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        f = sae.encode(x)
        ref = torch.where(pre > sae.threshold, pre, torch.zeros_like(pre))
        torch.testing.assert_close(f, ref, rtol=0, atol=1e-12)
        # some positive pre-activations are cut by the threshold (not just by ReLU)
        assert ((pre > 0) & (pre <= sae.threshold)).any()
        assert (f != 0).any()


@pytest.mark.parametrize("activation, kw", ACTS, ids=ACT_IDS)
def test_shapes_with_leading_batch_dims(activation, kw):
    sae = make_sae(activation, **kw)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        f = sae.encode(x)
        assert f.shape == (2, 3, 10)
        assert sae.decode(f).shape == (2, 3, 6)
        assert sae(x).shape == (2, 3, 6)
        torch.testing.assert_close(f.reshape(6, 10), sae.encode(x.reshape(6, 6)))


def test_wrong_last_dim_errors():
    sae = make_sae("relu")
    with pytest.raises(ValueError, match="d_in=6"):
        sae.encode(torch.randn(3, 5))
    with pytest.raises(ValueError, match="d_sae=10"):
        sae.decode(torch.randn(3, 9))


def test_identity_sae_reconstructs_nonnegative_inputs():
    sae = identity_sae(5, dtype="float64")
    x = torch.rand(11, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(sae(x), x)
        assert torch.equal(sae.encode(x), x)


# ---------------------------------------------------------------- save / load


@pytest.mark.parametrize("activation, kw", ACTS, ids=ACT_IDS)
def test_save_load_round_trip_bitwise(tmp_path, activation, kw):
    sae = make_sae(activation, hook_name="blocks.1.hook_resid_post", **kw)
    sae.cfg.metadata["trained_on"] = "unit test"
    folder = sae.save(tmp_path / "sae")
    loaded = SAE.load(folder)
    assert loaded.cfg == sae.cfg
    sd, sd2 = sae.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd2[k].dtype == sd[k].dtype
        assert torch.equal(sd[k], sd2[k]), k
    x = inputs(n=16)
    with torch.no_grad():
        assert torch.equal(sae.encode(x), loaded.encode(x))
        assert torch.equal(sae(x), loaded(x))


def test_save_load_float32_and_dtype_override(tmp_path):
    sae = SAE(SAEConfig(d_in=4, d_sae=8), seed=5)
    SAE.load(sae.save(tmp_path / "a"))
    loaded = SAE.load(tmp_path / "a", dtype="float64")
    assert loaded.W_enc.dtype == torch.float64
    assert torch.equal(loaded.W_enc, sae.W_enc.double())


@pytest.mark.parametrize("activation, kw", ACTS, ids=ACT_IDS)
def test_sae_lens_loads_tl_mdl_save(tmp_path, activation, kw):
    sae_lens = pytest.importorskip("sae_lens")
    sae = make_sae(activation, **kw).to(torch.float32)
    sae.cfg.dtype = "float32"
    folder = sae.save(tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    x = inputs(n=9).float()
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=0, atol=1e-6)
        torch.testing.assert_close(theirs.decode(sae.encode(x)), sae.decode(sae.encode(x)),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(theirs(x), sae(x), rtol=0, atol=1e-6)


def test_save_is_atomic_no_temp_files(tmp_path):
    sae = make_sae("relu")
    folder = tmp_path / "sae"
    sae.save(folder)
    sae.save(folder)  # overwrite in place
    assert sorted(p.name for p in folder.iterdir()) == sorted([CFG_FILENAME, WEIGHTS_FILENAME])


def test_load_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=CFG_FILENAME):
        SAE.load(tmp_path / "nothing_here")
    folder = make_sae("relu").save(tmp_path / "sae")
    (folder / WEIGHTS_FILENAME).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILENAME):
        SAE.load(folder)


@pytest.mark.parametrize("keep", [0, 7, 100, -1])
def test_load_truncated_weights(tmp_path, keep):
    folder = make_sae("relu").save(tmp_path / "sae")
    w = folder / WEIGHTS_FILENAME
    data = w.read_bytes()
    w.write_bytes(data[: keep if keep >= 0 else len(data) - 1])
    with pytest.raises(ValueError, match=WEIGHTS_FILENAME):
        SAE.load(folder)


def test_load_foreign_weights_file(tmp_path):
    folder = make_sae("relu").save(tmp_path / "sae")
    (folder / WEIGHTS_FILENAME).write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 4)
    with pytest.raises(ValueError, match=WEIGHTS_FILENAME):
        SAE.load(folder)


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2, 3]", '{"d_in": 4}', "\xff\xfe"])
def test_load_invalid_cfg_json(tmp_path, text):
    folder = make_sae("relu").save(tmp_path / "sae")
    (folder / CFG_FILENAME).write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=CFG_FILENAME):
        SAE.load(folder)


def test_load_shape_mismatch(tmp_path):
    folder = make_sae("relu", d_in=6).save(tmp_path / "sae")
    other = make_sae("relu", d_in=5)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()},
              str(folder / WEIGHTS_FILENAME))
    with pytest.raises(ValueError, match=WEIGHTS_FILENAME) as e:
        SAE.load(folder)
    assert CFG_FILENAME in str(e.value)


def test_load_missing_tensor(tmp_path):
    folder = make_sae("jumprelu").save(tmp_path / "sae")
    sd = make_sae("relu").state_dict()  # no 'threshold'
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / WEIGHTS_FILENAME))
    with pytest.raises(ValueError, match="threshold"):
        SAE.load(folder)


# ---------------------------------------------------------------- decoder normalisation


@pytest.mark.parametrize(
    "activation, kw",
    [
        ("relu", {}),
        ("jumprelu", {}),
    ],
    ids=["relu", "jumprelu"],
)
def test_set_decoder_norm_to_unit_norm_preserves_forward(activation, kw):
    sae = make_sae(activation, **kw)
    x = inputs(n=25)
    with torch.no_grad():
        before_f, before = sae.encode(x), sae(x)
        norms = sae.W_dec.norm(dim=-1).clone()
        assert not torch.allclose(norms, torch.ones_like(norms))
        sae.set_decoder_norm_to_unit_norm()
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(10, dtype=torch.float64))
        torch.testing.assert_close(sae(x), before, rtol=1e-10, atol=1e-10)
        # latents scale by the old decoder norms; their support is unchanged
        torch.testing.assert_close(sae.encode(x), before_f * norms, rtol=1e-10, atol=1e-10)
        assert math.isfinite(float(sae(x).sum()))


def test_set_decoder_norm_to_unit_norm_refuses_topk():
    sae = make_sae("topk", k=3)
    with pytest.raises(ValueError, match="allow_topk"):
        sae.set_decoder_norm_to_unit_norm()
    sae.set_decoder_norm_to_unit_norm(allow_topk=True)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(10, dtype=torch.float64))


def test_load_sae_lens_topk_with_decoder_norm_rescaling(tmp_path):
    """SAELens TopK ``rescale_acts_by_decoder_norm`` is folded into the weights on load."""
    from sae_lens import TopKSAE, TopKSAEConfig

    lens = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=3, rescale_acts_by_decoder_norm=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    lens.save_model(str(tmp_path))
    ours = SAE.load(tmp_path)
    x = torch.randn(20, 8, generator=g)
    torch.testing.assert_close(ours(x), lens(x).detach(), rtol=1e-5, atol=1e-5)


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
        stored = fh.metadata()[sae_model.CFG_HASH_KEY]
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
    assert bitwise_equal(cls.load(tmp_path), new)


def test_folders_without_the_hash_still_load(tmp_path):
    """E.g. written by SAELens: weights without metadata, any cfg.json."""
    sae = SAE(SAEConfig(d_in=4, d_sae=8), seed=4)
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()},
              str(tmp_path / "sae_weights.safetensors"))
    (tmp_path / "cfg.json").write_text(json.dumps(sae.cfg.to_dict()))
    assert bitwise_equal(SAE.load(tmp_path), sae)



# ------------------------------------------------ the config: owned by the SAE, following to()
def test_cfg_of_an_sae_is_a_copy():
    cfg = SAEConfig(d_in=4, d_sae=8)
    sae = SAE(cfg)
    sae.cfg.metadata["x"] = 1
    assert cfg.metadata == {}


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
    assert bitwise_equal(back, sae)
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

