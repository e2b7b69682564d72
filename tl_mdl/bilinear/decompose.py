"""Weight-based decomposition of a bilinear MLP: interaction matrices, their eigendecomposition,
and the top singular output directions of the bilinear tensor — all without materialising it.

Conventions (TransformerLens shapes): ``W_in, W_gate [d_in, h]``, ``W_out [h, d_out]``.
With the bias folded in, ``x̃ = [x; 1]``, ``L = [W_in; b_in]``, ``R = [W_gate; b_gate]``
(``[d, h]`` with ``d = d_in + 1``), so for every output direction ``u``::

    u·out(x) − u·b_out = x̃ᵀ Q(u) x̃,     Q(u) = sym(L · diag(W_out u) · Rᵀ),  sym(A) = (A+Aᵀ)/2

and ``Q(u) = Σ_j λ_j v_j v_jᵀ`` gives ``u·out(x) − u·b_out = Σ_j λ_j (v_j·x̃)²``.
The bilinear tensor ``B[o,i,j] = Σ_h W_out[h,o] L[i,h] R[j,h]`` (symmetrised in ``i,j``) is
never built: ``Q(u) = Σ_o u_o B[o]`` costs one ``[d,h]×[h,d]`` GEMM per direction.

In a transformer, ``x`` is the MLP's *input*, i.e. the residual stream after ``ln2``
(the normalised residual), not the raw residual stream.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from tl_mdl._tl import gated_mlp_parts
from tl_mdl.bilinear.eigh import Eigen, _aligned, _eigh_chunk


class OutputSVD(NamedTuple):
    """Top singular values ``values [k]`` and left singular vectors ``out_dirs [k, d_out]``
    (unit rows) of the bilinear tensor reshaped ``(d_out, d²)``."""

    values: Float[Tensor, " k"]
    out_dirs: Float[Tensor, "k d_out"]


# ---------------------------------------------------------------------------------------------
# weights, bases and directions


def _weights(mlp) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(W_in, W_gate, W_out, b_in, b_gate, b_out)`` of a bilinear layer in the
    biases-inside form ``((x W_gate + b_gate)·(x W_in + b_in)) W_out + b_out``. Any gated MLP
    (by structure: TL 3.9 ``GatedMLP``, a bridge's gated MLP, :class:`BilinearMLP`) whose gate
    activation is the identity qualifies; a post-product ``b_in`` (TL 3.9) is folded into
    ``b_out``. A module with the three weights and no activation is read as bilinear."""
    parts = gated_mlp_parts(mlp)
    if parts is None:
        missing = [n for n in ("W_in", "W_gate", "W_out") if getattr(mlp, n, None) is None]
        raise TypeError(
            f"{type(mlp).__name__} has no {missing or 'gated weights'}; the decomposition "
            "needs a bilinear layer (tl_mdl.BilinearMLP; convert a gated MLP with "
            "tl_mdl.to_bilinear or tl_mdl.anneal_to_bilinear)"
        )
    if parts.act is not None and not parts.bilinear:
        act = getattr(parts.act, "__name__", type(parts.act).__name__)
        raise TypeError(
            f"{type(mlp).__name__} is a gated MLP with gate activation {act}, not the "
            "identity, so it is not bilinear and its eigendecomposition would be wrong; "
            "convert it first with tl_mdl.to_bilinear(model) (exact only for an identity "
            "activation) or fine-tune it with tl_mdl.anneal_to_bilinear(model, tokens, steps)"
        )
    W_in, W_gate, W_out = parts.W_in.detach(), parts.W_gate.detach(), parts.W_out.detach()
    b_in, b_gate, b_out = parts.b_in.detach(), parts.b_gate.detach(), parts.b_out.detach()
    if not parts.bias_inside:  # ((x W_gate)·(x W_in) + b_in) W_out + b_out
        b_out = b_out + b_in @ W_out
        b_in = torch.zeros_like(b_in)
    return W_in, W_gate, W_out, b_in, b_gate, b_out


