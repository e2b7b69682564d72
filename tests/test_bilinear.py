"""Known-answer tests for tl_mdl.bilinear: exact eigen identities, swap/restore, SVD, ablation."""

from __future__ import annotations

import pytest
import torch
from builders import LOGIT_TERMS, assert_close_f32, hooked_transformer_classes
from hypothesis import given, settings
from hypothesis import strategies as st

from tl_mdl.bilinear import (
    BilinearMLP,
    Eigen,
    ablate_eigen,
    anneal_to_bilinear,
    bilinear_transformer,
    eigen_expansion,
    eigendecompose,
    folded_weights,
    interaction_matrix,
    iter_eigendecompose,
    output_svd,
    to_bilinear,
    truncation_curve,
)
from tl_mdl.sae import SAE, SAEConfig

HookedTransformer, HookedTransformerConfig = hooked_transformer_classes()

F64 = torch.float64


def tiny_cfg(**kw) -> HookedTransformerConfig:
    base = dict(
        n_layers=2, d_model=16, d_mlp=32, d_head=8, n_heads=2, n_ctx=16, d_vocab=50,
        act_fn="silu", gated_mlp=True, dtype=F64, seed=0,
    )
    base.update(kw)
    return HookedTransformerConfig(**base)


def random_mlp(d_model=6, d_mlp=10, seed=0, dtype=F64) -> BilinearMLP:
    cfg = tiny_cfg(d_model=d_model, d_mlp=d_mlp, d_head=2, n_heads=1, dtype=dtype)
    mlp = BilinearMLP(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    return mlp


def with_one(x):
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1)


def brute_force_B(mlp: BilinearMLP) -> torch.Tensor:
    """The symmetrised bilinear tensor B[o, i, j] with biases folded, materialised."""
    L = torch.cat([mlp.W_in, mlp.b_in[None]]).detach()
    R = torch.cat([mlp.W_gate, mlp.b_gate[None]]).detach()
    B = torch.einsum("ho,ih,jh->oij", mlp.W_out.detach(), L, R)
    return 0.5 * (B + B.mT)


# --------------------------------------------------------------------------- the layer


def test_forward_formula():
    mlp = random_mlp()
    x = torch.randn(2, 3, 6, dtype=F64)
    expected = ((x @ mlp.W_gate + mlp.b_gate) * (x @ mlp.W_in + mlp.b_in)) @ mlp.W_out + mlp.b_out
    torch.testing.assert_close(mlp(x), expected)
    assert {"hook_pre", "hook_pre_linear", "hook_post"} <= {n for n, _ in mlp.named_modules()}


# --------------------------------------------------------------------------- exact identities


@settings(max_examples=15, deadline=None)
@given(
    d_model=st.integers(2, 9), d_mlp=st.integers(1, 12), n=st.integers(1, 5),
    seed=st.integers(0, 10_000),
)
def test_eigen_expansion_is_exact(d_model, d_mlp, n, seed):
    mlp = random_mlp(d_model, d_mlp, seed)
    g = torch.Generator().manual_seed(seed + 1)
    U = torch.randn(n, d_model, generator=g, dtype=F64)
    x = torch.randn(7, d_model, generator=g, dtype=F64)
    y = mlp(x[None])[0] @ U.T - U @ mlp.b_out  # u·out(x) − u·b_out  [7, n]

    Q = interaction_matrix(mlp, U)
    assert Q.shape == (n, d_model + 1, d_model + 1)
    torch.testing.assert_close(Q, Q.mT, rtol=0, atol=0)
    xt = with_one(x)
    scale = 1 + y.abs().max().item()
    quad = torch.einsum("bi,nij,bj->bn", xt, Q, xt)
    torch.testing.assert_close(quad, y, rtol=0, atol=1e-5 * scale)

    eig = eigendecompose(mlp, U)
    d = d_model + 1
    assert eig.values.shape == (n, d) and eig.vectors.shape == (n, d, d)
    assert (eig.values.abs().diff(dim=-1) <= 1e-12).all()  # sorted by |λ| descending
    manual = (eig.values[None] * torch.einsum("nkd,bd->bnk", eig.vectors, xt).square()).sum(-1)
    torch.testing.assert_close(manual, y, rtol=0, atol=1e-5 * scale)
    torch.testing.assert_close(eigen_expansion(eig, x), y, rtol=0, atol=1e-5 * scale)
    # Q = V diag(λ) Vᵀ with rows of V
    recon = torch.einsum("nkd,nk,nke->nde", eig.vectors, eig.values, eig.vectors)
    torch.testing.assert_close(recon, Q, rtol=0, atol=1e-9 * (1 + Q.abs().max().item()))


