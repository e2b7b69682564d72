"""The bilinear MLP: a gated MLP with the activation removed, usable as a TransformerLens
``HookedTransformer`` block's MLP (TL 3.9) and inside a ``TransformerBridge`` (TL 3.9 and 4)."""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_mdl._tl import IDENTITY_ACTS, HookPoint, hooked_transformer_config


class BilinearMLP(nn.Module):
    """Bilinear (gated, activation-free) MLP with biases on both sides of the product::

        pre        = x @ W_gate + b_gate            # hook_pre        [batch pos d_mlp]
        pre_linear = x @ W_in   + b_in              # hook_pre_linear [batch pos d_mlp]
        post       = pre * pre_linear               # hook_post       [batch pos d_mlp]
        out        = post @ W_out + b_out           #                 [batch pos d_model]

    Weights use TransformerLens shapes: ``W_in, W_gate [d_model, d_mlp]``,
    ``W_out [d_mlp, d_model]``, ``b_in, b_gate [d_mlp]``, ``b_out [d_model]``.
    Each output coordinate is a quadratic form of ``x̃ = [x; 1]`` (see
    :func:`tl_mdl.interaction_matrix`). Hook names match TransformerLens' ``GatedMLP``.
    """

    def __init__(self, cfg, *, seed: int | None = None):
        super().__init__()
        if isinstance(cfg, dict):
            cfg = hooked_transformer_config().unwrap(cfg)
        if getattr(cfg, "d_mlp", None) is None:
            raise ValueError("d_mlp must be set to use an MLP")
        self.cfg = cfg
        self.d_mlp = cfg.d_mlp
        d_model, d_mlp = cfg.d_model, self.d_mlp
        dtype = getattr(cfg, "dtype", None) or torch.float32
        self.act_fn = IDENTITY_ACTS[0]
        self.hook_mid = None
        self.ln = None
        self.W_in = nn.Parameter(torch.empty(d_model, d_mlp, dtype=dtype))
        self.W_gate = nn.Parameter(torch.empty(d_model, d_mlp, dtype=dtype))
        self.W_out = nn.Parameter(torch.empty(d_mlp, d_model, dtype=dtype))
        self.b_in = nn.Parameter(torch.zeros(d_mlp, dtype=dtype))
        self.b_gate = nn.Parameter(torch.zeros(d_mlp, dtype=dtype))
        self.b_out = nn.Parameter(torch.zeros(d_model, dtype=dtype))
        self.hook_pre = HookPoint()  # gate branch [batch, pos, d_mlp]
        self.hook_pre_linear = HookPoint()  # linear branch [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # product [batch, pos, d_mlp]
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Fresh init: ``W_in, W_gate ~ N(0, 1/d_model)``, ``W_out ~ N(0, 1/d_mlp)``,
        ``b_gate = 1`` (so ``post ≈ pre_linear`` at init, like a linear layer), other biases 0."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        d_model, d_mlp = self.cfg.d_model, self.d_mlp
        for w, std in (
            (self.W_in, 1 / math.sqrt(d_model)),
            (self.W_gate, 1 / math.sqrt(d_model)),
            (self.W_out, 1 / math.sqrt(d_mlp)),
        ):
            w.copy_(torch.randn(w.shape, generator=gen, dtype=torch.float64) * std)
        self.b_in.zero_()
        self.b_gate.fill_(1.0)
        self.b_out.zero_()

    def use_hook_points(self, points: dict[str, HookPoint]) -> None:
        """Fire ``points`` (a bridge's own hook points, keyed ``hook_pre``/``hook_pre_linear``/
        ``hook_post``) instead of this module's, so the bridge's hook names keep working
        while this layer runs inside it. Kept out of the module tree (no state-dict entry)."""
        self.__dict__["_outer_hooks"] = dict(points)

    def _hook(self, name: str) -> HookPoint:
        return self.__dict__.get("_outer_hooks", {}).get(name) or getattr(self, name)

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], *args: object, **kwargs: object
    ) -> Float[Tensor, "batch pos d_model"]:
        # extra arguments: what a bridge passes on to the module it wraps (unused here)
        if self.W_in.device != x.device:
            x = x.to(self.W_in.device)
        pre = self._hook("hook_pre")(x @ self.W_gate + self.b_gate)
        pre_linear = self._hook("hook_pre_linear")(x @ self.W_in + self.b_in)
        post = self._hook("hook_post")(pre * pre_linear)
        return post @ self.W_out + self.b_out
