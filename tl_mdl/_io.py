"""File helpers shared by every layer: atomic writes, safetensors activation files."""

from __future__ import annotations

import os
import stat
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

ACTIVATIONS_KEY = "activations"


def _umask() -> int:
    """The process umask, read from /proc when possible (os.umask can only read by setting)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)  # process-global for an instant; restored at once
    os.umask(mask)
    return mask


def _target_mode(target: Path) -> int:
    """The existing ``target``'s permission bits, else those a new file would get."""
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def atomic_write(target: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``target``, then ``os.replace`` it into place,
    so a crash never leaves a half-written ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates the file 0600; give it the mode a plain open() would (or keep the
        # mode of the file it replaces), so saved files stay readable by group / others.
        os.chmod(tmp, _target_mode(target))
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


def usable_device(saved: Any, path: Path) -> str | None:
    """The device a model or SAE was saved on if this machine has it, else ``"cpu"`` (with
    a warning naming ``path``); ``None`` when nothing was saved."""
    if saved is None:
        return None
    try:
        dev = torch.device(saved)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is not None:
        if dev.type == "cpu":
            return str(saved)
        if dev.type == "cuda" and torch.cuda.is_available():
            if dev.index is None or dev.index < torch.cuda.device_count():
                return str(saved)
        if dev.type == "mps" and torch.backends.mps.is_available():
            return str(saved)
    warnings.warn(
        f"{path} was saved on device {saved!r}, which is not available here; loading it on "
        "cpu (pass device= to choose)",
        stacklevel=3,
    )
    return "cpu"
