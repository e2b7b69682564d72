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
    _decode_streams,
    _encode_streams,
    _frame,
    _histograms,
    _unframe,
    _validate_header,
)
from tl_mdl.codec.hierarchy import check_gating, check_parent_index

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
    payload = _encode_streams(qn, counts, n_distinct, uvals, ucounts, pin, order.tolist())
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
    q = _decode_streams(payload, n, model, pi.numpy(), order.tolist())
    return torch.from_numpy(q), pi


__all__ = ["encode", "decode", "inspect", "MAGIC"]
