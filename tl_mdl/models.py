"""Save and load small TL 3.9 ``HookedTransformer``s (including bilinear ones) without pickle.

A model folder holds ``model_cfg.json`` (the ``HookedTransformerConfig`` fields plus
``"bilinear_layers"``: which blocks carry a :class:`~tl_mdl.bilinear.BilinearMLP`) and
``model.safetensors`` (the state dict).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tl_mdl._io import atomic_write, usable_device
from tl_mdl._tl import hooked_transformer, hooked_transformer_config, is_bridge
from tl_mdl.bilinear import BilinearMLP, to_bilinear

MODEL_CFG = "model_cfg.json"
MODEL_WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"


def _jsonable_cfg(cfg: Any) -> dict[str, Any]:
    out = {}
    for k, v in cfg.to_dict().items():
        if isinstance(v, torch.dtype):
            v = str(v).removeprefix("torch.")
        try:
            json.dumps(v)
        except TypeError:
            continue  # e.g. tokenizer objects: not part of the architecture
        out[k] = v
    return out


def save_model(model: Any, path: str | os.PathLike) -> Path:
    """Write ``model`` (a TL 3.9 ``HookedTransformer``) to folder ``path`` (atomically per
    file)."""
    if is_bridge(model):
        raise TypeError(
            "save_model writes HookedTransformers (config + weights); a TransformerBridge "
            "wraps a Hugging Face model: save that with model.original_model.save_pretrained"
            "(path)"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = _jsonable_cfg(model.cfg)
    cfg["bilinear_layers"] = [
        i for i, b in enumerate(model.blocks) if isinstance(getattr(b, "mlp", None), BilinearMLP)
    ]
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / MODEL_WEIGHTS, lambda p: save_file(state, str(p)))
    atomic_write(path / MODEL_CFG, lambda p: p.write_text(json.dumps(cfg, indent=2)))
    return path


def load_model(path: str | os.PathLike, *, device: str | None = None) -> Any:
    """Inverse of :func:`save_model`. A Hugging Face model folder (``config.json``, from
    ``save_pretrained``) loads instead as a ``TransformerBridge`` (TL 3.9 or 4), offline."""
    path = Path(path)
    if not (path / MODEL_CFG).is_file() and (path / HF_CONFIG).is_file():
        return load_hf_bridge(path, device=device)
    for f in (MODEL_CFG, MODEL_WEIGHTS):
        if not (path / f).is_file():
            raise FileNotFoundError(
                f"{path / f} is missing; a model folder (tl_mdl.save_model) needs {MODEL_CFG} "
                f"and {MODEL_WEIGHTS}"
            )
    try:
        cfg = json.loads((path / MODEL_CFG).read_text())
        state = load_file(str(path / MODEL_WEIGHTS))
    except (json.JSONDecodeError, SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"model folder {path} is corrupted ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(
            f"{path / MODEL_CFG} is not a valid model config: expected a JSON object, got "
            f"{type(cfg).__name__}"
        )
    bilinear_layers = cfg.pop("bilinear_layers", [])
    HookedTransformer, HookedTransformerConfig = hooked_transformer(), hooked_transformer_config()
    try:
        if "dtype" in cfg and isinstance(cfg["dtype"], str):
            cfg["dtype"] = getattr(torch, cfg["dtype"])
        if device is not None:
            cfg["device"] = device
        else:
            cfg["device"] = usable_device(cfg.get("device"), path)
        known = set(HookedTransformerConfig.__dataclass_fields__)
        cfg = {k: v for k, v in cfg.items() if k in known}
        for derived in ("n_params",):  # recomputed in __post_init__
            cfg.pop(derived, None)
        model = HookedTransformer(HookedTransformerConfig(**cfg))
        if bilinear_layers:
            to_bilinear(model, layers=bilinear_layers, init="random", seed=0)
    except (AssertionError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path / MODEL_CFG} is not a valid model config: {e}") from e
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path / MODEL_WEIGHTS} does not match {path / MODEL_CFG}: {e}") from e
    return model.to(device) if device is not None else model


def load_hf_bridge(path: str | os.PathLike, *, device: str | None = None) -> Any:
    """A local Hugging Face causal-LM folder wrapped in a ``TransformerBridge``, with no
    network access (``local_files_only``). A ``hidden_act="linear"`` gated MLP (e.g. Llama's)
    is a bilinear layer with both biases inside, ready for :func:`tl_mdl.eigendecompose`."""
    import transformers
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    path = Path(path)
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path} is not a loadable Hugging Face causal-LM folder: {e}") from e
    hf.eval()
    if device is not None:
        hf.to(device)
    arch = (getattr(hf.config, "architectures", None) or [type(hf).__name__])[0]
    return build_bridge_from_module(hf, architecture=arch, hf_config=hf.config)
