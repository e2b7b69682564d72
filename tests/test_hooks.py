"""attach_sae (splice / splice_error / observe), ActivationStore, and the ce/kl model losses,
on tiny seeded HookedTransformers."""

from __future__ import annotations

import pytest
import torch
from builders import (
    LOGIT_TERMS,
    assert_close_f32,
    dot_scale,
    exact_identity_sae,
    random_sae,
    tiny_model,
)

from tl_mdl import SAE, ActivationStore, SAEConfig, attach_sae
from tl_mdl.hooks import SAE_HOOK_NAMES
from tl_mdl.mdl import build_model_loss, dequantize, quantize
from tl_mdl.mdl.losses import MODEL_LOSSES
from tl_mdl.metrics import kl_divergence

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HOOKS = [  # (hook, d_in) on the tiny model
    ("blocks.0.hook_resid_pre", 16),
    ("blocks.1.attn.hook_z", 16),  # [batch, pos, 2 heads, 8] flattened
    ("blocks.0.mlp.hook_post", 32),
    ("blocks.1.hook_mlp_out", 16),
]
ACTS = ["relu", "topk", "jumprelu"]


def flat(a: torch.Tensor, d_in: int) -> torch.Tensor:
    return a if a.shape[-1] == d_in else a.flatten(-2)


# --------------------------------------------------------------------- known answers
@pytest.mark.parametrize("hook,d_in", HOOKS)
def test_identity_splice_gives_clean_logits(model, tokens, hook, d_in):
    clean = model(tokens)
    with attach_sae(model, hook, exact_identity_sae(d_in)):
        assert torch.equal(model(tokens), clean)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("hook,d_in", HOOKS)
def test_splice_error_keeps_logits_for_any_sae(model, tokens, hook, d_in, activation):
    clean = model(tokens)
    sae = random_sae(d_in, activation)
    with attach_sae(model, hook, sae, mode="splice_error"):
        assert torch.equal(model(tokens), clean)
        out, cache = model.run_with_cache(tokens)  # hooks inside: clean-error path
    assert_close_f32(out, clean, terms=LOGIT_TERMS)
    x = flat(cache[f"{hook}.hook_sae_input"], d_in)
    err = cache[f"{hook}.hook_sae_error"]
    # x − decode(encode(x)): GEMMs of lengths d_in and d_sae on x's magnitudes
    scale = (float(x.abs().max()) + dot_scale(sae.encode(x), sae.W_dec)
             + float(sae.b_dec.abs().max()))
    assert_close_f32(flat(err, d_in), x - sae(x), terms=d_in + sae.cfg.d_sae, scale=scale)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("hook,d_in", HOOKS)
def test_observe_caches_latents_and_keeps_logits(model, tokens, hook, d_in, activation):
    clean = model(tokens)
    sae = random_sae(d_in, activation)
    with attach_sae(model, hook, sae, mode="observe") as h:
        out, cache = model.run_with_cache(tokens)
        assert torch.equal(out, clean)
        x = cache[f"{hook}.hook_sae_input"]
        assert x.shape[:2] == tokens.shape and x.shape[-1] == d_in
        latents = cache[f"{hook}.hook_sae_acts_post"]
        assert torch.equal(latents, sae.encode(x))
        assert torch.equal(flat(cache[hook], d_in), x)  # activation untouched
        assert torch.equal(h.latents, latents)


@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("hook,d_in", HOOKS)
def test_splice_equals_manual_run_with_hooks(model, tokens, hook, d_in, activation):
    sae = random_sae(d_in, activation)

    def manual(act, hook):
        return sae(flat(act, d_in)).reshape(act.shape)

    with torch.no_grad():  # no-grad forward takes the sparse-decode paths
        ref = model.run_with_hooks(tokens, fwd_hooks=[(hook, manual)])
        with attach_sae(model, hook, sae):
            out = model(tokens)
            out_cached, cache = model.run_with_cache(tokens)
    assert not torch.equal(ref, model(tokens))  # the SAE does change the output
    assert_close_f32(out, ref, terms=LOGIT_TERMS)
    assert_close_f32(out_cached, ref, terms=LOGIT_TERMS)
    recons = cache[f"{hook}.hook_sae_recons"]
    torch.testing.assert_close(flat(cache[f"{hook}.hook_sae_output"], d_in), recons)


