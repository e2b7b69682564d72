"""Swap a HookedTransformer's MLPs for :class:`BilinearMLP` and put them back."""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformer_lens import HookedTransformer
from transformer_lens.components.mlps.gated_mlp import GatedMLP
from transformer_lens.components.mlps.mlp import MLP

from tl_mdl.bilinear.mlp import BilinearMLP

INITS = ("copy", "random")


@dataclass
class BilinearSwap:
    """Handle returned by :func:`to_bilinear`. ``restore()`` (or leaving the ``with`` block)
    puts the original MLP modules back and re-runs ``model.setup()``."""

    model: HookedTransformer
    originals: dict[int, nn.Module]
    bilinear: dict[int, BilinearMLP] = field(default_factory=dict)
    restored: bool = False

    def restore(self) -> None:
        if self.restored:
            return
        for layer, module in self.originals.items():
            self.model.blocks[layer].mlp = module
        self.model.setup()
        self.restored = True

    def __enter__(self) -> BilinearSwap:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _check_layers(model: HookedTransformer, layers: int | Iterable[int] | None) -> list[int]:
    n_layers = model.cfg.n_layers
    if layers is None:
        return list(range(n_layers))
    try:
        items = [operator.index(layers)]  # one int (also a NumPy or 0-d torch integer)
    except TypeError:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise TypeError(
                f"layers must be an int, a list of ints or None, got {layers!r}"
            ) from None
        items = list(layers)
    out: list[int] = []
    for item in items:
        try:
            layer = operator.index(item)
        except TypeError:
            raise TypeError(f"layer {item!r} is not an integer; pass ints like 0 or -1") from None
        if not -n_layers <= layer < n_layers:
            raise ValueError(
                f"layer {layer} out of range for model with n_layers={n_layers}; "
                f"pass layers in 0..{n_layers - 1} or layers=None for all"
            )
        if layer % n_layers in out:
            raise ValueError(
                f"layer {layer} is block {layer % n_layers}, which layers={items!r} already "
                "names; pass each layer once"
            )
        out.append(layer % n_layers)
    return out


@torch.no_grad()
def bilinear_from_mlp(
    mlp: nn.Module, init: str = "copy", *, gate_scale: float = 1.0, seed: int | None = None
) -> BilinearMLP:
    """Build a :class:`BilinearMLP` matching ``mlp`` (same cfg, device, dtype).

    ``init="copy"`` from a ``GatedMLP`` copies ``W_in, W_gate, W_out`` and folds GatedMLP's
    post-product bias (``post = act(x W_gate)·(x W_in) + b_in``) into the output bias:
    ``b_in' = b_gate' = 0``, ``b_out' = b_out + b_in @ W_out``. This is exact when the gate
    activation is the identity (``gate_scale`` multiplies ``W_gate``, e.g. ½ for Swish_β at β=0).
    ``init="random"`` gives a fresh init (:meth:`BilinearMLP.reset_parameters`); ``"copy"``
    from anything but a ``GatedMLP`` or ``BilinearMLP`` raises (a plain ``MLP`` has no gate).
    """
    if init not in INITS:
        raise ValueError(f"init={init!r} not supported; use one of {INITS}")
    if getattr(mlp, "cfg", None) is None or getattr(mlp.cfg, "d_mlp", None) is None:
        raise TypeError(f"cannot convert {type(mlp).__name__}: it has no cfg.d_mlp")
    new = BilinearMLP(mlp.cfg, seed=seed)
    ref = mlp.W_in
    new.to(device=ref.device, dtype=ref.dtype)
    if isinstance(mlp, BilinearMLP) and init == "copy":
        new.load_state_dict(mlp.state_dict())
    elif isinstance(mlp, GatedMLP) and init == "copy":
        new.W_in.copy_(mlp.W_in)
        new.W_gate.copy_(mlp.W_gate * gate_scale)
        new.W_out.copy_(mlp.W_out)
        new.b_in.zero_()
        new.b_gate.zero_()
        new.b_out.copy_(mlp.b_out + mlp.b_in @ mlp.W_out)
    elif init == "copy":
        what = "a plain MLP has no gate" if isinstance(mlp, MLP) else "it is not a GatedMLP"
        raise TypeError(
            f"cannot copy weights from {type(mlp).__name__} ({what}); use init='random' for "
            "a fresh bilinear layer (it needs training; anneal_to_bilinear turns a GatedMLP "
            "into an exact bilinear one)"
        )
    return new


def to_bilinear(
    model: HookedTransformer,
    layers: int | Iterable[int] | None = None,
    init: str = "copy",
    *,
    seed: int | None = None,
    _gate_scale: float = 1.0,
) -> BilinearSwap:
    """Replace ``model.blocks[i].mlp`` by a :class:`BilinearMLP` for each layer in ``layers``
    (all if None) and call ``model.setup()``, so the new hook points appear in ``hook_dict``.

    From a ``GatedMLP`` with ``init="copy"`` the weights are copied (see
    :func:`bilinear_from_mlp`): the result equals the GatedMLP with its activation set to the
    identity. A plain ``MLP`` needs ``init="random"`` (a fresh init). Nothing changes unless
    every layer converts. Returns a :class:`BilinearSwap` whose ``restore()`` puts the
    original modules back (bitwise-identical forward pass). Nested swaps of the same layers
    are restored innermost first (like nested ``with`` blocks).
    """
    layer_ids = _check_layers(model, layers)
    no_mlp = [layer for layer in layer_ids if getattr(model.blocks[layer], "mlp", None) is None]
    if no_mlp:
        raise TypeError(
            f"blocks {no_mlp} have no MLP (attn_only={getattr(model.cfg, 'attn_only', None)}); "
            "to_bilinear converts the MLPs of a model built with attn_only=False"
        )
    swap = BilinearSwap(model, {})
    for layer in layer_ids:  # build every layer first: a failure leaves the model untouched
        old = model.blocks[layer].mlp
        swap.originals[layer] = old
        swap.bilinear[layer] = bilinear_from_mlp(
            old, init, gate_scale=_gate_scale, seed=None if seed is None else seed + layer
        )
    for layer, new in swap.bilinear.items():
        model.blocks[layer].mlp = new
    model.setup()
    return swap


def bilinear_transformer(cfg, *, seed: int | None = None, **kwargs) -> HookedTransformer:
    """A ``HookedTransformer`` built from ``cfg`` whose every MLP is a fresh
    :class:`BilinearMLP` (``cfg.d_mlp`` hidden units; ``act_fn``/``gated_mlp`` are ignored).
    Extra ``kwargs`` go to ``HookedTransformer``."""
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig.unwrap(cfg)
    if seed is not None:
        torch.manual_seed(seed)
    model = HookedTransformer(cfg, **kwargs)
    to_bilinear(model, init="random", seed=seed)
    return model
