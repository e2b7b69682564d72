"""The quantised-reconstruction evaluator behind :func:`~tl_mdl.mdl.description_length`:
the FVU of ``decode(round(f / w) · w)`` at any bin width ``w`` and the code statistics at the
chosen one, exactly, from the candidates ``|f| > τ(w)`` in row blocks (sparse decodes, merged
counts), with the latents held (:class:`_QuantizedFVU`) or re-encoded chunk by chunk
(:class:`_StreamedQuantizedFVU`). The math is in docs/math.md.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_mdl._memory import release_freed_memory
from tl_mdl._sparse import BLOCK_ELEMENTS, block_rows, csr_decode, extract_block, map_blocks
from tl_mdl.mdl.precision import STEPS_PER_OCTAVE
from tl_mdl.mdl.quantize import (
    FeatureCode,
    _xlog2x,
    code_stats_from_counts,
    flatnonzero,
    total_variance,
)
from tl_mdl.sae import SAE

_CHUNK = 8192


@torch.no_grad()
def encode_all(
    sae: SAE, activations: Float[Tensor, "n d_in"], *, batch_size: int | None = None
) -> Float[Tensor, "n d_sae"]:
    """``sae.encode`` over all rows in chunks of ``batch_size`` rows (default: about 2^26
    latents per chunk, at least 8192 rows), on the SAE's device; returns latents there.
    Chunks are written into one preallocated output (peak memory: the output plus one
    chunk's temporaries)."""
    dev = sae.W_enc.device
    if batch_size is None:
        batch_size = max(_CHUNK, (1 << 26) // max(sae.cfg.d_sae, 1))
    n = activations.shape[0]
    if n <= batch_size:
        return sae.encode(activations.to(dev))
    first = sae.encode(activations[:batch_size].to(dev))
    out = first.new_empty((n, *first.shape[1:]))
    out[:batch_size] = first
    del first
    for i in range(batch_size, n, batch_size):
        out[i : i + batch_size] = sae.encode(activations[i : i + batch_size].to(dev))
    return out


#: A block of candidates with at most this fraction of nonzero entries is decoded as a
#: sparse product (a weighted embedding bag over decoder rows); denser blocks use the GEMM.
_SPARSE_DENSITY = 0.2
#: latents per row block (8 MB in float32): every temporary of the exact evaluation is
#: O(one block), so it is reused from the allocator's heap instead of fresh pages.
_BLOCK_ELEMENTS = BLOCK_ELEMENTS
#: rows of the subsample on which the proxy loss is evaluated during bracketing.
_PROXY_ROWS = 128
#: candidates for the exact code are extracted this many grid steps below the width asked for.
_CANDIDATE_MARGIN_STEPS = 1


def _block_rows(n: int, f: int) -> int:
    """Rows per block for ``n`` rows of width ``f``: at most ``_BLOCK_ELEMENTS`` entries a
    block, blocks of (nearly) equal size (so worker threads get equal shares)."""
    return block_rows(n, f, _BLOCK_ELEMENTS)


def _sq_dist(a: Tensor, b: Tensor) -> float:
    """``Σ (a − b)²`` in one fused pass (cascade summation in the tensors' dtype; relative
    error ~1e-7 in float32, like the GEMM that produced them)."""
    return float(torch.nn.functional.mse_loss(a, b, reduction="sum"))


def _sse_dense(latents: Tensor, W: Tensor, resid: Tensor) -> float:
    """``Σ ‖resid − latents W‖²`` by the dense GEMM, one row block at a time."""
    rows = _block_rows(*latents.shape)
    pairs = zip(latents.split(rows), resid.split(rows), strict=True)
    return sum(_sq_dist(lat.to(W.dtype) @ W, r) for lat, r in pairs)


def _tau(w: float, dtype: torch.dtype) -> float:
    """Candidate threshold for width ``w``: ``τ < w/2`` with a margin of
    ``_CANDIDATE_MARGIN_STEPS`` grid steps (so a slightly finer width needs no new
    candidates) and room for ``τ`` rounded to ``dtype`` and float64 division: ``|f| <= τ``
    ⇒ ``round(f / w) = 0``."""
    shrink = 2.0 ** (-_CANDIDATE_MARGIN_STEPS / STEPS_PER_OCTAVE)
    return float(torch.tensor(0.5 * w * shrink * (1 - 1e-6), dtype=dtype))


def _quantized(values: Tensor, w: float) -> Tensor:
    """``round(values.double() / w)``: :func:`~tl_mdl.mdl.quantize.quantize`'s code, as
    integer-valued float64."""
    return values.to(torch.float64, copy=True).div_(w).round_()


class _Candidates:
    """The entries of an ``[n, f]`` latent matrix with ``|f| > tau`` (every other entry
    quantises to 0 at the widths this serves), in CSR blocks of rows: per block the
    columns, the values and the per-row offsets that ``embedding_bag`` takes."""

    def __init__(self, tau: float, latents: Tensor, nonneg: bool):
        self.f = latents.shape[1]
        self.tau = tau
        rows = _block_rows(latents.shape[0], self.f)
        blocks = latents.split(rows)
        parts = map_blocks(lambda b: extract_block(b, tau, nonneg), blocks)
        self.blocks: list[tuple[int, int, Tensor, Tensor, Tensor]] = [
            (i * rows, i * rows + b.shape[0], *part)
            for i, (b, part) in enumerate(zip(blocks, parts, strict=True))
        ]
        self.count = sum(part[0].numel() for part in parts)

    @property
    def nbytes(self) -> int:
        """Memory held by the CSR blocks."""
        return sum(t.numel() * t.element_size() for b in self.blocks for t in b[2:])

    @property
    def sparse(self) -> bool:
        """Every block is decoded as a sparse product (see :meth:`sse`)."""
        return all(c.numel() <= _SPARSE_DENSITY * (r1 - r0) * self.f
                   for r0, r1, c, _, _ in self.blocks)

    def sse(self, W: Tensor, resid: Tensor, w: float | None) -> float:
        """``Σ ‖resid − c W‖²`` for the code ``c`` equal to ``round(f / w) · w`` on the
        candidates (``f`` itself when ``w`` is None) and 0 elsewhere. The decoder sees
        ``q · w`` as float64 rounded to its dtype, like ``dequantize``."""
        total = 0.0
        for r0, r1, cols, values, offsets in self.blocks:
            weights = values if w is None else _quantized(values, w).mul_(w)
            weights = weights.to(W.dtype)
            if cols.numel() > _SPARSE_DENSITY * (r1 - r0) * self.f:
                codes = torch.zeros(r1 - r0, self.f, dtype=W.dtype, device=W.device)
                counts = torch.diff(offsets.long(), append=offsets.new_tensor([cols.numel()]))
                rows = torch.repeat_interleave(torch.arange(r1 - r0, device=W.device), counts)
                codes[rows, cols.long()] = weights
                recon = codes @ W
            else:  # row n of c W = Σ_{candidates i of row n} c[n, i] W[i]
                recon = csr_decode(cols, offsets, weights, W)
            total += _sq_dist(recon, resid[r0:r1])
        return total

    def pair_keys(self, w: float, span: int, vmin: int) -> Tensor:
        """The (feature, value) keys ``feature · span + q − vmin`` of ``q = round(f / w)``
        over all candidates (zeros included), int64."""
        keys = [
            cols.to(torch.int64, copy=True).mul_(span).add_(_quantized(values, w).long()).sub_(vmin)
            for _, _, cols, values, _ in self.blocks
        ]
        return torch.cat(keys) if len(keys) != 1 else keys[0]


class _KeyCounter:
    """Counts of int64 keys in ``[0, n_keys)`` accumulated over chunks: a dense bincount
    when the key range is small, else a sorted (keys, counts) pair merged per chunk.
    Memory O(min(n_keys, distinct keys) + chunk)."""

    def __init__(self, n_keys: int, dense_limit: int, device=None):
        self.n_keys = n_keys
        self.dense = n_keys <= dense_limit
        self.counts = torch.zeros(n_keys if self.dense else 0, dtype=torch.int64, device=device)
        self.keys = torch.zeros(0, dtype=torch.int64, device=device)

    def add(self, keys: Tensor) -> None:
        keys = keys.reshape(-1).to(torch.int64)
        if keys.numel() == 0:
            return
        if self.dense:
            self.counts += torch.bincount(keys, minlength=self.n_keys)
            return
        u, c = torch.unique(keys, return_counts=True)
        merged, inv = torch.unique(torch.cat([self.keys, u]), return_inverse=True)
        counts = torch.zeros(merged.numel(), dtype=torch.int64, device=merged.device)
        self.counts = counts.index_add_(0, inv, torch.cat([self.counts, c]))
        self.keys = merged

    def items(self) -> tuple[Tensor, Tensor]:
        """Present keys (ascending) and their counts (> 0)."""
        if self.dense:
            present = flatnonzero(self.counts)
            return present, self.counts[present]
        return self.keys, self.counts


def _check_finite_latents(sae: Any, lo: float, hi: float, latents: Tensor, row0: int) -> None:
    """Raise a clear ``ValueError`` when the latents (``lo``/``hi`` their extremes; rows
    ``row0 + i``) hold NaN/Inf: the activations were checked, so the SAE is at fault."""
    if math.isfinite(lo) and math.isfinite(hi):
        return
    row, feature = (int(v) for v in (~torch.isfinite(latents)).nonzero()[0])
    value = float(latents[row, feature])
    bad = [
        name for name, t in sae.named_parameters()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    weights = (
        f"non-finite SAE parameters: {', '.join(bad)}" if bad
        else "the SAE parameters are finite, so the encoder overflowed (weights too large "
        "for their dtype?)"
    )
    raise ValueError(
        f"the SAE's latents are {value} at row {row0 + row}, feature {feature}, although the "
        f"activations are finite; {weights}. Check the SAE weights (W_enc / b_enc, e.g. a "
        "training run that diverged or a damaged file) before measuring its description "
        "length"
    )


def _sample_rows(n: int, k: int, device) -> Tensor:
    """``min(n, k)`` distinct rows, reproducibly (seeded), sorted."""
    if n <= k:
        return torch.arange(n, device=device)
    gen = torch.Generator().manual_seed(0)
    return torch.randperm(n, generator=gen)[:k].sort().values.to(device)


class _QuantizedFVU:
    """``w -> FVU(x, decode(round(f/w)·w)) − FVU(x, decode(f))`` with latents ``f``
    encoded once.

    Each call evaluates that exactly on all inputs. The code ``q = round(f.double() / w)``
    (:func:`~tl_mdl.mdl.quantize.quantize`'s semantics) is computed only over *candidates*,
    the entries with ``|f| > τ`` for some ``τ < w/2`` (every other entry quantises to 0),
    and ``q · w`` is decoded as a weighted embedding bag over decoder rows (a sparse
    product; entries that round to 0 weigh 0) when the candidates are sparse, else by the
    dense GEMM, one row block at a time. :meth:`proxy` is a cheap estimate on a row
    subsample, used only to bracket the search."""

    def __init__(self, sae: SAE, x: Tensor, latents: Tensor, tv: float | None = None):
        self.sae, self.latents = sae, latents
        self.n, self.f = latents.shape
        self.W = sae.W_dec.detach()
        self.resid = x.to(latents.device, self.W.dtype) - sae.b_dec.detach()  # x − b_dec
        self.tv = total_variance(x) if tv is None else tv
        lo, hi = (float(t) for t in torch.aminmax(latents))
        _check_finite_latents(sae, lo, hi, latents, 0)
        self.nonneg = lo >= 0
        self.abs_max = max(-lo, hi)
        self._cand: _Candidates | None = None
        # per row block: small temporaries (a bool compare then count: ~4x faster on CPU
        # than count_nonzero of the float block itself)
        self.n_nonzero = sum(
            int(torch.count_nonzero(b != 0)) for b in latents.split(_block_rows(self.n, self.f))
        )
        if self.n_nonzero <= _SPARSE_DENSITY * latents.numel():
            self._cand = _Candidates(0.0, latents, self.nonneg)  # all nonzero latents
            self.sse0 = self._cand.sse(self.W, self.resid, None)
        else:
            self.sse0 = _sse_dense(latents, self.W, self.resid)
        self.fvu = self.sse0 / self.tv
        self._proxy_state: tuple[Tensor, Tensor, Tensor] | None = None

    def _candidates(self, w: float) -> _Candidates:
        """Candidates covering every entry that is nonzero at width ``w``."""
        # |f| <= τ < w/2 (with margin for float32 τ and float64 division) ⇒ q = 0.
        if self._cand is None or self._cand.tau > 0.5 * w * (1 - 1e-6):
            self._cand = _Candidates(_tau(w, self.latents.dtype), self.latents, self.nonneg)
        return self._cand

    def _candidate_chunks(self, w: float):
        yield self._candidates(w), self.resid

    def quantized_fvu(self, w: float) -> float:
        sse = sum(cand.sse(self.W, resid, w) for cand, resid in self._candidate_chunks(w))
        return sse / self.tv

    def __call__(self, w: float) -> float:
        return self.quantized_fvu(w) - self.fvu

    def code_stats(self, w: float) -> tuple[FeatureCode, int]:
        """Per-feature statistics of ``q = round(latents.double() / w)`` (the code of
        ``quantize(latents, w)``) and its number of distinct nonzero values, counted over
        (feature, value) pairs of the candidates, chunk by chunk."""
        f = self.f
        vmax = math.ceil(self.abs_max / w) + 1  # |q| <= vmax
        vmin = 0 if self.nonneg else -vmax
        span = vmax - vmin + 1
        if span > (2**62) // f:
            raise ValueError(f"bin_width={w:g} is too fine: its code's value range overflows")
        pairs: _KeyCounter | None = None
        for cand, _ in self._candidate_chunks(w):
            keys = cand.pair_keys(w, span, vmin)
            if pairs is None:  # dense counts when the key range is not much larger
                pairs = _KeyCounter(f * span, max(1 << 22, 4 * keys.numel()), keys.device)
            pairs.add(keys)
        assert pairs is not None
        keys, pc = pairs.items()
        feature, value = keys // span, keys % span
        active = value != -vmin  # drop the (feature, 0) pairs: inactive entries
        feature, value, pc = feature[active], value[active], pc[active]
        counts = torch.zeros(f, dtype=torch.int64, device=keys.device)
        counts.index_add_(0, feature, pc)
        per_pair = torch.zeros(f, dtype=torch.float64, device=keys.device)
        per_pair.index_add_(0, feature, _xlog2x(pc))
        n_values = int(torch.bincount(value, minlength=span).count_nonzero())
        return code_stats_from_counts(self.n, counts.cpu(), per_pair.cpu()), n_values

    # ----------------------------------------------------------------- proxy
    def _proxy(self) -> tuple[Tensor, Tensor, Tensor]:
        """Subsampled latents ``f_S``, ``2 r_S W_decᵀ`` and ``‖W_dec[i]‖²`` (built once)."""
        if self._proxy_state is None:
            rows = _sample_rows(self.n, _PROXY_ROWS, self.latents.device)
            fs = self.latents[rows]
            r = self.resid[rows] - fs @ self.W
            self._proxy_state = (fs, 2 * (r @ self.W.T), self.W.pow(2).sum(1))
        return self._proxy_state

    def proxy(self, w: float) -> float:
        """Estimate of ``self(w)`` from a row subsample, without the decoder's off-diagonal
        terms: ``N/S · Σ_{n∈S,i} (δ²‖W_dec[i]‖² − 2 δ ⟨r_n, W_dec[i]⟩) / TV`` with
        ``δ = round(f/w)·w − f`` and ``r`` the unquantised residual. O(S·F) per call."""
        fs, rw2, g = self._proxy()
        delta = torch.round(fs * (1 / w)).mul_(w).sub_(fs)
        val = float(((delta * g).sub_(rw2).mul_(delta)).sum(-1).double().sum())
        return val * self.n / fs.shape[0] / self.tv

    def guess(self, tolerance: float) -> float:
        """Width where uniform rounding noise (variance w²/12 per active latent) would
        use up the tolerance: ``w² / 12 · Σ_{n,a active} ‖W_dec[a]‖² = tol · TV``."""
        fs, _, g = self._proxy()
        active = (fs != 0).sum(0).double() * (self.n / fs.shape[0])
        energy = float((active * g.double()).sum())
        return math.sqrt(12 * tolerance * self.tv / energy) if energy > 0 else 1.0


class _StreamedQuantizedFVU(_QuantizedFVU):
    """:class:`_QuantizedFVU` over inputs in chunks of ``rows`` rows, never holding more
    than one chunk of dense latents. The first pass keeps each chunk's nonzero latents in
    CSR form (:class:`_Candidates` at ``τ = 0``, which serve every width) while they fit in
    ``keep_bytes`` and every block of them is sparse; the exact evaluations and the code
    statistics then read those instead of re-encoding (an SAE with k active latents a row
    keeps about ``8 k`` bytes a row). Otherwise every exact evaluation re-encodes the
    inputs chunk by chunk (time up, memory O(rows · d_sae)). Either way the figures are the
    same bit for bit: the kept candidates add only entries that quantise to 0, which weigh
    0 in the sparse decode and are dropped from the counts. The proxy uses the same row
    subsample, encoded on its own."""

    def __init__(self, sae: SAE, x: Tensor, rows: int, tv: float | None = None,
                 keep_bytes: float = 0):
        self.sae, self.x, self.rows = sae, x, max(1, int(rows))
        self.n, self.f = x.shape[0], sae.cfg.d_sae
        self.W = sae.W_dec.detach()
        self.tv = total_variance(x) if tv is None else tv
        sse, nnz, lo, hi = 0.0, 0, math.inf, -math.inf
        kept: list[_Candidates] | None = [] if keep_bytes > 0 else None
        held = 0
        for i, (lat, resid) in enumerate(self._chunks()):
            a, b = (float(t) for t in torch.aminmax(lat))
            _check_finite_latents(sae, a, b, lat, i * self.rows)
            lo, hi = min(lo, a), max(hi, b)
            cand = _Candidates(0.0, lat, a >= 0)  # the nonzero latents
            nnz += cand.count
            sse += cand.sse(self.W, resid, None)
            if kept is not None:
                held += cand.nbytes
                if held <= keep_bytes and cand.sparse:
                    kept.append(cand)
                else:
                    kept = None  # re-encode on every pass instead
        self._kept = kept
        self.nonneg = lo >= 0
        self.abs_max = max(-lo, hi)
        self.n_nonzero = nnz
        self.sse0 = sse
        self.fvu = self.sse0 / self.tv
        self._proxy_state: tuple[Tensor, Tensor, Tensor] | None = None

    def _chunks(self):
        dev = self.W.device
        b_dec = self.sae.b_dec.detach()
        for i in range(0, self.n, self.rows):
            xi = self.x[i : i + self.rows].to(dev)
            lat = self.sae.encode(xi)
            yield lat, xi.to(self.W.dtype) - b_dec
            del lat, xi
            release_freed_memory()  # else the budget is exceeded: see tl_mdl._memory

    def _candidate_chunks(self, w: float):
        if self._kept is not None:
            b_dec = self.sae.b_dec.detach()
            for i, cand in zip(range(0, self.n, self.rows), self._kept, strict=True):
                xi = self.x[i : i + self.rows].to(self.W.device)
                yield cand, xi.to(self.W.dtype) - b_dec
            return
        tau = _tau(w, self.sae.W_enc.dtype)
        for lat, resid in self._chunks():
            yield _Candidates(tau, lat, self.nonneg), resid

    def _proxy(self) -> tuple[Tensor, Tensor, Tensor]:
        if self._proxy_state is None:
            dev = self.W.device
            rows = _sample_rows(self.n, _PROXY_ROWS, self.x.device)
            xs = self.x[rows].to(dev)
            fs = self.sae.encode(xs)
            r = (xs.to(self.W.dtype) - self.sae.b_dec.detach()) - fs @ self.W
            self._proxy_state = (fs, 2 * (r @ self.W.T), self.W.pow(2).sum(1))
        return self._proxy_state
