"""Bilinear MLPs for TransformerLens: the layer, swap/restore, weight-based decomposition
(interaction matrices, eigendecomposition, output SVD), eigen-truncation ablations, and
fine-tuning a SiLU GatedMLP into a bilinear layer."""

from tl_mdl.bilinear.ablate import EigenAblation, TruncationCurve, ablate_eigen, truncation_curve
from tl_mdl.bilinear.decompose import (
    Eigen,
    OutputSVD,
    eigen_expansion,
    eigendecompose,
    folded_weights,
    interaction_matrix,
    iter_eigendecompose,
    output_svd,
)
from tl_mdl.bilinear.finetune import AnnealResult, SwishBeta, anneal_to_bilinear
from tl_mdl.bilinear.mlp import BilinearMLP
from tl_mdl.bilinear.swap import (
    BilinearSwap,
    bilinear_from_mlp,
    bilinear_transformer,
    to_bilinear,
)

__all__ = [
    "AnnealResult",
    "BilinearMLP",
    "BilinearSwap",
    "Eigen",
    "EigenAblation",
    "OutputSVD",
    "SwishBeta",
    "TruncationCurve",
    "ablate_eigen",
    "anneal_to_bilinear",
    "bilinear_from_mlp",
    "bilinear_transformer",
    "eigen_expansion",
    "eigendecompose",
    "folded_weights",
    "interaction_matrix",
    "iter_eigendecompose",
    "output_svd",
    "to_bilinear",
    "truncation_curve",
]