def test_sparse_decode_paths_match_dense(model, tokens):
    """TopK fast path (small k: torch.topk; k = 32 of 2048: the grouped top-k) and the
    sparse ReLU decode agree with the dense decode."""
    hook = "blocks.0.hook_resid_pre"
    for activation, d_sae, k in (("topk", 256, 5), ("topk", 2048, 32), ("relu", 256, 5)):
        sae = random_sae(16, activation, d_sae=d_sae, k=k)
        if activation == "relu":
            with torch.no_grad():
                sae.b_enc.fill_(-1.5)  # very sparse code
        with torch.no_grad(), attach_sae(model, hook, sae):
            fast = model(tokens)
        with attach_sae(model, hook, sae):
            dense = model(tokens)  # grad enabled: dense path
        assert_close_f32(fast, dense, terms=LOGIT_TERMS)


# ------------------------------------------------------------------- hook points
def test_hook_points_named_like_sae_lens(model, tokens):
    hook = "blocks.1.hook_resid_pre"
    with attach_sae(model, hook, random_sae(16)):
        for name in SAE_HOOK_NAMES:
            assert f"{hook}.{name}" in model.hook_dict
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: "hook_sae" in n)
        assert {f"{hook}.{n}" for n in SAE_HOOK_NAMES} == set(cache.keys())


def test_run_with_hooks_intervention_on_latents(model, tokens):
    hook, sae = "blocks.0.hook_resid_pre", random_sae(16)
    clean = model(tokens)

    def ablate(acts, hook):
        return torch.zeros_like(acts)

    name = f"{hook}.hook_sae_acts_post"
    with attach_sae(model, hook, sae):
        ablated = model.run_with_hooks(tokens, fwd_hooks=[(name, ablate)])
    b_dec_only = model.run_with_hooks(
        tokens, fwd_hooks=[(hook, lambda a, hook: sae.b_dec.expand_as(a).clone())])
    torch.testing.assert_close(ablated, b_dec_only)
    # splice_error: the intervention passes through (error term from the clean SAE pass)
    with attach_sae(model, hook, sae, mode="splice_error"):
        out = model.run_with_hooks(tokens, fwd_hooks=[(name, ablate)])
        _, cache = model.run_with_cache(tokens)
    x = cache[f"{hook}.hook_sae_input"]
    expected = model.run_with_hooks(
        tokens, fwd_hooks=[(hook, lambda a, hook: sae.b_dec + (x - sae(x)))])
    assert_close_f32(out, expected, terms=LOGIT_TERMS)
    assert not torch.allclose(out, clean)


def test_splice_error_gradients_reach_latents(model, tokens):
    hook, sae = "blocks.1.attn.hook_z", random_sae(16)
    kept = {}

    def keep(acts, hook):
        acts.retain_grad()
        kept["acts"] = acts

    with attach_sae(model, hook, sae, mode="splice_error"):
        logits = model.run_with_hooks(tokens, fwd_hooks=[(f"{hook}.hook_sae_acts_post", keep)])
        logits.logsumexp(-1).sum().backward()
    assert kept["acts"].grad is not None and kept["acts"].grad.abs().sum() > 0
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_several_saes_on_several_hooks(model, tokens):
    s1, s2 = random_sae(16, "topk"), random_sae(32, "jumprelu")
    h1, h2 = "blocks.0.hook_resid_pre", "blocks.1.mlp.hook_post"

    def manual(sae):
        return lambda a, hook: sae(a)

    with torch.no_grad():
        ref = model.run_with_hooks(tokens, fwd_hooks=[(h1, manual(s1)), (h2, manual(s2))])
        with attach_sae(model, h1, s1), attach_sae(model, h2, s2, mode="splice"):
            out, cache = model.run_with_cache(tokens)
    assert_close_f32(out, ref, terms=LOGIT_TERMS)
    assert f"{h1}.hook_sae_acts_post" in cache and f"{h2}.hook_sae_acts_post" in cache


def test_gated_mlp_model_hooks():
    model = tiny_model(act_fn="silu", gated=True)
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    clean = model(tokens)
    for hook, d_in in (("blocks.0.mlp.hook_pre_linear", 32), ("blocks.1.mlp.hook_post", 32)):
        with attach_sae(model, hook, exact_identity_sae(d_in)):
            assert torch.equal(model(tokens), clean)