def _basis(in_basis, d_in: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(D [m, d_in], offset [d_in])`` with ``x = f @ D + offset``."""
    if isinstance(in_basis, Tensor):
        D, offset = in_basis, torch.zeros(d_in, dtype=in_basis.dtype, device=in_basis.device)
    elif getattr(in_basis, "W_dec", None) is not None:  # an SAE: x ≈ f @ W_dec + b_dec
        D = in_basis.W_dec.detach()
        b_dec = getattr(in_basis, "b_dec", None)
        offset = torch.zeros(d_in, dtype=D.dtype) if b_dec is None else b_dec.detach()
    else:
        raise TypeError(
            f"in_basis must be a [m, d_in] tensor or an SAE with W_dec, got {type(in_basis)}"
        )
    if D.ndim != 2 or D.shape[1] != d_in:
        raise ValueError(
            f"in_basis has shape {tuple(D.shape)}; expected [m, d_in={d_in}] (one basis "
            "vector per row, e.g. an SAE's W_dec)"
        )
    return D.to(like), offset.to(like)


def _out_dirs(out_dirs, d_out: int, like: Tensor) -> Tensor:
    if not isinstance(out_dirs, Tensor):
        W_enc = getattr(out_dirs, "W_enc", None)
        if W_enc is None:
            raise TypeError(
                f"out_dirs must be a [n, d_out] tensor or an SAE with W_enc, got {type(out_dirs)}"
            )
        out_dirs = W_enc.detach().T  # encoder directions: pre-activation = u·out + const
    U = out_dirs.detach()
    if U.ndim == 1:
        U = U[None]
    if U.ndim != 2 or U.shape[1] != d_out:
        raise ValueError(
            f"out_dirs has shape {tuple(out_dirs.shape)}; expected [n, d_out={d_out}] "
            "(one output direction per row, e.g. model.W_U.T[tokens] or sae.W_enc.T)"
        )
    return U.to(like)


def folded_weights(
    mlp, *, bias: bool = True, in_basis=None, dtype: torch.dtype | None = None
) -> tuple[Float[Tensor, "d h"], Float[Tensor, "d h"], Float[Tensor, "h d_out"]]:
    """``(L, R, W_out)`` with ``L = [W_in; b_in]``, ``R = [W_gate; b_gate]`` (rows ``d = d_in+1``
    with ``bias``, else ``d = d_in`` and biases dropped). With ``in_basis`` (``[m, d_in]`` rows
    ``D``, or an SAE: ``D = W_dec`` and offset ``b_dec``) inputs are coordinates ``f`` with
    ``x = f D + offset``: ``L = [D W_in; offset W_in + b_in]`` (likewise ``R``), ``d = m (+1)``."""
    W_in, W_gate, W_out, b_in, b_gate, _ = _weights(mlp)
    dtype = dtype or W_in.dtype
    W_in, W_gate, W_out = W_in.to(dtype), W_gate.to(dtype), W_out.to(dtype)
    b_in, b_gate = b_in.to(dtype), b_gate.to(dtype)
    if in_basis is not None:
        D, offset = _basis(in_basis, W_in.shape[0], W_in)
        b_in, b_gate = offset @ W_in + b_in, offset @ W_gate + b_gate
        W_in, W_gate = D @ W_in, D @ W_gate
    if bias:
        W_in = torch.cat([W_in, b_in[None]], 0)
        W_gate = torch.cat([W_gate, b_gate[None]], 0)
    return W_in, W_gate, W_out


# ---------------------------------------------------------------------------------------------
# interaction matrices


def _form_q(
    L: Tensor, R: Tensor, C: Tensor, scratch: Tensor | None = None, out: Tensor | None = None
) -> Tensor:
    """``sym(L diag(c) Rᵀ)`` for each row ``c`` of ``C [n, h]`` → ``[n, d, d]``, one GEMM each."""
    n, d = C.shape[0], L.shape[0]
    Q = L.new_empty(n, d, d) if out is None else out
    scratch = L.new_empty(L.shape) if scratch is None else scratch
    R_T = R.T
    for i in range(n):
        torch.mul(L, C[i], out=scratch)
        torch.matmul(scratch, R_T, out=Q[i])
    for q in Q:  # symmetrise in place; the temporary is one [d, d]
        q.add_(q.T.clone()).mul_(0.5)
    return Q


def interaction_matrix(
    mlp,
    out_dirs: Float[Tensor, "n d_out"],
    *,
    bias: bool = True,
    in_basis=None,
    dtype: torch.dtype | None = None,
) -> Float[Tensor, "n d d"]:
    """Symmetric interaction matrices ``Q(u) = sym(L diag(W_out u) Rᵀ)``, one per row ``u`` of
    ``out_dirs [n, d_out]`` (or an SAE: its encoder directions ``W_enc.T``).

    ``x̃ᵀ Q(u) x̃ = u·out(x) − u·b_out`` with ``x̃ = [x; 1]`` (``d = d_in + 1``) when
    ``bias``; with ``bias=False`` ``d = d_in`` and all biases are dropped (the pure quadratic
    part). ``in_basis`` (``[m, d_in]`` or an SAE, see :func:`folded_weights`) expresses inputs
    in another basis, e.g. an input-side SAE's decoder: feature-to-feature interactions.
    Costs ``O(n d² h)`` and ``O(d h)`` scratch; the bilinear tensor is never built.
    """
    L, R, W_out = folded_weights(mlp, bias=bias, in_basis=in_basis, dtype=dtype)
    U = _out_dirs(out_dirs, W_out.shape[1], W_out)
    return _form_q(L, R, U @ W_out.T)


# ---------------------------------------------------------------------------------------------
# eigendecomposition


# Most directions whose Q(u) is formed and solved at once (see _eigen_into)
_EIGH_BATCH = 8


def _as_int(v) -> int | None:
    """``v`` as a Python int (ints, NumPy ints, 0-d integer tensors), else None (bools too)."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def iter_eigendecompose(
    mlp,
    out_dirs: Float[Tensor, "n d_out"],
    *,
    bias: bool = True,
    in_basis=None,
    k: int | None = None,
    chunk_size: int = 32,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Iterator[tuple[slice, Eigen]]:
    """Streaming :func:`eigendecompose`: yields ``(rows, Eigen)`` per chunk of ``chunk_size``
    directions, so peak memory is ``O(chunk_size · d²)`` whatever ``n`` is. Arguments are
    checked when called, before the first chunk."""
    return _iter_eigen_chunks(
        *_checked(mlp, out_dirs, bias, in_basis, k, chunk_size, dtype), progress
    )


def _checked(mlp, out_dirs, bias, in_basis, k, chunk_size, dtype):
    """Validated ``(L, R, W_out, U, k, chunk_size)`` for the eigendecomposition."""
    if k is not None and (_as_int(k) is None or k < 1):
        raise ValueError(f"k={k!r} must be a positive number of eigenpairs (or None for all)")
    if _as_int(chunk_size) is None or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (directions per chunk)")
    L, R, W_out = folded_weights(mlp, bias=bias, in_basis=in_basis, dtype=dtype)
    if L.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"eigendecomposition needs float32 or float64, got {L.dtype}; pass "
            "dtype=torch.float32 or dtype=torch.float64"
        )
    U = _out_dirs(out_dirs, W_out.shape[1], W_out)
    if U.shape[0] == 0:
        raise ValueError("out_dirs has no directions; pass at least one")
    d = L.shape[0]
    if k is not None and k > d:
        raise ValueError(
            f"k={k} exceeds d={d}, the number of eigenpairs per direction; "
            "pass k <= d (or k=None for all)"
        )
    k = None if k is None else _as_int(k)
    return L, R, W_out, U, k, _as_int(chunk_size)


