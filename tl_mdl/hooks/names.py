"""Hook names and hook helpers: which hook points an SAE attaches to, what shape they carry,
and the names of the SAE's own hook points. Works on a TL 3.9 ``HookedTransformer`` and on a
``TransformerBridge`` (either TL line), whose old hook names are aliases of the new ones.
"""

from __future__ import annotations

import difflib
import re
import sys
from typing import Any

from torch import Tensor

from tl_mdl._tl import hook_aliases, model_dtype_device
from tl_mdl.sae import SAE

#: The SAE's own hook points, children of the model hook it is attached to (SAELens names),
#: in the order they fire.
SAE_HOOK_NAMES = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_error",
    "hook_sae_output",
)
#: Hook points inside the SAE's computation: hooks there may intervene on its code (and a
#: ``sae_lens.SAE`` owns these four itself).
SAE_INNER_HOOKS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons")
#: Hook points that need the reconstruction (in ``"observe"`` mode it is only computed when
#: one of them has a hook).
SAE_RECONS_HOOKS = ("hook_sae_recons", "hook_sae_error", "hook_sae_output")
#: Hook points tl_mdl adds next to a ``sae_lens.SAE``'s own four.
SAE_OUTER_HOOKS = ("hook_sae_error", "hook_sae_output")

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def hook_layer(hook_name: str) -> int | None:
    """Block index of ``blocks.{L}.…`` hook names, ``-1`` for the embedding hooks, ``None``
    for hooks after the last block (``ln_final``, ``unembed``)."""
    m = _LAYER_RE.match(hook_name)
    if m:
        return int(m.group(1))
    if hook_name.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")):
        return -1
    return None


def check_hook_name(model: Any, hook_name: str) -> None:
    """Raise ``ValueError`` naming close matches when ``hook_name`` is not a model hook point."""
    if not isinstance(hook_name, str):
        raise TypeError(
            f"hook_name must be a str like 'blocks.0.hook_resid_pre', got {hook_name!r}"
        )
    if hook_name in model.hook_dict:
        return
    if f"{hook_name}.hook_sae_input" in model.hook_dict:  # SAELens' HookedSAEWrapper
        raise ValueError(
            f"an SAE was added at {hook_name!r} with SAELens' add_sae, which replaced the "
            "hook point; remove it first (model.reset_saes()) to attach an SAE with tl_mdl"
        )
    names = sorted(model.hook_dict)
    close = difflib.get_close_matches(hook_name, names, n=5, cutoff=0.6)
    n_layers = getattr(model.cfg, "n_layers", "?")
    hint = f"; did you mean {close}?" if close else ""
    raise ValueError(
        f"hook {hook_name!r} is not a hook point of this model (n_layers={n_layers}){hint} "
        f"Valid names are the keys of model.hook_dict, e.g. {names[:6]}"
    )


def expected_hook_shape(model: Any, hook_name: str) -> tuple[int, ...] | None:
    """Trailing activation dims at ``hook_name`` from the model config (``None`` if unknown).
    On a bridge a new name (``blocks.0.hook_in``) is read through its old-name aliases."""
    for name in hook_aliases(model, hook_name):
        shape = _shape_of_name(model, name)
        if shape is not None:
            return shape
    return None


def _shape_of_name(model: Any, hook_name: str) -> tuple[int, ...] | None:
    cfg = model.cfg
    last = hook_name.rsplit(".", 1)[-1]
    n_heads, d_head = cfg.n_heads, cfg.d_head
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    if last in ("hook_z", "hook_q", "hook_rot_q"):
        return (n_heads, d_head)
    if last in ("hook_k", "hook_v", "hook_rot_k"):
        return (n_kv, d_head)
    if last == "hook_result":
        return (n_heads, cfg.d_model)
    if last in ("hook_pattern", "hook_attn_scores"):
        return ()
    if ".mlp." in hook_name and last in ("hook_pre", "hook_post", "hook_pre_linear"):
        return (cfg.d_mlp,) if cfg.d_mlp else None
    if last in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
                "hook_mlp_out", "hook_embed", "hook_pos_embed", "hook_mlp_in"):
        return (cfg.d_model,)
    return None