# ---------------------------------------------------------------- detach / restore
def test_detach_restores_model_exactly(model, tokens):
    clean = model(tokens)
    before = dict(model.hook_dict)
    h = attach_sae(model, "blocks.0.hook_resid_pre", random_sae(16))
    h2 = attach_sae(model, "blocks.1.attn.hook_z", random_sae(16), mode="observe")
    assert len(model.hook_dict) == len(before) + 12
    assert not torch.equal(model(tokens), clean)
    h.detach()
    h2.detach()
    h.detach()  # idempotent
    assert model.hook_dict == before  # same names, same HookPoint objects
    assert torch.equal(model(tokens), clean)
    for hp in model.hook_dict.values():
        assert not hp._forward_hooks and not hp._modules


def test_detach_after_exception_in_block(model, tokens):
    clean = model(tokens)
    before = dict(model.hook_dict)
    with pytest.raises(RuntimeError, match="boom"):
        with attach_sae(model, "blocks.0.hook_resid_pre", random_sae(16)):
            model(tokens)
            raise RuntimeError("boom")
    assert model.hook_dict == before and torch.equal(model(tokens), clean)


def test_detach_after_exception_inside_forward(model, tokens):
    clean = model(tokens)
    before = dict(model.hook_dict)

    def bad(acts, hook):
        raise ValueError("hook failed")

    with pytest.raises(ValueError, match="hook failed"):
        with attach_sae(model, "blocks.1.hook_resid_pre", random_sae(16)):
            model.run_with_hooks(
                tokens, fwd_hooks=[("blocks.1.hook_resid_pre.hook_sae_acts_pre", bad)])
    assert model.hook_dict == before and torch.equal(model(tokens), clean)
    model.reset_hooks()


def test_reset_hooks_does_not_remove_the_sae(model, tokens):
    sae = random_sae(16)
    with attach_sae(model, "blocks.0.hook_resid_pre", sae):
        spliced = model(tokens)
        model.reset_hooks(including_permanent=True)
        assert torch.equal(model(tokens), spliced)


# ---------------------------------------------------------------------- errors
def test_bad_hook_name_names_valid_choices(model):
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_pre.*hook_dict"):
        attach_sae(model, "blocks.0.hook_resid_pr", random_sae(16))
    with pytest.raises(ValueError, match="n_layers=2"):
        attach_sae(model, "blocks.9.hook_resid_pre", random_sae(16))


def test_d_in_mismatch_names_valid_d_in(model):
    with pytest.raises(ValueError, match=r"valid d_in: \[32\]"):
        attach_sae(model, "blocks.0.mlp.hook_post", random_sae(16))
    with pytest.raises(ValueError, match=r"valid d_in: \[8, 16\]"):
        attach_sae(model, "blocks.0.attn.hook_z", random_sae(12))
    with pytest.raises(ValueError, match="attention patterns"):
        attach_sae(model, "blocks.0.attn.hook_pattern", random_sae(16))


def test_dtype_and_mode_and_double_attach_errors(model):
    with pytest.raises(TypeError, match="float64.*sae.to"):
        attach_sae(model, "blocks.0.hook_resid_pre", random_sae(16, dtype="float64"))
    with pytest.raises(ValueError, match="splice_error"):
        attach_sae(model, "blocks.0.hook_resid_pre", random_sae(16), mode="replace")
    with pytest.raises(TypeError, match="tl_mdl.SAE or a sae_lens.SAE"):
        attach_sae(model, "blocks.0.hook_resid_pre", torch.nn.Linear(16, 16))
    with attach_sae(model, "blocks.0.hook_resid_pre", random_sae(16)):
        with pytest.raises(RuntimeError, match="already attached"):
            attach_sae(model, "blocks.0.hook_resid_pre", random_sae(16))


def test_per_head_sae_on_hook_z(model, tokens):
    """An SAE with d_in = d_head is applied to each head separately."""
    sae = random_sae(8)
    with torch.no_grad():
        ref = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z",
                                                       lambda a, hook: sae(a))])
        with attach_sae(model, "blocks.0.attn.hook_z", sae):
            assert_close_f32(model(tokens), ref, terms=LOGIT_TERMS)


