"""Description length: quantisation, the exact DL of an integer code, precision search,
and MDL selection. Pure math over codes and tensors (never imports a model)."""

from tl_mdl.mdl.description_length import (
    DEFAULT_TOLERANCE,
    DLReport,
    description_length,
    encode_all,
)
from tl_mdl.mdl.losses import LossFn, build_model_loss, register_model_loss
from tl_mdl.mdl.precision import SearchResult, grid_width, search_bin_width
from tl_mdl.mdl.quantize import (
    FeatureCode,
    binary_entropy,
    dequantize,
    feature_code_stats,
    fvu,
    quantize,
    total_variance,
)

__all__ = [
    "DEFAULT_TOLERANCE",
    "DLReport",
    "description_length",
    "encode_all",
    "LossFn",
    "build_model_loss",
    "register_model_loss",
    "SearchResult",
    "grid_width",
    "search_bin_width",
    "FeatureCode",
    "binary_entropy",
    "dequantize",
    "feature_code_stats",
    "fvu",
    "latent_description_length",
    "quantize",
    "total_variance",
    "NoSAEMeetsThreshold",
    "select_mdl",
    "select_mdl_row",
]

from tl_mdl.mdl.hierarchical import latent_description_length  # noqa: E402
from tl_mdl.mdl.select import (  # noqa: E402
    NoSAEMeetsThreshold,
    frontier_bits_at,
    pareto_frontier,
    plot_frontiers,
    select_mdl,
    select_mdl_row,
)
