"""Activation data: safetensors files (``io``), streaming from shards on disk (``shards``) and
harvesting from a model's hook points (``store``).

``io`` and ``shards`` need only torch and safetensors; ``ActivationStore`` and
``harvest_batch`` run a TransformerLens model, so they load on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tl_mdl.activations.io import (
    ACTIVATIONS_KEY,
    load_activations,
    resolve_shards,
    save_activations,
)
from tl_mdl.activations.shards import ShardedActivations, read_shard_header

_LAZY = {"ActivationStore": "tl_mdl.activations.store",
         "harvest_batch": "tl_mdl.activations.harvest"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tl_mdl.activations' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "ACTIVATIONS_KEY", "load_activations", "resolve_shards", "save_activations",
    "ShardedActivations", "read_shard_header", *_LAZY,
]

if TYPE_CHECKING:
    from tl_mdl.activations.harvest import harvest_batch
    from tl_mdl.activations.store import ActivationStore
