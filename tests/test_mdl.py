"""Description length: hand-computed codes, quantisation, FVU, precision search, DLReport."""

from __future__ import annotations

import csv
import json
import math
from collections import Counter

import pytest
import torch

from tl_mdl import save_activations
from tl_mdl.mdl import (
    binary_entropy,
    dequantize,
    description_length,
    feature_code_stats,
    fvu,
    latent_description_length,
    quantize,
    search_bin_width,
)
from tl_mdl.mdl.precision import grid_width
from tl_mdl.sae import SAE, SAEConfig, identity_sae

STEP = 2.0 ** (1 / 8)  # ratio of neighbouring grid widths


def col(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)[:, None]


# ---------------------------------------------------------------- hand-built codes


def test_half_active_two_equiprobable_values_is_1_5_bits():
    q = col([1, 2, 0, 0, 2, 0, 1, 0])  # p = 1/2, values {1, 2} each half the time
    stats = feature_code_stats(q)
    assert stats.n_inputs == 8
    assert stats.active_counts.tolist() == [4]
    assert stats.p_active.tolist() == [0.5]
    assert stats.presence_bits.tolist() == pytest.approx([1.0], abs=1e-12)
    assert stats.value_entropy_bits.tolist() == pytest.approx([1.0], abs=1e-12)
    assert latent_description_length(q) == pytest.approx(1.5, abs=1e-12)


def test_always_off_feature_is_free():
    assert latent_description_length(torch.zeros(10, 1, dtype=torch.int64)) == 0.0
    assert latent_description_length(torch.zeros(10, 5, dtype=torch.int64)) == 0.0


def test_always_on_single_value_is_free():
    assert latent_description_length(col([3] * 9)) == pytest.approx(0.0, abs=1e-12)
    assert latent_description_length(col([-7] * 4)) == pytest.approx(0.0, abs=1e-12)


def test_always_on_four_equiprobable_values_is_2_bits():
    q = col([1, 2, 3, 4] * 5)
    assert latent_description_length(q) == pytest.approx(2.0, abs=1e-12)
    assert latent_description_length(col([-2, -1, 1, 2] * 3)) == pytest.approx(2.0, abs=1e-12)


def test_quarter_active_three_values_by_hand():
    # N = 12, active on 3 inputs with values 1, 2, 3: p = 1/4, H = log2 3.
    # H_b(1/4) = 2 − (3/4) log2 3, so DL = 2 − (3/4) log2 3 + (1/4) log2 3 = 2 − (1/2) log2 3.
    q = col([0, 1, 0, 0, 0, 2, 0, 0, 3, 0, 0, 0])
    stats = feature_code_stats(q)
    assert float(stats.value_entropy_bits[0]) == pytest.approx(math.log2(3), abs=1e-12)
    assert float(stats.presence_bits[0]) == pytest.approx(2 - 0.75 * math.log2(3), abs=1e-12)
    assert latent_description_length(q) == pytest.approx(2 - 0.5 * math.log2(3), abs=1e-12)


def test_negative_values_are_active_and_distinct():
    # p = 1/2 with values {-1, +1}: same as the 1.5-bit case
    assert latent_description_length(col([-1, 1, 0, 0])) == pytest.approx(1.5, abs=1e-12)


def test_sum_over_features():
    a = col([1, 2, 0, 0, 2, 0, 1, 0])  # 1.5
    b = torch.zeros(8, 1, dtype=torch.int64)  # 0
    c = col([1, 2, 3, 4] * 2)  # 2
    d = col([5] * 8)  # 0
    q = torch.cat([a, b, c, d], dim=1)
    stats = feature_code_stats(q)
    assert stats.bits.tolist() == pytest.approx([1.5, 0.0, 2.0, 0.0], abs=1e-12)
    assert stats.bits_per_input == pytest.approx(3.5, abs=1e-12)
    assert latent_description_length(q) == pytest.approx(3.5, abs=1e-12)


def test_int32_code_same_as_int64():
    q = torch.randint(-3, 4, (50, 6), generator=torch.Generator().manual_seed(0))
    assert latent_description_length(q.to(torch.int32)) == pytest.approx(
        latent_description_length(q), abs=1e-12
    )


