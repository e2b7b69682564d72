"""Swap a model's MLPs for :class:`BilinearMLP` and put them back.

On a TL 3.9 ``HookedTransformer`` the block's ``mlp`` module is replaced. On a
``TransformerBridge`` the MLP bridge stays (its hook names and aliases keep working) and the
module it wraps is replaced; the :class:`BilinearMLP` fires the bridge's hook points.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tl_mdl._tl import (
    gated_mlp_parts,
    hooked_transformer,
    hooked_transformer_config,
    is_bridge,
    refresh_hooks,
)
from tl_mdl.bilinear.mlp import BilinearMLP

INITS = ("copy", "random")


@dataclass
class BilinearSwap:
    """Handle returned by :func:`to_bilinear`. ``restore()`` (or leaving the ``with`` block)
    puts the original MLP modules back and re-runs ``model.setup()``."""

    model: Any
    originals: dict[int, nn.Module]
    bilinear: dict[int, BilinearMLP] = field(default_factory=dict)
    restored: bool = False

    def restore(self) -> None:
        if self.restored:
            return
        for layer, module in self.originals.items():
            _set_mlp(self.model, layer, module)
        refresh_hooks(self.model)
        self.restored = True

    def __enter__(self) -> BilinearSwap:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _get_mlp(model: Any, layer: int) -> nn.Module | None:
    """The module computing block ``layer``'s MLP (on a bridge: the module it wraps)."""
    mlp = getattr(model.blocks[layer], "mlp", None)
    if mlp is not None and is_bridge(model):
        return mlp.original_component
    return mlp


def _set_mlp(model: Any, layer: int, module: nn.Module) -> None:
    if not is_bridge(model):
        model.blocks[layer].mlp = module
        return
    outer = model.blocks[layer].mlp
    outer._modules["_original_component"] = module
    if isinstance(module, BilinearMLP):
        module.use_hook_points(_bridge_mlp_hooks(outer))


def _bridge_mlp_hooks(outer: nn.Module) -> dict[str, Any]:
    """The bridge's hook points behind the old names ``hook_pre``/``hook_pre_linear``/
    ``hook_post`` (its ``hook_aliases``, e.g. ``hook_pre -> gate.hook_out``)."""
    out = {}
    for alias, target in getattr(outer, "hook_aliases", {}).items():
        obj: Any = outer
        for part in (target if isinstance(target, str) else target[0]).split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            out[alias] = obj
    return out


def _check_layers(model: Any, layers: int | Iterable[int] | None) -> list[int]:
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
    mlp: nn.Module, init: str = "copy", *, gate_scale: float = 1.0, seed: int | None = None,
    cfg: Any = None,
) -> BilinearMLP:
    """Build a :class:`BilinearMLP` matching ``mlp`` (same cfg, device, dtype).

    ``init="copy"`` from a gated MLP (recognised by structure, see
    :func:`tl_mdl._tl.gated_mlp_parts`) copies ``W_in, W_gate, W_out`` and the biases in either
    convention: a bridge's ``act(x W_gate + b_gate)·(x W_in + b_in)`` is copied as is; TL 3.9
    ``GatedMLP``'s post-product bias (``act(x W_gate)·(x W_in) + b_in``) is folded into the
    output bias: ``b_in' = b_gate' = 0``, ``b_out' = b_out + b_in @ W_out``. Exact when the
    gate activation is the identity (``gate_scale`` multiplies the gate branch, e.g. ½ for
    Swish_β at β=0). ``init="random"`` gives a fresh init
    (:meth:`BilinearMLP.reset_parameters`); ``"copy"`` from a module without a gate raises.
    ``cfg``: the config to build from (default ``mlp.cfg``; a bridge passes its own).
    """
    if init not in INITS:
        raise ValueError(f"init={init!r} not supported; use one of {INITS}")
    cfg = getattr(mlp, "cfg", None) if cfg is None else cfg
    if cfg is None or getattr(cfg, "d_mlp", None) is None:
        raise TypeError(f"cannot convert {type(mlp).__name__}: it has no cfg.d_mlp")
    new = BilinearMLP(cfg, seed=seed)
    ref = _weight(mlp)
    new.to(device=ref.device, dtype=ref.dtype)
    parts = gated_mlp_parts(mlp)
    if isinstance(mlp, BilinearMLP) and init == "copy":
        new.load_state_dict(mlp.state_dict())
    elif parts is not None and init == "copy":
        new.W_in.copy_(parts.W_in)
        new.W_gate.copy_(parts.W_gate * gate_scale)
        new.W_out.copy_(parts.W_out)
        if parts.bias_inside:  # act(x W_gate + b_gate) · (x W_in + b_in): same form
            new.b_in.copy_(parts.b_in)
            new.b_gate.copy_(parts.b_gate * gate_scale)
            new.b_out.copy_(parts.b_out)
        else:  # act(x W_gate) · (x W_in) + b_in: fold b_in through W_out
            new.b_in.zero_()
            new.b_gate.zero_()
            new.b_out.copy_(parts.b_out + parts.b_in @ parts.W_out)
    elif init == "copy":
        raise TypeError(
            f"cannot copy weights from {type(mlp).__name__} (a plain MLP has no gate: no W_gate "
            "next to W_in and W_out); use init='random' for a fresh bilinear layer (it needs "
            "training; anneal_to_bilinear turns a gated MLP into an exact bilinear one)"
        )
    return new


