"""Hook adapters: attach SAEs to any TransformerLens hook point, harvest activations, and
the model-based losses (``"ce"``, ``"kl"``) for the description-length precision search.

Importing this package registers ``"ce"`` and ``"kl"`` with :mod:`tl_mdl.mdl.losses`.
"""

from tl_mdl.hooks.attach import SAE_HOOK_NAMES, SAEHandle, attach_sae
from tl_mdl.hooks.losses import SplicedLoss, build_ce_loss, build_kl_loss
from tl_mdl.hooks.store import ActivationStore, harvest_batch

__all__ = [
    "attach_sae", "SAEHandle", "SAE_HOOK_NAMES", "ActivationStore", "harvest_batch",
    "SplicedLoss", "build_ce_loss", "build_kl_loss",
]
