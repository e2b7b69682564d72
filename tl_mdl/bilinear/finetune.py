"""Fine-tune a SiLU ``GatedMLP`` model into a bilinear one by annealing Swish_β to linear."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Int
from safetensors.torch import save_model
from torch import Tensor
from tqdm.auto import tqdm

from tl_mdl._tl import gated_mlp_parts, set_mlp_activation
from tl_mdl.bilinear.swap import BilinearSwap, _check_layers, _get_mlp, to_bilinear


class SwishBeta:
    """``Swish_β(x) = x · σ(β x)``: SiLU at ``β = 1``, the linear map ``x / 2`` at ``β = 0``.
    A plain callable (not a module), so setting it as ``mlp.act_fn`` leaves the state dict and
    ``hook_dict`` unchanged."""

    def __init__(self, beta: float = 1.0):
        self.beta = float(beta)

    def __call__(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.beta * x)


@dataclass
class AnnealResult:
    """``swap``: the :func:`to_bilinear` handle for the converted model (``restore()`` puts
    back the fine-tuned GatedMLPs with their original activation); ``history``: one dict per
    step (``step, beta, loss, ce, kl``); ``checkpoints``: files written."""

    swap: BilinearSwap
    history: list[dict] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)


def beta_schedule(step: int, steps: int, beta_start: float, anneal_frac: float) -> float:
    """Linear ramp ``β_start → 0`` over the first ``anneal_frac`` of ``steps``, then 0."""
    ramp = max(1, round(anneal_frac * steps))
    return beta_start * max(0.0, 1.0 - (step + 1) / ramp)


def anneal_to_bilinear(
    model: Any,
    tokens: Int[Tensor, "n_seq pos"],
    steps: int,
    *,
    layers: int | Iterable[int] | None = None,
    lr: float = 1e-4,
    batch_size: int = 8,
    beta_start: float = 1.0,
    anneal_frac: float = 0.75,
    kl_coef: float = 0.0,
    ce_coef: float = 1.0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> AnnealResult:
    """Fine-tune ``model`` (a TL 3.9 ``HookedTransformer`` or a ``TransformerBridge``) in place
    while annealing each chosen gated MLP's gate activation
    from ``Swish_β`` (``β = beta_start``, SiLU at 1) to ``Swish_0(x) = x/2``, then swap in exact
    :class:`BilinearMLP` copies (the ½ folded into ``W_gate``; see :func:`to_bilinear`).

    Loss per step: ``ce_coef · CE(next token) + kl_coef · KL(p_original ‖ p_model)``, where
    ``p_original`` comes from a frozen copy of the model taken before fine-tuning (only kept
    when ``kl_coef > 0``). β follows :func:`beta_schedule` (linear to 0 over ``anneal_frac``
    of ``steps``, then held at 0 so the last steps train the exactly bilinear model).
    Checkpoints (``model.safetensors`` + ``state.json`` with step and β) go to
    ``checkpoint_dir/step_{n}`` every ``checkpoint_every`` steps and at the end.
    """
    layer_ids = _check_layers(model, layers)
    for layer in layer_ids:
        mlp = _get_mlp(model, layer)
        if mlp is None or gated_mlp_parts(model.blocks[layer].mlp) is None:
            raise TypeError(
                f"blocks.{layer}.mlp is a {type(mlp).__name__}; anneal_to_bilinear needs a "
                "gated MLP (GatedMLP, cfg.gated_mlp=True, or a bridge's gated MLP); for a "
                "plain MLP use to_bilinear(init='random')"
            )
    if steps < 1:
        raise ValueError(f"steps={steps}: need at least one step to reach β = 0")
    if beta_schedule(steps - 1, steps, beta_start, anneal_frac) != 0.0:
        raise ValueError(
            f"anneal_frac={anneal_frac} does not bring β to 0 by the last of steps={steps}; "
            "use anneal_frac <= 1"
        )
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [n_seq, pos≥2], got {tuple(tokens.shape)}")
    teacher = None
    if kl_coef > 0:
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    acts = {layer: SwishBeta(beta_start) for layer in layer_ids}
    saved_act = {}
    try:
        for layer, act in acts.items():
            saved_act[layer] = set_mlp_activation(_get_mlp(model, layer), act)
    except BaseException:
        for layer, act_fn in saved_act.items():
            set_mlp_activation(_get_mlp(model, layer), act_fn)
        raise

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    result_history: list[dict] = []
    checkpoints: list[Path] = []
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    device = next(model.parameters()).device

    def checkpoint(step: int, beta: float) -> None:
        if ckpt_dir is None:
            return
        path = ckpt_dir / f"step_{step}"
        path.mkdir(parents=True, exist_ok=True)
        save_model(model, str(path / "model.safetensors"))
        (path / "state.json").write_text(json.dumps({"step": step, "beta": beta}))
        checkpoints.append(path)

    model.train()
    try:
        bar = tqdm(range(steps), desc="anneal to bilinear", disable=not progress)
        beta = beta_start
        for step in bar:
            beta = beta_schedule(step, steps, beta_start, anneal_frac)
            for act in acts.values():
                act.beta = beta
            idx = torch.randint(0, tokens.shape[0], (batch_size,), generator=gen)
            batch = tokens[idx].to(device)
            logits = model(batch, return_type="logits")
            logp = logits[:, :-1].log_softmax(-1)
            ce = -logp.gather(-1, batch[:, 1:, None]).mean()
            loss = ce_coef * ce
            kl = torch.zeros(())
            if teacher is not None:
                with torch.no_grad():
                    logq = teacher(batch, return_type="logits")[:, :-1].log_softmax(-1)
                kl = F.kl_div(logp, logq, log_target=True, reduction="none").sum(-1).mean()
                loss = loss + kl_coef * kl
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            row = {"step": step, "beta": beta, "loss": loss.item(), "ce": ce.item(),
                   "kl": kl.item()}
            result_history.append(row)
            bar.set_postfix(beta=f"{beta:.3f}", ce=f"{row['ce']:.3f}", kl=f"{row['kl']:.3f}")
            if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
                checkpoint(step + 1, beta)
        for act in acts.values():
            act.beta = 0.0
    finally:
        model.eval()
        for layer, act_fn in saved_act.items():
            set_mlp_activation(_get_mlp(model, layer), act_fn)
    # At β = 0 the gate is x/2: fold the ½ into W_gate of the exact bilinear copy.
    swap = to_bilinear(model, layer_ids, init="copy", _gate_scale=0.5)
    checkpoint(steps, 0.0)
    return AnnealResult(swap, result_history, checkpoints)
