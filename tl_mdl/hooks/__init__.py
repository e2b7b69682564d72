"""Hook adapters: attach SAEs to any TransformerLens hook point, and the model-based losses
(``"ce"``, ``"kl"``) for the description-length precision search.

Importing this package registers ``"ce"`` and ``"kl"`` with :mod:`tl_mdl.mdl.losses`.
``ActivationStore`` and ``harvest_batch`` live in :mod:`tl_mdl.activations.store`, which
stands on this package; they stay importable from here (loaded on first use).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tl_mdl.hooks.attach import SAE_HOOK_NAMES, SAEHandle, attach_sae
from tl_mdl.hooks.losses import SplicedLoss, build_ce_loss, build_kl_loss

_MOVED = {"ActivationStore", "harvest_batch"}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module 'tl_mdl.hooks' has no attribute {name!r}")
    return getattr(importlib.import_module("tl_mdl.activations.store"), name)


__all__ = [
    "attach_sae", "SAEHandle", "SAE_HOOK_NAMES", "ActivationStore", "harvest_batch",
    "SplicedLoss", "build_ce_loss", "build_kl_loss",
]

if TYPE_CHECKING:
    from tl_mdl.activations.store import ActivationStore, harvest_batch
