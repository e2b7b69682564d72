"""``evaluate(model, saes, tokens)``: the standard SAE evaluation, one dict per SAE."""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from tl_mdl._tl import named_hooks
from tl_mdl.hooks import attach_sae
from tl_mdl.hooks.losses import check_tokens
from tl_mdl.hooks.names import (
    check_hook_name,
    check_sae_fits,
    flatten_heads,
    is_sae_lens_sae,
)
from tl_mdl.metrics.core import (
    ce_loss_recovered,
    dead_fraction,
    dense_fraction,
    explained_variance,
    fvu,
    l0,
)
from tl_mdl.sae import SAE


def _hook_of(sae: Any) -> str | None:
    if isinstance(sae, SAE):
        return sae.cfg.hook_name
    return getattr(sae.cfg.metadata, "hook_name", None)


def resolve_saes(saes: Any) -> dict[str, SAE]:
    """``SAE`` / list of SAEs (hook from ``cfg.hook_name``) / ``{hook_name: SAE}`` ->
    ``{hook_name: tl_mdl.SAE}`` (SAELens SAEs converted losslessly)."""
    if isinstance(saes, dict):
        items = list(saes.items())
    else:
        seq = [saes] if (isinstance(saes, SAE) or is_sae_lens_sae(saes)) else list(saes)
        items = []
        for s in seq:
            hook = _hook_of(s)
            if hook is None:
                raise ValueError(
                    "an SAE has no hook name in its config; pass saes as {hook_name: sae}"
                )
            items.append((hook, s))
    out: dict[str, SAE] = {}
    for hook, s in items:
        if hook in out:
            raise ValueError(f"two SAEs for hook {hook!r}; evaluate one SAE per hook per call")
        if is_sae_lens_sae(s):
            from tl_mdl.interop import from_sae_lens

            s = from_sae_lens(s)
        if not isinstance(s, SAE):
            raise TypeError(f"expected a tl_mdl.SAE or sae_lens.SAE, got {type(s).__name__}")
        out[hook] = s
    if not out:
        raise ValueError("no SAEs given")
    return out


def _nll_sum(logits: Tensor, tokens: Tensor) -> tuple[float, int]:
    logp = logits[:, :-1].double().log_softmax(-1)
    nll = -logp.gather(-1, tokens[:, 1:, None].to(logp.device))
    return float(nll.sum()), nll.numel()


def _kl_sum(clean_logp: Tensor, logits: Tensor) -> tuple[float, int]:
    lq = logits.double().log_softmax(-1)
    kl = (clean_logp.exp() * (clean_logp - lq)).sum(-1)
    return float(kl.sum()), kl.numel()


