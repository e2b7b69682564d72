"""Description length of activations under an SAE, with the precision searched."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from tl_mdl._sparse import BLOCK_ELEMENTS, block_rows, csr_decode, extract_block, map_blocks
from tl_mdl.activations.io import load_activations
from tl_mdl.mdl.losses import LossFn, build_model_loss
from tl_mdl.mdl.precision import STEPS_PER_OCTAVE, SearchResult, search_bin_width
from tl_mdl.mdl.quantize import (
    FeatureCode,
    _check_bin_width,
    _xlog2x,
    code_stats_from_counts,
    flatnonzero,
    total_variance,
    value_entropy,
)
from tl_mdl.sae import SAE

DEFAULT_TOLERANCE = 0.01
_CHUNK = 8192


@dataclass
class DLReport:
    """Description length of ``N`` activations under an SAE at one precision.

    ``bits_per_input = Σ_i [H_b(p_i) + p_i H_i]`` of the quantised code (docs/math.md §1).
    """

    bits_per_input: float
    bin_width: float
    tolerance: float | None
    loss: str
    #: loss with unquantised / quantised latents (FVU, or nats for CE/KL)
    loss_unquantized: float
    loss_quantized: float
    l0: float  # mean number of active (q != 0) latents per input
    l0_unquantized: float  # mean number of nonzero latents before quantisation
    fvu: float  # FVU of the unquantised reconstruction
    fvu_quantized: float  # FVU of decode(q · w)
    bits_per_value: float  # log2(#distinct nonzero q values): a fixed-length value code
    naive_bits: float  # L0 · (bits_per_value + log2 F)
    raw_bits: float  # Σ_d H(round(x_d / w_raw)), per-dimension coding of the activations
    raw_bin_width: float  # coarsest grid w_raw with FVU(x, round(x/w_raw) w_raw) within the
    # FVU tolerance (or, for model losses / fixed widths, the SAE code's own FVU increase)
    n_inputs: int
    d_in: int
    d_sae: int
    #: per-feature table, each ``[F]``: p_active, value_entropy_bits, bits
    features: dict[str, Tensor] = field(repr=False, default_factory=dict)
    search_trace: list[tuple[float, float]] = field(repr=False, default_factory=list)

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.fvu

    @property
    def explained_variance_quantized(self) -> float:
        return 1.0 - self.fvu_quantized

    @property
    def raw_bits_per_float(self) -> float:
        return self.raw_bits / self.d_in

    def summary(self) -> dict[str, Any]:
        """Scalars only (JSON-serialisable)."""
        d = asdict(self)
        d.pop("features")
        d.pop("search_trace")
        d["explained_variance"] = self.explained_variance
        d["raw_bits_per_float"] = self.raw_bits_per_float
        return d

    def feature_rows(self) -> list[dict[str, float]]:
        """One dict per feature: index, p_active, value_entropy_bits, bits."""
        cols = {k: v.tolist() for k, v in self.features.items()}
        return [{"feature": i, **{k: cols[k][i] for k in cols}} for i in range(self.d_sae)]

    def write_feature_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.feature_rows()
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return path

    def __str__(self) -> str:
        return (
            f"DL {self.bits_per_input:.2f} bits/input (w={self.bin_width:.4g}, "
            f"L0 {self.l0:.2f}, FVU {self.fvu:.4f} -> {self.fvu_quantized:.4f}; "
            f"naive {self.naive_bits:.1f}, raw {self.raw_bits:.1f} bits)"
        )


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
#: elements of the activations sampled for the raw cost's proxy.
_PROXY_ELEMENTS = 1 << 15
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
    than one chunk of latents: every exact evaluation re-encodes the inputs chunk by chunk
    (time up, memory O(rows · d_sae)). The proxy uses the same row subsample, encoded on
    its own."""

    def __init__(self, sae: SAE, x: Tensor, rows: int, tv: float | None = None):
        self.sae, self.x, self.rows = sae, x, max(1, int(rows))
        self.n, self.f = x.shape[0], sae.cfg.d_sae
        self.W = sae.W_dec.detach()
        self.tv = total_variance(x) if tv is None else tv
        sse, nnz, lo, hi = 0.0, 0, math.inf, -math.inf
        for i, (lat, resid) in enumerate(self._chunks()):
            a, b = (float(t) for t in torch.aminmax(lat))
            _check_finite_latents(sae, a, b, lat, i * self.rows)
            lo, hi = min(lo, a), max(hi, b)
            cand = _Candidates(0.0, lat, a >= 0)  # the nonzero latents
            nnz += cand.count
            sse += cand.sse(self.W, resid, None)
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

    def _candidate_chunks(self, w: float):
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


