"""Reconstruction losses for the precision search.

``mdl`` is pure math over codes and tensors. A loss reaches the precision search as a
:data:`LossFn`: ``loss_fn(bin_width)`` returns the loss when the SAE's latents are quantised
at ``bin_width`` (``None`` = unquantised latents). Model-based losses (CE / KL with the SAE
spliced into a model) are built by ``tl_mdl.hooks`` and registered here by name with
:func:`register_model_loss`; this module never imports a model. ``tl_mdl.description_length``
imports ``tl_mdl.hooks`` when a loss is named that is not registered yet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: ``loss_fn(bin_width or None) -> loss`` (FVU, or nats for CE / KL).
LossFn = Callable[[float | None], float]
#: ``builder(*, sae, model, hook_name, tokens, **kwargs) -> LossFn``.
ModelLossBuilder = Callable[..., LossFn]

MODEL_LOSSES: dict[str, ModelLossBuilder] = {}


def register_model_loss(name: str, builder: ModelLossBuilder) -> None:
    """Register a model-based loss (e.g. ``"kl"``, ``"ce"``) for ``description_length``."""
    MODEL_LOSSES[name] = builder


def build_model_loss(name: str, **kwargs: Any) -> LossFn:
    """Build the registered model-based loss ``name``."""
    if name not in MODEL_LOSSES:
        raise ValueError(
            f"loss={name!r} is unknown; use 'fvu', a callable bin_width -> loss, or one of the "
            f"model-based losses {sorted(MODEL_LOSSES)} (these need model=, hook_name=, tokens=); "
            "'ce' and 'kl' come with tl_mdl.hooks: call tl_mdl.description_length, which imports "
            "it, or import tl_mdl.hooks first"
        )
    return MODEL_LOSSES[name](**kwargs)
