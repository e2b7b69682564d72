"""``description_length(..., max_memory_mb=...)`` streams the inputs in chunks and gives
the same report as the in-memory path."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from tl_mdl.mdl import description_length
from tl_mdl.mdl.description_length import _chunk_rows
from tl_mdl.mdl.evaluator import _KeyCounter
from tl_mdl.sae import SAE, SAEConfig


def _sae(arch: str, seed: int, d_in: int = 16, d_sae: int = 64) -> SAE:
    k = 6 if arch == "topk" else None
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, activation=arch, k=k), seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.W_enc.add_(0.05 * torch.randn(sae.W_enc.shape, generator=gen))
        sae.W_enc.mul_(8)
        sae.b_enc.fill_(-0.3 if arch == "relu" else 0.0)
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen))
    return sae


def _acts(sae: SAE, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, sae.cfg.d_sae, generator=gen) * (
        torch.rand(n, sae.cfg.d_sae, generator=gen) < 0.1
    )
    return 5 * z @ sae.W_dec.detach() + 0.05 * torch.randn(n, sae.cfg.d_in, generator=gen)


def _budget_mb(n: int, d_sae: int, n_chunks: int) -> float:
    """A budget whose chunks of rows (1/16 of it for latents) split n rows into
    about ``n_chunks`` pieces, not evenly."""
    rows = n // n_chunks - 7
    return rows * 64 * d_sae / 2**20


def _assert_same(a, b) -> None:
    assert a.bin_width == b.bin_width
    assert a.raw_bin_width == b.raw_bin_width or (
        math.isnan(a.raw_bin_width) and math.isnan(b.raw_bin_width)
    )
    assert a.bits_per_input == pytest.approx(b.bits_per_input, rel=1e-9, abs=1e-12)
    for name in ("l0", "l0_unquantized", "bits_per_value", "naive_bits"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-12), name
    for name in ("fvu", "fvu_quantized", "loss_unquantized", "loss_quantized"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-6, abs=1e-9), name
    if math.isnan(b.raw_bits):
        assert math.isnan(a.raw_bits)
    else:
        assert a.raw_bits == pytest.approx(b.raw_bits, rel=1e-9)
    assert (a.tolerance, a.loss, a.n_inputs, a.d_in, a.d_sae) == (
        b.tolerance,
        b.loss,
        b.n_inputs,
        b.d_in,
        b.d_sae,
    )
    for k in b.features:
        torch.testing.assert_close(a.features[k], b.features[k], rtol=1e-9, atol=1e-12)
    assert [w for w, _ in a.search_trace] == [w for w, _ in b.search_trace] or not b.search_trace


@pytest.mark.parametrize("arch", ["relu", "topk"])
@pytest.mark.parametrize("tol", [0.003, 0.02])
def test_chunked_equals_in_memory(arch: str, tol: float) -> None:
    n, d_sae = 1531, 64
    sae = _sae(arch, seed=3)
    x = _acts(sae, n, seed=4)
    budget = _budget_mb(n, d_sae, 20)
    rows = _chunk_rows(budget, n, d_sae)
    assert rows is not None and math.ceil(n / rows) >= 3 and n % rows
    ref = description_length(sae, x, tolerance=tol)
    got = description_length(sae, x, tolerance=tol, max_memory_mb=budget)
    _assert_same(got, ref)


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_chunked_fixed_width_and_no_raw(arch: str) -> None:
    n, d_sae = 997, 64
    sae = _sae(arch, seed=5)
    x = _acts(sae, n, seed=6)
    budget = _budget_mb(n, d_sae, 24)
    rows = _chunk_rows(budget, n, d_sae)
    assert rows is not None and math.ceil(n / rows) >= 3 and n % rows
    for kw in ({"bin_width": 0.05}, {"bin_width": 0.3, "raw_cost": False}):
        ref = description_length(sae, x, **kw)
        got = description_length(sae, x, max_memory_mb=budget, **kw)
        _assert_same(got, ref)


def test_budget_large_enough_uses_in_memory_path() -> None:
    assert _chunk_rows(None, 10**5, 4096) is None  # 1.6 GB: under DEFAULT_MAX_MEMORY_MB
    assert _chunk_rows(1.0, 100, 64) is None  # 25 KiB of latents fit in 1 MiB
    assert _chunk_rows(1.0, 10**5, 4096) == 4
    with pytest.raises(ValueError):
        description_length(_sae("relu", 0), torch.randn(10, 16), max_memory_mb=0)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _peak_rise_mb(fn) -> float:
    """Rise of the resident set's high-water mark during ``fn()`` (Linux only)."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - before) / 1024


def test_chunked_peak_memory_is_bounded() -> None:
    try:
        _peak_rise_mb(lambda: None)
    except (OSError, RuntimeError):
        pytest.skip("needs /proc/self/clear_refs and VmHWM")
    n, d_sae = 24000, 1024
    sae = _sae("relu", seed=7, d_in=32, d_sae=d_sae)
    x = torch.randn(n, 32, generator=torch.Generator().manual_seed(8))
    latents_mb = n * d_sae * 4 / 2**20  # ~94 MiB
    kw = {"bin_width": 0.1, "raw_cost": False}
    budget = 16
    description_length(sae, x[:3000], max_memory_mb=budget, **kw)  # warm-up: one-off allocations
    chunked = _peak_rise_mb(lambda: description_length(sae, x, max_memory_mb=budget, **kw))
    full = _peak_rise_mb(lambda: description_length(sae, x, **kw))
    print(f"peak rise: in-memory {full:.1f} MiB, max_memory_mb={budget}: {chunked:.1f} MiB")
    assert full > latents_mb / 2  # the in-memory path holds the latents
    assert chunked < 2 * budget  # about the budget, far below the latents


@pytest.mark.parametrize("dense_limit", [0, 1 << 20])
def test_key_counter_merges_chunks(dense_limit: int) -> None:
    gen = torch.Generator().manual_seed(1)
    keys = torch.randint(0, 5000, (20000,), generator=gen) ** 2 // 5000
    counter = _KeyCounter(5000, dense_limit)
    for c in keys.split(3001):
        counter.add(c)
    k, c = counter.items()
    ref = torch.bincount(keys, minlength=5000)
    present = ref.nonzero().squeeze(1)
    assert torch.equal(k, present) and torch.equal(c, ref[present])