def _eigen_into(
    L: Tensor, R: Tensor, C: Tensor, k: int | None, out: Eigen, scratch: Tensor, d_out: int
) -> None:
    """Eigenpairs of ``Q(c)`` for each row of ``C [c, h]``, written into ``out`` (``[c, k]``,
    ``[c, k, d]``). ``Q`` is formed and solved ``max(1, min(8, d_out // 16))`` directions at
    a time, so the memory beyond ``out`` is about ``d_out / 8 + 2`` ``[d, d]`` matrices (Q,
    eigh's vectors, its workspace): under a quarter of the bilinear tensor's ``d_out·d²``.

    The same bits as solving the whole chunk in one batch, as this did before: every matrix
    has its own GEMM and LAPACK call, and LAPACK's vector kernels round differently with a
    matrix's address alignment, so each batch's Q and eigenvectors are placed at the
    alignment (mod 64 bytes) the same matrices had in a whole-chunk batch."""
    d = L.shape[0]
    size = d * d * L.element_size()
    full = k is None or k >= d
    batch = max(1, min(_EIGH_BATCH, d_out // 16))
    for s in range(0, C.shape[0], batch):
        rows = slice(s, s + batch)
        m = C[rows].shape[0]
        Q = _form_q(L, R, C[rows], scratch, out=_aligned(L, m * d * d, s * size).view(m, d, d))
        work = _aligned(L, m * d * d, s * size) if full else None
        _eigh_chunk(Q, k, Eigen(out.values[rows], out.vectors[rows]), work)
        del Q, work


def _new_eigen(L: Tensor, n: int, k: int | None) -> Eigen:
    d = L.shape[0]
    return Eigen(L.new_empty(n, d if k is None else k), L.new_empty(n, d if k is None else k, d))


def _iter_eigen_chunks(
    L: Tensor, R: Tensor, W_out: Tensor, U: Tensor, k: int | None, chunk_size: int,
    progress: bool, out: Eigen | None = None,
) -> Iterator[tuple[slice, Eigen]]:
    """Each chunk's eigenpairs, in a new ``Eigen`` per chunk or, with ``out``, in its rows."""
    scratch = L.new_empty(L.shape)
    n = U.shape[0]
    starts = range(0, n, chunk_size)
    for start in tqdm(starts, desc="eigendecompose", disable=not progress, unit="chunk"):
        rows = slice(start, min(start + chunk_size, n))
        C = U[rows] @ W_out.T  # [c, h]: the diagonal of Q(u) in the hidden basis
        part = (_new_eigen(L, C.shape[0], k) if out is None
                else Eigen(out.values[rows], out.vectors[rows]))
        _eigen_into(L, R, C, k, part, scratch, W_out.shape[1])
        yield rows, part


def eigendecompose(
    mlp,
    out_dirs: Float[Tensor, "n d_out"],
    *,
    bias: bool = True,
    in_basis=None,
    k: int | None = None,
    chunk_size: int = 32,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Eigen:
    """Eigendecomposition ``Q(u) = Σ_j λ_j v_j v_jᵀ`` of :func:`interaction_matrix` for every row
    of ``out_dirs``, sorted by ``|λ|`` descending: ``values [n, k]``, ``vectors [n, k, d]``
    (rows). ``u·out(x) − u·b_out = Σ_j λ_j (v_j·x̃)²`` exactly when ``k`` is None (all ``d``).

    ``k``: only the ``k`` largest-``|λ|`` eigenpairs (``1 <= k <= d``), computed exactly with
    LAPACK subset drivers after one tridiagonal reduction (much cheaper than a full ``eigh``).
    Directions are processed in chunks of ``chunk_size`` (a positive int); see
    :func:`iter_eigendecompose` to stream. ``dtype`` (default: the weights') must be float32 or
    float64. Raises ``ValueError`` for ``k > d``, ``k < 1`` or an empty ``out_dirs``.
    """
    L, R, W_out, U, k, chunk_size = _checked(mlp, out_dirs, bias, in_basis, k, chunk_size, dtype)
    # every chunk is written into the preallocated result, so the memory beyond it is one
    # chunk's [c, h] diagonals and a few [d, d] matrices (see _eigen_into), not a second copy
    out = _new_eigen(L, U.shape[0], k)
    for _ in _iter_eigen_chunks(L, R, W_out, U, k, chunk_size, progress, out):
        pass
    return out


def eigen_expansion(
    eigen: Eigen, x: Float[Tensor, "... d_in"], k: int | None = None
) -> Float[Tensor, "... n"]:
    """``Σ_{j<k} λ_j (v_j·x̃)²`` per direction: the top-``k`` truncation of ``u·out(x) − u·b_out``.
    ``x̃ = [x; 1]`` when the eigenvectors have ``d_in + 1`` entries (bias folded), else ``x``.
    ``x`` is in the decomposition's input basis (coordinates ``f`` if ``in_basis`` was used)."""
    values, vectors = eigen
    if k is not None and (_as_int(k) is None or k < 0):
        raise ValueError(f"k={k!r} must be an int >= 0 (eigenpairs kept per direction) or None")
    if k is not None:
        values, vectors = values[:, :k], vectors[:, :k]
    d = vectors.shape[-1]
    x = x.to(vectors.dtype)
    if x.shape[-1] == d - 1:
        x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)
    elif x.shape[-1] != d:
        raise ValueError(f"x has {x.shape[-1]} features; the eigenvectors have d={d} (or d-1)")
    proj = torch.einsum("...d,nkd->...nk", x, vectors)
    return (proj.square() * values).sum(-1)


# ---------------------------------------------------------------------------------------------
# output directions


def output_svd(
    mlp,
    k: int,
    *,
    bias: bool = True,
    in_basis=None,
    dtype: torch.dtype | None = None,
    block: int = 1024,
) -> OutputSVD:
    """Top-``k`` singular values and left singular vectors (output directions) of the
    symmetrised bilinear tensor reshaped ``(d_out, d²)``, without building it.

    ``B Bᵀ = W_outᵀ M W_out`` with the ``[h, h]`` Gram matrix of the hidden units' rank-one
    terms ``M[h,h'] = ⟨sym(l_h r_hᵀ), sym(l_h' r_h'ᵀ)⟩ = ½[(LᵀL)∘(RᵀR) + (LᵀR)∘(RᵀL)]``,
    accumulated in row blocks of ``block`` hidden units (``O(h² (d + d_out))`` time,
    ``O(block · h)`` memory); then ``eigh`` of the ``[d_out, d_out]`` matrix gives ``σ² , U``.
    Each output direction's sign is fixed so its largest-magnitude entry is positive.
    """
    L, R, W_out = folded_weights(mlp, bias=bias, in_basis=in_basis, dtype=dtype)
    h, d_out = W_out.shape
    if not 1 <= k <= d_out:
        raise ValueError(f"k={k} must be in 1..d_out={d_out}")
    G = W_out.new_zeros(d_out, d_out)
    for s in range(0, h, block):
        Lb, Rb = L[:, s : s + block], R[:, s : s + block]
        M_blk = 0.5 * ((Lb.T @ L) * (Rb.T @ R) + (Lb.T @ R) * (Rb.T @ L))  # [b, h]
        G += W_out[s : s + block].T @ (M_blk @ W_out)
    G = 0.5 * (G + G.T)
    evals, evecs = torch.linalg.eigh(G)
    evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k].T
    idx = evecs.abs().argmax(-1, keepdim=True)
    evecs = evecs * evecs.gather(-1, idx).sign()
    return OutputSVD(evals.clamp_min(0).sqrt(), evecs)
