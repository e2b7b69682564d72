"""A real entropy coder for integer SAE latent codes, so the description length is honest.

``encode(q)`` writes each feature as the DL formula counts it (docs/math.md §1, §4): a presence
stream (``N`` Bernoulli symbols with probability ``p_i``) and a value stream (the ``c_i``
nonzero values, categorical with their empirical distribution), all range-coded with
``constriction``'s ANS coder. The header carries the model (per-feature counts and
histograms), zlib-compressed, and is reported apart from the payload; a CRC32 guards both.
For large ``N`` the payload is within ~1% of ``N × latent_description_length(q)`` bits.

Layout: ``MAGIC | u32 crc32(rest) | u64 header_len | u64 payload_words | header | payload``.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import constriction
import numpy as np
import torch
from jaxtyping import Int
from torch import Tensor

_Categorical = constriction.stream.model.Categorical
_AnsCoder = constriction.stream.stack.AnsCoder

MAGIC = b"TLMDLC1\n"
_FIXED = struct.Struct("<IQQ")


@dataclass
class CodecStats:
    """Sizes of an encoded stream (bits)."""

    n_inputs: int
    n_features: int
    header_bits: int
    payload_bits: int

    @property
    def total_bits(self) -> int:
        return self.header_bits + self.payload_bits

    @property
    def payload_bits_per_input(self) -> float:
        return self.payload_bits / self.n_inputs


def _histograms(q: np.ndarray):
    """Per feature: active count, distinct nonzero values (sorted) and their counts."""
    n, f = q.shape
    rows, cols = np.nonzero(q)
    vals = q[rows, cols]
    order = np.lexsort((vals, cols))  # by feature, then value
    cols_s, vals_s = cols[order], vals[order]
    counts = np.bincount(cols, minlength=f)
    if vals_s.size:
        change = np.ones(vals_s.size, dtype=bool)
        change[1:] = (cols_s[1:] != cols_s[:-1]) | (vals_s[1:] != vals_s[:-1])
        starts = np.flatnonzero(change)
        uniq_vals = vals_s[starts]
        uniq_cols = cols_s[starts]
        uniq_counts = np.diff(np.append(starts, vals_s.size))
    else:
        uniq_vals = uniq_cols = uniq_counts = np.zeros(0, dtype=np.int64)
    n_distinct = np.bincount(uniq_cols, minlength=f)
    return counts, n_distinct, uniq_vals.astype(np.int64), uniq_counts.astype(np.int64)


def _bernoulli(c: int, n: int) -> _Categorical:
    return _Categorical(np.array([n - c, c], dtype=np.float64), perfect=False)


def encode(q: Int[Tensor, "n d_sae"]) -> bytes:
    """Entropy-code an integer latent code ``q [N, F]`` into bytes (see module docstring)."""
    if not isinstance(q, Tensor) or q.ndim != 2:
        raise ValueError(
            f"q must be an integer tensor of shape [N, F], got {getattr(q, 'shape', q)}"
        )
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise TypeError(f"q must be integer (got {q.dtype}); use tl_mdl.quantize(latents, w)")
    if q.dtype == torch.uint64:
        big = q.detach().cpu().numpy().max(initial=0)
        if big > np.iinfo(np.int64).max:
            raise ValueError(
                f"q holds {big}, beyond int64 (the codec's value type); quantise with a "
                "coarser bin width"
            )
    qn = q.detach().cpu().to(torch.int64).numpy()
    n, f = qn.shape
    if n == 0:
        raise ValueError("q has N = 0 inputs; nothing to encode")
    counts, n_distinct, uvals, ucounts = _histograms(qn)
    payload = _encode_streams(qn, counts, n_distinct, uvals, ucounts, np.full(f, -1), range(f))
    return _frame(MAGIC, np.concatenate([[n, f], counts, n_distinct, uvals, ucounts]), payload)


def _encode_streams(
    qn: np.ndarray,
    counts: np.ndarray,
    n_distinct: np.ndarray,
    uvals: np.ndarray,
    ucounts: np.ndarray,
    parent: np.ndarray,
    order,
) -> bytes:
    """The ANS payload of ``qn [N, F]``: per feature in ``order``, its presence over the
    inputs where its parent is active (all inputs for a root, ``parent = -1``), then its
    values as indices into its sorted distinct values. Streams whose outcome the header
    already fixes (always / never present, one value) are skipped."""
    n = qn.shape[0]
    offsets = np.concatenate([[0], np.cumsum(n_distinct)])
    active = qn != 0
    coder = _AnsCoder()
    for i in reversed(list(order)):  # a stack: encode in reverse of decoding order
        c, k = int(counts[i]), int(n_distinct[i])
        if k > 1:  # value stream
            col = qn[:, i]
            idx = np.searchsorted(uvals[offsets[i] : offsets[i + 1]], col[col != 0])
            model = _Categorical(
                ucounts[offsets[i] : offsets[i + 1]].astype(np.float64), perfect=False
            )
            coder.encode_reverse(idx.astype(np.int32), model)
        a = int(parent[i])
        where = active[:, a] if a >= 0 else slice(None)
        ca = int(counts[a]) if a >= 0 else n
        if 0 < c < ca:  # presence stream over the inputs where the parent is active
            coder.encode_reverse(active[where, i].astype(np.int32), _bernoulli(c, ca))
    return coder.get_compressed().astype("<u4").tobytes()


def _decode_streams(
    payload: np.ndarray, n: int, model: np.ndarray, parent: np.ndarray, order
) -> np.ndarray:
    """Inverse of :func:`_encode_streams` given the flat header layout ``model``
    (``[N, F, counts, n_distinct, values, value counts]``); checks every count."""
    f = int(model[1])
    counts = model[2 : 2 + f]
    n_distinct = model[2 + f : 2 + 2 * f]
    total = int(n_distinct.sum())
    uvals = model[2 + 2 * f : 2 + 2 * f + total]
    ucounts = model[2 + 2 * f + total : 2 + 2 * f + 2 * total]
    offsets = np.concatenate([[0], np.cumsum(n_distinct)])
    coder = _AnsCoder(payload)
    q = np.zeros((n, f), dtype=np.int64)
    for i in order:
        c, k = int(counts[i]), int(n_distinct[i])
        if c == 0:
            continue
        a = int(parent[i])
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
    return q


def _frame(magic: bytes, header: np.ndarray, payload: bytes) -> bytes:
    """``magic | crc32 | header_len | payload_words | zlib(int64 header) | payload``."""
    packed = zlib.compress(np.asarray(header).astype("<i8").tobytes(), 9)
    body = _FIXED.pack(0, len(packed), len(payload) // 4)[4:] + packed + payload
    return magic + struct.pack("<I", zlib.crc32(body)) + body


def _unframe(data: bytes, magic: bytes, writer: str):
    """Inverse of :func:`_frame`, checking magic, lengths and CRC: returns the int64 header,
    the payload words and the compressed header's length in bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes from {writer}, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < len(magic) + _FIXED.size or not data.startswith(magic):
        raise ValueError(f"not a {writer} stream (bad magic); was it written by {writer}?")
    crc, header_len, n_words = _FIXED.unpack_from(data, len(magic))
    body = data[len(magic) + 4 :]
    expected = 16 + header_len + 4 * n_words
    if len(body) != expected:
        raise ValueError(
            f"latent code is truncated or padded: {len(body)} body bytes, expected {expected}"
        )
    if zlib.crc32(body) != crc:
        raise ValueError("latent code is corrupted (CRC32 mismatch)")
    try:
        raw = zlib.decompress(body[16 : 16 + header_len])
    except zlib.error as e:
        raise ValueError(f"latent code header is corrupted ({e})") from e
    if len(raw) % 8:
        raise ValueError("latent code header is corrupted (not a whole number of int64)")
    header = np.frombuffer(raw, dtype="<i8")
    payload = np.frombuffer(body[16 + header_len :], dtype="<u4").astype(np.uint32)
    return header, payload, header_len