def _raw_cost(
    x: Tensor,
    tolerance: float,
    tv: float | None = None,
    abs_max: float | None = None,
    rows: int | None = None,
) -> tuple[float, float]:
    """Bits per input to code the activations themselves, each dimension with its own
    empirical distribution, at the coarsest grid width with FVU ≤ tolerance.

    The FVU of ``round(x/w)·w`` is evaluated on all of ``x`` (float32 rounding error per
    element, float64 sums over rows); an element subsample serves as proxy to bracket the
    search. The code itself is ``round(x.double() / w)``."""
    tv = total_variance(x) if tv is None else tv
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    flat = xf.reshape(-1)
    if abs_max is None:
        lo, hi = torch.aminmax(flat)
        abs_max = max(-float(lo), float(hi))

    def inc(w: float) -> float:
        if rows is not None:  # chunked: temporaries O(rows · d)
            return sum(
                _sq_dist(torch.round(c * (1 / w)).mul_(w), c) for c in xf.split(rows)
            ) / tv
        return _sq_dist(torch.round(xf * (1 / w)).mul_(w), xf) / tv

    proxy = None
    if flat.numel() > 8 * _PROXY_ELEMENTS:
        gen = torch.Generator().manual_seed(0)
        pick = torch.randint(flat.numel(), (_PROXY_ELEMENTS,), generator=gen).to(flat.device)
        sample = flat[pick]
        scale = flat.numel() / _PROXY_ELEMENTS / tv

        def proxy(w: float) -> float:
            err = torch.round(sample * (1 / w)).mul_(w).sub_(sample)
            return float(torch.dot(err, err)) * scale

    guess = math.sqrt(12 * tolerance * tv / x.numel())
    res = search_bin_width(
        inc, tolerance, guess=guess, saturation_width=2 * abs_max + 1e-12, proxy=proxy
    )
    w = res.bin_width
    n, d = xf.shape
    # integer-valued float64 keys  round(x/w) − lo + column · span  (exact below 2^53)
    lo, hi = math.floor(-abs_max / w) - 1, math.ceil(abs_max / w) + 1
    span = hi - lo + 1
    if rows is not None:  # chunked per-dimension value histograms
        if span * d >= 2**62:
            raise ValueError(f"raw bin width {w:g} is too fine for the chunked path")
        counter = _KeyCounter(span * d, max(1 << 24, 4 * rows * d), xf.device)
        col_off = torch.arange(d, dtype=torch.int64, device=xf.device) * span - lo
        for c in xf.split(rows):
            key = torch.round(c.to(torch.float64) / w).to(torch.int64) + col_off
            counter.add(key)
        keys, counts = counter.items()
        per_col = torch.zeros(d, dtype=torch.float64, device=xf.device)
        per_col.index_add_(0, keys // span, _xlog2x(counts))
        return float(((_xlog2x(torch.tensor(float(n))) - per_col.cpu()) / n).sum()), w
    if span * d > max(1 << 24, 4 * flat.numel()) or span * d >= 2**52:
        q = torch.round(xf.to(torch.float64) / w).to(torch.int64)
        return float(value_entropy(q).sum()), w
    offset = torch.arange(d, dtype=torch.float64, device=xf.device) * span - lo
    itype = torch.int32 if span * d < 2**31 else torch.int64  # int32 counts ~3× faster
    key = xf.to(torch.float64, copy=True).div_(w).round_().add_(offset).to(itype)
    counts = torch.bincount(key.reshape(-1), minlength=span * d).view(d, span)
    per_col = _xlog2x(counts).sum(1)
    return float(((_xlog2x(torch.tensor(float(n))) - per_col) / n).sum()), w


def _finite_extremes(x: Tensor) -> float | None:
    """``max |x|`` when every entry is finite, else None (one pass: NaN propagates)."""
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    return max(-lo, hi)


def _as_activations(activations, d_in: int) -> Tensor:
    """``[N, d_in]`` activations, validated (a tensor, or safetensors shard path(s))."""
    return _validated_activations(activations, d_in)[0]


def _validated_activations(activations, d_in: int) -> tuple[Tensor, float]:
    """``[N, d_in]`` activations (validated) and their largest absolute value."""
    if isinstance(activations, (str, os.PathLike, list)):
        activations = load_activations(activations)
    if not isinstance(activations, Tensor):
        raise TypeError(
            f"activations must be a Tensor [N, d_in] or path(s) to safetensors shards, "
            f"got {type(activations).__name__}"
        )
    if activations.ndim < 2 or activations.shape[-1] != d_in:
        raise ValueError(
            f"activations have shape {tuple(activations.shape)} but the SAE has d_in={d_in}; "
            "pass [N, d_in] (or [..., d_in], flattened)"
        )
    x = activations.reshape(-1, d_in)
    if x.shape[0] == 0:
        raise ValueError("activations are empty (N = 0); nothing to describe")
    if not x.is_floating_point():
        raise TypeError(f"activations must be floating point, got {x.dtype}")
    abs_max = _finite_extremes(x)
    if abs_max is None:
        row = int((~torch.isfinite(x)).any(-1).nonzero()[0])
        raise ValueError(f"activations contain NaN/Inf (first bad row {row}); clean them first")
    return x, abs_max


#: ``max_memory_mb=None`` holds all latents at once only up to this size: a SAELens-sized
#: SAE (d_sae 24,576) on 200,000 inputs would need 19.7 GB of dense latents.
DEFAULT_MAX_MEMORY_MB = 4096


def _chunk_rows(max_memory_mb: float | None, n: int, d_sae: int) -> int | None:
    """Rows per chunk for a memory budget (None: everything at once fits)."""
    if max_memory_mb is None:
        max_memory_mb = DEFAULT_MAX_MEMORY_MB
    budget = float(max_memory_mb) * 2**20
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"max_memory_mb must be a finite number > 0, got {max_memory_mb!r}")
    if n * d_sae * 4 <= budget:
        return None
    return max(1, int(budget / (64 * d_sae)))


