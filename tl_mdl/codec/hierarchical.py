"""Entropy coder for hierarchical latent codes: children coded conditionally on parents.

Like :mod:`tl_mdl.codec` (one presence stream and one value stream per feature, ANS-coded
with ``constriction``), except that a child ``i`` of parent ``a`` has its presence stream
only over the ``c_a`` inputs where ``a`` is active: ``c_a`` Bernoulli symbols with
probability ``p_{i|a} = c_i / c_a``. Its payload is therefore about
``N · hierarchical_description_length(q, parent_index)`` bits (within ~1% for large ``N``).
Features are coded parents first (by depth), so the decoder knows where each parent is
active before it reads the child's presence stream.

A child active where its parent is not cannot be written this way: :func:`encode` raises
``ValueError`` naming the child, its parent and the first offending row.

Layout: ``MAGIC | u32 crc32(rest) | u64 header_len | u64 payload_words | header | payload``;
the header (zlib) holds ``N, F, parent_index[F]`` and then the flat codec's model
(per-feature active counts and value histograms).
"""

from __future__ import annotations

import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

from tl_mdl.codec import (
    _FIXED,
    CodecStats,
    _AnsCoder,
    _bernoulli,
    _Categorical,
    _frame,
    _histograms,
    _unframe,
    _validate_header,
)
from tl_mdl.sae.hierarchical import check_gating, check_parent_index

MAGIC = b"TLMDLH1\n"


def _check_q(q: Tensor) -> None:
    if not isinstance(q, Tensor) or q.ndim != 2:
        raise ValueError(
            f"q must be an integer tensor of shape [N, F], got {getattr(q, 'shape', q)}"
        )
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"q must be integer (got {q.dtype}); use tl_mdl.quantize(latents, w)")
    if q.shape[0] == 0:
        raise ValueError("q has N = 0 inputs; nothing to encode")


def encode(q: Int[Tensor, "n d_sae"], parent_index: Int[Tensor, " d_sae"] | list[int]) -> bytes:
    """Entropy-code ``q [N, F]`` with children coded conditionally on their parents
    (``parent_index [F]``, ``-1`` for roots). Raises ``ValueError`` if a child is active
    where its parent is not."""
    _check_q(q)
    n, f = q.shape
    pi, order = check_parent_index(parent_index, f)
    qt = q.detach().cpu().to(torch.int64)
    check_gating(qt, pi)
    qn = qt.numpy()
    pin = pi.numpy()
    counts, n_distinct, uvals, ucounts = _histograms(qn)
    offsets = np.concatenate([[0], np.cumsum(n_distinct)])
    active = qn != 0
    coder = _AnsCoder()
    for i in reversed(order.tolist()):  # a stack: encode in reverse of decoding order
        c, k = int(counts[i]), int(n_distinct[i])
        if k > 1:  # value stream: indices into this feature's sorted distinct values
            vals_i = uvals[offsets[i] : offsets[i + 1]]
            col = qn[:, i]
            idx = np.searchsorted(vals_i, col[col != 0]).astype(np.int32)
            model = _Categorical(
                ucounts[offsets[i] : offsets[i + 1]].astype(np.float64), perfect=False
            )
            coder.encode_reverse(idx, model)
        a = int(pin[i])
        where = active[:, a] if a >= 0 else slice(None)
        ca = int(counts[a]) if a >= 0 else n
        if 0 < c < ca:  # presence stream over the inputs where the parent is active
            coder.encode_reverse(active[where, i].astype(np.int32), _bernoulli(c, ca))
    payload = coder.get_compressed().astype("<u4").tobytes()
    return _frame(MAGIC, np.concatenate([[n, f], pin, counts, n_distinct, uvals, ucounts]), payload)


def _parse(data: bytes):
    header, payload, header_len = _unframe(data, MAGIC, "tl_mdl.codec.hierarchical.encode")
    if header.size < 2 or header[1] < 0 or header.size < 2 + header[1]:
        raise ValueError("latent code header is corrupted: too short")
    n, f = int(header[0]), int(header[1])
    pi = header[2 : 2 + f]
    model = np.concatenate([header[:2], header[2 + f :]])  # the flat codec's header layout
    if model.size < 2 + 2 * f:
        raise ValueError(f"latent code header is corrupted: N={n}, F={f} with {header.size} values")
    _validate_header(model)
    try:
        pit, order = check_parent_index(torch.from_numpy(pi.copy()), f)
    except ValueError as e:
        raise ValueError(f"latent code header is corrupted: {e}") from e
    counts = model[2 : 2 + f]
    kids = pi >= 0
    if (counts[kids] > counts[pi[kids]]).any():
        raise ValueError(
            "latent code header is corrupted: a child is more often active than its parent"
        )
    return n, f, pit, order, model, payload, header_len


def inspect(data: bytes) -> CodecStats:
    """Header and payload sizes of an encoded stream."""
    n, f, _, _, _, payload, header_len = _parse(data)
    fixed = len(MAGIC) + _FIXED.size
    return CodecStats(n, f, 8 * (header_len + fixed), 32 * payload.size)


def decode(data: bytes) -> tuple[Int[Tensor, "n d_sae"], Int[Tensor, " d_sae"]]:
    """Inverse of :func:`encode`: the exact code ``q [N, F]`` (int64) and its
    ``parent_index [F]``."""
    n, f, pi, order, model, payload, _ = _parse(data)
    counts = model[2 : 2 + f]
    n_distinct = model[2 + f : 2 + 2 * f]
    total = int(n_distinct.sum())
    uvals = model[2 + 2 * f : 2 + 2 * f + total]
    ucounts = model[2 + 2 * f + total : 2 + 2 * f + 2 * total]
    offsets = np.concatenate([[0], np.cumsum(n_distinct)])
    pin = pi.numpy()
    coder = _AnsCoder(payload)
    q = np.zeros((n, f), dtype=np.int64)
    for i in order.tolist():
        c, k = int(counts[i]), int(n_distinct[i])
        if c == 0:
            continue
        a = int(pin[i])
        rows = np.flatnonzero(q[:, a]) if a >= 0 else np.arange(n)
        if rows.size != (int(counts[a]) if a >= 0 else n):
            raise ValueError(
                "latent code is corrupted: a parent's presence disagrees with its count"
            )
        if c < rows.size:
            present = coder.decode(_bernoulli(c, rows.size), rows.size).astype(bool)
            rows = rows[present]
            if rows.size != c:
                raise ValueError(
                    f"latent code is corrupted: feature {i} decoded {rows.size} presences, "
                    f"its count is {c}"
                )
        vals_i = uvals[offsets[i] : offsets[i + 1]]
        if k > 1:
            vmodel = _Categorical(
                ucounts[offsets[i] : offsets[i + 1]].astype(np.float64), perfect=False
            )
            q[rows, i] = vals_i[coder.decode(vmodel, c)]
        else:
            q[rows, i] = vals_i[0]
    if not coder.is_empty():
        raise ValueError("latent code has trailing payload; the stream is corrupted")
    return torch.from_numpy(q), pi


__all__ = ["encode", "decode", "inspect", "MAGIC"]
