"""SAE config, forward math, decoder normalisation, and the config an SAE owns (copied in,
following ``to()``). Files (save/load) are in test_sae_files.py."""

from __future__ import annotations

import json
import math

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

import tl_mdl.sae.model as sae_model
from tl_mdl.sae import SAE, HierarchicalSAE, HierarchicalSAEConfig, SAEConfig, identity_sae

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


@pytest.mark.parametrize("activation, kw", SAE_ACTS, ids=SAE_ACT_IDS)
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
    sae = float64_sae("relu")
    x = float64_inputs()
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        f = sae.encode(x)
        torch.testing.assert_close(sae.encode_pre(x), pre, rtol=0, atol=1e-12)
        torch.testing.assert_close(f, torch.clamp(pre, min=0), rtol=0, atol=1e-12)
        assert (f > 0).any() and (f == 0).any()
        torch.testing.assert_close(sae.decode(f), f @ sae.W_dec + sae.b_dec, rtol=0, atol=1e-12)
        torch.testing.assert_close(sae(x), sae.decode(f), rtol=0, atol=0)


def test_apply_b_dec_to_input_false():
    sae = float64_sae("relu", apply_b_dec_to_input=False)
    x = float64_inputs()
    with torch.no_grad():
        pre = x @ sae.W_enc + sae.b_enc
        torch.testing.assert_close(sae.encode(x), pre.clamp_min(0), rtol=0, atol=1e-12)


def test_topk_formula_and_exactly_k_nonzeros():
    sae = float64_sae("topk", d_sae=10, k=3)
    x = float64_inputs(n=20)
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
    sae = float64_sae("jumprelu")
    x = float64_inputs(n=30)
    with torch.no_grad():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        f = sae.encode(x)
        ref = torch.where(pre > sae.threshold, pre, torch.zeros_like(pre))
        torch.testing.assert_close(f, ref, rtol=0, atol=1e-12)
        # some positive pre-activations are cut by the threshold (not just by ReLU)
        assert ((pre > 0) & (pre <= sae.threshold)).any()
        assert (f != 0).any()


@pytest.mark.parametrize("activation, kw", SAE_ACTS, ids=SAE_ACT_IDS)
def test_shapes_with_leading_batch_dims(activation, kw):
    sae = float64_sae(activation, **kw)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        f = sae.encode(x)
        assert f.shape == (2, 3, 10)
        assert sae.decode(f).shape == (2, 3, 6)
        assert sae(x).shape == (2, 3, 6)
        torch.testing.assert_close(f.reshape(6, 10), sae.encode(x.reshape(6, 6)))


def test_wrong_last_dim_errors():
    sae = float64_sae("relu")
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
    sae = float64_sae(activation, **kw)
    x = float64_inputs(n=25)
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
    sae = float64_sae("topk", k=3)
    with pytest.raises(ValueError, match="allow_topk"):
        sae.set_decoder_norm_to_unit_norm()
    sae.set_decoder_norm_to_unit_norm(allow_topk=True)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(10, dtype=torch.float64))


def test_load_sae_lens_topk_with_decoder_norm_rescaling(tmp_path):
    """SAELens TopK ``rescale_acts_by_decoder_norm`` is folded into the weights on load."""
    sae_lens = require_sae_lens()
    TopKSAE, TopKSAEConfig = sae_lens.TopKSAE, sae_lens.TopKSAEConfig

    lens = TopKSAE(TopKSAEConfig(d_in=8, d_sae=16, k=3, rescale_acts_by_decoder_norm=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    lens.save_model(str(tmp_path))
    ours = SAE.load(tmp_path)
    x = torch.randn(20, 8, generator=g)
    # the norms folded into the encoder: a few more roundings per latent than SAELens's
    enc = dot_scale(x, ours.W_enc) + float(ours.b_enc.abs().max())
    assert_close_f32(ours(x), lens(x).detach(), terms=4 * (8 + 16),
                     scale=enc * float(ours.W_dec.abs().max()) * 16 + float(ours.b_dec.abs().max()))


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