# ------------------------------------------------------------------- activation store
def test_store_harvests_several_hooks_in_one_pass(model, tokens):
    hooks = ["blocks.0.hook_resid_pre", "blocks.0.attn.hook_z", "blocks.0.mlp.hook_post"]
    store = ActivationStore(model, hooks, tokens, batch_size=7, progress=False)
    assert store.stop_at_layer == 1  # never runs block 1 or the unembedding
    calls = []
    handle = model.blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        _, cache = model.run_with_cache(tokens)
        calls.clear()
        for h in hooks:
            a = store.activations(h)
            ref = cache[h].reshape(tokens.numel(), -1)
            assert torch.equal(a, ref)
        assert len(calls) == 1  # one model batch (model_batch_size=8 >= 4 sequences)
    finally:
        handle.remove()
    assert store.d_in("blocks.0.attn.hook_z") == 16
    with pytest.raises(TypeError, match=r"store\[hook_name\]"):
        iter(store)
    with pytest.raises(KeyError, match="not harvested"):
        store["blocks.1.hook_resid_pre"]


def test_store_iterates_shuffled_batches(model, tokens):
    store = ActivationStore(model, "blocks.1.hook_resid_post", tokens, batch_size=10,
                            progress=False, seed=3)
    batches = list(store)
    assert [b.shape for b in batches[:-1]] == [torch.Size([10, 16])] * (len(batches) - 1)
    assert len(batches) == len(store) == 5 and batches[-1].shape[0] == 8
    every = torch.cat(batches)
    full = store.activations()
    assert not torch.equal(every, full)  # shuffled
    assert torch.equal(every.sort(0).values, full.sort(0).values)  # a permutation
    assert not torch.equal(torch.cat(list(store)), every)  # reshuffled each pass
    store_dl = ActivationStore(model, "blocks.1.hook_resid_post", tokens, batch_size=10,
                               progress=False, drop_last=True)
    assert len(list(store_dl)) == len(store_dl) == 4


def test_store_windows_and_n_ctx(model):
    stream = torch.arange(100) % 50
    store = ActivationStore(model, "blocks.0.hook_resid_pre", stream, context_size=16,
                            progress=False)
    assert store.tokens.shape == (6, 16) and store.activations().shape == (96, 16)
    long = torch.zeros(2, 40, dtype=torch.long)
    with pytest.raises(ValueError, match="n_ctx=16"):
        ActivationStore(model, "blocks.0.hook_resid_pre", long, progress=False)
    assert ActivationStore(model, "blocks.0.hook_resid_pre", long, context_size=16,
                           progress=False).tokens.shape == (4, 16)
    with pytest.raises(ValueError, match="is not a hook point"):
        ActivationStore(model, "blocks.0.hook_resid", long, context_size=16)


def test_store_disk_cache_is_reused(model, tokens, tmp_path, monkeypatch):
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"]
    kw = dict(batch_size=16, model_batch_size=3, progress=False, cache_dir=tmp_path,
              buffer_size=20)
    first = ActivationStore(model, hooks, tokens, **kw)
    a = first.activations("blocks.1.attn.hook_z")
    assert (tmp_path / "meta.json").is_file()
    shards = sorted((tmp_path / "blocks.1.attn.hook_z").glob("*.safetensors"))
    assert len(shards) == 2
    from tl_mdl import load_activations

    assert torch.equal(load_activations(tmp_path / "blocks.1.attn.hook_z"), a)

    def boom(*args, **kwargs):
        raise AssertionError("the model must not run when the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(model, "forward", boom)
        again = ActivationStore(model, hooks, tokens, **kw)
        assert torch.equal(again.activations("blocks.1.attn.hook_z"), a)
        rows = torch.cat(list(again["blocks.0.hook_resid_pre"]))
        assert rows.shape == (tokens.numel(), 16)
        assert torch.equal(rows.sort(0).values,
                           again.activations("blocks.0.hook_resid_pre").sort(0).values)
    other = ActivationStore(model, hooks, tokens.flip(0), **kw)  # stale cache: re-harvest
    assert not torch.equal(other.activations("blocks.1.attn.hook_z"), a)


def test_train_sae_accepts_store(model, tokens):
    from tl_mdl import train_sae

    store = ActivationStore(model, "blocks.0.hook_resid_pre", tokens, batch_size=16,
                            progress=False)
    sae = train_sae(store, SAEConfig(d_in=16, d_sae=32), "l1", steps=3, progress=False)
    assert isinstance(sae, SAE)


# ------------------------------------------------------------------ model losses
def test_model_losses_registered():
    assert {"ce", "kl"} <= set(MODEL_LOSSES)


@pytest.mark.parametrize("hook,d_in", [("blocks.1.hook_resid_pre", 16),
                                       ("blocks.1.attn.hook_z", 16),
                                       ("blocks.0.mlp.hook_post", 32)])
def test_ce_and_kl_losses_match_spliced_model(model, tokens, hook, d_in):
    sae = random_sae(d_in)
    ce = build_model_loss("ce", sae=sae, model=model, hook_name=hook, tokens=tokens,
                          batch_size=3)
    kl = build_model_loss("kl", sae=sae, model=model, hook_name=hook, tokens=tokens)
    clean = model(tokens)
    with attach_sae(model, hook, sae):
        spliced = model(tokens)
        ce_ref = float(model(tokens, return_type="loss"))
    # float32 logits computed two ways (LOGIT_TERMS ulps), then a float32 mean in TL
    assert ce(None) == pytest.approx(ce_ref, rel=2 * LOGIT_TERMS * torch.finfo().eps)
    assert kl(None) == pytest.approx(kl_divergence(clean, spliced), rel=1e-4, abs=1e-7)
    w = 0.3

    def quantised(act, hook):
        x = flat(act, d_in)
        f = sae.encode(x)
        return sae.decode(dequantize(quantize(f, w), w, f.dtype)).reshape(act.shape)

    q_logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, quantised)])
    assert kl(w) == pytest.approx(kl_divergence(clean, q_logits), rel=1e-4, abs=1e-7)
    assert ce(w) != ce(None)


