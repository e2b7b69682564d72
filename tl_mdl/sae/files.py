"""The SAE folder format (SAELens's): ``cfg.json`` + ``sae_weights.safetensors``, written
atomically, with the config's hash in the weights' metadata so that a folder whose two
files come from different saves is detected on reading."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from tl_mdl._io import atomic_write, usable_device

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
#: safetensors metadata key holding the sha256 of the cfg.json saved with the weights
CFG_HASH_KEY = "tl_mdl_cfg_sha256"


def _unserialisable(value: Any, where: str) -> tuple[str, str] | None:
    """``(key path, type name)`` of the first value ``json`` cannot write, or None."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return f"{where}[{k!r}] (a key)", type(k).__name__
            bad = _unserialisable(v, f"{where}.{k}" if where else str(k))
            if bad is not None:
                return bad
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            bad = _unserialisable(v, f"{where}[{i}]")
            if bad is not None:
                return bad
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return None
    return where or "<root>", f"{type(value).__module__}.{type(value).__qualname__}"


def cfg_json_text(cfg: dict, path: Path | None = None) -> str:
    """The ``cfg.json`` text of ``cfg``; a value JSON cannot hold raises a ``TypeError``
    naming its key and type."""
    try:
        return json.dumps(cfg, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        bad = _unserialisable(cfg, "")
        what = f"cfg[{bad[0]!r}] is a {bad[1]}" if bad else str(e)
        where = f" to {path}" if path is not None else ""
        raise TypeError(
            f"cannot save the SAE{where}: {what}, which JSON cannot hold (nothing was "
            "written). Convert it to a plain Python value first (float(x), int(x), "
            "x.tolist(), str(x)), e.g. in cfg.metadata"
        ) from e


def cfg_hash(cfg_text: str) -> str:
    """sha256 of a ``cfg.json``'s content (canonical form: whitespace and key order do not
    count), stored with the weights so that a folder whose two files come from different
    saves is detected."""
    canonical = json.dumps(json.loads(cfg_text), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_sae_folder(path: str | os.PathLike, state: dict[str, Tensor], cfg: dict) -> Path:
    """Write ``sae_weights.safetensors`` (``state``) and ``cfg.json`` (``cfg``), each
    atomically. The config is serialised first (a value JSON cannot hold raises before any
    file is touched) and its hash stored in the weights' metadata, so that
    :func:`read_sae_folder` detects weights and config from different saves (a crash between
    the two writes)."""
    path = Path(path)
    cfg_text = cfg_json_text(cfg, path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    meta = {CFG_HASH_KEY: cfg_hash(cfg_text)}
    atomic_write(path / WEIGHTS_FILENAME, lambda p: save_file(tensors, str(p), metadata=meta))
    atomic_write(path / CFG_FILENAME, lambda p: Path(p).write_text(cfg_text))
    return path


def read_sae_folder(
    path: str | os.PathLike, *, device: str | None = None, dtype: str | None = None,
    written_by: str = "SAE.save",
) -> tuple[dict, dict[str, Tensor], Path]:
    """Read ``cfg.json`` and ``sae_weights.safetensors`` from an SAE folder, with clear
    errors for missing, corrupted or truncated files and for weights and config from
    different saves (checked when the weights carry the config's hash, as
    :func:`write_sae_folder` writes them; SAELens folders have none). Returns (cfg dict,
    tensors, weights path); ``device`` / ``dtype`` override the config's."""
    path = Path(path)
    cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} is missing; an SAE folder needs {CFG_FILENAME} and {WEIGHTS_FILENAME} "
                f"(as written by {written_by})"
            )
    try:
        cfg_text = cfg_path.read_text()
        cfg_dict = json.loads(cfg_text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); the file is corrupted") from e
    if not isinstance(cfg_dict, dict):
        raise ValueError(f"{cfg_path} is not an SAE config (a JSON object)")
    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as fh:
            expected = (fh.metadata() or {}).get(CFG_HASH_KEY)
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # one read: header and tensors
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{weights_path} could not be read ({e}); the file is truncated or not safetensors"
        ) from e
    if expected is not None and expected != cfg_hash(cfg_text):
        raise ValueError(
            f"{weights_path} and {cfg_path} come from different saves (e.g. an interrupted "
            "save: the weights were replaced but not the config); re-save the SAE. (A "
            f"{CFG_FILENAME} edited by hand fails this check too: the weights' metadata "
            "holds the hash of the config saved with them.)"
        )
    if device is not None:
        cfg_dict["device"] = device
    elif cfg_dict.get("device") is not None:  # saved on a GPU, loaded where there is none
        cfg_dict["device"] = usable_device(cfg_dict["device"], path)
    if dtype is not None:
        cfg_dict["dtype"] = dtype
    return cfg_dict, state, weights_path


def check_state_shapes(module: nn.Module, state: dict[str, Tensor], weights_path: Path) -> None:
    """Raise when the saved tensors' names/shapes differ from ``module``'s."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        raise ValueError(
            f"{weights_path} does not match {weights_path.parent / CFG_FILENAME}: expected "
            f"tensors {expected}, found {got}"
        )


__all__ = ["CFG_FILENAME", "WEIGHTS_FILENAME", "CFG_HASH_KEY", "cfg_json_text", "cfg_hash",
           "write_sae_folder", "read_sae_folder", "check_state_shapes"]
