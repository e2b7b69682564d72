"""The splice's row-blocked encode (``_TlMdlKernel._blocked``): the reconstruction it
builds ``R`` rows at a time, with no ``[rows, d_sae]`` tensor, against the plain path of the
same kernel (one GEMM over all rows, selection, decode)."""

from __future__ import annotations

import pytest
import torch
from builders import assert_close_f32, dot_scale, f32_tolerance

from tl_mdl import SAE, SAEConfig
from tl_mdl._tl import HookPoint
from tl_mdl.hooks import kernels
from tl_mdl.hooks.kernels import _TlMdlKernel, encode_block_rows
from tl_mdl.hooks.names import SAE_INNER_HOOKS

D_IN, D_SAE = 24, 512


def make_sae(kind: str, dtype=torch.float32, k: int = 16) -> SAE:
    act = "topk" if kind.startswith("topk") else "relu"
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, activation=act, k=k if act == "topk" else None)
    sae = SAE(cfg, seed=3).to(dtype)
    if kind == "relu sparse":  # about 2% of the latents fire: the gather decode
        with torch.no_grad():
            sae.b_enc.fill_(-0.6)
    return sae


def kernel(sae: SAE) -> _TlMdlKernel:
    return _TlMdlKernel(sae, {h: HookPoint() for h in SAE_INNER_HOOKS})


def row_independent_gemm(x: torch.Tensor, sae: SAE, rows: int) -> bool:
    """Whether this BLAS gives each row of ``(x - b_dec) W_enc + b_enc`` the same bits
    whatever rows share the call (then the blocked encode is bitwise the plain one)."""
    xs = (x - sae.b_dec).detach()
    full = torch.addmm(sae.b_enc, xs, sae.W_enc)
    blocks = torch.cat([torch.addmm(sae.b_enc, b, sae.W_enc) for b in xs.split(rows)])
    return bool(((full == blocks) | (full.isnan() & blocks.isnan())).all())


def check_same(blocked: torch.Tensor, plain: torch.Tensor, x: torch.Tensor, sae: SAE,
               rows: int) -> None:
    """Bitwise where the GEMM is row-independent (MKL, OpenBLAS); otherwise the two differ
    by the GEMM's rounding, carried through an exact selection and the decode. A TopK
    selection could then flip at a near-tie; the data here have none closer than that."""
    if row_independent_gemm(x.reshape(-1, D_IN), sae, rows):
        torch.testing.assert_close(blocked, plain, rtol=0, atol=0, equal_nan=True)
    else:
        xs = x.reshape(-1, D_IN).nan_to_num()
        scale = dot_scale(xs, sae.W_enc) + float(sae.b_enc.detach().abs().max())
        tol = f32_tolerance(plain, terms=2 * D_SAE,
                            scale=scale * float(sae.W_dec.detach().abs().sum(0).max()))
        torch.testing.assert_close(blocked, plain, rtol=0, atol=tol, equal_nan=True)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of ENCODE_BLOCK_MIN_ROWS rows, so a few hundred rows make several blocks
    (and a ragged last one)."""
    monkeypatch.setattr(kernels, "ENCODE_BLOCK_BYTES", 1)
    return encode_block_rows(D_SAE, 4)


def run_both(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = kernel(sae)
    with torch.no_grad():
        assert k._blockable(x)
        _, blocked = k.run(x)
        acts, plain = k.run(x, need_acts=True)  # a caller that keeps latents: plain path
    assert acts is not None and acts.shape == (*x.shape[:-1], D_SAE)
    return blocked, plain


@pytest.mark.parametrize("kind", ["topk", "relu sparse", "relu dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [0, 1, 31, 200])
def test_blocked_encode_equals_the_plain_path(small_blocks, kind, dtype, n):
    sae = make_sae(kind, dtype)
    x = torch.randn(n, D_IN, generator=torch.Generator().manual_seed(n), dtype=dtype)
    blocked, plain = run_both(sae, x)
    assert blocked.shape == (n, D_IN) and blocked.dtype == dtype
    check_same(blocked, plain, x, sae, small_blocks)


def test_blocked_encode_keeps_the_leading_shape_and_non_contiguous_input(small_blocks):
    sae = make_sae("topk")
    big = torch.randn(5, 2 * D_IN, 40, generator=torch.Generator().manual_seed(1))
    x = big[:, ::2, :].transpose(1, 2)  # [5, 40, D_IN], non-contiguous
    assert not x.is_contiguous()
    blocked, plain = run_both(sae, x)
    assert blocked.shape == (5, 40, D_IN)
    check_same(blocked, plain, x, sae, small_blocks)
    with torch.no_grad():
        _, contiguous = kernel(sae).run(x.contiguous())
    assert torch.equal(blocked, contiguous)


@pytest.mark.parametrize(("lo", "hi"), [(-2, 3), (0, 2)])
def test_blocked_topk_with_ties_and_k_equal_to_d_sae(small_blocks, lo, hi):
    """Integer weights and inputs: exact integer pre-activations with ties at the k-th
    place (entries in {0, 1}: hundreds of ties, the top-k's fallback for rows with more
    than 8 k candidates). Each row's chosen columns depend on that row alone, so the blocks
    give the plain path's bits. k = d_sae keeps every positive latent."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(lo, hi, (150, D_IN), generator=gen).double()
    for k in (16, D_SAE):
        sae = make_sae("topk", torch.float64, k=k)
        with torch.no_grad():
            sae.W_enc.copy_(torch.randint(max(lo, -1), min(hi, 2), sae.W_enc.shape,
                                          generator=gen))
            sae.b_enc.zero_()
            sae.b_dec.zero_()
        pre = x @ sae.W_enc
        kth = pre.topk(k, dim=-1).values[:, -1:]
        if k < D_SAE:  # ties at the k-th place in many rows
            assert ((pre == kth).sum(-1) > 1).float().mean() > 0.25
        blocked, plain = run_both(sae, x)
        assert torch.equal(blocked, plain)
        if k == D_SAE:
            assert torch.equal(blocked, sae.decode(pre.relu()))


