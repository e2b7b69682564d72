"""SAELens interop: lossless conversion both ways, same logits as HookedSAETransformer,
SAELens loading tl_mdl saves, and the tl_mdl_mdl training architecture."""

from __future__ import annotations

import itertools

import pytest
import torch
from builders import LOGIT_TERMS, assert_close_f32, dot_scale, random_sae, require_sae_lens

require_sae_lens()
from sae_lens import SAE as SLSAE  # noqa: E402
from sae_lens import HookedSAETransformer, SAETrainer  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.registry import get_sae_training_class  # noqa: E402
from sae_lens.saes.sae import TrainStepInput  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402

from tl_mdl import SAE, attach_sae, from_sae_lens, to_sae_lens  # noqa: E402
from tl_mdl.interop.sae_lens import (  # noqa: E402
    MDL_ARCHITECTURE,
    MDLTrainingSAE,
    MDLTrainingSAEConfig,
)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

CASES = [
    ("blocks.0.hook_resid_pre", 16, "relu"),
    ("blocks.1.attn.hook_z", 16, "topk"),
    ("blocks.0.mlp.hook_post", 32, "jumprelu"),
]


@pytest.fixture(scope="module")
def model() -> HookedSAETransformer:
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32,
                                  d_vocab=50, n_ctx=16, act_fn="gelu", seed=0)
    return HookedSAETransformer(cfg)


def sl_logits(model, sae, tokens, **kw):
    model.add_sae(sae, **kw)
    try:
        return model(tokens)
    finally:
        model.reset_saes()


@pytest.mark.parametrize("hook,d_in,activation", CASES)
def test_round_trip_is_lossless(hook, d_in, activation):
    sae = random_sae(d_in, activation, hook_name=hook, metadata={"model_name": "tiny"})
    sl = to_sae_lens(sae)
    assert sl.cfg.architecture() == sae.cfg.architecture
    assert sl.cfg.metadata.hook_name == hook and sl.cfg.metadata.model_name == "tiny"
    assert sl.cfg.reshape_activations == ("hook_z" if hook.endswith("hook_z") else "none")
    back = from_sae_lens(sl)
    assert back.cfg == sae.cfg
    for (k, a), (k2, b) in zip(sae.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)


@pytest.mark.parametrize("hook,d_in,activation", CASES)
def test_same_logits_as_hooked_sae_transformer(model, tokens, hook, d_in, activation):
    sae = random_sae(d_in, activation, hook_name=hook)
    sl = to_sae_lens(sae)
    ref = sl_logits(model, sl, tokens)
    with attach_sae(model, hook, sae):  # tl_mdl SAE
        ours = model(tokens)
    with attach_sae(model, hook, sl):  # the SAELens object itself
        ours_sl = model(tokens)
    with attach_sae(model, hook, from_sae_lens(sl)):  # converted back
        ours_back = model(tokens)
    assert_close_f32(ours, ref, terms=LOGIT_TERMS)
    assert torch.equal(ours_sl, ref) and torch.equal(ours_back, ours)
    # splice_error and the cached latents match SAELens's use_error_term
    ref_err = sl_logits(model, sl, tokens, use_error_term=True)
    with attach_sae(model, hook, sae, mode="splice_error"):
        assert_close_f32(model(tokens), ref_err, terms=LOGIT_TERMS)
    model.add_sae(sl)
    _, ref_cache = model.run_with_cache(tokens)
    model.reset_saes()
    with attach_sae(model, hook, sae):
        _, cache = model.run_with_cache(tokens)
    name = f"{hook}.hook_sae_acts_post"
    x = cache[f"{hook}.hook_sae_input"]  # the same input reaches both encoders
    assert_close_f32(cache[name], ref_cache[name], terms=d_in,
                     scale=dot_scale(x.reshape(-1, d_in), sae.W_enc) + float(sae.b_enc.abs().max()))


