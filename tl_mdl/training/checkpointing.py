"""Training checkpoints: one atomic safetensors file holds the weights, the optimiser's
moments, the objective's running state and the loop's state (step, convergence, dual
variable, history) as JSON metadata; ``train_state.json`` is a readable copy."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from tl_mdl._io import atomic_write
from tl_mdl.training.config import LEGACY_OBJECTIVE_SETTINGS

STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
META_KEY = "tl_mdl_train_state"

#: TrainConfig fields a resumed run may change: they do not change the steps already taken
#: (``steps`` / ``epochs`` / ``max_steps`` set where training ends; with
#: ``lr_decay_frac > 0`` the decay then follows the new length from the checkpoint on, so
#: the result equals an uninterrupted run of the new length only when the checkpoint lies
#: before the decay of both schedules; the same holds for the end of the ``mdl``
#: objective's warm start, a fraction of the steps).
RESUME_MAY_DIFFER = ("steps", "epochs", "max_steps", "checkpoint_every", "log_every")

#: TrainConfig fields a checkpoint written before they existed holds nothing of, and whose
#: default that run trained with (AuxK's: it was off), so a resume compares against it
ABSENT_MEANS_DEFAULT = ("aux_k", "aux_coefficient", "dead_steps")


def kept_objective_settings(ckpt: Path, meta: dict[str, Any], now: dict[str, str],
                            tc: Any) -> dict[str, str]:
    """The objective settings (``OBJECTIVE_SETTINGS``; ``now``: this run's) a resumed run
    must take from the checkpoint's run: those this TrainConfig leaves to the objective's
    default, which may have changed since (a checkpoint without their record and without
    ``warm_start`` predates both: the defaults then). A setting asked for explicitly that
    differs raises."""
    saved = (meta.get("loop") or {}).get("objective_settings")
    if saved is None:
        saved_tc = meta.get("train_cfg") or {}
        if "warm_start" in saved_tc:  # written on 2026-12-04 before the record:
            return {}  # its defaults were (for all but half an hour) today's
        saved = {n: saved_tc.get(n) or v for n, v in LEGACY_OBJECTIVE_SETTINGS.items()}
    keep = {}
    for name, value in saved.items():
        if name not in now or now[name] == value:
            continue
        if getattr(tc, name) is not None:
            raise ValueError(
                f"checkpoint in {ckpt} was trained with other settings ({name}="
                f"{value!r} there, {now[name]!r} here); resuming it would mix two runs. "
                f"Leave {name} unset to continue that run, or pass another checkpoint_dir, "
                "or resume=False to start over (overwriting it)")
        keep[name] = value
    return keep


def check_resumable(ckpt: Path, meta: dict[str, Any], cfg: Any, tc: Any) -> None:
    """Raise unless the checkpoint ``meta`` continues this run: the same training settings
    but :data:`RESUME_MAY_DIFFER` (checked first: another objective also changes the SAE
    config ``train_sae`` builds) and the same SAE config (its ``metadata`` and ``device``
    aside: a run may move, e.g. from a GPU to the CPU)."""
    saved_tc, now = meta.get("train_cfg") or {}, asdict(tc)
    defaults = asdict(type(tc)())
    saved_tc = {**{k: defaults[k] for k in ABSENT_MEANS_DEFAULT if k in defaults}, **saved_tc}
    diff = [
        f"{k}={saved_tc[k]!r} there, {now[k]!r} here"
        for k in now
        if k in saved_tc and k not in RESUME_MAY_DIFFER and saved_tc[k] != now[k]
    ]
    if diff:
        raise ValueError(
            f"checkpoint in {ckpt} was trained with other settings ({'; '.join(diff)}); "
            "resuming it would mix two runs. Pass another checkpoint_dir, or resume=False "
            "to start over (overwriting it). Only "
            f"{', '.join(RESUME_MAY_DIFFER)} may change on resume"
        )
    saved = replace(type(cfg).from_dict(meta["sae_cfg"]), metadata={}, device=cfg.device)
    if saved != replace(cfg, metadata={}):
        a, b = asdict(saved), asdict(replace(cfg, metadata={}))
        diff = ", ".join(f"{k}={a[k]!r} there, {b[k]!r} here" for k in a if a[k] != b.get(k))
        raise ValueError(
            f"checkpoint in {ckpt} is for a different SAE config ({diff}); pass another "
            "checkpoint_dir, or resume=False to start over (overwriting it)"
        )


def save_checkpoint(
    path: str | os.PathLike,
    sae: Any,
    opt: torch.optim.Optimizer,
    step: int,
    tc: Any,
    history: list[dict[str, float]],
    *,
    loop_state: dict[str, Any] | None = None,
    objective_state: dict[str, Tensor] | None = None,
    aux_state: dict[str, Tensor] | None = None,
) -> None:
    """Atomically write the training state (weights, Adam moments, step, config, and the
    loop's, objective's and AuxK's running state) to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    osd = opt.state_dict()
    for idx, st in osd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    for k, v in (objective_state or {}).items():
        tensors[f"objective.{k}"] = v.detach().cpu().contiguous()
    for k, v in (aux_state or {}).items():
        tensors[f"auxk.{k}"] = v.detach().cpu().contiguous()
    meta = {
        "step": step,
        "sae_cfg": sae.cfg.to_dict(),
        "train_cfg": asdict(tc),
        "param_groups": osd["param_groups"],
        "history": history,
        "loop": loop_state or {},
    }
    text = json.dumps(meta)
    # One file is the checkpoint: the state JSON travels in the safetensors metadata, so a
    # crash between two writes can never pair weights of one step with the step of another.
    # train_state.json is a readable copy written after it.
    atomic_write(
        path / STATE_TENSORS, lambda p: save_file(tensors, str(p), metadata={META_KEY: text})
    )
    atomic_write(path / STATE_JSON, lambda p: p.write_text(text))


def has_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / STATE_TENSORS).is_file()


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(meta, tensors)`` of the checkpoint in ``path`` (meta: step, configs, history)."""
    path = Path(path)
    try:
        with safe_open(str(path / STATE_TENSORS), framework="pt") as fh:
            text = (fh.metadata() or {}).get(META_KEY)
        tensors = load_file(str(path / STATE_TENSORS))
        if text is None:  # written before the metadata copy existed
            text = (path / STATE_JSON).read_text()
        meta = json.loads(text)
    except (OSError, json.JSONDecodeError, SafetensorError, ValueError) as e:
        raise ValueError(
            f"checkpoint in {path} is unreadable ({e}); delete it to start over"
        ) from e
    return meta, tensors


def restore(
    sae: Any, opt: torch.optim.Optimizer, meta: dict[str, Any], tensors: dict[str, Tensor]
) -> dict[str, Tensor]:
    """Load a checkpoint's weights and optimiser state into ``sae`` and ``opt``; returns the
    objective's saved state (empty for checkpoints without one)."""
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
    osd: dict[str, Any] = {"state": {}, "param_groups": meta["param_groups"]}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            osd["state"].setdefault(int(idx), {})[name] = v
    opt.load_state_dict(osd)
    return {k[len("objective."):]: v for k, v in tensors.items() if k.startswith("objective.")}


__all__ = [
    "STATE_JSON",
    "STATE_TENSORS",
    "META_KEY",
    "RESUME_MAY_DIFFER",
    "ABSENT_MEANS_DEFAULT",
    "check_resumable",
    "kept_objective_settings",
    "save_checkpoint",
    "has_checkpoint",
    "load_checkpoint",
    "restore",
]
