"""The fast description_length (proxy-bracketed search, sparse decoding over candidates,
bincount counting) gives the same answers as a slow brute-force reference."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tl_mdl._sparse import extract_block, extract_block_torch
from tl_mdl.mdl import (
    dequantize,
    description_length,
    feature_code_stats,
    latent_description_length,
    quantize,
    search_bin_width,
)
from tl_mdl.mdl.precision import grid_index, grid_width
from tl_mdl.sae import SAE, SAEConfig


def _sae(arch: str, seed: int, d_in: int = 16, d_sae: int = 64, dtype: str = "float32") -> SAE:
    k = 6 if arch == "topk" else None
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, activation=arch, k=k, dtype=dtype), seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.W_enc.add_(0.05 * torch.randn(sae.W_enc.shape, generator=gen).to(sae.W_enc))
        sae.W_enc.mul_(8)
        sae.b_enc.fill_(-0.3 if arch == "relu" else 0.0)
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen).to(sae.b_dec))
        if arch == "jumprelu":
            sae.threshold.fill_(0.2)
    return sae


def _acts(sae: SAE, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, sae.cfg.d_sae, generator=gen) * (
        torch.rand(n, sae.cfg.d_sae, generator=gen) < 0.1
    )
    x = 5 * z @ sae.W_dec.detach().float() + 0.05 * torch.randn(n, sae.cfg.d_in, generator=gen)
    return x.to(sae.W_dec.dtype)


@torch.no_grad()
def _brute_increase(sae: SAE, x: torch.Tensor, w: float) -> float:
    """FVU(decode(round(f/w)·w)) − FVU(decode(f)), dense, float64 sums, no shortcuts."""
    f = sae.encode(x)
    xd = x.double()
    tv = float((xd - xd.mean(0)).pow(2).sum())
    sse0 = float((xd - sae.decode(f).double()).pow(2).sum())
    sse = float((xd - sae.decode(dequantize(quantize(f, w), w, f.dtype)).double()).pow(2).sum())
    return (sse - sse0) / tv


def _increase_tol(sae: SAE, x: torch.Tensor, w: float) -> float:
    """How far two float32 evaluations of the FVU increase may differ (other decode kernels,
    sparse or dense, other summation orders). Rounding errors of independent sums add like a
    random walk: a reconstruction entry is off by about δ = √d_sae·eps·max(|f| @ |W_dec|),
    an SSE by about 2·‖r‖·δ; with a safety factor of 16, two SSEs, two evaluations."""
    with torch.no_grad():
        f = sae.encode(x)
        fq = dequantize(quantize(f, w), w, f.dtype)
        xd = x.double()
        tv = float((xd - xd.mean(0)).pow(2).sum())
        total = 0.0
        for code in (f, fq):
            delta = math.sqrt(sae.cfg.d_sae) * torch.finfo(torch.float32).eps * float(
                (code.abs().double() @ sae.W_dec.abs().double()).max() + sae.b_dec.abs().max())
            r = xd - sae.decode(code).double()
            total += 2 * float(r.norm()) * delta
    return 16 * 2 * total / tv


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu"])
@pytest.mark.parametrize("n", [200, 1500])
@pytest.mark.parametrize("tol", [0.003, 0.02])
def test_fast_dl_matches_brute_force(arch, n, tol):
    sae = _sae(arch, seed=n)
    x = _acts(sae, n, seed=1)
    rep = description_length(sae, x, tolerance=tol)
    w = rep.bin_width
    j = grid_index(w)
    assert w == grid_width(j)
    inc = _brute_increase(sae, x, w)
    assert inc <= tol + 1e-9
    assert rep.loss_quantized - rep.loss_unquantized == pytest.approx(
        inc, abs=_increase_tol(sae, x, w))
    with torch.no_grad():
        f = sae.encode(x)
    if not (f.abs().max() < 0.5 * w):  # not saturated: the next-coarser width fails
        assert _brute_increase(sae, x, grid_width(j + 1)) > tol - 1e-9
    # the slow reference: the same grid search without a proxy, on the brute-force loss
    ref = search_bin_width(
        lambda v: _brute_increase(sae, x, v),
        tol,
        guess=1.0,
        saturation_width=2 * float(f.abs().max()) + 1e-12,
    )
    assert ref.bin_width == w
    q = quantize(f, w)
    assert rep.bits_per_input == pytest.approx(latent_description_length(q), rel=1e-12, abs=1e-12)
    assert rep.l0 == pytest.approx(float((q != 0).sum()) / n, abs=1e-12)
    assert rep.l0_unquantized == pytest.approx(float((f != 0).sum()) / n, abs=1e-12)
    nz = q[q != 0]
    levels = int(torch.unique(nz).numel())
    assert rep.bits_per_value == pytest.approx(math.log2(levels) if levels > 1 else 0.0)
    stats = feature_code_stats(q)
    assert torch.allclose(rep.features["bits"], stats.bits, atol=1e-12)


def _brute_raw(x: torch.Tensor, tol: float) -> tuple[float, float]:
    xd = x.double()
    tv = float((xd - xd.mean(0)).pow(2).sum())

    def inc(w: float) -> float:
        return float((xd - torch.round(xd / w) * w).pow(2).sum()) / tv

    res = search_bin_width(inc, tol, guess=1.0, saturation_width=2 * float(xd.abs().max()) + 1e-12)
    q = torch.round(xd / res.bin_width).to(torch.int64)
    bits = 0.0
    for c in range(q.shape[1]):
        counts = Counter(q[:, c].tolist())
        bits -= sum(v / len(q) * math.log2(v / len(q)) for v in counts.values())
    return bits, res.bin_width


@pytest.mark.parametrize("n", [100, 5000])
def test_fast_raw_cost_matches_brute_force(n):
    sae = _sae("relu", seed=3, d_in=16, d_sae=32)
    x = _acts(sae, n, seed=2)
    rep = description_length(sae, x, tolerance=0.01)
    bits, w = _brute_raw(x, 0.01)
    assert rep.raw_bin_width == w
    assert rep.raw_bits == pytest.approx(bits, rel=1e-9)


def test_sparse_latents_and_float64_sae():
    """Sparse latents take the all-sparse path (unquantised decode as an embedding bag)."""
    sae = _sae("relu", seed=5, dtype="float64")
    with torch.no_grad():
        sae.b_enc.fill_(-1.5)
    x = _acts(sae, 2000, seed=4)
    with torch.no_grad():
        f = sae.encode(x)
    assert 0 < float((f != 0).double().mean()) < 0.2
    rep = description_length(sae, x, tolerance=0.005)
    inc = _brute_increase(sae, x, rep.bin_width)
    assert rep.loss_quantized - rep.loss_unquantized == pytest.approx(inc, abs=1e-9)
    assert inc <= 0.005
    assert _brute_increase(sae, x, grid_width(grid_index(rep.bin_width) + 1)) > 0.005
    assert rep.bits_per_input == pytest.approx(
        latent_description_length(quantize(f, rep.bin_width)), rel=1e-12
    )


def test_fixed_bin_width_matches_brute_force():
    sae = _sae("topk", seed=7)
    x = _acts(sae, 700, seed=5)
    with torch.no_grad():
        f = sae.encode(x)
    for w in (0.013, 0.2, 3.0, 1e3):
        rep = description_length(sae, x, bin_width=w, raw_cost=False)
        assert rep.bin_width == w
        assert rep.fvu_quantized - rep.fvu == pytest.approx(_brute_increase(sae, x, w),
                                                            abs=_increase_tol(sae, x, w))
        assert rep.bits_per_input == pytest.approx(
            latent_description_length(quantize(f, w)), rel=1e-12, abs=1e-12
        )


@pytest.mark.parametrize("scale", [1, 10**4, 10**7, 10**17])
def test_feature_code_stats_counting_paths(scale):
    """bincount (small value range), sort-based (sparse key space) and row-unique (huge
    range) counting all agree with a Counter."""
    gen = torch.Generator().manual_seed(scale % 1000)
    q = torch.randint(-3, 4, (300, 7), generator=gen) * (torch.rand(300, 7, generator=gen) < 0.4)
    q = q * torch.randint(1, 3, (300, 7), generator=gen) * scale
    stats = feature_code_stats(q)
    for i in range(q.shape[1]):
        vals = [v for v in q[:, i].tolist() if v != 0]
        c = len(vals)
        p = c / len(q)
        h = -sum(k / c * math.log2(k / c) for k in Counter(vals).values()) if c else 0.0
        hb = 0.0 if p in (0.0, 1.0) else -p * math.log2(p) - (1 - p) * math.log2(1 - p)
        assert float(stats.bits[i]) == pytest.approx(hb + p * h, abs=1e-9)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("max_memory_mb", [None, 0.05])
@pytest.mark.parametrize("tol", [0.01, 1e-4])  # sparse / dense candidate blocks
def test_signed_latents_and_row_blocks_match_brute_force(monkeypatch, dtype, max_memory_mb, tol):
    """Signed latents (a registered linear activation), many small row blocks with a mix of
    dense and sparse blocks, in memory and chunked: same width, increase and code as the
    brute force (and the SAE's float64 latents are not modified in place)."""
    import importlib

    from tl_mdl.sae.model import ACTIVATIONS, register_activation

    dl = importlib.import_module("tl_mdl.mdl.evaluator")

    monkeypatch.setattr(dl, "_BLOCK_ELEMENTS", 64 * 37)  # 37 rows per block
    if "test_linear" not in ACTIVATIONS:
        register_activation("test_linear", lambda sae, pre: pre * (pre.abs() > 1.0))
    sae = _sae("relu", seed=11, dtype=dtype)
    sae.cfg.activation = "test_linear"
    x = _acts(sae, 900, seed=6)
    with torch.no_grad():
        f = sae.encode(x)
    assert float(f.min()) < 0 < float(f.max())
    before = f.clone()
    rep = description_length(sae, x, tolerance=tol, raw_cost=False, max_memory_mb=max_memory_mb)
    w = rep.bin_width
    inc = _brute_increase(sae, x, w)
    assert inc <= tol + 1e-9
    assert _brute_increase(sae, x, grid_width(grid_index(w) + 1)) > tol - 1e-9
    assert rep.loss_quantized - rep.loss_unquantized == pytest.approx(
        inc, abs=_increase_tol(sae, x, w))
    q = quantize(f, w)
    assert rep.bits_per_input == pytest.approx(latent_description_length(q), rel=1e-12)
    assert rep.l0_unquantized == pytest.approx(float((f != 0).sum()) / len(x), abs=1e-12)
    levels = int(torch.unique(q[q != 0]).numel())
    assert rep.bits_per_value == pytest.approx(math.log2(levels))
    with torch.no_grad():
        assert torch.equal(sae.encode(x), before)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("max_memory_mb", [None, 0.05])
def test_inputs_are_not_modified(dtype, max_memory_mb):
    """Neither the activations nor the SAE change (float64 tensors convert to float64
    without a copy, so every in-place temporary must be a copy)."""
    from tl_mdl.mdl import total_variance

    sae = _sae("relu", seed=2, dtype=dtype)
    x = _acts(sae, 500, seed=3)
    x0 = x.clone()
    state = {k: v.clone() for k, v in sae.state_dict().items()}
    total_variance(x)
    description_length(sae, x, tolerance=0.01, max_memory_mb=max_memory_mb)
    assert torch.equal(x, x0)
    assert all(torch.equal(v, state[k]) for k, v in sae.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nonneg", [True, False])
@pytest.mark.parametrize("shape", [(1, 7), (13, 5), (40, 64)])
def test_block_extraction_numpy_and_torch_agree(dtype, nonneg, shape):
    """The NumPy candidate extraction (CPU float32/64) equals the torch one (other devices
    and dtypes): same columns, values and CSR offsets, empty rows and blocks included."""
    gen = torch.Generator().manual_seed(shape[0])
    lat = torch.randn(shape, generator=gen, dtype=dtype)
    lat = lat * (torch.rand(shape, generator=gen) < 0.3)
    if nonneg:
        lat = lat.abs()
    lat[shape[0] // 2] = 0  # an empty row
    for tau in (0.0, 0.5, 1e9):  # all nonzero / some / none
        a = extract_block(lat, tau, nonneg)
        b = extract_block_torch(lat, tau, nonneg)
        for u, v in zip(a, b, strict=True):
            assert u.dtype == v.dtype and torch.equal(u, v)
    lat16 = lat.to(torch.float16)
    half = extract_block(lat16, 0.5, nonneg)  # the torch branch on CPU
    ref = extract_block(lat16.float(), 0.5, nonneg)  # the same numbers, NumPy
    assert torch.equal(half[0], ref[0]) and torch.equal(half[2], ref[2])
    assert torch.equal(half[1].float(), ref[1])


def test_threaded_block_extraction_gives_the_same_report(monkeypatch):
    """With more than one torch thread the candidate blocks are extracted on a thread
    pool; the report is identical to the single-threaded one."""
    import importlib

    dl = importlib.import_module("tl_mdl.mdl.evaluator")
    monkeypatch.setattr(dl, "_BLOCK_ELEMENTS", 64 * 50)  # many blocks
    sae = _sae("relu", seed=4)
    x = _acts(sae, 1200, seed=8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = description_length(sae, x, tolerance=0.01)
        torch.set_num_threads(2)
        two = description_length(sae, x, tolerance=0.01)
    finally:
        torch.set_num_threads(threads)
    assert one.bin_width == two.bin_width and one.bits_per_input == two.bits_per_input
    assert one.l0 == two.l0 and one.bits_per_value == two.bits_per_value
    assert torch.equal(one.features["bits"], two.features["bits"])
    assert two.fvu_quantized == pytest.approx(one.fvu_quantized, rel=1e-6)