def reference_stats(q: torch.Tensor) -> list[tuple[float, float, float]]:
    """Brute force per feature: (p, H of nonzero values, H_b(p) + p H)."""
    n = q.shape[0]
    out = []
    for i in range(q.shape[1]):
        column = [int(v) for v in q[:, i]]
        nz = [v for v in column if v != 0]
        p = len(nz) / n
        hb = 0.0 if p in (0.0, 1.0) else -p * math.log2(p) - (1 - p) * math.log2(1 - p)
        h = -sum(c / len(nz) * math.log2(c / len(nz)) for c in Counter(nz).values()) if nz else 0.0
        out.append((p, h, hb + p * h))
    return out


@pytest.mark.parametrize("seed", range(4))
def test_feature_code_stats_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    n, f = 300, 12
    active = torch.rand(n, f, generator=gen) < torch.linspace(0, 1, f)  # p from 0 to 1
    values = torch.randint(-5, 6, (n, f), generator=gen)
    values[:, 3] = torch.randint(2**35, 2**35 + 3, (n,), generator=gen)  # wide values
    q = torch.where(active, values, torch.zeros_like(values))
    stats = feature_code_stats(q)
    ref = reference_stats(q)
    assert stats.p_active.tolist() == pytest.approx([r[0] for r in ref], abs=1e-12)
    assert stats.value_entropy_bits.tolist() == pytest.approx([r[1] for r in ref], abs=1e-9)
    assert stats.bits.tolist() == pytest.approx([r[2] for r in ref], abs=1e-9)
    assert latent_description_length(q) == pytest.approx(sum(r[2] for r in ref), abs=1e-9)