@pytest.mark.parametrize("hook,d_in,activation", CASES)
def test_sae_lens_loads_tl_mdl_save(tmp_path, hook, d_in, activation):
    sae = random_sae(d_in, activation, hook_name=hook)
    sae.save(tmp_path)
    sl = SLSAE.load_from_disk(tmp_path)
    x = torch.randn(7, d_in, generator=torch.Generator().manual_seed(0))
    if sl.cfg.reshape_activations == "hook_z":  # SAELens takes [..., n_heads, d_head] there
        assert hook.endswith("hook_z") and d_in == 16
        out = sl.decode(sl.encode(x.unflatten(-1, (2, 8)))).flatten(-2)
    else:
        out = sl.decode(sl.encode(x))
    # encode then decode: two GEMMs of lengths d_in and d_sae, in SAELens's op order
    assert_close_f32(out, sae(x), terms=d_in + sae.cfg.d_sae,
                     scale=dot_scale(sae.encode(x), sae.W_dec) + float(sae.b_dec.abs().max()))


def _sl_sae(arch: str, d_in=16, d_sae=40, **cfg):
    d = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "metadata": {"hook_name":
         "blocks.0.hook_resid_pre"}, **cfg}
    sl = SLSAE.from_dict(d)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in sl.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return sl


def test_topk_rescale_by_decoder_norm_is_folded():
    sl = _sl_sae("topk", k=4, rescale_acts_by_decoder_norm=True)
    ours = from_sae_lens(sl)
    x = torch.randn(20, 16, generator=torch.Generator().manual_seed(1))
    f_ref = sl.encode(x)
    # the decoder norms are folded into the encoder: a few more roundings per latent
    enc_scale = dot_scale(x, ours.W_enc) + float(ours.b_enc.abs().max())
    assert_close_f32(ours.encode(x), f_ref, terms=4 * 16, scale=enc_scale)
    assert_close_f32(ours(x), sl.decode(f_ref), terms=4 * (16 + 40),
                     scale=enc_scale * float(sl.W_dec.abs().max()) * 40)


def test_jumprelu_negative_thresholds():
    sl = _sl_sae("jumprelu")
    with torch.no_grad():
        sl.threshold.copy_(torch.linspace(-0.5, 0.5, 40))
    ours = from_sae_lens(sl)
    x = torch.randn(30, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours.encode(x), sl.encode(x))
    assert bool((ours.threshold >= 0).all())
    with torch.no_grad():
        ours.threshold[0] = -0.1
    with pytest.raises(ValueError, match="thresholds are < 0"):
        to_sae_lens(ours)


def test_normalisation_folded_or_rejected():
    sl = _sl_sae("standard", normalize_activations="expected_average_only_in")
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(3))
    plain = from_sae_lens(sl)  # identity at inference in SAELens: weights as they are
    torch.testing.assert_close(plain(x), sl.decode(sl.encode(x)))
    assert plain.cfg.metadata["sae_lens_normalize_activations"] == "expected_average_only_in"
    folded = from_sae_lens(sl, norm_scaling_factor=2.5)
    sl.fold_activation_norm_scaling_factor(2.5)
    torch.testing.assert_close(folded(x), sl.decode(sl.encode(x)))
    with pytest.raises(ValueError, match="'layer_norm'"):
        from_sae_lens(_sl_sae("standard", normalize_activations="layer_norm"))
    with pytest.raises(ValueError, match="'gated'"):
        from_sae_lens(_sl_sae("gated"))
    with pytest.raises(TypeError, match="sae_lens.SAE"):
        from_sae_lens(random_sae(16))


def test_mdl_training_architecture_in_sae_lens_trainer(tmp_path):
    assert get_sae_training_class(MDL_ARCHITECTURE) == (MDLTrainingSAE, MDLTrainingSAEConfig)
    cfg = MDLTrainingSAEConfig(d_in=8, d_sae=24, mdl_coefficient=0.05)
    sae = MDLTrainingSAE(cfg)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen) @ torch.randn(8, 8, generator=gen)
    out = sae.training_forward_pass(TrainStepInput(
        sae_in=x, coefficients={"mdl": 0.05}, dead_neuron_mask=None, n_training_steps=0,
        is_logging_step=False))
    assert set(out.losses) == {"mse_loss", "mdl_loss"} and out.losses["mdl_loss"] > 0
    out.loss.backward()
    assert sae.W_enc.grad is not None

    batches = (x[torch.randperm(64, generator=gen)[:16]] for _ in itertools.count())
    trainer_cfg = SAETrainerConfig(total_training_samples=16 * 20, train_batch_size_samples=16,
                                   lr=1e-2, lr_end=1e-2, device="cpu")
    trained = SAETrainer(trainer_cfg, MDLTrainingSAE(cfg), batches).fit()
    trained.save_inference_model(tmp_path)
    loaded = SAE.load(tmp_path)  # saves as a plain "standard" SAE
    expected = trained.decode(trained.encode(x))
    assert_close_f32(loaded(x), expected, terms=4 * (loaded.cfg.d_in + loaded.cfg.d_sae),
                     scale=dot_scale(loaded.encode(x), loaded.W_dec) + float(expected.abs().max()))
    assert type(SLSAE.load_from_disk(tmp_path)).__name__ == "StandardSAE"
    topk = MDLTrainingSAE(MDLTrainingSAEConfig(d_in=8, d_sae=24, k=3))
    assert int((topk.encode(x) != 0).sum(-1).max()) <= 3


