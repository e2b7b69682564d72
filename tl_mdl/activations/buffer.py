"""Batches of activations, one pass at a time: the :class:`BatchSource` protocol the trainer,
sweeps and CLI consume, and the one shuffle buffer behind every streaming source.

A source serves pass ``e`` as a function of ``(seed, e)`` alone, so a resumed run sees the
batches an uninterrupted one would. Sources built here also *seek*:
``epoch_batches(e, start=b)`` begins at batch ``b`` of the pass without reading the rows of
batches ``0 … b−1`` from disk (the shuffle buffer replays its bookkeeping on row numbers,
then reads only the rows it still holds).
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class BatchSource(Protocol):
    """Passes of ``[batch, d_in]`` batches: ``epoch_batches(e)`` is pass ``e`` (the same
    batches whenever it is asked for) and ``len()`` the number of batches in a pass."""

    def epoch_batches(self, epoch: int) -> Iterator[Tensor]: ...

    def __len__(self) -> int: ...


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of pass ``epoch`` of a source seeded with ``seed``."""
    return seed * 1_000_003 + epoch


def batches_from(source: BatchSource, epoch: int, start: int = 0) -> Iterator[Tensor]:
    """Batches ``start, start + 1, …`` of pass ``epoch``: a seek when the source's
    ``epoch_batches`` takes ``start=``, else the first ``start`` batches are read and dropped."""
    if start and "start" in inspect.signature(source.epoch_batches).parameters:
        return iter(source.epoch_batches(epoch, start=start))  # type: ignore[call-arg]
    return itertools.islice(source.epoch_batches(epoch), start, None)


def check_epoch(epoch: int, start: int = 0) -> None:
    for name, v in (("epoch", epoch), ("start", start)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")


# ----------------------------------------------------------------------- in memory
class TensorBatches:
    """Batches of an in-memory ``[N, d_in]`` tensor: pass ``e`` gathers rows in the order of
    one random permutation drawn from ``pass_seed(e)`` (in row order with ``shuffle=False``).
    ``drop_last`` drops a pass's final partial batch."""

    def __init__(self, data: Tensor, batch_size: int, pass_seed: Callable[[int], int], *,
                 shuffle: bool = True, drop_last: bool = True):
        self.data, self.batch_size, self.pass_seed = data, batch_size, pass_seed
        self.shuffle, self.drop_last = shuffle, drop_last

    def __len__(self) -> int:
        n, bs = self.data.shape[0], self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[Tensor]:
        check_epoch(epoch, start)
        return self._pass(epoch, start)

    def _pass(self, epoch: int, start: int) -> Iterator[Tensor]:
        data, bs = self.data, self.batch_size
        n = data.shape[0]
        perm = None
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.pass_seed(epoch))
            perm = torch.randperm(n, generator=gen).to(data.device)
        stop = n - n % bs if self.drop_last else n
        for j in range(start * bs, stop, bs):
            yield data[perm[j : j + bs]] if perm is not None else data[j : j + bs].clone()


class _Reiterable:
    """A sized iterable of batches (a list, a DataLoader): each pass iterates it afresh."""

    def __init__(self, data: Iterable[Tensor]):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def epoch_batches(self, epoch: int) -> Iterator[Tensor]:
        return iter(self.data)


def as_batch_source(data: Tensor | Iterable[Tensor], batch_size: int, seed: int
                    ) -> BatchSource | Iterable[Tensor]:
    """What ``train_sae`` iterates: a Tensor becomes :class:`TensorBatches` (reshuffled each
    pass from ``(seed, pass)``, the final partial batch dropped unless it is the only one); a
    :class:`BatchSource` is itself; a sized iterable is iterated afresh each pass; any other
    iterable is returned as is (one stream: it cannot be served again)."""
    if isinstance(data, Tensor):
        return TensorBatches(data, batch_size, lambda e: epoch_seed(seed, e),
                             drop_last=data.shape[0] >= batch_size)
    if isinstance(data, BatchSource):
        return data
    if isinstance(data, Sized):
        return _Reiterable(data)
    return data


# ------------------------------------------------------------------------ streaming
@dataclass(frozen=True)
class Block:
    """Rows ``start … start + rows − 1`` of a source (numbered across all its files or
    chunks); ``load()`` reads them as ``[rows, d_in]``."""

    start: int
    rows: int
    load: Callable[[], Tensor]