@torch.no_grad()
def evaluate(
    model: Any,
    saes: Any,
    tokens: Int[Tensor, "batch pos"],
    *,
    batch_size: int = 16,
    dense_threshold: float = 0.1,
    description_length: bool = True,
    dl_kwargs: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate each SAE at its hook, spliced in alone.

    Args:
        model: a TL 3.9 ``HookedTransformer`` or a ``TransformerBridge`` (TL 3.9 or 4).
        saes: an SAE, a list of SAEs (hook from ``cfg.hook_name``), or ``{hook_name: SAE}``;
            ``tl_mdl.SAE`` or ``sae_lens.SAE``. Results are keyed by these hook names as
            given (on a bridge, an old-name alias stays the key).
        tokens: ``[batch, pos]`` token ids with ``pos <= model.cfg.n_ctx``.
        dense_threshold: a latent is *dense* when active on more than this fraction of tokens.
        description_length: also compute the DL (bits per token), precision chosen on the
            downstream KL (``tl_mdl.mdl.description_length(..., loss="kl")``).
        dl_kwargs: extra arguments for ``description_length`` (e.g. ``tolerance``).

    Returns:
        ``{hook_name: metrics}`` with ``fvu``, ``explained_variance`` (see
        :mod:`tl_mdl.metrics.core`), ``l0``, ``dead_fraction``, ``dense_fraction``,
        ``ce_loss_clean``, ``ce_loss_spliced``, ``ce_loss_zero_ablated``, ``ce_loss_recovered``,
        ``kl_clean_spliced`` (nats/token), ``dl_bits_per_token``, ``dl_bits_per_input``,
        ``dl_bin_width``, ``dl_l0``, ``n_tokens``. Reconstruction metrics, ``l0`` and
        ``dl_bits_per_input`` are per SAE input; for a per-head ``hook_z`` SAE (``d_in =
        d_head``) a token has ``n_heads`` inputs, and ``dl_bits_per_token`` is their sum.
    """
    tokens = check_tokens(model, tokens)
    resolved = resolve_saes(saes)
    for hook, sae in resolved.items():
        check_hook_name(model, hook)
        check_sae_fits(model, hook, sae)
    hooks = list(resolved)
    dev = getattr(model.cfg, "device", None) or "cpu"
    acts: dict[str, list[Tensor]] = {h: [] for h in hooks}
    sums = {h: {"ce_spliced": 0.0, "ce_zero": 0.0, "kl": 0.0} for h in hooks}
    ce_clean, n_ce, n_kl = 0.0, 0, 0

    got: dict[str, Tensor] = {}

    def zero(act: Tensor, hook: Any) -> Tensor:
        return torch.zeros_like(act)

    def grab(act: Tensor, name: str) -> None:
        got[name] = act

    for i in range(0, tokens.shape[0], batch_size):
        toks = tokens[i : i + batch_size].to(dev)
        got.clear()
        with named_hooks(model, [(h, grab) for h in hooks]):
            clean = model(toks)
        s, n = _nll_sum(clean, toks)
        ce_clean += s
        n_ce += n
        clean_logp = clean.double().log_softmax(-1)
        n_kl += clean.shape[0] * clean.shape[1]
        for h, sae in resolved.items():
            d_in = sae.cfg.d_in  # hook_z: heads flattened, or one head's d_head per row
            acts[h].append(flatten_heads(got[h], d_in, h).reshape(-1, d_in).cpu())
            with attach_sae(model, h, sae):
                spliced = model(toks)
            sums[h]["ce_spliced"] += _nll_sum(spliced, toks)[0]
            sums[h]["kl"] += _kl_sum(clean_logp, spliced)[0]
            with model.hooks(fwd_hooks=[(h, zero)]):
                sums[h]["ce_zero"] += _nll_sum(model(toks), toks)[0]

    results: dict[str, dict[str, float]] = {}
    for h, sae in resolved.items():
        x = torch.cat(acts[h])
        xs = x.to(sae.W_enc.device)
        latents = sae.encode(xs)
        x_hat = sae.decode(latents)
        c_clean = ce_clean / n_ce
        c_spliced = sums[h]["ce_spliced"] / n_ce
        c_zero = sums[h]["ce_zero"] / n_ce
        r: dict[str, float] = {
            "fvu": fvu(xs, x_hat),
            "explained_variance": explained_variance(xs, x_hat),
            "l0": l0(latents),
            "dead_fraction": dead_fraction(latents),
            "dense_fraction": dense_fraction(latents, dense_threshold),
            "ce_loss_clean": c_clean,
            "ce_loss_spliced": c_spliced,
            "ce_loss_zero_ablated": c_zero,
            "ce_loss_recovered": ce_loss_recovered(c_clean, c_spliced, c_zero),
            "kl_clean_spliced": sums[h]["kl"] / n_kl,
            "n_tokens": float(tokens.numel()),
        }
        rows_per_token = x.shape[0] // tokens.numel()  # n_heads for a per-head hook_z SAE
        if description_length:
            from tl_mdl.mdl import description_length as _dl

            rep = _dl(sae, x, loss="kl", model=model, hook_name=h, tokens=tokens,
                      **(dl_kwargs or {}))
            r["dl_bits_per_token"] = rep.bits_per_input * rows_per_token
            r["dl_bits_per_input"] = rep.bits_per_input
            r["dl_bin_width"] = rep.bin_width
            r["dl_l0"] = rep.l0
        results[h] = r
    return results
