"""The splice kernel of a ``tl_mdl.SAE`` subclass that replaces ``activation`` or
``decode``: every path (blocked, TopK fast path, plain) gives the subclass's own
``forward``, never the stock TopK/ReLU code's reconstruction."""

from __future__ import annotations

import pytest
import torch

from tl_mdl import SAE, SAEConfig
from tl_mdl._tl import HookPoint
from tl_mdl.hooks.kernels import _TlMdlKernel
from tl_mdl.hooks.names import SAE_INNER_HOOKS


class HalvedLatents(SAE):
    def activation(self, pre):
        return super().activation(pre) * 0.5


class ShiftedDecode(SAE):
    def decode(self, latents):
        return super().decode(latents) + 1.0


def _assert_kernel_matches_forward(cls, act: str, need_acts: bool = False) -> None:
    """The splice kernel's reconstruction of a float64 ``cls`` SAE equals ``sae(x)``."""
    cfg = SAEConfig(d_in=24, d_sae=512, activation=act, k=16 if act == "topk" else None,
                    dtype="float64")
    sae = cls(cfg, seed=3)
    k = _TlMdlKernel(sae, {h: HookPoint() for h in SAE_INNER_HOOKS})
    x = torch.randn(40, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, recons = k.run(x, need_acts=need_acts)
        want = sae(x)
    # float64: the kernel's fused GEMM and sparse decode differ from forward's only in
    # summation order (terms of size <= |x| |W| ~ 1)
    torch.testing.assert_close(recons, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cls", [HalvedLatents, ShiftedDecode])
@pytest.mark.parametrize("act", ["topk", "relu"])
@pytest.mark.parametrize("need_acts", [False, True])
def test_subclass_overrides_are_used_by_the_kernel(cls, act, need_acts):
    _assert_kernel_matches_forward(cls, act, need_acts=need_acts)


@pytest.mark.parametrize("act", ["topk", "relu"])
def test_re_registered_activation_is_used_by_the_kernel(act, monkeypatch):
    from tl_mdl.sae import model

    stock = model.ACTIVATIONS[act]
    monkeypatch.setitem(model.ACTIVATIONS, act, lambda sae, pre: 0.5 * stock(sae, pre))
    _assert_kernel_matches_forward(SAE, act)


@pytest.mark.parametrize("method", ["activation", "decode", "encode_pre"])
@pytest.mark.parametrize("act", ["topk", "relu"])
def test_a_method_replaced_on_the_instance_is_used_by_the_kernel(method, act):
    """``sae.decode = f`` on one SAE (not its class): the kernel calls ``f`` too."""
    class Patched(SAE):
        def __init__(self, cfg, seed=None):
            super().__init__(cfg, seed=seed)
            orig = getattr(self, method)
            shift = {"activation": 0.5, "decode": 1.0, "encode_pre": -0.25}[method]
            if method == "activation":
                setattr(self, method, lambda t: shift * orig(t))
            else:
                setattr(self, method, lambda t: orig(t) + shift)

    _assert_kernel_matches_forward(Patched, act)
    _assert_kernel_matches_forward(Patched, act, need_acts=True)


@pytest.mark.parametrize("act", ["topk", "relu"])
def test_a_method_patched_on_the_class_is_used_by_the_kernel(act, monkeypatch):
    orig = SAE.decode
    monkeypatch.setattr(SAE, "decode", lambda self, f: orig(self, f) - 1.0)
    _assert_kernel_matches_forward(SAE, act)


def test_uses_stock_names_its_methods():
    sae = SAE(SAEConfig(d_in=4, d_sae=8, activation="topk", k=2))
    assert sae.uses_stock("encode_pre", "decode", activation="topk")
    assert not sae.uses_stock(activation="relu")
    with pytest.raises(ValueError, match="forward"):
        sae.uses_stock("forward")
