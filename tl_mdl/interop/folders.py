"""Load an SAE from a folder, whoever wrote it: a tl_mdl save, or a SAELens save (through
``sae_lens`` and :func:`~tl_mdl.interop.from_sae_lens` when ``tl_mdl.SAE.load`` cannot read
it faithfully)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tl_mdl._io import error_message
from tl_mdl.sae import SAE
from tl_mdl.sae.config import ACTIVATION_OF_ARCHITECTURE
from tl_mdl.sae.files import CFG_FILENAME


def is_sae_lens_only(cfg: dict[str, Any]) -> bool:
    """True for SAELens cfgs that ``tl_mdl.SAE.load`` cannot read faithfully, but
    ``sae_lens`` + ``tl_mdl.from_sae_lens`` can (other architectures, foldable
    normalisation, TopK rescaled by decoder norm)."""
    if "activation" in cfg:  # a tl_mdl save
        return False
    return (
        cfg.get("architecture") not in ACTIVATION_OF_ARCHITECTURE
        or cfg.get("normalize_activations", "none") not in ("none", None)
        or bool(cfg.get("rescale_acts_by_decoder_norm", False))
    )


def load_sae_folder(path: str | os.PathLike, device: str = "cpu") -> SAE:
    """A tl_mdl SAE from a tl_mdl or SAELens save folder (``cfg.json`` +
    ``sae_weights.safetensors``). Raises ``FileNotFoundError`` / ``ValueError`` naming the
    folder when it is missing, a file, or a SAELens SAE that cannot be converted."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"SAE folder {path} does not exist")
    if not path.is_dir():
        raise ValueError(
            f"{path} is a file; an SAE is a folder with cfg.json and sae_weights.safetensors"
        )
    cfg: Any = None
    try:
        cfg = json.loads((path / CFG_FILENAME).read_text())
    except (OSError, ValueError):
        pass  # SAE.load reports missing / corrupted files
    if isinstance(cfg, dict) and is_sae_lens_only(cfg):
        return _load_via_sae_lens(path, device, cfg)
    return SAE.load(path, device=device)


def _load_via_sae_lens(path: Path, device: str, cfg: dict[str, Any]) -> SAE:
    from tl_mdl.interop import from_sae_lens

    try:
        import sae_lens

        sl = sae_lens.SAE.load_from_disk(str(path), device=device)
        return from_sae_lens(sl)
    except Exception as e:  # whatever SAELens raises means "cannot load"
        raise ValueError(
            f"{path} is a SAELens SAE (architecture={cfg.get('architecture')!r}, "
            f"normalize_activations={cfg.get('normalize_activations', 'none')!r}) that tl_mdl "
            f"cannot convert: {error_message(e)}"
        ) from e