def _weight(mlp: nn.Module) -> torch.Tensor:
    """A tensor of ``mlp`` giving its device and dtype."""
    w = getattr(mlp, "W_in", None)
    p = w if isinstance(w, torch.Tensor) else next(mlp.parameters(), None)
    if p is None:
        raise TypeError(f"cannot convert {type(mlp).__name__}: it has no weights")
    return p


def to_bilinear(
    model: Any,
    layers: int | Iterable[int] | None = None,
    init: str = "copy",
    *,
    seed: int | None = None,
    _gate_scale: float = 1.0,
) -> BilinearSwap:
    """Replace ``model.blocks[i].mlp`` by a :class:`BilinearMLP` for each layer in ``layers``
    (all if None), so its hook points appear in ``hook_dict``. ``model``: a TL 3.9
    ``HookedTransformer`` or a ``TransformerBridge`` (which keeps its MLP bridge, hook names
    and aliases, and runs the bilinear layer inside it).

    From a gated MLP with ``init="copy"`` the weights are copied (see
    :func:`bilinear_from_mlp`): the result equals the GatedMLP with its activation set to the
    identity. A plain ``MLP`` needs ``init="random"`` (a fresh init). Nothing changes unless
    every layer converts. Returns a :class:`BilinearSwap` whose ``restore()`` puts the
    original modules back (bitwise-identical forward pass). Nested swaps of the same layers
    are restored innermost first (like nested ``with`` blocks).
    """
    layer_ids = _check_layers(model, layers)
    no_mlp = [layer for layer in layer_ids if _get_mlp(model, layer) is None]
    if no_mlp:
        raise TypeError(
            f"blocks {no_mlp} have no MLP (attn_only={getattr(model.cfg, 'attn_only', None)}); "
            "to_bilinear converts the MLPs of a model built with attn_only=False"
        )
    if is_bridge(model):
        folded = [
            layer for layer in layer_ids
            if getattr(model.blocks[layer].mlp, "_use_processed_weights", False)
        ]
        if folded:
            raise TypeError(
                f"blocks {folded} run processed (folded) weights "
                "(enable_compatibility_mode), which bypass the wrapped MLP; convert a bridge "
                "without processed weights, e.g. a fresh boot, then to_bilinear"
            )
    swap = BilinearSwap(model, {})
    cfg = model.cfg if is_bridge(model) else None
    for layer in layer_ids:  # build every layer first: a failure leaves the model untouched
        old = _get_mlp(model, layer)
        assert old is not None
        swap.originals[layer] = old
        # a bridge's MLP reads its weights in TL shapes (W_in, W_gate, ...) from what it wraps
        swap.bilinear[layer] = bilinear_from_mlp(
            model.blocks[layer].mlp, init, gate_scale=_gate_scale,
            seed=None if seed is None else seed + layer, cfg=cfg,
        )
    try:
        for layer, new in swap.bilinear.items():
            _set_mlp(model, layer, new)
        refresh_hooks(model)
    except BaseException:
        for layer, old in swap.originals.items():
            _set_mlp(model, layer, old)
        refresh_hooks(model)
        raise
    return swap


def bilinear_transformer(cfg, *, seed: int | None = None, **kwargs) -> Any:
    """A ``HookedTransformer`` built from ``cfg`` whose every MLP is a fresh
    :class:`BilinearMLP` (``cfg.d_mlp`` hidden units; ``act_fn``/``gated_mlp`` are ignored).
    Extra ``kwargs`` go to ``HookedTransformer``."""
    cfg = hooked_transformer_config().unwrap(cfg)
    if seed is not None:
        torch.manual_seed(seed)
    model = hooked_transformer()(cfg, **kwargs)
    to_bilinear(model, init="random", seed=seed)
    return model
