"""The shared sparse-code helpers (tl_mdl._sparse): exact top-k, CSR extraction, decodes."""

from __future__ import annotations

import pytest
import torch

from tl_mdl._sparse import csr_decode, to_csr, topk, topk_decode
from tl_mdl.sae import SAE, SAEConfig


def _same_topk(x: torch.Tensor, k: int) -> None:
    v, i = topk(x, k)
    v0, i0 = x.topk(k, dim=-1)
    assert v.shape == i.shape == (x.shape[0], k)
    assert torch.equal(v.sort(-1).values, v0.sort(-1).values)
    assert torch.equal(torch.gather(x, 1, i), v)  # the columns hold the values returned
    assert torch.equal(i.sort(-1).values, i0.sort(-1).values)


@pytest.mark.parametrize(
    ("n", "f", "k"),
    [(300, 4096, 64), (7, 2048, 16), (50, 1024, 32), (33, 512, 16),  # grouped path
     (20, 1000, 16), (20, 256, 64), (20, 4096, 8), (0, 4096, 64)],  # torch.topk fallbacks
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_equals_torch_topk(n, f, k, dtype):
    gen = torch.Generator().manual_seed(n + f + k)
    _same_topk(torch.randn(n, f, generator=gen, dtype=dtype), k)


def test_topk_worst_cases_for_the_group_bound():
    """All winners in one group (strided columns j, j + G, …), or in one contiguous run,
    or the row sorted either way: still the exact top k."""
    n, f, k = 4, 4096, 64
    groups = f // 8
    x = torch.randn(n, f, generator=torch.Generator().manual_seed(0))
    x[0, torch.arange(8) * groups] += 100  # one whole group wins (8 of the k)
    x[1, :k] += 100  # a contiguous run: k different groups
    x[2] = torch.arange(f, dtype=x.dtype)
    x[3] = -torch.arange(f, dtype=x.dtype)
    _same_topk(x, k)


def test_topk_ties_give_the_same_values():
    """With ties at the k-th place the values equal torch.topk's; the columns hold them."""
    x = torch.randint(0, 4, (64, 2048), generator=torch.Generator().manual_seed(1)).float()
    v, i = topk(x, 32)
    assert torch.equal(v.sort(-1).values, x.topk(32, dim=-1).values.sort(-1).values)
    assert torch.equal(torch.gather(x, 1, i), v)
    assert all(len(set(row.tolist())) == 32 for row in i)  # distinct columns


def test_topk_gradient_equals_torch_topk():
    x = torch.randn(40, 2048, generator=torch.Generator().manual_seed(2), requires_grad=True)
    w = torch.randn(2048, generator=torch.Generator().manual_seed(3))
    v, i = topk(x, 32)
    (g,) = torch.autograd.grad((v * w[i]).sum(), x)
    v0, i0 = x.topk(32, dim=-1)
    (g0,) = torch.autograd.grad((v0 * w[i0]).sum(), x)
    assert torch.equal(g, g0)


def test_topk_sae_activation_unchanged():
    """The TopK activation through the grouped top-k equals the torch.topk definition."""
    sae = SAE(SAEConfig(d_in=32, d_sae=2048, activation="topk", k=32), seed=0)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(4))
    pre = sae.encode_pre(x)
    v, i = pre.topk(32, dim=-1)
    ref = torch.zeros_like(pre).scatter(-1, i, v.relu())
    assert torch.equal(sae.encode(x), ref)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("nonneg", [True, False])
