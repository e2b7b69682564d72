"""Sparse autoencoders (ReLU, TopK, JumpReLU) with SAELens-compatible save/load."""

from tl_mdl.sae.config import SAEConfig
from tl_mdl.sae.hierarchical import HierarchicalSAE, HierarchicalSAEConfig
from tl_mdl.sae.model import ACTIVATIONS, SAE, identity_sae, register_activation

__all__ = [
    "SAE",
    "SAEConfig",
    "ACTIVATIONS",
    "identity_sae",
    "register_activation",
    "HierarchicalSAE",
    "HierarchicalSAEConfig",
]