def test_interaction_matrix_matches_brute_force():
    mlp = random_mlp(5, 7)
    U = torch.randn(4, 5, dtype=F64)
    B = brute_force_B(mlp)
    torch.testing.assert_close(interaction_matrix(mlp, U), torch.einsum("no,oij->nij", U, B))
    # without bias: the quadratic block of B
    torch.testing.assert_close(
        interaction_matrix(mlp, U, bias=False), torch.einsum("no,oij->nij", U, B[:, :-1, :-1])
    )


def test_topk_of_all_eigenvectors_is_full_output():
    mlp = random_mlp(6, 9, seed=3)
    U = torch.randn(3, 6, dtype=F64)
    x = torch.randn(11, 6, dtype=F64)
    full = eigendecompose(mlp, U)
    y = mlp(x[None])[0] @ U.T - U @ mlp.b_out
    torch.testing.assert_close(eigen_expansion(full, x, k=7), y)
    # the subset (top-k) driver agrees with the full decomposition for every k
    for k in (1, 2, 3, 5, 6):
        top = eigendecompose(mlp, U, k=k)
        assert top.values.shape == (3, k) and top.vectors.shape == (3, k, 7)
        torch.testing.assert_close(top.values, full.values[:, :k])
        overlap = (top.vectors * full.vectors[:, :k]).sum(-1).abs()
        torch.testing.assert_close(overlap, torch.ones_like(overlap))
        torch.testing.assert_close(eigen_expansion(top, x), eigen_expansion(full, x, k))


@pytest.mark.parametrize("d_mlp", [1, 2])
def test_topk_low_rank_split_tridiagonal(d_mlp):
    """Q of rank ≤ 2·d_mlp: the tridiagonal splits and zero eigenvalues repeat (stemr path)."""
    mlp = random_mlp(8, d_mlp, seed=4)
    U = torch.randn(3, 8, dtype=F64)
    x = torch.randn(5, 8, dtype=F64)
    full = eigendecompose(mlp, U)
    k = 2 * d_mlp + 1
    top = eigendecompose(mlp, U, k=k)
    torch.testing.assert_close(top.values, full.values[:, :k])
    torch.testing.assert_close(eigen_expansion(top, x), eigen_expansion(full, x))


def test_topk_float32_large_matches_eigh():
    mlp = random_mlp(40, 64, seed=1, dtype=torch.float32)
    U = torch.randn(5, 40)
    full = eigendecompose(mlp, U)
    top = eigendecompose(mlp, U, k=8, chunk_size=2)
    # two float32 eigensolvers on Q [41, 41]: each eigenvalue within ~d ulps of ‖Q‖
    assert_close_f32(top.values, full.values[:, :8], terms=4 * 41,
                     scale=float(full.values.abs().max()))
    overlap = (top.vectors * full.vectors[:, :8]).sum(-1).abs()
    torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-3)


def test_streaming_chunks_cover_all_directions():
    mlp = random_mlp(4, 6)
    U = torch.randn(7, 4, dtype=F64)
    full = eigendecompose(mlp, U)
    got = torch.zeros_like(full.values)
    for rows, eig in iter_eigendecompose(mlp, U, chunk_size=3):
        got[rows] = eig.values
    torch.testing.assert_close(got, full.values)


def test_sae_bases_feature_to_feature():
    """Outputs along an SAE's encoder directions, inputs in another SAE's decoder basis."""
    mlp = random_mlp(6, 10, seed=5)
    sae_in = SAE(SAEConfig(d_in=6, d_sae=9, dtype="float64"), seed=0)
    sae_out = SAE(SAEConfig(d_in=6, d_sae=4, dtype="float64"), seed=1)
    with torch.no_grad():
        sae_in.b_dec.normal_()
    Q = interaction_matrix(mlp, sae_out, in_basis=sae_in)
    assert Q.shape == (4, 10, 10)  # d_sae_in + 1
    f = torch.randn(8, 9, dtype=F64)  # input-side SAE latents
    x = f @ sae_in.W_dec + sae_in.b_dec
    U = sae_out.W_enc.T
    y = mlp(x[None])[0] @ U.T - U @ mlp.b_out
    ft = with_one(f)
    torch.testing.assert_close(torch.einsum("bi,nij,bj->bn", ft, Q, ft), y)
    torch.testing.assert_close(eigen_expansion(eigendecompose(mlp, sae_out, in_basis=sae_in), f), y)