def test_to_csr_equals_nonzero(threads, nonneg):
    """The CSR of a matrix split over threads equals the one-block extraction from
    ``nonzero``: same columns, values and row offsets (empty rows included)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        lat = torch.randn(101, 64, generator=gen) * (torch.rand(101, 64, generator=gen) < 0.1)
        lat[7] = 0
        lat[-1] = 0
        if nonneg:
            lat = lat.relu()
        cols, values, offsets = to_csr(lat, 0.0, nonneg)
        rows, c = lat.nonzero(as_tuple=True)
        assert torch.equal(cols.long(), c)
        assert torch.equal(values, lat[rows, c])
        assert torch.equal(offsets.long(), torch.searchsorted(rows, torch.arange(101)))
    finally:
        torch.set_num_threads(old)


def test_decodes_equal_the_gemm():
    gen = torch.Generator().manual_seed(5)
    W, b = torch.randn(300, 24, generator=gen), torch.randn(24, generator=gen)
    acts = torch.randn(50, 300, generator=gen).relu() * (torch.rand(50, 300, generator=gen) < .1)
    cols, values, offsets = to_csr(acts)
    torch.testing.assert_close(csr_decode(cols, offsets, values, W, b), acts @ W + b)
    v, i = topk(acts, 16)
    code = torch.zeros_like(acts).scatter(-1, i, v)
    torch.testing.assert_close(topk_decode(i, v, W, b), code @ W + b)
    torch.testing.assert_close(topk_decode(i, v, W), code @ W)


def test_to_csr_keeps_nan():
    """A NaN latent stays in the code, so the decode shows it instead of dropping it."""
    acts = torch.zeros(4, 64)
    acts[2, 5] = float("nan")
    acts[1, 3] = 1.0
    cols, values, offsets = to_csr(acts)
    assert cols.tolist() == [3, 5] and offsets.tolist() == [0, 0, 1, 2]
    out = csr_decode(cols, offsets, values, torch.ones(64, 8))
    assert out[2].isnan().all() and not out[[0, 1, 3]].isnan().any()


@pytest.mark.parametrize("threads", [1, 3])
def test_topk_rows_split_over_threads(threads):
    """The grouped top-k's selections split over the torch threads: the same as one block."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _same_topk(torch.randn(301, 4096, generator=torch.Generator().manual_seed(5)), 64)
    finally:
        torch.set_num_threads(old)


def test_topk_nan_and_inf_rank_as_torch_topk():
    """NaN counts as the largest value (as in torch.topk), then +inf; -inf never wins."""
    x = torch.randn(6, 4096, generator=torch.Generator().manual_seed(6))
    x[0, [3, 700, 4000]] = float("nan")
    x[1, :] = float("-inf")
    x[1, 5:105:5] = 1.0  # 20 finite winners, the rest tied at -inf
    x[2, 17] = float("inf")
    v, i = topk(x, 32)
    v0 = x.topk(32, dim=-1).values
    torch.testing.assert_close(v.sort(-1).values, v0.sort(-1).values, rtol=0, atol=0,
                               equal_nan=True)
    assert set(i[0].tolist()) >= {3, 700, 4000}
    assert set(range(5, 105, 5)) <= set(i[1].tolist())
    assert 17 in i[2].tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_topk_other_dtypes_equal_torch_topk(dtype):
    """Dtypes NumPy cannot select in (bfloat16) or that go through torch.topk (float16)."""
    x = torch.randn(40, 2048, generator=torch.Generator().manual_seed(7)).to(dtype)
    v, i = topk(x, 32)
    assert torch.equal(v.sort(-1).values, x.topk(32, dim=-1).values.sort(-1).values)
    assert torch.equal(torch.gather(x, 1, i), v)


def test_topk_rows_that_leave_the_bounded_selection():
    """A NaN (ranked first, as by torch.topk), -inf entries, a row of equal values (more
    than 8 k candidates) and ordinary rows in one call: the values equal torch.topk's,
    the columns hold them, and each row's columns come out ascending."""
    n, f, k = 6, 2048, 32
    x = torch.randn(n, f, generator=torch.Generator().manual_seed(8))
    x[1] = 0.5  # every entry ties
    x[2, : f - 8] = float("-inf")  # fewer than k finite entries
    x[3, :: f // 8] = float("-inf")
    v, i = topk(x, k)
    assert torch.equal(v.sort(-1).values, x.topk(k, dim=-1).values.sort(-1).values)
    assert torch.equal(x.gather(1, i), v)
    assert torch.equal(i, i.sort(-1).values)
    x[4, 5] = float("nan")
    v, i = topk(x, k)
    assert 5 in i[4].tolist() and v[4].isnan().sum() == 1
    v0 = x.topk(k, dim=-1).values
    ok = [r for r in range(n) if r != 4]
    assert torch.equal(v[ok].sort(-1).values, v0[ok].sort(-1).values)


@pytest.mark.parametrize("threads", [1, 2])
def test_topk_non_contiguous_and_split_over_threads(threads):
    """A transposed (non-contiguous) input and rows split over two worker threads give the
    same columns as the contiguous input in one block (a row's answer is its own)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base = torch.randn(4096, 40, generator=torch.Generator().manual_seed(9))
        x = base.t()
        assert not x.is_contiguous()
        v, i = topk(x, 64)
        v1, i1 = topk(x.contiguous(), 64)
        rows = torch.cat([topk(x[r:r + 1].contiguous(), 64)[1] for r in range(40)])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(i, i1) and torch.equal(v, v1) and torch.equal(i, rows)
    assert torch.equal(v.sort(-1).values, x.topk(64, dim=-1).values.sort(-1).values)
