"""Harvesting: one forward pass of a model over a batch of token windows, caching several
hook points at once (stopped after the last block any of them needs), each flattened to
``[batch·pos, d_in]``; and what a cache of harvested activations depends on (the model's
fingerprint, whether hooks are attached)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_mdl._tl import named_hooks, user_forward_hooks
from tl_mdl.hooks.names import hook_layer


def stop_layer_for(model: Any, hook_names: list[str]) -> int | None:
    """The ``stop_at_layer`` that still runs every hook in ``hook_names`` (``None`` = the
    whole model, for hooks after the last block)."""
    layers = [hook_layer(h) for h in hook_names]
    if any(layer is None for layer in layers):
        return None
    return max(layers) + 1  # type: ignore[type-var,operator]


def as_token_windows(tokens: Tensor, context_size: int | None, n_ctx: int) -> Tensor:
    """``[n_seq, L]`` or ``[n_tokens]`` token ids -> ``[n_windows, context_size]`` (rows split
    into consecutive windows, the ragged tail dropped). Raises if a window exceeds ``n_ctx``."""
    if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.is_complex():
        what = f"dtype {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
        raise TypeError(
            f"tokens must be an integer Tensor [n_seq, seq_len] or [n_tokens], got {what}"
        )
    if tokens.ndim not in (1, 2):
        raise ValueError(
            f"tokens must be [n_seq, seq_len] or [n_tokens], got {tuple(tokens.shape)}"
        )
    if context_size is None:
        if tokens.ndim == 1:
            raise ValueError("1-D token streams need context_size= to cut them into sequences")
        context_size = tokens.shape[1]
    if not isinstance(context_size, int) or context_size <= 0:
        raise ValueError(f"context_size must be a positive int, got {context_size!r}")
    if context_size > n_ctx:
        raise ValueError(
            f"context_size={context_size} exceeds the model's n_ctx={n_ctx}; use "
            f"context_size <= {n_ctx} (longer rows are split into windows of that size)"
        )
    if tokens.ndim == 1:
        tokens = tokens[None]
    n_win = tokens.shape[1] // context_size
    if n_win == 0:
        raise ValueError(
            f"sequences of length {tokens.shape[1]} are shorter than context_size={context_size}"
        )
    windows = tokens[:, : n_win * context_size].reshape(-1, context_size)
    return windows


def _flat(act: Tensor) -> Tensor:
    """``[batch, pos, ..., d]`` -> ``[batch·pos, prod(rest)]`` (heads flattened like SAELens)."""
    return act.reshape(act.shape[0] * act.shape[1], -1)


def harvest_batch(
    model: Any, tokens: Int[Tensor, "batch pos"], hook_names: list[str],
    stop_at_layer: int | None = None,
) -> dict[str, Float[Tensor, "rows d_in"]]:
    """One forward pass (stopped after the last needed block) caching ``hook_names``,
    each flattened to ``[batch·pos, d_in]``, keyed by the names given (on a bridge an
    old-name alias stays the key)."""
    got: dict[str, Tensor] = {}

    def save(act: Tensor, name: str) -> None:
        got[name] = _flat(act.detach())

    with torch.no_grad(), named_hooks(model, [(h, save) for h in hook_names]):
        model(tokens, stop_at_layer=stop_at_layer, return_type=None)
    missing = [h for h in hook_names if h not in got]
    if missing:
        raise RuntimeError(f"hooks {missing} did not fire during the forward pass")
    return got


def _check_finite(act: Tensor, hook_name: str, batch: int, model_batch_size: int) -> None:
    """Raise ``FloatingPointError`` naming the hook, model batch and row of a NaN/Inf."""
    bad = ~torch.isfinite(act)
    if bad.any():
        row = int(bad.any(-1).nonzero()[0])
        raise FloatingPointError(
            f"activations at hook {hook_name!r} contain NaN/Inf in model batch {batch} "
            f"(sequences {batch * model_batch_size}..{(batch + 1) * model_batch_size - 1}, "
            f"first bad row {row} of the batch's [batch·pos, d] activations); nothing from "
            "this batch was stored"
        )


def model_fingerprint(model: Any, tokens: Tensor, settings: list[Any]) -> str:
    """SHA-256 of ``tokens``, the harvest ``settings`` (JSON) and the model: its config and
    every parameter and buffer byte for byte, with its name, dtype and shape."""
    h = hashlib.sha256()
    h.update(tokens.to(torch.int64).cpu().numpy().tobytes())
    h.update(json.dumps(settings).encode())
    h.update(repr(model.cfg).encode())
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            raw = t.detach().reshape(-1).contiguous().cpu()
            h.update(raw.view(torch.uint8).numpy().tobytes() if raw.numel() else b"")
    return h.hexdigest()


def model_hooked(model: Any) -> bool:
    """Whether any module of the model has a forward hook (an attached SAE, a user hook):
    their effect on the activations is not part of :func:`model_fingerprint`. A bridge's own
    wiring (hooks it installs on the modules it wraps) does not count."""
    return any(user_forward_hooks(m) for m in model.modules())
