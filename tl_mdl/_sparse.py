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


def _grouped_columns(a: np.ndarray, maxima: np.ndarray, k: int) -> np.ndarray:
    """Columns (ascending) of the ``k`` largest entries of each row of ``a`` through the
    ``k`` groups with the largest ``maxima`` (their ``8 k`` members hold the row's top ``k``;
    see :func:`topk`): two ``argpartition`` selections. NaN counts as the largest."""
    n, f = a.shape
    groups = f // _TOPK_GROUP
    best = np.argpartition(maxima, groups - k, axis=1)[:, groups - k:]
    cand = (best[:, :, None] + groups * np.arange(_TOPK_GROUP)).reshape(n, -1)
    j = np.argpartition(np.take_along_axis(a, cand, 1), cand.shape[1] - k, axis=1)
    return np.sort(np.take_along_axis(cand, j[:, cand.shape[1] - k:], 1), axis=1)


def _bounded_columns(a: np.ndarray, maxima: np.ndarray, k: int) -> np.ndarray:
    """Columns (ascending) of the ``k`` largest entries of each row of ``a``, given the
    maxima of its ``G`` strided column groups (:func:`topk`).

    ``t``, the ``k``-th largest group maximum, is a lower bound of the row's ``k``-th largest
    entry (the ``k`` best groups each hold an entry ≥ ``t``), so the entries ``≥ t``
    (about ``k``, never fewer) hold the top ``k``. Those candidates, in column order, are
    cut to the ``k`` largest by value: every one above the ``k``-th largest value ``v``, and
    the first ties at ``v`` in column order. Only ``np.partition`` of values is used (several
    times faster than ``argpartition``), and each row's answer depends on that row alone.
    Rows with a NaN (which ``torch.topk`` ranks first) or ``t = -inf`` go through
    :func:`_grouped_columns`, as do rows with more than ``8 k`` candidates (ties at ``t``)."""
    n, f = a.shape
    groups = maxima.shape[1]
    t = np.partition(maxima, groups - k, axis=1)[:, groups - k]
    if np.isnan(t).any() or np.isnan(maxima).any() or np.isneginf(t).any():
        return _grouped_columns(a, maxima, k)
    idx = np.flatnonzero(a >= t[:, None])
    r, c = np.divmod(idx, f)
    counts = np.bincount(r, minlength=n)
    if (counts == k).all():
        return c.reshape(n, k)
    heavy = counts > _TOPK_GROUP * k
    if heavy.any():
        out = np.empty((n, k), dtype=np.int64)
        out[heavy] = _grouped_columns(a[heavy], maxima[heavy], k)
        light = ~heavy
        out[light] = _bounded_columns(a[light], maxima[light], k)
        return out
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    cv = a.reshape(-1)[idx] if a.flags.c_contiguous else a[r, c]
    # the k-th largest candidate per row: candidates padded with -inf (below all of them)
    width = int(counts.max())
    vals = np.full(n * width, -np.inf, dtype=a.dtype)
    vals[np.arange(idx.size) + (r * width - starts[r])] = cv
    v = np.partition(vals.reshape(n, width), width - k, axis=1)[:, width - k][r]
    above, tie = cv > v, cv == v
    if np.count_nonzero(tie) == n:  # no ties: v is the only one in its row
        return c[above | tie].reshape(n, k)
    need = k - np.bincount(r[above], minlength=n)  # ties each row takes, ≥ 1
    ties_before = np.cumsum(tie) - tie  # ties earlier in the flat order
    rank = ties_before - ties_before[starts][r]  # rank of a tie within its row
    return c[above | (tie & (rank < need[r]))].reshape(n, k)


def topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=-1, sorted=False)`` for a 2-D ``x``: the ``k`` largest entries of each
    row and their columns, in no particular order; differentiable like ``torch.topk``.

    On CPU, when the rows are wide enough (``k ≥ 16``, ``f / 8 ≥ 4 k``): the columns are
    split into ``G = f / 8`` strided groups ``{j, j + G, …}`` and their maxima taken in one
    pass; an entry outside the ``k`` groups with the largest maxima is below ``k`` group
    maxima, so below ``k`` entries. For float32/float64 the ``k``-th largest group maximum
    then bounds the candidates (:func:`_bounded_columns`, NumPy, rows split over the torch
    threads); otherwise the top ``k`` of the ``8 k`` members of the best ``k`` groups
    (``torch.topk``). The values are always exactly those of ``torch.topk``; where values
    tie at the ``k``-th place, which of the tied columns is returned may differ
    (``torch.topk`` leaves that unspecified as well).
    """
    n, f = x.shape
    g = _TOPK_GROUP
    if x.device.type != "cpu" or k < 16 or f % g or f // g < 4 * k or n == 0:
        return x.topk(k, dim=-1, sorted=False)
    groups = f // g
    xd = x.detach()
    maxima = xd.reshape(n, g, groups).amax(1)
    if x.dtype not in (torch.float32, torch.float64):
        best = maxima.topk(k, dim=-1, sorted=False).indices
        cand = (best.unsqueeze(-1) + groups * torch.arange(g, device=x.device)).view(n, k * g)
        values, j = x.gather(1, cand).topk(k, dim=-1, sorted=False)
        return values, cand.gather(1, j)
    a, m = xd.numpy(), maxima.numpy()
    workers = torch.get_num_threads()
    if workers < 2 or n < 2 * workers:
        cols = torch.from_numpy(_bounded_columns(a, m, k))
    else:  # NumPy uses one core per call: rows split over the torch threads

        def part(rows: Tensor) -> Tensor:
            s, e = int(rows[0]), int(rows[-1]) + 1
            return torch.from_numpy(_bounded_columns(a[s:e], m[s:e], k))

        cols = torch.cat(map_blocks(part, torch.arange(n).split(-(-n // workers))))
    return x.gather(1, cols), cols
