"""Exact symmetric eigensolvers for the interaction matrices of a bilinear MLP: a batched full
``eigh`` and a LAPACK top-k (largest ``|λ|``) path, both returning eigenpairs sorted by ``|λ|``
(docs/math.md §7). Kept apart from :mod:`tl_mdl.bilinear.decompose`, which forms the matrices
and streams them through these solvers."""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch
from jaxtyping import Float
from scipy.linalg import lapack
from torch import Tensor


class Eigen(NamedTuple):
    """Eigendecomposition of ``Q(u)`` per output direction, sorted by ``|λ|`` descending.

    ``values [n, k]``; ``vectors [n, k, d]`` with ``vectors[i, j]`` the unit eigenvector
    (a row, not a column) belonging to ``values[i, j]``. ``k = d`` for a full decomposition.
    """

    values: Float[Tensor, "n k"]
    vectors: Float[Tensor, "n k d"]


def _sort_by_abs(
    values: Tensor, vectors_rows: Tensor, k: int | None, out: Eigen | None = None
) -> Eigen:
    """Eigenpairs sorted by ``|λ|`` descending (the first ``k``), written into ``out`` if given."""
    order = values.abs().argsort(dim=-1, descending=True, stable=True)
    if k is not None:
        order = order[..., :k]
    index = order[..., None].expand(-1, -1, vectors_rows.shape[-1])
    if out is None:
        return Eigen(values.gather(-1, order), vectors_rows.gather(-2, index))
    torch.gather(values, -1, order, out=out.values)
    torch.gather(vectors_rows, -2, index, out=out.vectors)
    return out


_LAPACK = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}


@functools.lru_cache(maxsize=32)
def _sytrd_lwork(prefix: str, n: int) -> int:
    work, info = getattr(lapack, prefix + "sytrd_lwork")(n)
    return max(int(work), n) if info == 0 else n * 64


def _tridiagonal_vectors(
    diag: np.ndarray, off: np.ndarray, w_all: np.ndarray, ranges: list[tuple[int, int]]
) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs ``ranges`` (inclusive index ranges of the ascending spectrum) of the
    tridiagonal ``(diag, off)``. Unreduced matrices (the usual case) use inverse iteration
    (``stein``) on the eigenvalues already known from ``sterf``; matrices that split into
    blocks, or a ``stein`` failure, fall back to MRRR (``stemr``)."""
    p = _LAPACK[diag.dtype]
    n = len(diag)
    ulp = np.finfo(diag.dtype).eps
    tiny = np.finfo(diag.dtype).tiny
    w = np.concatenate([w_all[a : b + 1] for a, b in ranges])
    # LAPACK stebz's splitting test: e_j² ≤ ulp²·|d_j d_{j+1}| + safe_min splits the matrix
    e2 = off.astype(np.float64) ** 2
    unreduced = not np.any(e2 <= ulp**2 * np.abs(diag[:-1] * diag[1:]) + tiny)
    if unreduced:
        iblock = np.ones(n, dtype=np.int32)
        isplit = np.zeros(n, dtype=np.int32)
        isplit[0] = n
        z, info = getattr(lapack, p + "stein")(diag, off, w, iblock, isplit)
        if info == 0:
            return w, z[:, : len(w)]
    parts_w, parts_z = [], []
    for a, b in ranges:
        wi, zi = scipy.linalg.eigh_tridiagonal(
            diag, off, select="i", select_range=(a, b), lapack_driver="stemr", check_finite=False
        )
        parts_w.append(wi)
        parts_z.append(zi)
    return np.concatenate(parts_w), np.concatenate(parts_z, axis=1)


def _topk_eigh_one(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k largest-|λ| eigenpairs of one symmetric matrix via LAPACK: one blocked
    tridiagonal reduction (``sytrd``), all eigenvalues of the tridiagonal (``sterf``, O(d²)),
    eigenvectors only for the two ends of the spectrum that hold the top-|λ| (``stein`` /
    ``stemr``, O(d k)), and a back-transformation of only those k vectors (``ormqr``,
    O(d² k)). Returns ``(w [k], V [d, k])``."""
    p = _LAPACK[q.dtype]
    n = q.shape[0]
    # q is symmetric, so its transpose is a Fortran-ordered view of the same matrix (no copy)
    a, diag, off, tau, info = getattr(lapack, p + "sytrd")(
        q.T, lower=1, lwork=_sytrd_lwork(p, n), overwrite_a=1
    )
    if info != 0:
        raise np.linalg.LinAlgError(f"{p}sytrd failed with info={info}")
    w_all, info = getattr(lapack, p + "sterf")(diag, off)
    if info != 0:
        raise np.linalg.LinAlgError(f"{p}sterf failed with info={info}")
    lo, hi = 0, n - 1
    for _ in range(k):  # two-pointer merge from both ends of the ascending spectrum
        if abs(w_all[lo]) >= abs(w_all[hi]):
            lo += 1
        else:
            hi -= 1
    ranges = [(a_, b_) for a_, b_ in ((0, lo - 1), (hi + 1, n - 1)) if b_ >= a_]
    w, Z = _tridiagonal_vectors(diag, off, w_all, ranges)
    # back-transform: Q_house = H(1)…H(d-1) stored geqrf-style in a[1:, :-1]
    V = torch.from_numpy(np.ascontiguousarray(Z))
    if n > 1:
        V[1:] = torch.ormqr(
            torch.from_numpy(a)[1:, :-1], torch.from_numpy(tau), V[1:].clone(), left=True
        )
    return w, V.numpy()


def _eigh_chunk(
    Q: Tensor, k: int | None, out: Eigen | None = None, work: Tensor | None = None
) -> Eigen:
    """Eigenpairs of each ``Q [n, d, d]`` sorted by ``|λ|`` (the top ``k``), into ``out`` if
    given. ``work`` (``n·d²`` elements): where the full ``eigh`` computes its vectors."""
    d = Q.shape[-1]
    if k is None or k >= d:
        if work is None:
            values, vectors = torch.linalg.eigh(Q)
        else:  # batched column-major, as eigh's own output, but placed by the caller
            values, vectors = Q.new_empty(Q.shape[:-1]), work.view(Q.shape).mT
            torch.linalg.eigh(Q, out=(values, vectors))
        return _sort_by_abs(values, vectors.mT, None if k is None else k, out)
    Qn = Q.cpu().numpy()
    ws, vs = [], []
    for q in Qn:
        w, v = _topk_eigh_one(q, k)
        ws.append(w)
        vs.append(v.T)
    values = torch.from_numpy(np.stack(ws)).to(Q.device)
    vectors = torch.from_numpy(np.stack(vs)).to(Q.device)
    return _sort_by_abs(values, vectors, None, out)


def _aligned(like: Tensor, numel: int, offset_bytes: int) -> Tensor:
    """A flat buffer of ``numel`` elements whose address is ``offset_bytes`` mod 64: where
    the matrix at that byte offset of a fresh batch (64-byte aligned) would sit."""
    item = like.element_size()
    buf = like.new_empty(numel + 64 // item)
    shift = (offset_bytes - buf.data_ptr()) % 64 // item
    return buf[shift : shift + numel]