def test_feature_code_stats_bad_inputs():
    with pytest.raises(TypeError, match="integer"):
        feature_code_stats(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="integer"):
        feature_code_stats(torch.zeros(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[N, F\]"):
        feature_code_stats(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="N = 0"):
        latent_description_length(torch.zeros(0, 4, dtype=torch.int64))


def test_binary_entropy_known_values():
    p = torch.tensor([0.0, 0.5, 1.0, 0.25])
    h = binary_entropy(p).tolist()
    assert h == pytest.approx([0.0, 1.0, 0.0, 2 - 0.75 * math.log2(3)], abs=1e-12)


# ---------------------------------------------------------------- quantize


def test_quantize_round_half_to_even_int64():
    x = torch.tensor([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49, 0.51], dtype=torch.float64)
    q = quantize(x, 1.0)
    assert q.dtype == torch.int64
    assert q.tolist() == [0, 2, 2, 4, 0, -2, -2, 0, 1]
    # same with a power-of-two width (division exact)
    assert quantize(x * 0.25, 0.25).tolist() == [0, 2, 2, 4, 0, -2, -2, 0, 1]
    assert quantize(torch.tensor([0.3, -0.7, 10.0]), 0.5).tolist() == [1, -1, 20]


def test_quantize_keeps_shape_and_dequantize_inverts_on_grid():
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    q = quantize(x, 0.125)
    assert q.shape == (2, 3, 4)
    deq = dequantize(q, 0.125, dtype=torch.float64)
    assert torch.equal(quantize(deq, 0.125), q)
    assert (deq - x.double()).abs().max() <= 0.0625 + 1e-12


@pytest.mark.parametrize("w", [0.0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_quantize_bad_width(w):
    with pytest.raises(ValueError, match="bin_width"):
        quantize(torch.ones(3), w)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_quantize_non_finite_latents(bad):
    x = torch.ones(2, 3)
    x[1, 2] = bad
    with pytest.raises(ValueError, match="NaN"):
        quantize(x, 0.1)


def test_quantize_integer_latents():
    with pytest.raises(TypeError, match="float"):
        quantize(torch.ones(3, dtype=torch.int64), 0.1)


# ---------------------------------------------------------------- FVU


def test_fvu_known_answers():
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert fvu(x, x) == 0.0
    assert fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1.0, abs=1e-12)
    # 2x2 by hand: mean (2, 3), total variance 1+1+1+1 = 4; errors 1 and 1 -> 2/4
    x2 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert fvu(x2, torch.tensor([[0.0, 2.0], [3.0, 3.0]])) == pytest.approx(0.5, abs=1e-12)
    assert fvu(x2, torch.tensor([[1.0, 2.0], [3.0, 5.0]])) == pytest.approx(0.25, abs=1e-12)
    # leading dims are flattened
    assert fvu(x.reshape(4, 10, 5), x.mean(0).expand(4, 10, 5)) == pytest.approx(1.0, abs=1e-12)


def test_fvu_errors():
    with pytest.raises(ValueError, match="shape"):
        fvu(torch.ones(3, 2), torch.ones(3, 3))
    with pytest.raises(ValueError, match="variance"):
        fvu(torch.ones(3, 2), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="N = 0"):
        fvu(torch.ones(0, 2), torch.ones(0, 2))


# ---------------------------------------------------------------- description_length


def random_sae(seed: int = 0, d_in: int = 8, d_sae: int = 32) -> SAE:
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, dtype="float64"), seed=seed)
    with torch.no_grad():
        sae.W_enc.mul_(10)
        sae.b_enc.fill_(-0.05)
    return sae


def random_acts(sae: SAE, n: int = 1500, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, sae.cfg.d_in, generator=gen, dtype=torch.float64)
    return 3 * z @ sae.W_dec.detach()[: sae.cfg.d_in]


@torch.no_grad()
def fvu_increase(sae: SAE, x: torch.Tensor, w: float) -> float:
    """Independent recomputation: FVU(decode(quantize(encode(x), w)·w)) − FVU(decode(encode(x)))."""
    f = sae.encode(x)
    return fvu(x, sae.decode(quantize(f, w).to(torch.float64) * w)) - fvu(x, sae.decode(f))


def on_grid(w: float) -> bool:
    j = 8 * math.log2(w)
    return abs(j - round(j)) < 1e-9 and grid_width(round(j)) == w


def test_identity_sae_has_zero_fvu():
    sae = identity_sae(6, dtype="float64")
    x = torch.rand(300, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    report = description_length(sae, x, tolerance=0.01, raw_cost=False)
    assert report.fvu == 0.0
    assert report.explained_variance == 1.0
    assert report.loss_unquantized == 0.0
    assert report.fvu_quantized <= 0.01


@pytest.mark.parametrize("tol", [0.003, 0.01, 0.05])
def test_precision_search_coarsest_width_meeting_tolerance(tol):
    sae = random_sae()
    x = random_acts(sae)
    report = description_length(sae, x, tolerance=tol, raw_cost=False)
    w = report.bin_width
    assert on_grid(w)
    assert report.tolerance == tol and report.loss == "fvu"
    assert report.loss_quantized - report.loss_unquantized <= tol
    assert fvu_increase(sae, x, w) == pytest.approx(
        report.loss_quantized - report.loss_unquantized, abs=1e-12
    )
    assert fvu_increase(sae, x, w) <= tol
    assert fvu_increase(sae, x, w * STEP) > tol  # the next coarser grid width fails
    assert report.fvu_quantized == pytest.approx(report.loss_quantized, abs=1e-12)
    with torch.no_grad():
        assert report.fvu == pytest.approx(fvu(x, sae(x)), abs=1e-12)


def test_precision_search_with_custom_callable_loss():
    sae = random_sae(seed=1)
    x = random_acts(sae, seed=1)
    with torch.no_grad():
        f = sae.encode(x)

    def mean_abs_error(w: float | None) -> float:
        with torch.no_grad():
            code = f if w is None else quantize(f, w).to(torch.float64) * w
            return float((sae.decode(code) - x).abs().mean())

    tol = 0.02
    report = description_length(sae, x, tolerance=tol, loss=mean_abs_error, raw_cost=False)
    w = report.bin_width
    assert report.loss == "mean_abs_error"
    assert on_grid(w)
    assert report.loss_unquantized == pytest.approx(mean_abs_error(None), abs=1e-12)
    assert report.loss_quantized == pytest.approx(mean_abs_error(w), abs=1e-12)
    assert report.loss_quantized - report.loss_unquantized <= tol
    assert mean_abs_error(w * STEP) - mean_abs_error(None) > tol
    assert report.bits_per_input == pytest.approx(
        latent_description_length(quantize(f, w)), abs=1e-9
    )
    # a custom loss may use tolerances >= 1 (its own units)
    big = description_length(sae, x, tolerance=5.0, loss=mean_abs_error, raw_cost=False)
    assert big.bin_width >= w


def test_fixed_bin_width_path():
    sae = random_sae(seed=2)
    x = random_acts(sae, seed=2)
    w = 0.3  # deliberately off the grid
    report = description_length(sae, x, bin_width=w, raw_cost=False)
    assert report.bin_width == w
    assert report.tolerance is None
    with torch.no_grad():
        q = quantize(sae.encode(x), w)
    assert report.bits_per_input == pytest.approx(latent_description_length(q), abs=1e-9)
    assert report.loss_quantized - report.loss_unquantized == pytest.approx(
        fvu_increase(sae, x, w), abs=1e-12
    )
    assert report.search_trace == []


@pytest.mark.parametrize("w", [0.0, -0.5, float("nan"), float("inf")])
def test_fixed_bin_width_must_be_positive(w):
    sae = random_sae()
    with pytest.raises(ValueError, match="bin_width"):
        description_length(sae, random_acts(sae, n=50), bin_width=w)


def test_report_fields_consistent(tmp_path):
    sae = random_sae(seed=3)
    x = random_acts(sae, seed=3)
    report = description_length(sae, x, tolerance=0.01)
    w = report.bin_width
    with torch.no_grad():
        latents = sae.encode(x)
    q = quantize(latents, w)
    nz = q[q != 0]
    assert report.n_inputs == x.shape[0] and report.d_in == 8 and report.d_sae == 32
    assert report.bits_per_input == pytest.approx(latent_description_length(q), abs=1e-9)
    assert report.l0 == pytest.approx(float((q != 0).sum(1).double().mean()), abs=1e-12)
    assert report.l0_unquantized == pytest.approx(
        float((latents != 0).sum(1).double().mean()), abs=1e-12
    )
    assert report.l0 <= report.l0_unquantized
    assert report.bits_per_value == pytest.approx(math.log2(torch.unique(nz).numel()), abs=1e-12)
    assert report.naive_bits == pytest.approx(
        report.l0 * (report.bits_per_value + math.log2(32)), rel=1e-12
    )
    feats = report.features
    assert set(feats) == {"p_active", "value_entropy_bits", "bits"}
    assert all(v.shape == (32,) for v in feats.values())
    assert float(feats["bits"].sum()) == pytest.approx(report.bits_per_input, abs=1e-9)
    assert feats["p_active"].tolist() == pytest.approx(
        (q != 0).double().mean(0).tolist(), abs=1e-12
    )
    assert report.explained_variance == pytest.approx(1 - report.fvu, abs=1e-15)
    assert report.explained_variance_quantized == pytest.approx(1 - report.fvu_quantized)
    assert math.isfinite(report.raw_bits) and report.raw_bits > 0
    assert report.raw_bits_per_float == pytest.approx(report.raw_bits / 8)
    # raw cost: the activations themselves quantised at raw_bin_width stay within tolerance
    xr = torch.round(x / report.raw_bin_width) * report.raw_bin_width
    assert fvu(x, xr) <= 0.01
    coarser = report.raw_bin_width * STEP
    assert fvu(x, torch.round(x / coarser) * coarser) > 0.01
    json.dumps(report.summary())
    assert "bits/input" in str(report)
    assert len(report.search_trace) > 0

    path = report.write_feature_csv(tmp_path / "out" / "features.csv")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 32
    assert list(rows[0]) == ["feature", "p_active", "value_entropy_bits", "bits"]
    assert [int(r["feature"]) for r in rows] == list(range(32))
    assert sum(float(r["bits"]) for r in rows) == pytest.approx(report.bits_per_input, abs=1e-9)


def test_description_length_from_activation_file(tmp_path):
    sae = random_sae(seed=4)
    x = random_acts(sae, n=400, seed=4)
    path = save_activations(x, tmp_path / "acts.safetensors")
    a = description_length(sae, x, tolerance=0.02, raw_cost=False)
    b = description_length(sae, path, tolerance=0.02, raw_cost=False)
    assert a.bin_width == b.bin_width and a.bits_per_input == b.bits_per_input


def test_description_length_is_deterministic():
    sae = random_sae(seed=5)
    x = random_acts(sae, n=400, seed=5)
    a = description_length(sae, x, tolerance=0.01, raw_cost=False)
    b = description_length(sae, x, tolerance=0.01, raw_cost=False)
    assert a.summary() == pytest.approx(b.summary(), nan_ok=True)


# ---------------------------------------------------------------- search_bin_width


@pytest.mark.parametrize("guess", [1e-6, 0.01, 0.125, 1.0, 1e4, float("nan"), -1.0])
def test_search_on_w_squared_exact_grid_point(guess):
    # loss(w) = w²: coarsest grid w with w² <= t.
    # t = 0.01: 4·log2(0.01) = -26.58 -> j = -27, w = 2^(-27/8) (w² = 0.00925; next 0.01105)
    res = search_bin_width(lambda w: w * w, 0.01, guess=guess)
    assert res.bin_width == 2.0 ** (-27 / 8)
    assert res.loss_increase == pytest.approx(2.0 ** (-27 / 4))
    assert not res.saturated
    # t = 2^-6: w = 2^-3 exactly meets it (<=), 2^(-23/8) does not
    res = search_bin_width(lambda w: w * w, 2.0**-6, guess=guess)
    assert res.bin_width == 0.125
    assert (0.125, 2.0**-6) in res.trace


def test_search_saturation():
    # tolerance never reached: stops at the first grid width >= saturation_width
    res = search_bin_width(lambda w: 0.0, 0.1, guess=0.01, saturation_width=3.0)
    assert res.saturated
    assert res.bin_width == grid_width(math.ceil(8 * math.log2(3.0)))
    assert res.bin_width >= 3.0 and res.bin_width / STEP < 3.0


@pytest.mark.parametrize("tol", [0.0, -0.1, float("nan"), float("inf")])
def test_search_bad_tolerance(tol):
    with pytest.raises(ValueError, match="tolerance"):
        search_bin_width(lambda w: w, tol, guess=1.0)


def test_search_reaches_fine_widths_far_below_guess():
    res = search_bin_width(lambda w: w, 1e-12, guess=1.0)
    assert res.bin_width == grid_width(math.floor(8 * math.log2(1e-12)))


def test_search_nan_loss_and_unreachable_tolerance():
    with pytest.raises(ValueError, match="NaN"):
        search_bin_width(lambda w: float("nan"), 0.1, guess=1.0)
    with pytest.raises(ValueError, match="tolerance"):
        search_bin_width(lambda w: 1.0, 0.1, guess=1.0)


# ---------------------------------------------------------------- description_length errors


@pytest.mark.parametrize("tol", [0.0, -0.01, float("nan"), float("inf"), 1.0, 1.5])
def test_description_length_bad_tolerance(tol):
    sae = random_sae()
    with pytest.raises(ValueError, match="tolerance"):
        description_length(sae, random_acts(sae, n=50), tolerance=tol)


def test_description_length_bad_activations():
    sae = random_sae()
    x = random_acts(sae, n=50)
    with pytest.raises(ValueError, match="empty"):
        description_length(sae, x[:0])
    with pytest.raises(ValueError, match="d_in=8"):
        description_length(sae, x[:, :7])
    with pytest.raises(ValueError, match="d_in=8"):
        description_length(sae, x[0])
    with pytest.raises(TypeError, match="floating"):
        description_length(sae, x.to(torch.int64))
    with pytest.raises(TypeError, match="Tensor"):
        description_length(sae, x.numpy())
    bad = x.clone()
    bad[7, 3] = float("nan")
    with pytest.raises(ValueError, match="row 7"):
        description_length(sae, bad)
    with pytest.raises(ValueError, match="nope"):
        description_length(sae, x, loss="nope")


# ------------------------------------------------------ description_length: non-finite latents
@pytest.mark.parametrize("kw", [{}, {"bin_width": 0.1}, {"max_memory_mb": 1e-4}])
def test_nan_latents_name_the_row_feature_and_weights(kw):
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)).abs()
    bad = SAE(SAEConfig(d_in=4, d_sae=8))
    with torch.no_grad():
        bad.W_enc[0, 2] = float("nan")
    with pytest.raises(ValueError, match=r"nan at row 0, feature 2.*W_enc.*W_enc / b_enc"):
        description_length(bad, x, **kw)


@pytest.mark.parametrize("kw", [{}, {"max_memory_mb": 1e-4}])
def test_overflowing_latents_name_the_first_bad_row(kw):
    """Finite weights whose latents overflow to inf on one row (37): in memory and chunked
    (the chunked path counts rows across chunks)."""
    x = torch.full((50, 4), 0.5)
    x[37, 1] = 4.0
    sae = SAE(SAEConfig(d_in=4, d_sae=8, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc[1, 5] = 3e38
    with pytest.raises(ValueError, match=r"inf at row 37, feature 5.*parameters are finite"):
        description_length(sae, x, **kw)

