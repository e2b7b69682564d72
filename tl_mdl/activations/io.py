"""Activation files: safetensors with one tensor ``activations`` ``[N, d_in]`` per file, a
folder of such shards, or a list of either."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tl_mdl._io import atomic_write

ACTIVATIONS_KEY = "activations"


def save_activations(activations: torch.Tensor, path: str | os.PathLike) -> Path:
    """Save ``[N, d_in]`` activations as safetensors with one tensor named ``activations``."""
    if activations.ndim != 2:
        raise ValueError(f"activations must be [N, d_in], got shape {tuple(activations.shape)}")
    path = Path(path)
    t = {ACTIVATIONS_KEY: activations.detach().contiguous().cpu()}
    atomic_write(path, lambda p: save_file(t, str(p)))
    return path


def resolve_shards(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Safetensors files from a file, a folder of ``*.safetensors`` shards, or a list of
    either (folders expanded in sorted order)."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.safetensors"))
            if not found:
                raise FileNotFoundError(f"no *.safetensors activation shards in folder {p}")
            files.extend(found)
        else:
            files.append(p)
    if not files:
        raise ValueError(
            "no activation files given; pass safetensors files or a folder of them"
        )
    return files


def load_activations(paths: str | os.PathLike | list) -> torch.Tensor:
    """Load one or several safetensors shards (each with an ``activations`` tensor
    ``[N_i, d_in]``) or a folder of ``*.safetensors`` shards, concatenated along N."""
    files = resolve_shards(paths)
    parts = []
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"activation file {f} does not exist")
        try:
            d = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{f} is not a readable safetensors file ({e})") from e
        if ACTIVATIONS_KEY not in d:
            raise ValueError(
                f"{f} has tensors {sorted(d)} but no {ACTIVATIONS_KEY!r}; save activations with "
                "tl_mdl.save_activations"
            )
        a = d[ACTIVATIONS_KEY]
        if a.ndim != 2:
            raise ValueError(f"{f}: 'activations' must be [N, d_in], got {tuple(a.shape)}")
        parts.append(a)
    if len({a.shape[1] for a in parts}) > 1:
        raise ValueError(f"activation shards disagree on d_in: {[a.shape[1] for a in parts]}")
    return torch.cat(parts) if len(parts) > 1 else parts[0]
