"""TransformerLens compatibility: the one module that knows both TransformerLens lines.

TransformerLens 3.9 has ``HookedTransformer`` (and, already, a ``TransformerBridge``);
TransformerLens 4 keeps only the bridge, ``HookPoint`` and ``HookedRootModule``. Everything
else in tl_mdl reaches TransformerLens through here, so each line imports only what it has:
the ``HookedTransformer`` pieces load lazily, on first use, with an error naming the fix.

A *bridge* names hooks two ways: the new names (``blocks.0.hook_in``, ``blocks.0.mlp.gate.
hook_out``) and the old ones as aliases (``blocks.0.hook_resid_pre``, ``blocks.0.mlp.hook_pre``).
Both are keys of ``model.hook_dict`` for the same ``HookPoint``, whose ``.name`` is the new
one; tl_mdl files results under the name the user gave (see :func:`add_named_hooks`).

Gated MLPs are recognised by structure (:func:`gated_mlp_parts`), not class name: TL 3.9's
``GatedMLP`` computes ``act(x W_gate) · (x W_in) + b_in`` (bias after the product), a bridge's
gated MLP ``act(x W_gate + b_gate) · (x W_in + b_in)`` (biases inside, like BilinearMLP).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint  # both lines

__all__ = [
    "HookPoint", "hooked_transformer", "hooked_transformer_config", "is_bridge",
    "is_hooked_transformer", "refresh_hooks", "add_named_hooks", "remove_named_hooks",
    "hook_aliases", "named_hooks", "user_forward_hooks", "GatedParts", "gated_mlp_parts",
    "mlp_activation", "set_mlp_activation", "IDENTITY_ACTS", "is_identity",
]

_TL4_HINT = (
    "TransformerLens {v} has no {name} (removed in 4.0): use a TransformerBridge "
    "(TransformerBridge.boot_transformers(...) or boot_native(...)), which tl_mdl supports, "
    "or install transformer-lens<4"
)


def _tl_version() -> str:
    import transformer_lens

    return getattr(transformer_lens, "__version__", "?")


def hooked_transformer() -> type:
    """``transformer_lens.HookedTransformer`` (TL < 4), else ``ImportError`` naming the fix."""
    try:
        from transformer_lens import HookedTransformer
    except ImportError as e:
        raise ImportError(_TL4_HINT.format(v=_tl_version(), name="HookedTransformer")) from e
    return HookedTransformer


def hooked_transformer_config() -> type:
    """``transformer_lens.HookedTransformerConfig`` (TL < 4), else ``ImportError``."""
    try:
        from transformer_lens import HookedTransformerConfig
    except ImportError as e:
        raise ImportError(
            _TL4_HINT.format(v=_tl_version(), name="HookedTransformerConfig")
        ) from e
    return HookedTransformerConfig


def is_bridge(model: Any) -> bool:
    """Whether ``model`` is a ``TransformerBridge`` (TL 3.9 or 4): it keeps its hooks in a
    registry (``_hook_registry``) and has no ``setup()``."""
    return hasattr(model, "_hook_registry") and hasattr(model, "original_model")


def is_hooked_transformer(model: Any) -> bool:
    """A TL 3.9 ``HookedRootModule`` whose hook names come from ``setup()``."""
    return not is_bridge(model) and callable(getattr(model, "setup", None))


def refresh_hooks(model: Any) -> None:
    """Rebuild ``model.hook_dict`` after modules changed (``setup()`` on a HookedRootModule;
    a bridge's registry is edited in place by :func:`add_named_hooks`)."""
    if is_hooked_transformer(model):
        model.setup()


def hook_aliases(model: Any, hook_name: str) -> list[str]:
    """Every ``hook_dict`` key naming the same ``HookPoint`` as ``hook_name`` (itself first)."""
    hd = model.hook_dict
    hp = hd.get(hook_name)
    if hp is None:
        return [hook_name]
    return [hook_name] + [k for k, v in hd.items() if v is hp and k != hook_name]


def add_named_hooks(model: Any, parent: HookPoint, prefix: str, points: dict[str, HookPoint]
                    ) -> None:
    """Make ``points`` children of ``parent`` reachable as ``f"{prefix}.{name}"`` in
    ``model.hook_dict`` (``prefix`` is the name the user gave, alias or not)."""
    for name, point in points.items():
        parent.add_module(name, point)
    if is_bridge(model):
        for name, point in points.items():
            point.name = f"{prefix}.{name}"
            model._hook_registry[point.name] = point
    else:
        refresh_hooks(model)


def remove_named_hooks(model: Any, parent: HookPoint, prefix: str, names: list[str]) -> None:
    """Undo :func:`add_named_hooks` (missing entries are skipped, so it also cleans up after a
    partial add)."""
    removed = [parent._modules.pop(name, None) for name in names]
    if is_bridge(model):
        gone = {id(p) for p in removed if p is not None}
        registry = model._hook_registry
        for key in [f"{prefix}.{name}" for name in names]:
            registry.pop(key, None)
        # a registry rescan while attached may have filed them under other names too
        for key in [k for k, v in registry.items() if id(v) in gone]:
            del registry[key]
    else:
        refresh_hooks(model)


def _bridge_owned(fn: Any) -> bool:
    """A hook a ``TransformerBridge`` installs on its own modules (its capture wiring), not a
    user's: defined inside ``transformer_lens.model_bridge``."""
    return getattr(fn, "__module__", "").startswith("transformer_lens.model_bridge")


def user_forward_hooks(module: nn.Module) -> list[Callable]:
    """``module``'s forward and pre-forward hooks, without a bridge's own wiring."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return [fn for fn in hooks if not _bridge_owned(fn)]


@contextmanager
def named_hooks(model: Any, fwd_hooks: list[tuple[str, Callable]]) -> Iterator[None]:
    """``model.hooks(fwd_hooks=...)`` where each hook is called as ``fn(act, name)`` with the
    name the caller gave (a bridge's ``hook.name`` is the new name even for an alias)."""

    def named(fn: Callable, name: str) -> Callable:
        return lambda act, hook: fn(act, name)

    with model.hooks(fwd_hooks=[(n, named(fn, n)) for n, fn in fwd_hooks]):
        yield


# ------------------------------------------------------------------------------ gated MLPs
#: Names of the activation attribute on gated MLP modules (TL 3.9 / HF: ``act_fn``; TL 4's
#: native models: ``act``).
_ACT_ATTRS = ("act_fn", "act")


def _identity(x: Tensor) -> Tensor:
    return x


#: Activations tl_mdl treats as the identity (a bilinear layer).
IDENTITY_ACTS: tuple[Any, ...] = (_identity,)


def _inner(mlp: nn.Module) -> nn.Module:
    """The module holding the activation: a bridge's wrapped module, else ``mlp`` itself."""
    inner = getattr(mlp, "original_component", None)
    return inner if isinstance(inner, nn.Module) else mlp


def mlp_activation(mlp: nn.Module) -> tuple[nn.Module, str] | None:
    """``(module, attribute)`` holding a gated MLP's gate activation, or None."""
    for holder in (mlp, _inner(mlp)):
        for attr in _ACT_ATTRS:
            if callable(getattr(holder, attr, None)):
                return holder, attr
    return None


def set_mlp_activation(mlp: nn.Module, act: Callable) -> Callable:
    """Set the gate activation of ``mlp``; returns the previous one."""
    where = mlp_activation(mlp)
    if where is None:
        raise TypeError(f"{type(mlp).__name__} has no gate activation (act_fn / act)")
    holder, attr = where
    old = getattr(holder, attr)
    # a callable that is an nn.Module (HF's SiLUActivation) must go through __setattr__
    # of nn.Module; a plain function replacing it must first drop the submodule entry
    if attr in holder._modules and not isinstance(act, nn.Module):
        del holder._modules[attr]
        object.__setattr__(holder, attr, act)
    else:
        setattr(holder, attr, act)
    return old


#: Probe for :func:`is_identity`: negatives, zero, small and large values, in float64.
_PROBE = torch.tensor([-7.5, -1.0, -0.25, 0.0, 1e-3, 0.5, 3.0, 1e4], dtype=torch.float64)


def is_identity(act: Any) -> bool:
    """Whether the activation ``act`` is the identity, by behaviour (a Hugging Face
    ``hidden_act="linear"``, ``nn.Identity``, tl_mdl's own): it returns a probe unchanged.
    SiLU, GELU, ReLU and their kin all move some probe value."""
    if act in IDENTITY_ACTS or isinstance(act, nn.Identity):
        return True
    try:
        with torch.no_grad():
            out = act(_PROBE.clone())
    except Exception:  # an activation that cannot run on a probe is not known to be identity
        return False
    return isinstance(out, Tensor) and out.shape == _PROBE.shape and torch.equal(
        out.to(torch.float64), _PROBE)


@dataclass
class GatedParts:
    """A gated MLP read in TransformerLens shapes: ``W_in, W_gate [d_model, d_mlp]``,
    ``W_out [d_mlp, d_model]``, biases (zeros where the module has none).

    ``bias_inside``: ``act(x W_gate + b_gate) · (x W_in + b_in)`` (a bridge, BilinearMLP);
    else TL 3.9's ``act(x W_gate) · (x W_in) + b_in`` (``b_gate`` is zero).
    ``bilinear``: the gate activation is the identity.
    """

    W_in: Tensor
    W_gate: Tensor
    W_out: Tensor
    b_in: Tensor
    b_gate: Tensor
    b_out: Tensor
    bias_inside: bool
    bilinear: bool
    act: Any


def _tensor(mlp: nn.Module, name: str) -> Tensor | None:
    try:
        v = getattr(mlp, name)
    except (AttributeError, RuntimeError, KeyError):
        return None
    return v if isinstance(v, Tensor) else None


def gated_mlp_parts(mlp: nn.Module) -> GatedParts | None:
    """Read ``mlp`` as a gated MLP by structure (``W_in``, ``W_gate``, ``W_out`` of matching
    shapes plus a gate activation), whatever its class; None when it is not one."""
    inner = _inner(mlp)
    if inner is not mlp and _tensor(inner, "W_in") is not None:
        return gated_mlp_parts(inner)  # e.g. a BilinearMLP wrapped by a bridge
    W_in, W_gate, W_out = (_tensor(mlp, n) for n in ("W_in", "W_gate", "W_out"))
    if W_in is None or W_gate is None or W_out is None:
        return None
    if W_in.ndim != 2 or W_gate.shape != W_in.shape or W_out.shape != W_in.shape[::-1]:
        return None
    d_model, d_mlp = W_in.shape
    # TL 3.9's GatedMLP has b_in but no b_gate: the post-product convention
    inside = _tensor(mlp, "b_gate") is not None
    if hasattr(mlp, "original_component"):
        inside = True  # a bridge runs the wrapped module: nn.Linear biases sit inside

    def bias(name: str, size: int) -> Tensor:
        b = _tensor(mlp, name)
        return W_in.new_zeros(size) if b is None else b

    act = mlp_activation(mlp)
    fn = getattr(act[0], act[1]) if act is not None else None
    return GatedParts(
        W_in, W_gate, W_out, bias("b_in", d_mlp), bias("b_gate", d_mlp), bias("b_out", d_model),
        bias_inside=inside, bilinear=fn is not None and is_identity(fn), act=fn,
    )


def model_dtype_device(model: Any) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters(), None)
    if p is None:
        return model.cfg.dtype, torch.device(getattr(model.cfg, "device", None) or "cpu")
    return p.dtype, p.device