# ------------------------------------------------------------- hook_z files, both ways
@pytest.mark.parametrize("d_in", [16, 8])  # heads flattened (2 x 8), or one head
def test_hook_z_saves_load_in_both_libraries(model, tokens, tmp_path, d_in):
    hook = "blocks.1.attn.hook_z"
    sae = random_sae(d_in, hook_name=hook)
    if d_in == 8:  # a per-head SAE: SAELens must not flatten the heads
        sae.cfg.metadata["reshape_activations"] = "none"
    sae.save(tmp_path / "ours")
    theirs = SLSAE.load_from_disk(str(tmp_path / "ours"))
    assert theirs.cfg.reshape_activations == ("hook_z" if d_in == 16 else "none")
    with attach_sae(model, hook, sae):
        ours_logits = model(tokens)
    torch.testing.assert_close(sl_logits(model, theirs, tokens), ours_logits)
    theirs.save_model(str(tmp_path / "sl"))
    back = SAE.load(tmp_path / "sl")
    back.cfg.metadata.pop("sae_lens_training_version")  # what SAELens' save adds
    assert back.cfg == sae.cfg
    for name, p in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name
    assert from_sae_lens(theirs).cfg == sae.cfg
    assert to_sae_lens(from_sae_lens(theirs)).cfg.reshape_activations == (
        theirs.cfg.reshape_activations)


def test_a_sae_lens_sae_attaches_at_one_hook_at_a_time(model, tokens):
    sl = to_sae_lens(random_sae(16))
    a = "blocks.0.hook_resid_pre"
    with attach_sae(model, a, sl, mode="observe"):
        with pytest.raises(RuntimeError, match="already attached at 'blocks.0.hook_resid_pre'"):
            attach_sae(model, "blocks.1.hook_resid_pre", sl)
        assert f"{a}.hook_sae_acts_post" in model.hook_dict
    with attach_sae(model, "blocks.1.hook_resid_pre", sl, mode="observe"):  # free again
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: "acts_post" in n)
    assert list(cache.keys()) == ["blocks.1.hook_resid_pre.hook_sae_acts_post"]


def test_attach_over_sae_lens_add_sae_names_the_fix(model):
    hook = "blocks.0.hook_resid_pre"
    model.add_sae(to_sae_lens(random_sae(16, hook_name=hook)))
    try:
        with pytest.raises(ValueError, match=r"add_sae.*model.reset_saes\(\)"):
            attach_sae(model, hook, random_sae(16))
    finally:
        model.reset_saes()


def test_sae_lens_jumprelu_folder_with_negative_thresholds(tmp_path):
    """SAELens' JumpReLU is relu(pre)·[pre > θ]: loading its folder gives the same latents
    when some θ < 0 (tl_mdl's own saves keep signed thresholds)."""
    sl = _sl_sae("jumprelu")
    with torch.no_grad():
        sl.threshold[::2] = -0.3
    sl.save_model(str(tmp_path))
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(3))
    ours = SAE.load(tmp_path)
    assert_close_f32(ours.encode(x), sl.encode(x), terms=16,
                     scale=dot_scale(x, ours.W_enc) + float(ours.b_enc.abs().max()))
    assert bool((ours.encode(x) >= 0).all())
    signed = random_sae(16, "jumprelu")
    with torch.no_grad():
        signed.threshold.fill_(-0.5)
    signed.save(tmp_path / "ours")
    assert torch.equal(SAE.load(tmp_path / "ours").threshold, signed.threshold)
