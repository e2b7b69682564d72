"""Stream activations from safetensors shards on disk with a bounded shuffle buffer.

A shard is a safetensors file with one tensor ``activations [N_i, d_in]`` (what
``save_activations`` writes).
:class:`ShardedActivations` reads row blocks straight from the files (the safetensors header
gives each tensor's byte range; rows are read with ``readinto``, no memory map), so memory
is ``O(buffer_size · d_in)`` however large the shards are, even shards larger than RAM.
"""

from __future__ import annotations

import functools
import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tl_mdl.activations.buffer import (
    Block,
    ShuffleBuffer,
    check_epoch,
    epoch_seed,
    in_order_batches,
)
from tl_mdl.activations.io import ACTIVATIONS_KEY, resolve_shards

#: safetensors dtype tag -> (bytes per element, numpy dtype to read raw, torch dtype)
_DTYPES = {
    "F64": (8, np.float64, torch.float64),
    "F32": (4, np.float32, torch.float32),
    "F16": (2, np.float16, torch.float16),
    "BF16": (2, np.int16, torch.bfloat16),  # read as int16, reinterpreted
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class ShardInfo:
    """Where the ``activations`` tensor of one shard lives: ``rows × d_in`` elements of
    ``dtype`` starting at byte ``offset``."""

    path: Path
    rows: int
    d_in: int
    dtype: str
    offset: int

    @property
    def row_bytes(self) -> int:
        return self.d_in * _DTYPES[self.dtype][0]


def read_shard_header(path: str | os.PathLike) -> ShardInfo:
    """Parse and check a shard's safetensors header (no tensor data is read). Raises
    ``FileNotFoundError`` / ``ValueError`` naming the file when it is missing, truncated,
    not safetensors, or has no 2-D floating-point ``activations`` tensor."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"activation shard {path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(
                f"{path} is not a safetensors file or is truncated (header of {n} bytes in a "
                f"file of {size} bytes)"
            )
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file (bad header: {e})") from e
    if not isinstance(header, dict) or ACTIVATIONS_KEY not in header:
        keys = sorted(k for k in header if k != "__metadata__") if isinstance(header, dict) else []
        raise ValueError(
            f"{path} has tensors {keys} but no {ACTIVATIONS_KEY!r}; save activations with "
            "tl_mdl.save_activations"
        )
    entry = header[ACTIVATIONS_KEY]
    dtype, shape, (start, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPES:
        raise ValueError(
            f"{path}: 'activations' has dtype {dtype}; expected one of {sorted(_DTYPES)}"
        )
    if len(shape) != 2:
        raise ValueError(f"{path}: 'activations' must be [N, d_in], got {tuple(shape)}")
    rows, d_in = int(shape[0]), int(shape[1])
    if stop - start != rows * d_in * _DTYPES[dtype][0] or 8 + n + stop > size:
        raise ValueError(
            f"{path} is truncated or inconsistent: 'activations' {tuple(shape)} {dtype} needs "
            f"bytes {8 + n + start}..{8 + n + stop} of a {size}-byte file"
        )
    return ShardInfo(path, rows, d_in, dtype, 8 + n + start)


def read_rows(info: ShardInfo, start: int, stop: int, fh=None) -> Tensor:
    """Rows ``[start, stop)`` of a shard as a ``[stop − start, d_in]`` tensor (a fresh copy)."""
    nbytes, raw, tdtype = _DTYPES[info.dtype]
    count = (stop - start) * info.d_in
    out = np.empty(count, dtype=raw)
    own = fh is None
    fh = open(info.path, "rb") if own else fh
    try:
        fh.seek(info.offset + start * info.row_bytes)
        got = fh.readinto(memoryview(out).cast("B"))
    finally:
        if own:
            fh.close()
    if got != count * nbytes:
        raise ValueError(f"{info.path} is truncated: rows {start}..{stop} could not be read")
    t = torch.from_numpy(out)
    if tdtype == torch.bfloat16:
        t = t.view(torch.bfloat16)
    return t.view(stop - start, info.d_in)


class ShardedActivations:
    """Shuffled ``[batch_size, d_in]`` batches streamed from safetensors shards on disk.

    Each epoch visits the shards in a random order and each shard in random blocks of
    ``chunk_rows`` rows; rows pass through a shuffle buffer of ``buffer_size`` rows (when it
    is full a random half of it is served and refilled). The order is a function of
    ``(seed, epoch)`` only, so two iterations with the same seed give the same batches (what
    ``train_sae``'s resume and data-parallel ranks rely on). Peak memory is about
    ``(buffer_size + chunk_rows + batch_size) · d_in`` values, independent of the data size.

    Args:
        paths: a shard file, a folder of ``*.safetensors`` shards, or a list of either.
        batch_size: rows per batch.
        buffer_size: rows in the shuffle buffer (``>= batch_size``).
        seed: shuffling seed.
        shuffle: ``False`` streams rows in file order.
        repeat: ``True`` (default) iterates over epochs forever (pass ``steps=`` to
            ``train_sae``); ``False`` stops after one epoch.
        drop_last: drop each epoch's final partial batch (default, so batch statistics are
            always over ``batch_size`` rows).
        chunk_rows: rows per read (default ``max(batch_size, buffer_size // 8)``).
        dtype: convert batches to this dtype (default: as stored).
        check_finite: raise ``FloatingPointError`` naming the shard and rows on NaN/Inf.

    ``len()`` is the number of batches per epoch.
    """

    def __init__(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        batch_size: int = 4096,
        buffer_size: int = 1 << 18,
        seed: int = 0,
        *,
        shuffle: bool = True,
        repeat: bool = True,
        drop_last: bool = True,
        chunk_rows: int | None = None,
        dtype: torch.dtype | None = None,
        check_finite: bool = True,
    ):
        for name, v in (("batch_size", batch_size), ("buffer_size", buffer_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if buffer_size < batch_size:
            raise ValueError(
                f"buffer_size={buffer_size} is smaller than batch_size={batch_size}; the "
                "shuffle buffer must hold at least one batch"
            )
        self.shards = [read_shard_header(p) for p in resolve_shards(paths)]
        d_ins = {s.d_in for s in self.shards}
        if len(d_ins) > 1:
            found = [(str(s.path), s.d_in) for s in self.shards]
            raise ValueError(f"activation shards disagree on d_in: {found}")
        self.d_in = d_ins.pop()
        self.n_rows = sum(s.rows for s in self.shards)
        if self.n_rows == 0:
            raise ValueError(
                f"the activation shards hold no rows ({len(self.shards)} shard(s) with N = 0)"
            )
        self.batch_size, self.buffer_size, self.seed = batch_size, buffer_size, seed
        self.shuffle, self.repeat, self.drop_last = shuffle, repeat, drop_last
        self.chunk_rows = chunk_rows or max(batch_size, buffer_size // 8)
        self.dtype, self.check_finite = dtype, check_finite
        if self.n_rows < batch_size and drop_last:
            raise ValueError(
                f"the shards hold {self.n_rows} rows, fewer than batch_size={batch_size}; "
                "lower batch_size or pass drop_last=False"
            )

    def __len__(self) -> int:
        full, rest = divmod(self.n_rows, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def __repr__(self) -> str:
        return (
            f"ShardedActivations({len(self.shards)} shards, n_rows={self.n_rows}, "
            f"d_in={self.d_in}, batch_size={self.batch_size}, buffer_size={self.buffer_size})"
        )

    def _blocks(self, gen: torch.Generator) -> Iterator[Block]:
        """Row blocks of every shard, in the epoch's order (rows numbered across shards)."""
        base = [0]
        for s in self.shards:
            base.append(base[-1] + s.rows)
        order = torch.randperm(len(self.shards), generator=gen).tolist() if self.shuffle else (
            range(len(self.shards)))
        for i in order:
            info = self.shards[i]
            starts = list(range(0, info.rows, self.chunk_rows))
            if self.shuffle:
                starts = [starts[j] for j in torch.randperm(len(starts), generator=gen)]
            for a in starts:
                b = min(a + self.chunk_rows, info.rows)
                yield Block(base[i] + a, b - a, functools.partial(self._read, info, a, b))

    def _read(self, info: ShardInfo, a: int, b: int) -> Tensor:
        """Rows ``a … b−1`` of one shard, checked for NaN/Inf, in the requested dtype."""
        block = read_rows(info, a, b)
        if self.check_finite and not torch.isfinite(block).all():
            bad = a + int((~torch.isfinite(block)).any(-1).nonzero()[0])
            raise FloatingPointError(
                f"activation shard {info.path} has NaN/Inf in row {bad} "
                f"(block rows {a}..{b}); clean or drop that shard"
            )
        return block if self.dtype is None else block.to(self.dtype)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Tensor]:
        """The batches of one epoch (deterministic in ``(seed, epoch)``), from batch number
        ``start`` on: a seek that reads only the rows the shuffle buffer holds at that batch
        (see :class:`~tl_mdl.activations.buffer.ShuffleBuffer`)."""
        check_epoch(epoch, start)
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        if not self.shuffle:
            return in_order_batches(self._blocks(gen), self.batch_size,
                                    drop_last=self.drop_last, start=start)
        buf = ShuffleBuffer(self.buffer_size, self.batch_size, drop_last=self.drop_last)
        return buf.batches(self._blocks(gen), gen, start)

    def epoch(self, epoch: int) -> Iterator[Tensor]:
        """The batches of one epoch (the same as :meth:`epoch_batches`)."""
        return self.epoch_batches(epoch)

    def __iter__(self) -> Iterator[Tensor]:
        e = 0
        while True:
            yield from self.epoch_batches(e)
            e += 1
            if not self.repeat:
                return
