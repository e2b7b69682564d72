"""SAELens interop: ``from_sae_lens`` / ``to_sae_lens`` (lossless for standard, TopK and
JumpReLU SAEs) and the ``"tl_mdl_mdl"`` SAELens training architecture (MDL objective).

``sae_lens`` is imported on first use, so ``import tl_mdl`` stays light; import
``tl_mdl.interop.sae_lens`` to register ``"tl_mdl_mdl"`` with SAELens's trainer.
"""

from __future__ import annotations

from typing import Any

from tl_mdl.sae import SAE


def from_sae_lens(sae: Any, *, norm_scaling_factor: float | None = None) -> SAE:
    """``sae_lens.SAE`` -> equivalent ``tl_mdl.SAE`` (see :mod:`tl_mdl.interop.sae_lens`)."""
    from tl_mdl.interop.sae_lens import from_sae_lens as _from

    return _from(sae, norm_scaling_factor=norm_scaling_factor)


def to_sae_lens(sae: SAE) -> Any:
    """``tl_mdl.SAE`` -> equivalent SAELens ``StandardSAE`` / ``TopKSAE`` / ``JumpReLUSAE``."""
    from tl_mdl.interop.sae_lens import to_sae_lens as _to

    return _to(sae)


def register_sae_lens_architectures() -> bool:
    """Register the ``"tl_mdl_mdl"`` training architecture with SAELens (idempotent)."""
    from tl_mdl.interop.sae_lens import register_sae_lens_architectures as _reg

    return _reg()


__all__ = ["from_sae_lens", "to_sae_lens", "register_sae_lens_architectures"]