def test_identity_sae_loss_is_clean(model, tokens):
    hook = "blocks.1.hook_resid_pre"
    kl = build_model_loss("kl", sae=exact_identity_sae(16), model=model, hook_name=hook,
                          tokens=tokens)
    assert kl(None) == pytest.approx(0.0, abs=1e-9)


def test_model_loss_errors(model, tokens):
    sae = random_sae(16)
    with pytest.raises(ValueError, match="n_ctx=16"):
        build_model_loss("ce", sae=sae, model=model, hook_name="blocks.0.hook_resid_pre",
                         tokens=torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(ValueError, match="needs model="):
        build_model_loss("kl", sae=sae, model=None, hook_name=None, tokens=None)


@torch.no_grad()
def test_cached_pre_activations_are_not_rectified_in_place():
    """The splice reuses its own pre-activation buffer for the ReLU only when no hook sees
    it: a cached ``hook_sae_acts_pre`` keeps its negative entries."""
    model = tiny_model()
    hook, d_in = HOOKS[0]
    sae = random_sae(d_in)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(3))
    _, clean = model.run_with_cache(tokens, names_filter=hook)
    x = clean[hook].reshape(-1, d_in)
    with attach_sae(model, hook, sae):
        logits, cache = model.run_with_cache(tokens)
        plain = model(tokens)
    pre = cache[f"{hook}.hook_sae_acts_pre"].reshape(-1, sae.cfg.d_sae)
    post = cache[f"{hook}.hook_sae_acts_post"].reshape(-1, sae.cfg.d_sae)
    assert (pre < 0).any()
    enc_scale = dot_scale(x, sae.W_enc) + float(sae.b_enc.abs().max())
    assert_close_f32(pre, sae.encode_pre(x), terms=d_in, scale=enc_scale)
    assert_close_f32(post, sae.encode(x), terms=d_in, scale=enc_scale)
    assert torch.equal(logits, plain)  # the in-place path (no hooks) gives the same logits