def test_blocked_topk_with_nan_input_rows(small_blocks):
    """A NaN row takes the grouped fallback of the top-k; the NaNs reach the output as in
    the plain path and the other rows are untouched."""
    sae = make_sae("topk")
    x = torch.randn(100, D_IN, generator=torch.Generator().manual_seed(4))
    x[7, 3] = float("nan")
    blocked, plain = run_both(sae, x)
    assert blocked[7].isnan().all() and not blocked[8:].isnan().any()
    check_same(blocked, plain, x, sae, small_blocks)


def test_hooks_still_see_and_change_what_they_did(small_blocks):
    """With hooks only on the SAE's input and reconstruction the blocked path runs; an
    input hook's change reaches the encode and a recons hook sees (and may replace) the
    reconstruction. A hook on the latents turns the blocked path off and sees the exact
    dense latents."""
    sae = make_sae("topk")
    x = torch.randn(90, D_IN, generator=torch.Generator().manual_seed(5))
    k = kernel(sae)
    seen: dict[str, torch.Tensor] = {}
    k.hooks["hook_sae_input"].add_hook(lambda t, hook: t * 2)
    k.hooks["hook_sae_recons"].add_hook(lambda t, hook: seen.setdefault("recons", t.clone()) - 1)
    with torch.no_grad():
        _, got = k.run(x)
        _, ref = kernel(sae).run(x * 2, need_acts=True)
    check_same(seen["recons"], ref, x * 2, sae, small_blocks)
    assert torch.equal(got, seen["recons"] - 1) and k.changed
    k.hooks["hook_sae_acts_post"].add_hook(lambda t, hook: seen.setdefault("acts", t.clone()))
    with torch.no_grad():
        acts, _ = k.run(x)
    assert acts is not None and torch.equal(seen["acts"], acts)
    assert_close_f32(acts, sae.encode(x * 2), terms=D_IN,
                     scale=dot_scale(x * 2, sae.W_enc) + float(sae.b_enc.abs().max()))


def test_blocked_path_only_where_it_computes_the_same():
    """Gradients through the decoder, a dtype the SAE does not have, or a subclass with its
    own encode or activation take the plain path."""
    sae = make_sae("topk")
    x = torch.randn(4, D_IN)
    k = kernel(sae)
    with torch.enable_grad():
        assert not k._blockable(x)
    with torch.no_grad():
        assert k._blockable(x) and not k._blockable(x.double())

    class Custom(SAE):
        def activation(self, pre):
            return super().activation(pre) * 2

    with torch.no_grad():
        assert not kernel(Custom(sae.cfg)).__class__._blockable(kernel(Custom(sae.cfg)), x)


def test_block_rows_follow_the_cache_budget():
    assert encode_block_rows(4096, 4, threads=1) == kernels.ENCODE_BLOCK_BYTES // (4096 * 4)
    assert encode_block_rows(4096, 4, threads=3) == 3 * encode_block_rows(4096, 4, threads=1)
    assert encode_block_rows(10**9, 8, threads=1) == kernels.ENCODE_BLOCK_MIN_ROWS


@pytest.mark.parametrize("kind", ["topk", "relu sparse"])
def test_blocked_encode_on_two_threads(small_blocks, kind):
    """Two torch threads: blocks of twice the rows, the selection's rows split over two
    workers; the same answer as the plain path."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sae = make_sae(kind)
        x = torch.randn(300, D_IN, generator=torch.Generator().manual_seed(6))
        rows = encode_block_rows(D_SAE, 4)
        assert rows == 2 * small_blocks
        blocked, plain = run_both(sae, x)
        check_same(blocked, plain, x, sae, rows)
    finally:
        torch.set_num_threads(old)


def test_a_dense_relu_code_keeps_the_plain_path_and_its_buffer(small_blocks):
    """A ReLU SAE whose first block is dense switches to the plain path (full pre-activation
    buffer, kept from call to call); later calls go there directly, with the same result."""
    sae = make_sae("relu dense")
    x = torch.randn(100, D_IN, generator=torch.Generator().manual_seed(7))
    k = kernel(sae)
    with torch.no_grad():
        _, first = k.run(x)
        buf = k._buf
        assert k._dense_code and buf is not None and buf.shape == (100, D_SAE)
        _, second = k.run(x)
        _, plain = k.run(x, need_acts=True)
    assert k._buf is buf and torch.equal(first, second)
    check_same(first, plain, x, sae, small_blocks)
    k.release()
    assert not k._dense_code and k._buf is None
