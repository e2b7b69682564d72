"""The TransformerLens compatibility layer (``tl_mdl._tl``) and the optional sae-lens extra:
what each TransformerLens line and each install gets, and the messages when a piece is
missing. Runs on TL 3.9 and TL 4, with or without SAELens."""

from __future__ import annotations

import pytest
import torch
from builders import hooked_transformer_classes

import tl_mdl
from tl_mdl import _tl
from tl_mdl.bilinear import BilinearMLP
from tl_mdl.hooks.kernels import _hooks_disabled


def test_hooked_transformer_is_lazy_and_named_when_missing():
    try:
        import transformer_lens

        transformer_lens.HookedTransformer  # noqa: B018
    except ImportError:  # TransformerLens 4
        with pytest.raises(ImportError, match="TransformerBridge.*transformer-lens<4"):
            _tl.hooked_transformer()
        with pytest.raises(ImportError, match="TransformerBridge"):
            tl_mdl.bilinear_transformer({"n_layers": 1})
    else:
        assert _tl.hooked_transformer() is transformer_lens.HookedTransformer


def test_interop_without_sae_lens_names_the_extra(monkeypatch):
    import tl_mdl.interop.sae_lens as interop

    monkeypatch.setattr(interop, "HAVE_SAE_LENS", False)
    with pytest.raises(ImportError, match=r"pip install 'tl_mdl\[sae-lens\]'"):
        tl_mdl.from_sae_lens(object())
    with pytest.raises(ImportError, match=r"tl_mdl\[sae-lens\]"):
        tl_mdl.to_sae_lens(tl_mdl.SAE(tl_mdl.SAEConfig(d_in=4, d_sae=8)))
    assert tl_mdl.interop.register_sae_lens_architectures() is False


def test_hooks_disabled_fallback_silences_and_restores(monkeypatch):
    """Without SAELens's private ``_disable_hooks`` the hook points are silenced by hand and
    put back (the same objects, hooks intact)."""
    import sys

    monkeypatch.setitem(sys.modules, "sae_lens.saes.sae", None)  # import fails
    calls = []

    class Fake(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.hook_sae_input = _tl.HookPoint()

        def encode(self, x):
            return self.hook_sae_input(x)

    fake = Fake()
    point = fake.hook_sae_input
    point.add_hook(lambda t, hook: calls.append(1))
    fake.encode(torch.ones(1))
    assert calls == [1]
    with _hooks_disabled(fake):
        fake.encode(torch.ones(1))
    assert calls == [1] and fake.hook_sae_input is point
    fake.encode(torch.ones(1))
    assert calls == [1, 1]


def test_gated_mlps_by_structure_and_bias_convention():
    """TL 3.9's GatedMLP (b_in after the product, no b_gate) and a BilinearMLP (biases
    inside) are told apart by their parameters, not their class names."""
    cfg = {"d_model": 4, "d_mlp": 6, "dtype": torch.float64}
    bil = BilinearMLP(type("Cfg", (), cfg)())
    parts = _tl.gated_mlp_parts(bil)
    assert parts is not None and parts.bias_inside and parts.bilinear
    assert _tl.gated_mlp_parts(torch.nn.Linear(4, 6)) is None
    HookedTransformer, HookedTransformerConfig = hooked_transformer_classes()
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=4, n_heads=1, d_head=4, d_mlp=6, d_vocab=10, n_ctx=4,
        act_fn="silu", gated_mlp=True))
    gated = _tl.gated_mlp_parts(model.blocks[0].mlp)
    assert gated is not None and not gated.bias_inside and not gated.bilinear
    assert not _tl.is_bridge(model) and _tl.is_hooked_transformer(model)
