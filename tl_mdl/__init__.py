"""tl_mdl: MDL-scored sparse autoencoders and bilinear MLPs for TransformerLens.

The SAE / description-length / codec / training core is imported eagerly (it needs only
torch). Names that need TransformerLens or SAELens (hooks, metrics, interop, bilinear,
models) load on first use, so ``import tl_mdl`` and ``tl-mdl --help`` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tl_mdl import codec
from tl_mdl.activations.io import load_activations, save_activations
from tl_mdl.mdl import DLReport, latent_description_length, quantize, select_mdl
from tl_mdl.mdl.hierarchical import feature_splitting, hierarchical_description_length
from tl_mdl.sae import (
    SAE,
    HierarchicalSAE,
    HierarchicalSAEConfig,
    SAEConfig,
    identity_sae,
    register_activation,
)
from tl_mdl.scoring import description_length, hierarchical_dl_report
from tl_mdl.training import ShardedActivations, SweepTable, sweep, train_sae
from tl_mdl.training.hierarchical import sweep_hierarchical, train_hierarchical_sae

__version__ = "0.1.0"

#: name -> module, imported on first attribute access (PEP 562)
_LAZY = {
    # hooks / metrics / interop
    "ActivationStore": "tl_mdl.activations",
    "SAEHandle": "tl_mdl.hooks",
    "attach_sae": "tl_mdl.hooks",
    "from_sae_lens": "tl_mdl.interop",
    "to_sae_lens": "tl_mdl.interop",
    "evaluate": "tl_mdl.metrics",
    "explained_variance": "tl_mdl.metrics",
    "fvu": "tl_mdl.metrics",
    # bilinear
    **{
        name: "tl_mdl.bilinear"
        for name in (
            "BilinearMLP", "BilinearSwap", "Eigen", "EigenAblation", "OutputSVD",
            "TruncationCurve", "ablate_eigen", "anneal_to_bilinear", "bilinear_transformer",
            "eigen_expansion", "eigendecompose", "interaction_matrix", "iter_eigendecompose",
            "output_svd", "to_bilinear", "truncation_curve",
        )
    },
    # models
    "save_model": "tl_mdl.models",
    "load_model": "tl_mdl.models",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tl_mdl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = sorted(
    {
        "codec", "load_activations", "save_activations", "DLReport", "description_length",
        "latent_description_length", "quantize", "select_mdl", "feature_splitting",
        "hierarchical_description_length", "hierarchical_dl_report", "SAE",
        "HierarchicalSAE", "HierarchicalSAEConfig", "SAEConfig", "identity_sae",
        "register_activation", "ShardedActivations", "SweepTable", "sweep", "train_sae",
        "sweep_hierarchical", "train_hierarchical_sae", *_LAZY,
    }
)

if TYPE_CHECKING:  # static analysers see the lazy names
    from tl_mdl.activations.store import ActivationStore
    from tl_mdl.bilinear import (
        BilinearMLP,
        BilinearSwap,
        Eigen,
        EigenAblation,
        OutputSVD,
        TruncationCurve,
        ablate_eigen,
        anneal_to_bilinear,
        bilinear_transformer,
        eigen_expansion,
        eigendecompose,
        interaction_matrix,
        iter_eigendecompose,
        output_svd,
        to_bilinear,
        truncation_curve,
    )
    from tl_mdl.hooks import SAEHandle, attach_sae
    from tl_mdl.interop import from_sae_lens, to_sae_lens
    from tl_mdl.metrics import evaluate, explained_variance, fvu
    from tl_mdl.models import load_model, save_model