def in_order_batches(blocks: Iterable[Block], batch_size: int, *, drop_last: bool,
                     start: int = 0) -> Iterator[Tensor]:
    """Rows in block order, cut into batches; batch ``b`` is rows ``b·bs … (b+1)·bs − 1`` of the
    concatenation, so seeking to ``start`` skips whole blocks unread."""
    bs, skip = batch_size, start * batch_size
    carry: Tensor | None = None
    for block in blocks:
        if skip >= block.rows:
            skip -= block.rows
            continue
        rows = block.load()[skip:]
        skip = 0
        if carry is not None:
            rows = torch.cat([carry, rows])
        k = rows.shape[0] // bs * bs
        for j in range(0, k, bs):
            yield rows[j : j + bs].clone()
        carry = rows[k:].clone() if k < rows.shape[0] else None
    if carry is not None and not drop_last:
        yield carry


class ShuffleBuffer:
    """A fixed ``[capacity, d_in]`` buffer between blocks read in order and shuffled batches.

    Rows are written into the buffer's free slots; when it is full a random half of the
    slots (a whole number of batches, at least one) is served batch by batch and those slots
    are refilled, so each row is copied once in and once out. At the end of the blocks what
    is left is served in random order (``drop_last`` drops a final partial batch). Every
    random draw comes from ``gen``, interleaved with the blocks' own draws in a fixed order,
    so a pass is a function of the generator's seed."""

    def __init__(self, capacity: int, batch_size: int, *, drop_last: bool):
        self.capacity, self.batch_size, self.drop_last = capacity, batch_size, drop_last

    def batches(self, blocks: Iterable[Block], gen: torch.Generator, start: int = 0
                ) -> Iterator[Tensor]:
        """The pass's batches from number ``start`` on. Seeking runs the same draws on row
        numbers instead of rows (no reads), then reads only the blocks whose rows the buffer
        still holds."""
        return _Pass(self, gen, start).run(blocks)


class _Pass:
    def __init__(self, buf: ShuffleBuffer, gen: torch.Generator, skip: int):
        self.cap, self.bs, self.drop_last = buf.capacity, buf.batch_size, buf.drop_last
        self.gen, self.skip = gen, skip
        self.data: Tensor | None = None  # [cap, d_in], allocated at the first rows read
        self.ids = torch.empty(self.cap, dtype=torch.long) if skip else None  # while seeking
        self.seen: list[Block] = []  # blocks read while seeking (their rows may be held)
        self.free = torch.arange(self.cap)  # empty slots, in the order they are filled

    def run(self, blocks: Iterable[Block]) -> Iterator[Tensor]:
        any_block = False
        for block in blocks:
            any_block = True
            rows = None
            if self.skip:
                self.seen.append(block)
            at = 0
            while at < block.rows:
                if not self.skip and rows is None:
                    rows = block.load()
                m = min(block.rows - at, self.free.shape[0])
                slots, self.free = self.free[:m], self.free[m:]
                if self.skip:
                    assert self.ids is not None
                    self.ids.index_copy_(0, slots, torch.arange(block.start + at,
                                                                block.start + at + m))
                else:
                    assert rows is not None
                    self._write(slots, rows[at : at + m])
                at += m
                if self.free.shape[0] == 0:  # full: serve a random half, reuse its slots
                    n_out = max(self.bs, (self.cap // 2) // self.bs * self.bs)
                    out = torch.randperm(self.cap, generator=self.gen)[:n_out]
                    yield from self._serve(out)
                    self.free = out
        if not any_block:
            return
        held = torch.ones(self.cap, dtype=torch.bool)
        held[self.free] = False
        rest = held.nonzero().squeeze(1)
        rest = rest[torch.randperm(rest.shape[0], generator=self.gen)]
        yield from self._serve(rest)

    def _write(self, slots: Tensor, rows: Tensor) -> None:
        if self.data is None:
            self.data = rows.new_empty(self.cap, rows.shape[1])
        self.data.index_copy_(0, slots.to(self.data.device), rows)

    def _serve(self, order: Tensor) -> Iterator[Tensor]:
        for j in range(0, order.shape[0], self.bs):
            if self.drop_last and j + self.bs > order.shape[0]:
                return
            if self.skip:
                self.skip -= 1
                if self.skip == 0:
                    self._load_held(served=order[: j + self.bs])
                continue
            assert self.data is not None
            yield self.data[order[j : j + self.bs].to(self.data.device)]

    def _load_held(self, served: Tensor) -> None:
        """End of a seek: read the rows the buffer holds now (not free, not yet served),
        each block of them once, into their slots."""
        assert self.ids is not None
        held = torch.ones(self.cap, dtype=torch.bool)
        held[self.free] = False
        held[served] = False
        slots = held.nonzero().squeeze(1)
        ids = self.ids[slots]
        blocks = sorted(self.seen, key=lambda b: b.start)
        starts = torch.tensor([b.start for b in blocks], dtype=torch.long)
        which = torch.searchsorted(starts, ids, right=True) - 1
        for k in which.unique().tolist():
            sel = which == k
            rows = blocks[k].load()
            self._write(slots[sel], rows[ids[sel] - blocks[k].start])
        self.ids, self.seen = None, []
