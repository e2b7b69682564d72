"""Hook adapters: attach SAEs to any TransformerLens hook point, harvest activations, and
the model-based losses (``"ce"``, ``"kl"``) for the description-length precision search."""

from tl_mdl.hooks.attach import SAE_HOOK_NAMES, SAEHandle, attach_sae

__all__ = ["attach_sae", "SAEHandle", "SAE_HOOK_NAMES"]
