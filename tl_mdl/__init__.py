"""tl_mdl: MDL-scored sparse autoencoders and bilinear MLPs for TransformerLens."""

from tl_mdl._io import load_activations, save_activations
from tl_mdl.sae import SAE, SAEConfig, identity_sae, register_activation

# -- exports added per subsystem below (keep one block per subsystem) --

__version__ = "0.1.0"