# --------------------------------------------------------------------------- output SVD


def test_output_svd_matches_materialised_svd():
    mlp = random_mlp(6, 11, seed=2)
    B = brute_force_B(mlp)
    U_ref, S_ref, _ = torch.linalg.svd(B.reshape(6, -1), full_matrices=False)
    svd = output_svd(mlp, 4, block=3)  # small block exercises the accumulation
    torch.testing.assert_close(svd.values, S_ref[:4])
    torch.testing.assert_close((svd.out_dirs @ U_ref[:, :4]).abs(), torch.eye(4, dtype=F64))
    # no bias
    L, R, W_out = folded_weights(mlp, bias=False)
    S_nb = torch.linalg.svdvals(B[:, :-1, :-1].reshape(6, -1))
    torch.testing.assert_close(output_svd(mlp, 3, bias=False).values, S_nb[:3])


# --------------------------------------------------------------------------- swap / restore


def identity_act(model: HookedTransformer) -> None:
    for block in model.blocks:
        block.mlp.act_fn = lambda x: x


def test_swap_matches_identity_gated_and_restore_is_bitwise():
    model = HookedTransformer(tiny_cfg())
    with torch.no_grad():  # nonzero biases so the fold matters
        for block in model.blocks:
            block.mlp.b_in.normal_()
            block.mlp.b_out.normal_()
    identity_act(model)
    tokens = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    ref = model(tokens)
    hooks_before = dict(model.hook_dict)

    swap = to_bilinear(model)
    assert all(isinstance(b.mlp, BilinearMLP) for b in model.blocks)
    torch.testing.assert_close(model(tokens), ref, rtol=1e-10, atol=1e-10)
    _, cache = model.run_with_cache(tokens)
    for name in ("hook_pre", "hook_pre_linear", "hook_post"):
        assert f"blocks.1.mlp.{name}" in cache
    assert model.hook_dict["blocks.0.mlp.hook_post"] is model.blocks[0].mlp.hook_post

    swap.restore()
    assert torch.equal(model(tokens), ref)
    assert model.hook_dict == hooks_before


def test_swap_context_manager_restores_on_error_and_layers_subset():
    model = HookedTransformer(tiny_cfg())
    tokens = torch.randint(0, 50, (1, 8))
    ref = model(tokens)
    with pytest.raises(RuntimeError), to_bilinear(model, layers=[1]) as swap:
        assert isinstance(model.blocks[1].mlp, BilinearMLP)
        assert not isinstance(model.blocks[0].mlp, BilinearMLP)
        assert set(swap.bilinear) == {1}
        raise RuntimeError
    assert torch.equal(model(tokens), ref)
    with pytest.raises(ValueError, match="n_layers=2"):
        to_bilinear(model, layers=[5])


def test_plain_mlp_gets_fresh_init_and_bilinear_transformer():
    model = HookedTransformer(tiny_cfg(gated_mlp=False, act_fn="gelu"))
    with pytest.raises(TypeError, match="a plain MLP has no gate.*init='random'"):
        to_bilinear(model, init="copy", seed=0)
    assert not any(isinstance(b.mlp, BilinearMLP) for b in model.blocks)
    swap = to_bilinear(model, init="random", seed=0)
    assert isinstance(model.blocks[0].mlp, BilinearMLP)
    assert model(torch.randint(0, 50, (1, 5))).isfinite().all()
    swap.restore()
    model = bilinear_transformer(tiny_cfg(), seed=0)
    assert all(isinstance(b.mlp, BilinearMLP) for b in model.blocks)
    assert "blocks.0.mlp.hook_pre_linear" in model.hook_dict


# --------------------------------------------------------------------------- ablation


def bilinear_model() -> HookedTransformer:
    model = bilinear_transformer(tiny_cfg(), seed=0)
    with torch.no_grad():
        for block in model.blocks:
            block.mlp.b_in.normal_()
            block.mlp.b_out.normal_()
    return model