#: Hooks whose activations carry a head axis ``[..., n_heads, d]``.
HEAD_HOOKS = ("hook_z", "hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_result")


def flatten_heads(x: Tensor, d_in: int, hook_name: str) -> Tensor:
    """``[..., d_in]`` unchanged; at a head-indexed hook (:data:`HEAD_HOOKS`),
    ``[..., n_heads, d_head]`` with ``n_heads·d_head = d_in`` flattened to ``[..., d_in]``
    (SAELens's hook_z convention), and a bridge's flat ``[batch, pos, n_heads·d_head]``
    split into heads for a per-head SAE. Any other shape raises (never mixes other axes)."""
    if x.shape[-1] == d_in:
        return x
    heads = hook_name.rsplit(".", 1)[-1] in HEAD_HOOKS
    if heads and x.ndim >= 2 and x.shape[-2] * x.shape[-1] == d_in:
        return x.flatten(-2)
    if heads and x.ndim == 3 and x.shape[-1] % d_in == 0:
        # a bridge's hook_z is [batch, pos, n_heads·d_head]: a per-head SAE (d_in = d_head,
        # checked by check_sae_fits) sees [batch, pos, n_heads, d_head]
        return x.unflatten(-1, (x.shape[-1] // d_in, d_in))
    raise ValueError(
        f"activation at {hook_name!r} has shape {tuple(x.shape)}, which does not fit an SAE "
        f"with d_in={d_in}: the last dim is {x.shape[-1]}"
        + (f", the flattened heads {x.shape[-2] * x.shape[-1]}" if heads and x.ndim >= 2
           else "")
    )


def is_sae_lens_sae(sae: Any) -> bool:
    mod = sys.modules.get("sae_lens")
    return mod is not None and isinstance(sae, mod.SAE)


def sae_param(sae: Any) -> Tensor:
    return sae.W_enc


def check_sae_fits(model: Any, hook_name: str, sae: Any) -> None:
    """Validate SAE type, ``d_in`` against the hook's shape, dtype and device."""
    if not (isinstance(sae, SAE) or is_sae_lens_sae(sae)):
        raise TypeError(
            f"sae must be a tl_mdl.SAE or a sae_lens.SAE, got {type(sae).__name__}"
        )
    d_in = sae.cfg.d_in
    shape = expected_hook_shape(model, hook_name)
    if shape == ():
        raise ValueError(
            f"hook {hook_name!r} carries attention patterns/scores [batch, head, q, k], not "
            "[..., d_in] activations; attach SAEs to residual, hook_z, mlp or *_out hooks"
        )
    if shape is not None:
        valid = {shape[-1]} | ({shape[-2] * shape[-1]} if len(shape) >= 2 else set())
        if d_in not in valid:
            dims = " x ".join(map(str, shape))
            raise ValueError(
                f"SAE d_in={d_in} does not fit hook {hook_name!r} with activations [..., {dims}]; "
                f"valid d_in: {sorted(valid)}"
                + (" (heads flattened, like SAELens, or one head)" if len(shape) >= 2 else "")
            )
    m_dtype, m_device = model_dtype_device(model)
    p = sae_param(sae)
    if p.dtype != m_dtype:
        raise TypeError(
            f"SAE dtype {p.dtype} differs from model dtype {m_dtype}; convert one of them, "
            f"e.g. sae.to({m_dtype})"
        )
    if p.device.type != m_device.type or (
        p.device.index is not None and m_device.index is not None and p.device != m_device
    ):
        raise ValueError(
            f"SAE is on device {p.device} but the model is on {m_device}; move it with "
            f"sae.to({str(m_device)!r})"
        )
