"""Old import path of :mod:`tl_mdl.activations.store` (kept so existing imports work)."""

from tl_mdl.activations.store import (  # noqa: F401
    META_FILENAME,
    ActivationStore,
    as_token_windows,
    harvest_batch,
    stop_layer_for,
)