def test_ablate_eigen_full_k_is_identity_and_zero_k_is_bias():
    model = bilinear_model()
    tokens = torch.randint(0, 50, (2, 9))
    U = torch.randn(3, 16, dtype=F64)
    _, cache = model.run_with_cache(tokens)
    ref_logits, mlp_out = model(tokens), cache["blocks.1.hook_mlp_out"]

    with ablate_eigen(model, 1, U, k=17):  # all d_model + 1 eigenpairs: nothing changes
        torch.testing.assert_close(model(tokens), ref_logits)

    with ablate_eigen(model, 1, U, k=0):
        _, cache0 = model.run_with_cache(tokens)
    out0 = cache0["blocks.1.hook_mlp_out"]
    b_out = model.blocks[1].mlp.b_out
    torch.testing.assert_close(out0 @ U.T, (U @ b_out).expand(2, 9, 3))
    # orthogonal complement of span(U) untouched
    P = torch.eye(16, dtype=F64) - torch.linalg.pinv(U) @ U
    torch.testing.assert_close(out0 @ P, mlp_out @ P)
    assert torch.equal(model(tokens), ref_logits)  # hook removed


def test_ablate_eigen_matches_truncated_expansion():
    model = bilinear_model()
    tokens = torch.randint(0, 50, (2, 9))
    U = torch.randn(2, 16, dtype=F64)
    mlp = model.blocks[0].mlp
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.ln2.hook_normalized")
    x = cache["blocks.0.ln2.hook_normalized"]
    expected = eigen_expansion(eigendecompose(mlp, U), x, 4) + U @ mlp.b_out
    with ablate_eigen(model, 0, U, k=4):
        _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(cache["blocks.0.hook_mlp_out"] @ U.T, expected)


def test_truncation_curve_and_errors():
    model = bilinear_model()
    tokens = torch.randint(0, 50, (4, 8))
    U = model.W_U.T[:3].detach()
    curve = truncation_curve(model, tokens, 1, U, ks=[0, 2, 17])
    assert curve.ks == [0, 2, 17] and len(curve.loss) == 3
    assert curve.loss[-1] == pytest.approx(curve.base_loss, abs=1e-9)
    assert curve.accuracy[-1] == pytest.approx(curve.base_accuracy)
    gated = HookedTransformer(tiny_cfg())
    with pytest.raises(TypeError, match="to_bilinear"):
        ablate_eigen(gated, 0, U, 2)
    with pytest.raises(TypeError, match="to_bilinear"):
        eigendecompose(gated.blocks[0].mlp, U)
    with pytest.raises(ValueError, match="d_out=16"):
        interaction_matrix(model.blocks[0].mlp, torch.randn(2, 5, dtype=F64))


def test_eigen_namedtuple():
    eig = Eigen(torch.zeros(1, 2), torch.zeros(1, 2, 3))
    assert eig.values.shape == (1, 2)


# --------------------------------------------------------------------------- fine-tuning


def test_anneal_to_bilinear_is_exact_at_beta_zero(tmp_path):
    model = HookedTransformer(tiny_cfg(dtype=torch.float32))
    tokens = torch.randint(0, 50, (16, 8), generator=torch.Generator().manual_seed(0))
    result = anneal_to_bilinear(
        model, tokens, steps=6, batch_size=4, lr=1e-3, kl_coef=0.5,
        checkpoint_dir=tmp_path, checkpoint_every=3, progress=False,
    )
    assert [r["beta"] for r in result.history][-2:] == [0.0, 0.0]
    assert all(isinstance(b.mlp, BilinearMLP) for b in model.blocks)
    assert (tmp_path / "step_3" / "model.safetensors").exists()
    assert (tmp_path / "step_6" / "state.json").exists()
    bil_logits = model(tokens[:2])
    result.swap.restore()  # the fine-tuned GatedMLPs with a linear gate x/2 give the same
    for block in model.blocks:
        block.mlp.act_fn = lambda x: 0.5 * x
    # x/2 applied to the gate branch vs ½ folded into W_gate: float32 roundings per layer
    assert_close_f32(model(tokens[:2]), bil_logits, terms=LOGIT_TERMS)


