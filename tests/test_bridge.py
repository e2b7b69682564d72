"""tl_mdl on TransformerBridge models (TransformerLens 3.9 and 4): tiny Llama and GPT-2
architectures from ``transformers`` configs with random weights (no download), wrapped with
``build_bridge_from_module``; and, on TL 3.9, the same GPT-2 weights in a HookedTransformer.

Known answers: spliced logits equal a hand-spliced run of an untouched copy of the Hugging
Face model; ``splice_error`` and every restore are bitwise; eigen expansions reproduce the
MLP output exactly (float64 identity on float32 weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from builders import assert_close_f32, random_sae, require_hooked_transformer

import tl_mdl
from tl_mdl import ActivationStore, attach_sae, evaluate, to_bilinear
from tl_mdl.bilinear import eigen_expansion, eigendecompose
from tl_mdl.hooks.losses import build_ce_loss

transformers = pytest.importorskip("transformers")
_builder = pytest.importorskip("transformer_lens.model_bridge.sources._bridge_builder")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

D_MODEL, VOCAB, N_CTX = 32, 64, 16


def _randomise_biases(model: torch.nn.Module, seed: int) -> None:
    """Nonzero biases, so both gated-MLP bias conventions are exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def hf_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=N_CTX,
        mlp_bias=True,
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    _randomise_biases(hf, seed)
    return hf


def hf_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=2, n_head=4,
                                  n_positions=N_CTX)
    return transformers.GPT2LMHeadModel(cfg).eval()


def bridge_of(hf):
    arch = type(hf).__name__
    return _builder.build_bridge_from_module(hf, architecture=arch, hf_config=hf.config)


@pytest.fixture(scope="module")
def llama():
    hf = hf_llama()
    ref = copy.deepcopy(hf)  # the bridge rewires hf's modules; ref stays plain HF
    return bridge_of(hf), ref


@pytest.fixture(scope="module")
def gpt2():
    hf = hf_gpt2()
    ref = copy.deepcopy(hf)
    return bridge_of(hf), ref


@pytest.fixture(scope="module")
def toks() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))


def hf_layers(ref):
    return ref.model.layers if hasattr(ref, "model") else ref.transformer.h