def test_reused_pre_activation_buffer_is_never_visible():
    """Spliced forwards reuse one pre-activation buffer when no hook, gradient or observe
    can hold the latents; across batch shapes, no_grad / inference_mode / grad, and with a
    hook that keeps every latent tensor, the outputs equal the manual reference."""
    model = tiny_model()
    hook, d_in = HOOKS[0]
    gen = torch.Generator().manual_seed(5)
    runs = [
        ((2, 6), torch.no_grad), ((3, 5), torch.inference_mode), ((2, 6), torch.no_grad),
        ((1, 4), torch.enable_grad),
    ]
    batches = [torch.randint(0, model.cfg.d_vocab, shape, generator=gen) for shape, _ in runs]
    toks = [torch.randint(0, model.cfg.d_vocab, (2, 6), generator=gen) for _ in range(2)]
    for act in ("relu", "topk"):
        sae = random_sae(d_in, act)

        def repl(x, hook, sae=sae):
            return sae(x)

        with torch.no_grad():
            refs = [model.run_with_hooks(t, fwd_hooks=[(hook, repl)]) for t in batches]
            _, cache = model.run_with_cache(torch.cat(toks), names_filter=hook)
        expected = sae.encode(cache[hook].reshape(-1, d_in)).detach()
        kept = []
        with attach_sae(model, hook, sae) as h:
            for tokens, ref, (_, ctx) in zip(batches, refs, runs, strict=True):
                with ctx():
                    got = model(tokens)
                assert_close_f32(got.detach(), ref, terms=LOGIT_TERMS)
            h.hook_points["hook_sae_acts_post"].add_hook(lambda t, hook, kept=kept: kept.append(t))
            with torch.no_grad():
                for t in toks:
                    model(t)
        got_acts = torch.cat([a.reshape(-1, sae.cfg.d_sae) for a in kept])
        x_all = cache[hook].reshape(-1, d_in)
        assert_close_f32(got_acts, expected, terms=d_in,
                         scale=dot_scale(x_all, sae.W_enc) + float(sae.b_enc.abs().max()))


def test_splice_trains_biases_of_a_frozen_encoder():
    """Only the encoder bias requires grad (weights frozen): the splice must build its
    pre-activations in the autograd graph (no reused buffer) and the bias gets a gradient
    equal to the manual reference's."""
    model = tiny_model()
    for p in model.parameters():
        p.requires_grad_(False)
    hook, d_in = HOOKS[0]
    sae = random_sae(d_in)
    for name in ("W_enc", "W_dec", "b_dec"):
        getattr(sae, name).requires_grad_(False)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(7))
    with attach_sae(model, hook, sae):
        model(tokens).square().mean().backward()
    got = sae.b_enc.grad.clone()
    sae.b_enc.grad = None
    ref = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda x, hook: sae(x))])
    ref.square().mean().backward()
    assert got.abs().sum() > 0
    # forward and backward through the model: twice the roundings of the logits
    assert_close_f32(got, sae.b_enc.grad, terms=2 * LOGIT_TERMS)


def test_heads_are_flattened_only_at_head_hooks(model, tokens):
    """At a hook without a head axis, trailing dims whose product is d_in are not mixed."""
    hook = "blocks.0.ln1.hook_scale"  # [batch, pos, 1]
    sae = random_sae(tokens.shape[1])  # d_in = pos · 1
    with attach_sae(model, hook, sae), pytest.raises(ValueError, match="does not fit an SAE"):
        model(tokens)
    assert torch.equal(model(tokens), model(tokens))  # detached on the error


def test_topk_k_must_be_a_real_int():
    with pytest.raises(ValueError, match="needs an int k"):
        SAEConfig(d_in=4, d_sae=8, activation="topk", k=True)


@pytest.mark.parametrize("activation", ACTS)
def test_splice_error_is_bitwise_clean_under_reading_hooks(model, tokens, activation):
    """run_with_cache only reads: splice_error keeps the clean logits bitwise. A hook that
    changes latents, by returning a tensor or in place, changes the output exactly like a
    manual splice of the intervened reconstruction plus the clean error term."""
    hook = "blocks.1.hook_resid_pre"
    sae = random_sae(16, activation, d_sae=64, k=8)
    clean = model(tokens)
    with attach_sae(model, hook, sae, mode="splice_error"):
        logits, cache = model.run_with_cache(tokens)
        assert torch.equal(logits, clean)
        assert f"{hook}.hook_sae_error" in cache

        def zero_returned(acts, hook):
            return torch.zeros_like(acts)

        def zero_in_place(acts, hook):
            acts.zero_()

        name = f"{hook}.hook_sae_acts_post"
        a = model.run_with_hooks(tokens, fwd_hooks=[(name, zero_returned)])
        b = model.run_with_hooks(tokens, fwd_hooks=[(name, zero_in_place)])
    x = cache[hook]
    ref = model.run_with_hooks(
        tokens, fwd_hooks=[(hook, lambda act, hook: sae.b_dec + (x - sae(x)))])
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref)
    assert not torch.equal(a, clean)