def _parse(data: bytes):
    header, payload, header_len = _unframe(data, MAGIC, "tl_mdl.codec.encode")
    _validate_header(header)
    return header, payload, header_len


def _validate_header(header: np.ndarray) -> None:
    """The model must be self-consistent: 0 <= c_i <= N, histograms summing to c_i."""

    def bad(why: str) -> ValueError:
        return ValueError(f"latent code header is corrupted: {why}")

    if header.size < 2:
        raise bad("too short")
    n, f = int(header[0]), int(header[1])
    if n <= 0 or f < 0 or header.size < 2 + 2 * f:
        raise bad(f"N={n}, F={f} with {header.size} header values")
    counts, n_distinct = header[2 : 2 + f], header[2 + f : 2 + 2 * f]
    total = int(n_distinct.sum()) if f else 0
    if header.size != 2 + 2 * f + 2 * total:
        raise bad(f"{header.size} values, expected {2 + 2 * f + 2 * total}")
    if (counts < 0).any() or (counts > n).any():
        raise bad(f"active counts outside [0, N={n}]")
    if (n_distinct < 0).any() or ((n_distinct == 0) != (counts == 0)).any():
        raise bad("distinct-value counts inconsistent with active counts")
    uvals = header[2 + 2 * f : 2 + 2 * f + total]
    ucounts = header[2 + 2 * f + total :]
    if (uvals == 0).any() or (ucounts <= 0).any():
        raise bad("value histograms contain zeros")
    owner = np.repeat(np.arange(f), n_distinct)  # feature of each histogram entry
    sums = np.zeros(f, dtype=np.int64)
    np.add.at(sums, owner, ucounts)
    if not np.array_equal(sums, counts):
        raise bad("value histograms do not sum to the active counts")


def inspect(data: bytes) -> CodecStats:
    """Header and payload sizes of an encoded stream."""
    header, payload, header_len = _parse(data)
    fixed = len(MAGIC) + _FIXED.size
    return CodecStats(int(header[0]), int(header[1]), 8 * (header_len + fixed), 32 * payload.size)


def decode(data: bytes) -> Int[Tensor, "n d_sae"]:
    """Inverse of :func:`encode`: returns the exact integer code ``q [N, F]`` (int64)."""
    header, payload, _ = _parse(data)
    n, f = int(header[0]), int(header[1])
    q = _decode_streams(payload, n, header, np.full(f, -1), range(f))
    return torch.from_numpy(q)


__all__ = ["encode", "decode", "inspect", "CodecStats", "MAGIC"]
