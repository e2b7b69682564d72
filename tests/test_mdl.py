"""The code and its parts: hand-computed codes, quantisation, FVU and the precision search
(``search_bin_width``). The scorer over an SAE, ``description_length``, is tested in
test_description_length.py."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from tl_mdl.mdl import (
    binary_entropy,
    dequantize,
    feature_code_stats,
    fvu,
    latent_description_length,
    quantize,
    search_bin_width,
)
from tl_mdl.mdl.precision import grid_width

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
