"""Sparse codes, one implementation for the whole package: the CSR extraction of a latent
matrix, the decode of a CSR or top-k code through a gather of decoder rows, and an exact
top-k that is faster than ``torch.topk`` on CPU.

Used by the DL scorer (:mod:`tl_mdl.mdl.description_length`), the hook splice
(:mod:`tl_mdl.hooks.attach`), the downstream losses (:mod:`tl_mdl.hooks.losses`) and the
TopK activation (:mod:`tl_mdl.sae.model`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: Entries per row block of the CSR extraction (the DL scorer's unit of work, too).
BLOCK_ELEMENTS = 1 << 21


def block_rows(n: int, f: int, block_elements: int = BLOCK_ELEMENTS) -> int:
    """Rows per block for ``n`` rows of width ``f``: at most ``block_elements`` entries a
    block, blocks of (nearly) equal size (so worker threads get equal shares)."""
    most = max(1, block_elements // max(f, 1))
    return -(-n // -(-n // most)) if n > 0 else most


# ------------------------------------------------------------------ CSR extraction
def extract_block(lat: Tensor, tau: float, nonneg: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Columns (int32), values and per-row offsets (int32) of the entries ``|lat| > tau``
    (``lat > tau`` when ``nonneg``; ``lat != 0`` when ``tau`` is 0, so a NaN is kept and
    reaches the decode) of one ``[rows, f]`` block, row-major. On CPU this is
    NumPy (single-threaded and faster than ``torch.nonzero``; :func:`map_blocks` runs
    blocks side by side). Not differentiable: the values are detached."""
    rows, f = lat.shape
    if lat.device.type == "cpu" and lat.dtype in (torch.float32, torch.float64):
        a = lat.detach().numpy()
        idx = np.flatnonzero(_mask(a, tau, nonneg))
        r, c = np.divmod(idx, f)
        offsets = np.zeros(rows, dtype=np.int32)
        np.cumsum(np.bincount(r, minlength=rows)[:-1], out=offsets[1:])
        values = torch.from_numpy(a.reshape(-1)[idx])
        return torch.from_numpy(c.astype(np.int32)), values, torch.from_numpy(offsets)
    return extract_block_torch(lat, tau, nonneg)


def _mask(a: Any, tau: float, nonneg: bool) -> Any:
    """Which entries of an array or tensor a CSR code keeps (see :func:`extract_block`)."""
    if tau == 0:
        return a != 0
    return (a > tau) if nonneg else ((a > tau) | (a < -tau))