def hand_spliced_logits(ref, layer: int, sae, toks) -> torch.Tensor:
    """Logits of the plain HF model with ``sae``'s reconstruction replacing the residual
    stream entering block ``layer`` (what ``blocks.{layer}.hook_resid_pre`` carries)."""

    def pre(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        x_hat = sae.decode(sae.encode(x))
        if args:
            return (x_hat, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x_hat}

    h = hf_layers(ref)[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            return ref(toks).logits
    finally:
        h.remove()


def registry(model) -> dict:
    return dict(model.hook_dict)


def assert_same_hooks(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    assert all(after[k] is v for k, v in before.items())


# --------------------------------------------------------------------------- splicing
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_spliced_logits_match_hand_spliced_hf_model(arch, request, toks):
    bridge, ref = request.getfixturevalue(arch)
    sae = random_sae(D_MODEL, seed=3)
    with torch.no_grad():
        clean = bridge(toks)
        with attach_sae(bridge, "blocks.1.hook_resid_pre", sae):
            spliced = bridge(toks)
        with attach_sae(bridge, "blocks.1.hook_resid_pre", sae, mode="splice_error"):
            assert torch.equal(bridge(toks), clean)  # x̂ + (x − x̂) is x bitwise
    expected = hand_spliced_logits(ref, 1, sae, toks)
    assert (spliced - clean).abs().max() > 1e-3  # the splice changes the output
    # same sums, other summation orders: a few ulps per layer of the logits' magnitude
    assert_close_f32(spliced, expected, terms=4 * D_MODEL)


def test_spliced_logits_agree_with_hooked_transformer(gpt2, toks):
    """TL 3.9: the same GPT-2 weights as a HookedTransformer and as a bridge."""
    HookedTransformer, HookedTransformerConfig = require_hooked_transformer()
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    bridge, ref = gpt2
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=D_MODEL, n_heads=4, d_head=D_MODEL // 4, d_mlp=4 * D_MODEL,
        d_vocab=VOCAB, n_ctx=N_CTX, act_fn="gelu_new", normalization_type="LN", eps=1e-5,
    )
    ht = HookedTransformer(cfg)
    ht.load_state_dict(convert_gpt2_weights(ref, cfg), strict=False)
    ht.eval()
    sae = random_sae(D_MODEL, seed=4)
    with torch.no_grad():
        assert_close_f32(ht(toks), bridge(toks), terms=4 * D_MODEL)
        outs = []
        for model in (ht, bridge):
            with attach_sae(model, "blocks.1.hook_resid_pre", sae):
                outs.append(model(toks))
            with attach_sae(model, "blocks.1.hook_resid_pre", sae, mode="splice_error"):
                assert torch.equal(model(toks), model(toks))
        assert_close_f32(outs[0], outs[1], terms=4 * D_MODEL)


def test_llama_as_hooked_transformer_and_bridge(toks):
    """TL 3.9: the same Llama weights as a HookedTransformer (converted from the local HF
    model) and as a bridge give the same logits, spliced logits and bilinear layers."""
    HookedTransformer, HookedTransformerConfig = require_hooked_transformer()
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    torch.manual_seed(2)
    hcfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=N_CTX)
    hf = transformers.LlamaForCausalLM(hcfg).eval()
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=D_MODEL, n_heads=4, d_head=8, d_mlp=48, d_vocab=VOCAB, n_ctx=N_CTX,
        act_fn="silu", gated_mlp=True, normalization_type="RMS", eps=hcfg.rms_norm_eps,
        positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2, final_rms=True,
        original_architecture="LlamaForCausalLM")
    ht = HookedTransformer(cfg)
    ht.load_state_dict(convert_llama_weights(hf, cfg), strict=False)
    ht.eval()
    bridge = bridge_of(hf)
    sae = random_sae(D_MODEL, seed=9)
    with torch.no_grad():
        assert_close_f32(ht(toks), bridge(toks), terms=4 * 48)
        outs = []
        for model in (ht, bridge):
            with attach_sae(model, "blocks.1.hook_resid_pre", sae):
                outs.append(model(toks))
        assert_close_f32(outs[0], outs[1], terms=4 * 48)
        outs = []
        for model in (ht, bridge):
            with to_bilinear(model):
                outs.append(model(toks))
        assert_close_f32(outs[0], outs[1], terms=4 * 48)


def test_hook_names_keyed_as_given(llama, toks):
    bridge, _ = llama
    sae = random_sae(D_MODEL, seed=5)
    before = registry(bridge)
    for name in ("blocks.1.hook_resid_pre", "blocks.1.hook_in"):  # old alias, new name
        with attach_sae(bridge, name, sae) as h:
            _, cache = bridge.run_with_cache(toks, names_filter=lambda n: "hook_sae" in n)
            assert f"{name}.hook_sae_acts_post" in cache
            assert h.hook_points["hook_sae_acts_post"].name == f"{name}.hook_sae_acts_post"
        assert_same_hooks(before, registry(bridge))

    store = ActivationStore(bridge, ["blocks.0.hook_resid_pre", "blocks.0.mlp.hook_post"],
                            toks, batch_size=8, progress=False)
    _, cache = bridge.run_with_cache(toks)
    assert torch.equal(store.activations("blocks.0.hook_resid_pre"),
                       cache["blocks.0.hook_in"].reshape(-1, D_MODEL))
    assert torch.equal(store.activations("blocks.0.mlp.hook_post"),
                       cache["blocks.0.mlp.out.hook_in"].reshape(-1, 48))

    res = evaluate(bridge, {"blocks.1.hook_resid_pre": sae}, toks, description_length=False)
    assert list(res) == ["blocks.1.hook_resid_pre"]
    ce = build_ce_loss(sae=sae, model=bridge, hook_name="blocks.1.hook_resid_pre", tokens=toks)
    # the unquantised CE of the loss builder is the spliced CE of evaluate (both float64 sums
    # of the same float32 logits)
    assert ce(None) == pytest.approx(res["blocks.1.hook_resid_pre"]["ce_loss_spliced"],
                                     rel=1e-12)


# ----------------------------------------------------------------------- failure paths
def _state(model, toks):
    with torch.no_grad():
        return registry(model), model(toks)


