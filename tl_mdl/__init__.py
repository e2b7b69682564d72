"""tl_mdl: MDL-scored sparse autoencoders and bilinear MLPs for TransformerLens."""

from tl_mdl import codec
from tl_mdl._io import load_activations, save_activations
from tl_mdl.mdl import (
    DLReport,
    description_length,
    latent_description_length,
    quantize,
    select_mdl,
)
from tl_mdl.sae import SAE, SAEConfig, identity_sae, register_activation
from tl_mdl.training import SweepTable, sweep, train_sae

# -- exports added per subsystem below (keep one block per subsystem) --

# isort: split
# hooks / metrics / interop
from tl_mdl.hooks import ActivationStore, SAEHandle, attach_sae
from tl_mdl.interop import from_sae_lens, to_sae_lens
from tl_mdl.metrics import evaluate, explained_variance, fvu

# isort: split
# bilinear
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

# isort: split
# scale: streaming shards (data-parallel helpers live in tl_mdl.training.distributed)
from tl_mdl.training import ShardedActivations

# isort: split
# hierarchical MDL-SAEs
from tl_mdl.mdl.hierarchical import (
    feature_splitting,
    hierarchical_description_length,
    hierarchical_dl_report,
)
from tl_mdl.sae import HierarchicalSAE, HierarchicalSAEConfig
from tl_mdl.training.hierarchical import sweep_hierarchical, train_hierarchical_sae

__version__ = "0.1.0"
