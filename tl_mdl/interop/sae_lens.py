"""SAELens interop: lossless conversion both ways, and an MDL training architecture for
SAELens's own trainer.

Conversion (``from_sae_lens`` / ``to_sae_lens``) covers the ``standard`` (ReLU), ``topk`` and
``jumprelu`` architectures; weights are copied, so decoder norms, ``b_dec``,
``apply_b_dec_to_input``, dtype, device and hook metadata survive both ways. Exact
equivalences used:

* SAELens TopK with ``rescale_acts_by_decoder_norm`` selects on ``pre · ‖W_dec_i‖`` and decodes
  ``f / ‖W_dec_i‖``; folding the norms into the encoder (``W_enc·n``, ``b_enc·n``,
  ``W_dec / n``) gives the same latents and output with a plain TopK.
* SAELens JumpReLU is ``relu(pre) · [pre > θ]``, tl_mdl's ``pre · [pre > θ]``; they agree with
  ``θ' = max(θ, 0)``. A tl_mdl threshold below 0 has no SAELens equivalent (error).
* ``normalize_activations``: ``"none"``; ``"expected_average_only_in"`` and
  ``"covariance_whitening"`` are identities inside an SAELens SAE at inference (the
  statistics are folded into the weights after training), so the weights are copied as they
  are; pass ``norm_scaling_factor=`` to fold a known scaling factor (as SAELens's
  ``fold_activation_norm_scaling_factor``). ``"layer_norm"`` / ``"constant_norm_rescale"``
  depend on each input and cannot be folded (error).
* ``reshape_activations="hook_z"``: tl_mdl SAEs take flattened heads; ``attach_sae`` flattens
  ``hook_z`` itself, and ``to_sae_lens`` sets it back for ``*hook_z`` hooks.

``register_sae_lens_architectures()`` (run on import) registers ``"tl_mdl_mdl"``: a SAELens
training SAE (ReLU, or TopK with ``k``) whose auxiliary loss is tl_mdl's differentiable
description-length surrogate :func:`tl_mdl.training.objectives.mdl_penalty`. It saves as a
plain ``standard``/``topk`` SAE, which loads in SAELens and in ``tl_mdl.SAE.load``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tl_mdl.mdl import DEFAULT_TOLERANCE
from tl_mdl.sae import SAE, SAEConfig
from tl_mdl.sae.config import dtype_to_str, sae_lens_reshape

try:  # SAELens is optional at import time; the functions below raise if it is missing.
    import sae_lens
    from sae_lens.saes.sae import (
        TrainCoefficientConfig,
        TrainingSAE,
        TrainingSAEConfig,
        TrainStepInput,
    )
    from sae_lens.saes.standard_sae import StandardSAEConfig
    from sae_lens.saes.topk_sae import TopK, TopKSAEConfig

    HAVE_SAE_LENS = True
except ImportError:  # the optional extra is not installed
    HAVE_SAE_LENS = False

#: What a user without SAELens is told (SAELens pins transformer-lens<4).
SAE_LENS_MISSING = (
    "sae_lens is not installed (or not importable with this TransformerLens); SAELens "
    "interop needs the optional extra: pip install 'tl_mdl[sae-lens]' (SAELens requires "
    "transformer-lens<4). Everything else in tl_mdl works without it"
)
MDL_ARCHITECTURE = "tl_mdl_mdl"
_RUNTIME_IDENTITY_NORMS = ("none", "expected_average_only_in", "covariance_whitening")
_SAELENS_META_DROP = ("sae_lens_version", "sae_lens_training_version")


def _need_sae_lens() -> None:
    if not HAVE_SAE_LENS:
        raise ImportError(SAE_LENS_MISSING)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except TypeError:
            v = repr(v)
        out[k] = v
    return out


@torch.no_grad()
def from_sae_lens(sae: Any, *, norm_scaling_factor: float | None = None) -> SAE:
    """Convert a ``sae_lens.SAE`` (standard / topk / jumprelu) into an equivalent
    ``tl_mdl.SAE``: same latents and reconstructions on every input.

    Args:
        sae: the SAELens SAE (inference or training class).
        norm_scaling_factor: for ``normalize_activations="expected_average_only_in"``, a
            scaling factor to fold into the weights (``W_enc·s``, ``W_dec/s``, ``b_dec/s``).
    """
    _need_sae_lens()
    if not isinstance(sae, sae_lens.SAE):
        raise TypeError(f"from_sae_lens needs a sae_lens.SAE, got {type(sae).__name__}")
    cfg = sae.cfg
    arch = cfg.architecture()
    norm = cfg.normalize_activations
    if arch not in ("standard", "topk", "jumprelu"):
        raise ValueError(
            f"SAELens architecture {arch!r} has no tl_mdl equivalent; supported: "
            "['standard', 'topk', 'jumprelu']"
        )
    if norm not in _RUNTIME_IDENTITY_NORMS:
        raise ValueError(
            f"normalize_activations={norm!r} depends on each input and cannot be folded into "
            f"tl_mdl.SAE weights; supported: {list(_RUNTIME_IDENTITY_NORMS)}"
        )
    if norm_scaling_factor is not None and norm != "expected_average_only_in":
        raise ValueError(
            f"norm_scaling_factor applies to normalize_activations='expected_average_only_in', "
            f"this SAE has {norm!r}"
        )
    W_enc, W_dec = sae.W_enc.detach().clone(), sae.W_dec.detach().clone()
    b_enc, b_dec = sae.b_enc.detach().clone(), sae.b_dec.detach().clone()
    threshold = None
    k = None
    if arch == "standard":
        activation = "relu"
    elif arch == "topk":
        activation, k = "topk", int(cfg.k)
        if getattr(cfg, "rescale_acts_by_decoder_norm", False):
            n = W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    else:  # jumprelu
        activation = "jumprelu"
        threshold = sae.threshold.detach().clone().clamp_min(0)
    if norm_scaling_factor is not None:
        s = float(norm_scaling_factor)
        W_enc, W_dec, b_dec = W_enc * s, W_dec / s, b_dec / s
    meta = {k_: v for k_, v in cfg.metadata.to_dict().items() if k_ not in _SAELENS_META_DROP}
    hook_name = meta.pop("hook_name", None)
    meta = {k_: v for k_, v in meta.items() if v is not None}
    if norm != "none" and norm_scaling_factor is None:
        meta["sae_lens_normalize_activations"] = norm
    new_cfg = SAEConfig(
        d_in=cfg.d_in, d_sae=cfg.d_sae, activation=activation, k=k,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input, hook_name=hook_name,
        dtype=dtype_to_str(W_enc.dtype), device=str(W_enc.device), metadata=_jsonable(meta),
    )
    reshape = getattr(cfg, "reshape_activations", "none") or "none"
    if reshape != sae_lens_reshape(new_cfg):  # e.g. per head at hook_z: kept for to_sae_lens
        new_cfg.metadata["reshape_activations"] = reshape
    out = SAE(new_cfg)
    out.W_enc.copy_(W_enc)
    out.b_enc.copy_(b_enc)
    out.W_dec.copy_(W_dec)
    out.b_dec.copy_(b_dec)
    if threshold is not None:
        out.threshold.copy_(threshold)
    return out


@torch.no_grad()
def to_sae_lens(sae: SAE) -> Any:
    """Convert a ``tl_mdl.SAE`` into the matching SAELens inference SAE
    (``StandardSAE`` / ``TopKSAE`` / ``JumpReLUSAE``) with the same weights and metadata."""
    _need_sae_lens()
    if not isinstance(sae, SAE):
        raise TypeError(f"to_sae_lens needs a tl_mdl.SAE, got {type(sae).__name__}")
    c = sae.cfg
    if c.activation == "jumprelu" and bool((sae.threshold < 0).any()):
        bad = int((sae.threshold < 0).sum())
        raise ValueError(
            f"{bad} JumpReLU thresholds are < 0; SAELens computes relu(pre)·[pre > θ], which "
            "cannot represent negative latents. Clamp with sae.threshold.data.clamp_(min=0) "
            "if that is acceptable"
        )
    meta = dict(copy.deepcopy(c.metadata))
    meta.pop("sae_lens_normalize_activations", None)
    meta.pop("reshape_activations", None)
    if c.hook_name is not None:
        meta["hook_name"] = c.hook_name
    d = {
        "architecture": c.architecture,
        "d_in": c.d_in, "d_sae": c.d_sae, "dtype": c.dtype, "device": c.device,
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": sae_lens_reshape(c),
        "metadata": meta,
    }
    if c.activation == "topk":
        d["k"] = c.k
        d["rescale_acts_by_decoder_norm"] = False
    out = sae_lens.SAE.from_dict(d)
    state = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    out.load_state_dict(state)
    return out.to(device=c.device, dtype=c.torch_dtype)


# ----------------------------------------------------- MDL training architecture
if HAVE_SAE_LENS:

    @dataclass
    class MDLTrainingSAEConfig(TrainingSAEConfig):
        """SAELens training config for the MDL objective:
        ``loss = Σ_d (x − x̂)² + mdl_coefficient · DL_surrogate(f)`` (bits per input,
        :func:`tl_mdl.training.objectives.mdl_penalty`). ``k`` set = TopK, else ReLU."""

        mdl_coefficient: float = 1e-3
        mdl_warm_up_steps: int = 0
        mdl_tolerance: float = DEFAULT_TOLERANCE
        k: int | None = None
        rescale_acts_by_decoder_norm: bool = False

        @classmethod
        def architecture(cls) -> str:
            return MDL_ARCHITECTURE

        def __post_init__(self) -> None:
            if self.rescale_acts_by_decoder_norm:
                raise ValueError(
                    "rescale_acts_by_decoder_norm=True is not supported by tl_mdl_mdl; "
                    "leave it False"
                )
            super().__post_init__()

        def get_inference_config_class(self) -> type:
            return StandardSAEConfig if self.k is None else TopKSAEConfig

    class MDLTrainingSAE(TrainingSAE[MDLTrainingSAEConfig]):
        """A ReLU/TopK SAE trained by SAELens's trainer on ``MSE + λ · DL surrogate``."""

        b_enc: nn.Parameter

        def initialize_weights(self) -> None:
            super().initialize_weights()
            self.b_enc = nn.Parameter(
                torch.zeros(self.cfg.d_sae, dtype=self.dtype, device=self.device)
            )

        def get_activation_fn(self):  # type: ignore[override]
            if self.cfg.k is not None:
                return TopK(self.cfg.k)
            return nn.ReLU()

        def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
            return {
                "mdl": TrainCoefficientConfig(
                    value=self.cfg.mdl_coefficient, warm_up_steps=self.cfg.mdl_warm_up_steps
                )
            }

        def encode_with_hidden_pre(self, x: Tensor) -> tuple[Tensor, Tensor]:
            sae_in = self.process_sae_in(x)
            hidden_pre = self.hook_sae_acts_pre(sae_in @ self.W_enc + self.b_enc)
            return self.hook_sae_acts_post(self.activation_fn(hidden_pre)), hidden_pre

        def calculate_aux_loss(
            self, step_input: TrainStepInput, feature_acts: Tensor, hidden_pre: Tensor,
            sae_out: Tensor,
        ) -> dict[str, Tensor]:
            from tl_mdl.training.objectives import mdl_penalty

            x = step_input.sae_in.reshape(-1, self.cfg.d_in)
            f = feature_acts.reshape(-1, self.cfg.d_sae)
            pen = mdl_penalty(f, self, x, tolerance=self.cfg.mdl_tolerance)  # type: ignore[arg-type]
            return {"mdl_loss": step_input.coefficients["mdl"] * pen}


def register_sae_lens_architectures() -> bool:
    """Register ``"tl_mdl_mdl"`` with SAELens's training registry (idempotent). Returns
    whether SAELens is available."""
    if not HAVE_SAE_LENS:
        return False
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    if MDL_ARCHITECTURE not in SAE_TRAINING_CLASS_REGISTRY:
        sae_lens.register_sae_training_class(
            MDL_ARCHITECTURE, MDLTrainingSAE, MDLTrainingSAEConfig
        )
    return True


register_sae_lens_architectures()