def _assert_unchanged(model, toks, before):
    hooks, logits = before
    assert_same_hooks(hooks, registry(model))
    with torch.no_grad():
        assert torch.equal(model(toks), logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_failed_attach_leaves_model_bitwise(arch, request, toks, monkeypatch):
    bridge, _ = request.getfixturevalue(arch)
    before = _state(bridge, toks)
    sae = random_sae(D_MODEL, seed=6)
    with pytest.raises(ValueError, match="not a hook point"):
        attach_sae(bridge, "blocks.1.hook_resid_prex", sae)
    with pytest.raises(ValueError, match="does not fit"):
        attach_sae(bridge, "blocks.1.hook_resid_pre", random_sae(D_MODEL + 1))
    with pytest.raises(TypeError, match="dtype"):
        attach_sae(bridge, "blocks.1.hook_resid_pre", random_sae(D_MODEL).double())
    _assert_unchanged(bridge, toks, before)

    import tl_mdl.hooks.attach as attach_mod

    real = attach_mod.add_named_hooks

    def half_then_fail(*args, **kwargs):  # registers the hook points, then fails
        real(*args, **kwargs)
        raise RuntimeError("boom")

    monkeypatch.setattr(attach_mod, "add_named_hooks", half_then_fail)
    with pytest.raises(RuntimeError, match="boom"):
        attach_sae(bridge, "blocks.1.hook_resid_pre", sae)
    monkeypatch.undo()
    _assert_unchanged(bridge, toks, before)

    def bad_hook(act, hook):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        with attach_sae(bridge, "blocks.1.hook_resid_pre", sae):
            bridge.run_with_hooks(
                toks, fwd_hooks=[("blocks.1.hook_resid_pre.hook_sae_acts_post", bad_hook)]
            )
    _assert_unchanged(bridge, toks, before)


def test_failed_swap_and_ablation_leave_model_bitwise(llama, toks, monkeypatch):
    bridge, _ = llama
    before = _state(bridge, toks)
    import tl_mdl.bilinear.swap as swap_mod

    real, calls = swap_mod._set_mlp, []

    def second_fails(model, layer, module):
        calls.append(layer)
        if len(calls) == 2:
            raise RuntimeError("boom")
        real(model, layer, module)

    monkeypatch.setattr(swap_mod, "_set_mlp", second_fails)
    with pytest.raises(RuntimeError, match="boom"):
        to_bilinear(bridge)
    monkeypatch.undo()
    _assert_unchanged(bridge, toks, before)

    with to_bilinear(bridge, layers=[0]):
        inside = _state(bridge, toks)
        U = torch.eye(D_MODEL)[:2]
        for bad in (dict(k=-1), dict(k=2, eigen="not an eigen")):
            with pytest.raises((ValueError, TypeError, AttributeError)):
                tl_mdl.ablate_eigen(bridge, 0, U, **bad)
        with pytest.raises(ValueError, match="full row rank"):
            tl_mdl.ablate_eigen(bridge, 0, torch.ones(2, D_MODEL), 2)
        _assert_unchanged(bridge, toks, inside)
    _assert_unchanged(bridge, toks, before)


# ------------------------------------------------------------------- bilinear layers
def _mlp_io(model, layer: int, toks):
    """The MLP's own input and output in block ``layer``, read by a module hook."""
    got = {}
    mlp = model.blocks[layer].mlp
    h = mlp.register_forward_hook(lambda m, a, o: got.update(x=a[0], out=o))
    try:
        with torch.no_grad():
            model(toks)
    finally:
        h.remove()
    return got["x"], got["out"]


def check_eigen_identity(model, layer, toks, b_out) -> None:
    """Σ_j λ_j (v_j·x̃)² = u·(out − b_out) for every direction, exact in float64."""
    U = torch.randn(4, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    eig = eigendecompose(model.blocks[layer].mlp, U, dtype=torch.float64)
    x, out = _mlp_io(model, layer, toks)
    lhs = eigen_expansion(eig, x.double())
    rhs = (out.double() - b_out.double()) @ U.T
    assert (lhs - rhs).abs().max() <= 1e-5 * max(1.0, float(rhs.abs().max()))


def test_eigendecompose_refuses_silu_bridge_then_identity_holds(llama, toks):
    bridge, _ = llama
    U = torch.eye(D_MODEL)[:2]
    with pytest.raises(TypeError, match="not the identity.*to_bilinear.*anneal_to_bilinear"):
        eigendecompose(bridge.blocks[0].mlp, U)
    with to_bilinear(bridge, layers=[0]) as swap:
        bil = swap.bilinear[0]
        assert bil.b_in.abs().max() > 0 and bil.b_gate.abs().max() > 0  # biases inside
        check_eigen_identity(bridge, 0, toks, bil.b_out)
    with pytest.raises(TypeError, match="not the identity"):
        eigendecompose(bridge.blocks[0].mlp, U)


def test_post_product_bias_convention_identity():
    """TL 3.9's GatedMLP convention ``(act(x W_gate)·(x W_in) + b_in) W_out + b_out`` read
    by structure (no b_gate) from a hand-built module, on either TransformerLens line."""

    class PostBiasGated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.W_in = torch.nn.Parameter(torch.randn(8, 12, generator=g, dtype=torch.float64))
            self.W_gate = torch.nn.Parameter(torch.randn(8, 12, generator=g,
                                                         dtype=torch.float64))
            self.W_out = torch.nn.Parameter(torch.randn(12, 8, generator=g, dtype=torch.float64))
            self.b_in = torch.nn.Parameter(torch.randn(12, generator=g, dtype=torch.float64))
            self.b_out = torch.nn.Parameter(torch.randn(8, generator=g, dtype=torch.float64))
            self.act_fn = torch.nn.functional.silu

        def forward(self, x):
            return (self.act_fn(x @ self.W_gate) * (x @ self.W_in) + self.b_in) @ self.W_out \
                + self.b_out

    m = PostBiasGated()
    U = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.raises(TypeError, match="not the identity"):
        eigendecompose(m, U)
    m.act_fn = torch.nn.Identity()
    x = torch.randn(20, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    eig = eigendecompose(m, U)
    b_out_eff = m.b_out + m.b_in @ m.W_out  # the post-product bias folds into b_out
    rhs = (m(x) - b_out_eff).detach() @ U.T
    torch.testing.assert_close(eigen_expansion(eig, x), rhs, atol=1e-10, rtol=1e-10)


def test_gpt2_bridge_random_bilinear_journey(gpt2, toks):
    bridge, _ = gpt2
    before = _state(bridge, toks)
    with pytest.raises(TypeError, match="plain MLP has no gate"):
        to_bilinear(bridge)
    with to_bilinear(bridge, layers=[1], init="random", seed=0) as swap:
        _, cache = bridge.run_with_cache(toks, names_filter=["blocks.1.mlp.hook_pre",
                                                             "blocks.1.mlp.hook_post"])
        assert len(cache) >= 2  # the bilinear layer fires the bridge's own hook points
        check_eigen_identity(bridge, 1, toks, swap.bilinear[1].b_out)
        U = torch.eye(D_MODEL)[:3]
        curve = tl_mdl.truncation_curve(bridge, toks, 1, U, [0, D_MODEL + 1])
        assert curve.loss[-1] == pytest.approx(curve.base_loss, abs=1e-5)
    _assert_unchanged(bridge, toks, before)


def test_llama_bridge_anneal_journey(toks):
    """The seed's TinyLlama path at tiny scale: anneal SiLU → bilinear, decompose, ablate,
    restore."""
    bridge = bridge_of(hf_llama(seed=1))
    before = _state(bridge, toks)
    sae = random_sae(D_MODEL, seed=8)
    res = evaluate(bridge, {"blocks.1.hook_resid_pre": sae}, toks, description_length=False)
    assert res["blocks.1.hook_resid_pre"]["ce_loss_spliced"] > 0
    train = torch.randint(0, VOCAB, (16, 10), generator=torch.Generator().manual_seed(3))
    out = tl_mdl.anneal_to_bilinear(bridge, train, steps=4, batch_size=4, lr=1e-3,
                                    progress=False)
    assert out.history[-1]["beta"] == 0.0
    check_eigen_identity(bridge, 0, toks, out.swap.bilinear[0].b_out)
    U = torch.eye(D_MODEL)[:2]
    with tl_mdl.ablate_eigen(bridge, 0, U, D_MODEL + 1):  # every pair kept: no change
        x, _ = _mlp_io(bridge, 0, toks)
    with torch.no_grad():
        full = bridge(toks)
        with tl_mdl.ablate_eigen(bridge, 0, U, D_MODEL + 1):
            assert_close_f32(bridge(toks), full, terms=4 * D_MODEL)
    out.swap.restore()
    hooks, _ = before
    assert_same_hooks(hooks, registry(bridge))  # weights were fine-tuned; hooks are back


def test_boot_native_gated_bridge(toks):
    """TransformerLens's own native model (``boot_native``, no ``transformers`` weights):
    its gated MLP keeps the activation as ``act``; refused, converted, exact, restored."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=D_MODEL, d_head=8, n_heads=4, n_layers=2, n_ctx=N_CTX,
                                  d_vocab=VOCAB, d_mlp=48, act_fn="silu", gated_mlp=True, seed=0)
    bridge = TransformerBridge.boot_native(cfg)
    before = _state(bridge, toks)
    with pytest.raises(TypeError, match="not the identity"):
        eigendecompose(bridge.blocks[0].mlp, torch.eye(D_MODEL)[:2])
    with to_bilinear(bridge, layers=[0]) as swap:
        check_eigen_identity(bridge, 0, toks, swap.bilinear[0].b_out)
        _, cache = bridge.run_with_cache(toks, names_filter=["blocks.0.mlp.hook_pre"])
        assert len(cache) >= 1
    _assert_unchanged(bridge, toks, before)
    with attach_sae(bridge, "blocks.1.hook_resid_pre", random_sae(D_MODEL), mode="splice_error"):
        assert torch.equal(bridge(toks), before[1])
    _assert_unchanged(bridge, toks, before)


def test_cli_decompose_reads_a_hugging_face_folder(tmp_path):
    """``tl-mdl decompose`` on a saved Hugging Face Llama: with ``hidden_act="linear"`` its
    gated MLP is bilinear (biases inside) and the saved eigenpairs reproduce the layer; with
    SiLU the CLI refuses, naming the conversion."""
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from tl_mdl.cli import app
    from tl_mdl.models import load_model

    torch.manual_seed(4)
    for act in ("linear", "silu"):
        cfg = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=N_CTX,
            mlp_bias=True, hidden_act=act)
        hf = transformers.LlamaForCausalLM(cfg).eval()
        _randomise_biases(hf, 4)
        hf.save_pretrained(tmp_path / act)
    out = tmp_path / "eig.safetensors"
    args = ["decompose", str(tmp_path / "linear"), "--layer", "0", "--index", "3,7",
            "--top", str(D_MODEL + 1), "--out", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    saved = load_file(str(out))
    bridge = load_model(tmp_path / "linear")
    x, mlp_out = _mlp_io(bridge, 0, torch.randint(0, VOCAB, (2, 8)))
    U = saved["directions"].double()
    b_out = bridge.blocks[0].mlp.b_out.detach().double()
    xt = torch.cat([x.double(), torch.ones(*x.shape[:-1], 1, dtype=torch.float64)], -1)
    proj = torch.einsum("...d,nkd->...nk", xt, saved["vectors"].double())
    lhs = (proj.square() * saved["values"].double()).sum(-1)
    rhs = (mlp_out.double() - b_out) @ U.T
    assert (lhs - rhs).abs().max() <= 1e-5 * max(1.0, float(rhs.abs().max()))
    r = CliRunner().invoke(app, ["decompose", str(tmp_path / "silu"), "--layer", "0"])
    assert r.exit_code != 0 and "to_bilinear" in r.output


def test_detach_after_a_registry_rescan(llama, toks):
    """A bridge that rescans its hook registry while an SAE is attached files the SAE's hook
    points under the new names too; detaching removes every entry."""
    bridge, _ = llama
    bridge.clear_hook_registry()
    bridge._initialize_hook_registry()
    before = _state(bridge, toks)
    with attach_sae(bridge, "blocks.1.hook_resid_pre", random_sae(D_MODEL)):
        bridge.clear_hook_registry()
        bridge._initialize_hook_registry()
        assert any("hook_sae" in k for k in registry(bridge))
    _assert_unchanged(bridge, toks, before)
