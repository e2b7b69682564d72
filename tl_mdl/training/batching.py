"""Where the trainer's batches come from: deterministic per-step batches (so a resumed run
sees what an uninterrupted one would), the held-out rows the convergence rule watches,
and the checks every batch passes."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sized

import torch
from torch import Tensor

from tl_mdl.activations.buffer import (
    BatchSource,
    as_batch_source,
    batches_from,
    check_epoch,
    epoch_seed,
)

#: at most this many rows are held out to watch convergence and the fidelity target
MAX_HELDOUT_ROWS = 4096
#: a Tensor with fewer rows than this is not split: the rule watches the training rows
MIN_ROWS_TO_SPLIT = 100


class Batches:
    """Step ``s`` is batch ``s % len`` of pass ``s // len`` of the data as a
    :class:`~tl_mdl.activations.buffer.BatchSource` (see ``as_batch_source``: a Tensor is
    reshuffled each pass from ``(seed, pass)``; ``rows``, an index tensor, restricts it to
    those rows, the rest being held out), so a resumed run sees the batches an
    uninterrupted one would, and resuming in the middle of a pass seeks to it. An iterable
    without ``len()`` is one stream, consumed in order (on resume the first ``s`` batches are
    skipped)."""

    def __init__(self, data: Tensor | Iterable[Tensor], batch_size: int, seed: int,
                 rows: Tensor | None = None):
        if rows is not None and isinstance(data, Tensor):
            self.source: BatchSource | Iterable[Tensor] = RowBatches(
                data, rows, batch_size, seed)
        else:
            self.source = as_batch_source(data, batch_size, seed)
        n = len(self.source) if isinstance(self.source, Sized) else 0
        self.per_epoch: int | None = n if n > 0 else None
        self._pass: tuple[int, Iterator[Tensor]] | None = None

    def get(self, step: int) -> Tensor:
        if self.per_epoch is None:
            epoch, b = 0, step
        else:
            epoch, b = divmod(step, self.per_epoch)
        if self._pass is None or self._pass[0] != epoch:
            if isinstance(self.source, BatchSource):
                it = batches_from(self.source, epoch, b)
            else:
                it = itertools.islice(iter(self.source), b, None)
            self._pass = (epoch, it)
        try:
            return next(self._pass[1])
        except StopIteration:
            raise StopIteration from None


class RowBatches:
    """Batches of the rows ``rows`` of an in-memory tensor (the others held out), without
    copying them out first: pass ``e`` gathers them in the order of one permutation drawn
    from ``(seed, e)``, as :class:`~tl_mdl.activations.buffer.TensorBatches` does."""

    def __init__(self, data: Tensor, rows: Tensor, batch_size: int, seed: int):
        self.data, self.rows, self.batch_size, self.seed = data, rows, batch_size, seed
        self.drop_last = rows.shape[0] >= batch_size

    def __len__(self) -> int:
        n, bs = self.rows.shape[0], self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Tensor]:
        check_epoch(epoch, start)
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = self.rows[torch.randperm(self.rows.shape[0], generator=gen)]
        bs = self.batch_size
        stop = order.shape[0] - order.shape[0] % bs if self.drop_last else order.shape[0]
        return (self.data[order[j : j + bs].to(self.data.device)]
                for j in range(start * bs, stop, bs))


def split_heldout(n: int, seed: int) -> tuple[Tensor | None, Tensor | None]:
    """``(train_rows, heldout_rows)`` of a Tensor with ``n`` rows: ``min(n // 10, 4096)``
    rows drawn from ``seed`` are held out; with fewer than 100 rows nothing is
    (``(None, None)``: the rule then watches the training rows)."""
    if n < MIN_ROWS_TO_SPLIT:
        return None, None
    g = torch.Generator().manual_seed(seed * 7_919 + 17)
    perm = torch.randperm(n, generator=g)
    h = min(n // 10, MAX_HELDOUT_ROWS)
    return perm[h:].sort().values, perm[:h].sort().values


def check_batch(x: Tensor, d_in: int, step: int, *, finite: bool = True) -> None:
    """Raise for a batch of the wrong shape or dtype, or (``finite``) with NaN/Inf."""
    if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != d_in:
        raise ValueError(
            f"batch at step {step} has shape {tuple(getattr(x, 'shape', ()))}; expected "
            f"[batch, d_in={d_in}]"
        )
    if not x.is_floating_point():
        raise TypeError(
            f"batch at step {step} has dtype {x.dtype}; activations must be floating point "
            "(integer tensors are usually token ids, not activations)"
        )
    if finite and not torch.isfinite(x).all():
        row = int((~torch.isfinite(x)).any(-1).nonzero()[0])
        raise FloatingPointError(
            f"activations of the batch at step {step} contain NaN/Inf (row {row} of the batch); "
            "training stopped, the last checkpoint is kept"
        )


def check_activations(activations: Tensor | Iterable[Tensor], d_in: int) -> None:
    """Shape, emptiness and dtype of a Tensor of activations (iterables are checked batch
    by batch)."""
    if not isinstance(activations, Tensor):
        return
    if activations.ndim != 2 or activations.shape[1] != d_in:
        raise ValueError(
            f"activations have shape {tuple(activations.shape)}; expected [N, d_in={d_in}]"
        )
    if activations.shape[0] == 0:
        raise ValueError("activations are empty (N = 0); nothing to train on")
    if not activations.is_floating_point():
        raise TypeError(
            f"activations have dtype {activations.dtype}; expected a floating-point [N, d_in]"
        )


@torch.no_grad()
def init_b_dec(sae, x: Tensor | None) -> None:
    """``b_dec`` ← the mean of (up to 16k rows of) the data, so encoders start centred."""
    if x is None or x.shape[0] == 0:
        return
    sample = x[:16384].to(sae.b_dec.device, torch.float64)
    if torch.isfinite(sample).all():
        sae.b_dec.copy_(sample.mean(0).to(sae.b_dec.dtype))


__all__ = ["Batches", "RowBatches", "split_heldout", "check_batch", "check_activations",
           "init_b_dec"]