def extract_block_torch(lat: Tensor, tau: float, nonneg: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`extract_block` with torch ops (any device and dtype)."""
    lat = lat.detach()
    rows = lat.shape[0]
    nz = torch.nonzero(_mask(lat, tau, nonneg))
    r, c = nz[:, 0], nz[:, 1]
    offsets = torch.zeros(rows, dtype=torch.int32, device=lat.device)
    offsets[1:] = torch.bincount(r, minlength=rows)[:-1].cumsum(0)
    return c.to(torch.int32), lat[r, c], offsets


_POOL: tuple[int, ThreadPoolExecutor] | None = None  # (workers, pool)


def map_blocks(fn: Callable[[Tensor], Any], blocks: list[Tensor] | tuple[Tensor, ...]) -> list:
    """``[fn(b) for b in blocks]``, on CPU with one worker thread per torch thread (for
    NumPy work, which releases the GIL and uses one core per call)."""
    global _POOL
    workers = torch.get_num_threads()
    if workers < 2 or len(blocks) < 2 or blocks[0].device.type != "cpu":
        return [fn(b) for b in blocks]
    if _POOL is None or _POOL[0] != workers:
        _POOL = (workers, ThreadPoolExecutor(workers, thread_name_prefix="tl_mdl"))
    return list(_POOL[1].map(fn, blocks))


def to_csr(
    lat: Tensor, tau: float = 0.0, nonneg: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`extract_block` of a whole ``[n, f]`` matrix: ``(cols, values, offsets)`` in the
    form ``F.embedding_bag`` takes. On CPU the rows are split over the torch threads."""
    n, f = lat.shape
    workers = torch.get_num_threads() if lat.device.type == "cpu" else 1
    if workers < 2 or n < 2 * workers:
        return extract_block(lat, tau, nonneg)
    blocks = lat.split(-(-n // workers))
    parts = map_blocks(lambda b: extract_block(b, tau, nonneg), blocks)
    cols = torch.cat([p[0] for p in parts])
    values = torch.cat([p[1] for p in parts])
    starts = np.cumsum([0] + [p[0].numel() for p in parts[:-1]])
    offsets = torch.cat([p[2] + int(s) for p, s in zip(parts, starts, strict=True)])
    return cols, values, offsets


# ------------------------------------------------------------------------ decoding
def csr_decode(
    cols: Tensor, offsets: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None = None
) -> Tensor:
    """Row ``n`` of ``c W_dec (+ b_dec)`` for the CSR code ``c`` (``offsets[n]`` is where
    row ``n`` starts in ``cols`` / ``values``): a gather of the active decoder rows, the
    same value as the dense GEMM up to float summation order."""
    out = F.embedding_bag(cols, W_dec, offsets, mode="sum",
                          per_sample_weights=values.to(W_dec.dtype))
    return out if b_dec is None else out + b_dec


def topk_decode(
    indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None = None
) -> Tensor:
    """``Σ_j values[n, j] · W_dec[indices[n, j]] (+ b_dec)`` for ``[N, k]`` codes: the decode of
    a code with ``k`` nonzeros per row, without materialising ``[N, d_sae]``."""
    out = F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum")
    return out if b_dec is None else out + b_dec


# ------------------------------------------------------------------------- top-k
#: Group size of :func:`topk`'s first pass.
_TOPK_GROUP = 8


def _top_columns(a: Tensor, k: int) -> Tensor:
    """Columns (int64) of the ``k`` largest entries of each row of a float32/float64 CPU
    matrix, in no particular order; NaN counts as the largest, as in ``torch.topk``.
    NumPy's introselect (``argpartition``) is 2–3× faster than ``torch.topk`` at these
    widths; rows are split over the torch threads (:func:`map_blocks`)."""

    def part(b: Tensor) -> Tensor:
        w = b.shape[1]
        return torch.from_numpy(np.argpartition(b.numpy(), w - k, axis=1)[:, w - k:])

    n, workers = a.shape[0], torch.get_num_threads()
    if workers < 2 or n < 2 * workers:
        return part(a)
    return torch.cat(map_blocks(part, a.split(-(-n // workers))))


def topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=-1, sorted=False)`` for a 2-D ``x``: the ``k`` largest entries of each
    row and their columns, in no particular order; differentiable like ``torch.topk``.

    On CPU, when the rows are wide enough, in two passes: the columns are split into
    ``G = f / 8`` strided groups ``{j, j + G, …}``; the ``k`` groups with the largest maxima
    hold every entry of the row's top ``k`` (an entry outside them is below ``k`` group
    maxima, so below ``k`` entries), and the top ``k`` of those ``8 k`` candidates is the
    answer (used for ``k ≥ 16``, where it pays). Both selections are NumPy's
    ``argpartition`` for float32/float64 (:func:`_top_columns`), ``torch.topk`` otherwise.
    The values are always exactly those of ``torch.topk``; where values tie at the
    ``k``-th place, which of the tied columns is returned may differ (``torch.topk`` leaves
    that unspecified as well).
    """
    n, f = x.shape
    g = _TOPK_GROUP
    if x.device.type != "cpu" or k < 16 or f % g or f // g < 4 * k or n == 0:
        return x.topk(k, dim=-1, sorted=False)
    groups = f // g
    maxima = x.detach().view(n, g, groups).amax(1)
    if x.dtype not in (torch.float32, torch.float64):
        best = maxima.topk(k, dim=-1, sorted=False).indices
        cand = (best.unsqueeze(-1) + groups * torch.arange(g, device=x.device)).view(n, k * g)
        values, j = x.gather(1, cand).topk(k, dim=-1, sorted=False)
        return values, cand.gather(1, j)
    best = _top_columns(maxima, k)
    cand = (best.unsqueeze(-1) + groups * torch.arange(g)).view(n, k * g)
    cols = cand.gather(1, _top_columns(x.detach().gather(1, cand), k))
    return x.gather(1, cols), cols