def test_split_tridiagonal_falls_back_to_mrrr():
    import numpy as np

    from tl_mdl.bilinear.eigh import _tridiagonal_vectors

    diag, off = np.array([1.0, -2.0, 3.0, 0.5, -4.0]), np.array([0.5, 0.0, 0.3, 0.7])
    T = np.diag(diag) + np.diag(off, 1) + np.diag(off, -1)
    w_all, V_all = np.linalg.eigh(T)
    w, Z = _tridiagonal_vectors(diag, off, w_all, [(0, 1), (4, 4)])
    np.testing.assert_allclose(w, w_all[[0, 1, 4]], atol=1e-12)
    np.testing.assert_allclose(np.abs(Z.T @ V_all[:, [0, 1, 4]]), np.eye(3), atol=1e-10)


def test_swap_validates_layers_and_is_all_or_nothing():
    model = HookedTransformer(tiny_cfg())
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    clean = model(tokens)
    for bad, err, match in (([0, 0], ValueError, "pass each layer once"),
                            ([0, -2], ValueError, "already names"),
                            ("0", TypeError, "must be an int"),
                            ([0.5], TypeError, "is not an integer")):
        with pytest.raises(err, match=match):
            to_bilinear(model, bad)
    with to_bilinear(model, torch.tensor(1)):  # a 0-d integer tensor is one layer
        assert isinstance(model.blocks[1].mlp, BilinearMLP)
    assert torch.equal(model(tokens), clean)

    class Custom(torch.nn.Module):
        cfg = model.blocks[1].mlp.cfg
        W_in = model.blocks[1].mlp.W_in

    original = model.blocks[1].mlp
    model.blocks[1].mlp = Custom()
    with pytest.raises(TypeError, match="cannot copy weights from Custom"):
        to_bilinear(model)  # block 0 converts, block 1 cannot: nothing changes
    assert not isinstance(model.blocks[0].mlp, BilinearMLP)
    model.blocks[1].mlp = original
    assert torch.equal(model(tokens), clean)


def test_ablate_eigen_checks_eigen_and_k():
    model = bilinear_model()
    U = torch.eye(model.cfg.d_model)[:3]
    one = eigendecompose(model.blocks[0].mlp, U[:1], k=4, dtype=torch.float64)
    with pytest.raises(ValueError, match="decomposes 1 output directions but out_dirs has 3"):
        ablate_eigen(model, 0, U, 2, eigen=one)
    with pytest.raises(ValueError, match="k=-3 must be an int >= 0"):
        ablate_eigen(model, 0, U, -3)


def test_anneal_frac_above_one_fails_before_training():
    model = HookedTransformer(tiny_cfg(act_fn="silu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="anneal_frac=1.5 does not bring"):
        anneal_to_bilinear(model, tokens, 4, anneal_frac=1.5, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_eigendecompose_validates_inputs():
    mlp = random_mlp(6, 9)  # d = d_model + 1 = 7 with the bias folded in
    U = torch.randn(2, 6, dtype=F64)
    assert eigendecompose(mlp, U, k=7).values.shape == (2, 7)  # k = d is the full spectrum
    with pytest.raises(ValueError, match="k=8 exceeds d=7"):
        eigendecompose(mlp, U, k=8)
    with pytest.raises(ValueError, match="k=8 exceeds d=6"):
        eigendecompose(mlp, U, k=8, bias=False)
    for k in (0, -2):
        with pytest.raises(ValueError, match=f"k={k} must be a positive number"):
            eigendecompose(mlp, U, k=k)
    with pytest.raises(ValueError, match="out_dirs has no directions; pass at least one"):
        eigendecompose(mlp, torch.zeros(0, 6, dtype=F64))
    for cs in (0, -1):
        with pytest.raises(ValueError, match=f"chunk_size={cs} must be a positive int"):
            eigendecompose(mlp, U, chunk_size=cs)
        with pytest.raises(ValueError, match=f"chunk_size={cs} must be a positive int"):
            iter_eigendecompose(mlp, U, chunk_size=cs)  # checked on call, not on first next()
    for dt in (torch.float16, torch.bfloat16):
        with pytest.raises(TypeError, match="needs float32 or float64"):
            eigendecompose(mlp, U, dtype=dt)
    eig = eigendecompose(mlp, U)
    with pytest.raises(ValueError, match="k=-1 must be an int >= 0"):
        eigen_expansion(eig, torch.randn(3, 6, dtype=F64), k=-1)