@torch.no_grad()
def description_length(
    sae: SAE,
    activations: Float[Tensor, "n d_in"] | str | os.PathLike,
    *,
    bin_width: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    loss: str | LossFn = "fvu",
    model: Any = None,
    hook_name: str | None = None,
    tokens: Tensor | None = None,
    raw_cost: bool = True,
    max_memory_mb: float | None = None,
) -> DLReport:
    """Description length (bits per input) of ``activations [N, d_in]`` written in the SAE's
    latents, quantised at one shared bin width.

    With ``bin_width=None`` the precision is searched: the coarsest grid width (see
    :mod:`tl_mdl.mdl.precision`) whose quantised reconstruction raises the loss by at most
    ``tolerance`` over the unquantised one. ``loss`` is ``"fvu"`` (default; absolute FVU
    increase), a model-based loss ``"kl"`` / ``"ce"`` (nats per token, with ``model``,
    ``hook_name`` and ``tokens``; built by ``tl_mdl.hooks``), or any callable
    ``bin_width | None -> loss``.

    ``max_memory_mb`` bounds memory: when the latents ``[N, d_sae]`` (4 bytes each) would
    take more than that, the inputs are processed in chunks of rows whose latents take at
    most a quarter of it (the rest is for temporaries), re-encoding every chunk on each
    pass (the unquantised error, each exact evaluation of the search, the final code
    statistics); counts are merged across chunks, so the report is the same as without
    it (up to float summation order). Default ``None``: all latents held at once (fastest)
    when they take at most ``DEFAULT_MAX_MEMORY_MB`` (4096), else chunked within that budget.
    """
    if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance <= 0:
        raise ValueError(f"tolerance must be a finite number > 0, got {tolerance!r}")
    if loss == "fvu" and tolerance >= 1:
        raise ValueError(
            f"tolerance={tolerance} is an absolute FVU increase and must be < 1 "
            "(e.g. 0.01 = one percent of the variance)"
        )
    x, x_abs_max = _validated_activations(activations, sae.cfg.d_in)
    rows = _chunk_rows(max_memory_mb, x.shape[0], sae.cfg.d_sae)
    tv = total_variance(x)
    if rows is None:
        fq = _QuantizedFVU(sae, x, encode_all(sae, x), tv)
    else:
        fq = _StreamedQuantizedFVU(sae, x, rows, tv)
    saturation = 2 * fq.abs_max + 1e-12

    if callable(loss):
        loss_fn, loss_name = loss, getattr(loss, "__name__", "custom")
    elif loss == "fvu":
        loss_fn, loss_name = None, "fvu"
    elif isinstance(loss, str):
        loss_fn = build_model_loss(loss, sae=sae, model=model, hook_name=hook_name, tokens=tokens)
        loss_name = loss
    else:
        raise TypeError(f"loss must be 'fvu', 'kl', 'ce' or a callable, got {loss!r}")

    if loss_fn is None:
        base = fq.fvu
        increase = fq
    else:
        base = float(loss_fn(None))

        def increase(w: float) -> float:
            return float(loss_fn(w)) - base

    if bin_width is None:
        res = search_bin_width(
            increase,
            tolerance,
            guess=fq.guess(tolerance),
            saturation_width=saturation,
            proxy=fq.proxy if loss_fn is None and fq.n > 2 * _PROXY_ROWS else None,
        )
    else:
        w = _check_bin_width(bin_width)
        res = SearchResult(w, float(increase(w)), [])
        tolerance = None  # type: ignore[assignment]
    w = res.bin_width

    stats, n_levels = fq.code_stats(w)
    bits_per_value = math.log2(n_levels) if n_levels > 1 else 0.0
    l0 = float(stats.active_counts.sum()) / stats.n_inputs
    fvu_quantized = fq.quantized_fvu(w) if loss_fn is not None else fq.fvu + res.loss_increase
    if raw_cost:
        # Same fidelity as the SAE code: the FVU tolerance, or (for model-based losses and
        # fixed widths) the FVU increase the SAE's code actually incurs at w.
        raw_tol = (
            tolerance
            if (tolerance is not None and loss_name == "fvu")
            else max(fvu_quantized - fq.fvu, 1e-6)
        )
        raw_bits, raw_w = _raw_cost(x, raw_tol, tv, x_abs_max, rows)
    else:
        raw_bits, raw_w = float("nan"), float("nan")
    return DLReport(
        bits_per_input=stats.bits_per_input,
        bin_width=w,
        tolerance=tolerance,
        loss=loss_name,
        loss_unquantized=base,
        loss_quantized=base + res.loss_increase,
        l0=l0,
        l0_unquantized=fq.n_nonzero / stats.n_inputs,
        fvu=fq.fvu,
        fvu_quantized=fvu_quantized,
        bits_per_value=bits_per_value,
        naive_bits=l0 * (bits_per_value + math.log2(sae.cfg.d_sae)),
        raw_bits=raw_bits,
        raw_bin_width=raw_w,
        n_inputs=stats.n_inputs,
        d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae,
        features={
            "p_active": stats.p_active,
            "value_entropy_bits": stats.value_entropy_bits,
            "bits": stats.bits,
        },
        search_trace=res.trace,
    )
