"""SAE metrics in one place (FVU / explained variance, L0, dead / dense latents, CE loss
recovered, KL) and :func:`evaluate`, which computes them all for SAEs spliced into a model;
:mod:`tl_mdl.metrics.shapes` reads directions as images (feature shapes, smoothness)."""

from tl_mdl.metrics.core import (
    ce_loss,
    ce_loss_recovered,
    dead_fraction,
    dense_fraction,
    explained_variance,
    feature_frequency,
    fvu,
    kl_divergence,
    l0,
)
from tl_mdl.metrics.evaluate import evaluate
from tl_mdl.metrics.shapes import (
    FeatureShapes,
    feature_shapes,
    high_frequency_fraction,
    total_variation_ratio,
)

__all__ = [
    "fvu", "explained_variance", "l0", "feature_frequency", "dead_fraction", "dense_fraction",
    "ce_loss", "ce_loss_recovered", "kl_divergence", "evaluate",
    "FeatureShapes", "feature_shapes", "high_frequency_fraction", "total_variation_ratio",
]
