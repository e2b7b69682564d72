"""File helpers shared by every layer: atomic writes, the device a file was saved on, an
error as one line of text."""

from __future__ import annotations

import os
import stat
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


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


def error_message(e: BaseException) -> str:
    """``e`` as one line for a user: a KeyError's key without quotes, an OSError as
    ``file: reason``, else ``str(e)`` (or the exception's type when that is empty)."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__
