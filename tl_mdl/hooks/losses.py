"""Model-based losses for the description-length precision search: CE and KL of the model
with an SAE spliced in, its latents quantised at a bin width.

``build_ce_loss`` / ``build_kl_loss`` are registered as ``"ce"`` / ``"kl"`` in
:mod:`tl_mdl.mdl.losses`. Each builder runs the clean model once and caches, per token batch,
the residual stream entering the hook's block, the SAE's nonzero latents and (for KL) the
clean log-probabilities. A call ``loss_fn(w)`` then quantises the cached latents
(``q = round(f / w)``, decoder input ``q · w``), decodes only the active ones, and runs the
model from the hook's block onward (``start_at_layer``) with the activation replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_mdl._sparse import csr_decode, to_csr
from tl_mdl._tl import is_bridge, named_hooks
from tl_mdl.hooks.names import check_hook_name, check_sae_fits, flatten_heads, hook_layer
from tl_mdl.mdl import dequantize, quantize, register_model_loss
from tl_mdl.mdl.losses import LossFn
from tl_mdl.sae import SAE


def check_tokens(model: Any, tokens: Any) -> Tensor:
    """Validate ``tokens [batch, pos]`` (integer ids, ``pos <= n_ctx``)."""
    if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.ndim != 2:
        raise TypeError(
            "tokens must be an integer Tensor [batch, pos] of token ids, got "
            + (f"shape {tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, Tensor)
               else type(tokens).__name__)
        )
    n_ctx = model.cfg.n_ctx
    if tokens.shape[1] > n_ctx:
        raise ValueError(
            f"tokens have {tokens.shape[1]} positions but the model's n_ctx={n_ctx}; cut them "
            f"to at most {n_ctx} (e.g. tokens.reshape(-1, {n_ctx}) on a stream)"
        )
    if tokens.shape[1] < 2:
        raise ValueError("tokens need at least 2 positions for a next-token loss")
    return tokens


@dataclass
class _Batch:
    tokens: Tensor
    start: Tensor | None  # residual entering the hook's block (None: full forward)
    cols: Tensor  # nonzero latents in CSR form (``offsets[n]``: where row n starts)
    vals: Tensor
    offsets: Tensor
    act_shape: torch.Size
    clean_logp: Tensor | None


class SplicedLoss:
    """``loss_fn(bin_width | None) -> float``: mean CE (next token) or mean KL(clean ‖ spliced)
    in nats per token, with the SAE's latents quantised at ``bin_width`` and decoded into
    ``hook_name``. See the module docstring for what is cached."""

    def __init__(
        self,
        kind: str,
        *,
        sae: SAE,
        model: Any,
        hook_name: str,
        tokens: Int[Tensor, "batch pos"],
        batch_size: int = 16,
    ):
        if kind not in ("ce", "kl"):
            raise ValueError(f"kind must be 'ce' or 'kl', got {kind!r}")
        if model is None or hook_name is None or tokens is None:
            raise ValueError(
                f"loss={kind!r} needs model=, hook_name= and tokens= (the SAE is spliced into "
                "the model at hook_name and the loss measured on tokens)"
            )
        if not isinstance(sae, SAE):
            raise TypeError(
                f"loss={kind!r} needs a tl_mdl.SAE, got {type(sae).__name__}; convert SAELens "
                "SAEs with tl_mdl.from_sae_lens(sae)"
            )
        check_hook_name(model, hook_name)
        check_sae_fits(model, hook_name, sae)
        self.kind, self.sae, self.model, self.hook_name = kind, sae, model, hook_name
        tokens = check_tokens(model, tokens)
        layer = hook_layer(hook_name)
        shortformer = getattr(model.cfg, "positional_embedding_type", "") == "shortformer"
        # a bridge runs the wrapped model whole (no start_at_layer): full forwards there
        resumable = not (shortformer or is_bridge(model))
        self.layer = layer if (layer is not None and layer >= 0 and resumable) else None
        self.batches: list[_Batch] = []
        dev = sae.W_dec.device
        with torch.no_grad():
            for i in range(0, tokens.shape[0], batch_size):
                self.batches.append(self._prepare(tokens[i : i + batch_size].to(dev)))

    def _prepare(self, toks: Tensor) -> _Batch:
        got: dict[str, Tensor] = {}

        def grab(act: Tensor, name: str) -> None:
            got[name] = act

        names = [self.hook_name]
        if self.layer is not None:
            names.append(f"blocks.{self.layer}.hook_resid_pre")
        with named_hooks(self.model, [(n, grab) for n in names]):
            logits = self.model(toks)
        act = got[self.hook_name]
        x = flatten_heads(act, self.sae.cfg.d_in, self.hook_name).reshape(-1, self.sae.cfg.d_in)
        latents = self.sae.encode(x)
        cols, vals, offsets = to_csr(latents)
        return _Batch(
            tokens=toks,
            start=got.get(f"blocks.{self.layer}.hook_resid_pre"),
            cols=cols, vals=vals, offsets=offsets,
            act_shape=act.shape,
            clean_logp=logits.double().log_softmax(-1) if self.kind == "kl" else None,
        )

    def _spliced_logits(self, b: _Batch, recons: Tensor) -> Tensor:
        def replace(act: Tensor, hook: Any) -> Tensor:
            return recons.reshape(act.shape).to(act.dtype)

        with self.model.hooks(fwd_hooks=[(self.hook_name, replace)]):
            if b.start is not None:
                return self.model(b.start, start_at_layer=self.layer)
            return self.model(b.tokens)

    @torch.no_grad()
    def __call__(self, bin_width: float | None) -> float:
        sae = self.sae
        total, count = 0.0, 0
        for b in self.batches:
            vals = b.vals if bin_width is None else dequantize(
                quantize(b.vals, bin_width), bin_width, b.vals.dtype)
            recons = csr_decode(b.cols, b.offsets, vals, sae.W_dec, sae.b_dec)
            logits = self._spliced_logits(b, recons)
            logp = logits.double().log_softmax(-1)
            if self.kind == "ce":
                nll = -logp[:, :-1].gather(-1, b.tokens[:, 1:, None].to(logp.device))
                total += float(nll.sum())
                count += nll.numel()
            else:
                assert b.clean_logp is not None
                p_log = b.clean_logp.double()
                kl = (p_log.exp() * (p_log - logp)).sum(-1)
                total += float(kl.sum())
                count += kl.numel()
        return total / count


def build_ce_loss(*, sae: SAE, model: Any, hook_name: str, tokens: Tensor, **kw: Any) -> LossFn:
    """``w -> mean next-token CE (nats)`` of ``model`` with ``sae`` spliced at ``hook_name``,
    latents quantised at bin width ``w`` (``None``: unquantised)."""
    return SplicedLoss("ce", sae=sae, model=model, hook_name=hook_name, tokens=tokens, **kw)


def build_kl_loss(*, sae: SAE, model: Any, hook_name: str, tokens: Tensor, **kw: Any) -> LossFn:
    """``w -> mean KL(clean ‖ spliced)`` (nats per token) of ``model``'s next-token
    distributions with ``sae`` spliced at ``hook_name``, latents quantised at ``w``."""
    return SplicedLoss("kl", sae=sae, model=model, hook_name=hook_name, tokens=tokens, **kw)


register_model_loss("ce", build_ce_loss)
register_model_loss("kl", build_kl_loss)
