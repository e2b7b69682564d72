"""Feature-shape and smoothness measures on images whose answers are known by construction."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tl_mdl.metrics.shapes import (
    feature_shapes,
    high_frequency_fraction,
    memorisation,
    noise_high_frequency_fraction,
    positive_mass_shape,
    total_variation_ratio,
)

YY, XX = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")


def segment(p0, p1, thickness=1.5) -> torch.Tensor:
    """An anti-aliased pen stroke from ``p0`` to ``p1`` (row, col) on a 28×28 canvas."""
    p0, p1 = torch.tensor(p0, dtype=torch.float32), torch.tensor(p1, dtype=torch.float32)
    d, pts = p1 - p0, torch.stack([YY, XX], -1) - p0
    u = ((pts @ d) / (d @ d)).clamp(0, 1)
    dist = (pts - u[..., None] * d).norm(dim=-1)
    return (1 - (dist - thickness / 2)).clamp(0, 1)


def ring(centre=(14, 14), a=9.0, b=6.0, thickness=2.0) -> torch.Tensor:
    """An elliptical "0" (semi-axes ``a`` rows, ``b`` columns)."""
    r = torch.sqrt(((YY - centre[0]) / a) ** 2 + ((XX - centre[1]) / b) ** 2)
    return (1 - ((r - 1).abs() * (a + b) / 2 - thickness / 2)).clamp(0, 1)


def seven(dx=0) -> torch.Tensor:
    return torch.maximum(segment((5, 8 + dx), (5, 20 + dx)), segment((5, 20 + dx), (23, 11 + dx)))


def training_digits() -> torch.Tensor:
    """Synthetic "training images": rings and sevens at several positions and sizes."""
    digits = [ring((14, c), a, b) for c in (12, 14, 16) for a, b in ((9, 6), (8, 5), (10, 7))]
    digits += [seven(dx) for dx in (-3, 0, 3)]
    return torch.stack(digits).flatten(1)


def blob3() -> torch.Tensor:
    img = torch.zeros(28, 28)
    img[10, 10] = img[10, 11] = img[11, 10] = 1
    return img


# ----------------------------------------------------------------------------- exact values


def test_axis_segment_and_pixel_have_exact_area_and_elongation():
    rows = torch.zeros(3, 28, 28)
    rows[0, 7, 3:15] = 2.0  # 12 equal pixels in a row
    rows[1, 4:9, 20] = 0.5  # 5 equal pixels in a column
    rows[2, 3, 3] = 1.0
    rows[:, 20, 20] = -3.0  # negative pixels are not part of the positive mass
    area, elong, pos = positive_mass_shape(rows.flatten(1))
    torch.testing.assert_close(area, torch.tensor([12.0, 5.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(elong, torch.tensor([12.0, 5.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(pos, torch.tensor([48 / 57, 1.25 / 10.25, 1 / 10],
                                                 dtype=torch.float64))


def test_shape_measures_are_scale_and_rotation_invariant():
    img = segment((6, 6), (12, 16)).double()  # float64: 7.5·img is exact enough for 1e-12
    a, e, _ = positive_mass_shape(torch.stack([img, 7.5 * img, img.T]).flatten(1))
    torch.testing.assert_close(a, a[:1].expand(3), rtol=1e-12, atol=0)
    torch.testing.assert_close(e, e[:1].expand(3), rtol=1e-12, atol=0)


def test_memorisation_is_the_best_cosine():
    imgs = training_digits()
    rows = torch.stack([3 * imgs[4], -imgs[4], torch.zeros(784), imgs[0] + imgs[-1]])
    mem = memorisation(rows, imgs, chunk_size=5)  # chunks must not change the answer
    cos = torch.nn.functional.cosine_similarity(rows[:, None].double(), imgs[None].double(), -1)
    torch.testing.assert_close(mem, cos.max(1).values, rtol=0, atol=1e-12)
    assert mem[0] == pytest.approx(1.0, abs=1e-12) and mem[2] == 0.0


# --------------------------------------------------------------------------- known labels


@pytest.mark.parametrize("with_images", [True, False])
def test_stroke_digit_and_blob_get_their_labels(with_images):
    imgs = training_digits()
    stroke = segment((14, 9), (20, 16))  # a short diagonal stroke, in no training image whole
    digit = ring((14, 13), 9, 6)  # a "0" one pixel off a training image
    rows = torch.stack([stroke, digit, blob3()]).flatten(1)
    fs = feature_shapes(rows, imgs if with_images else None)
    assert fs.labels == ["stroke", "digit", "blob"]
    if with_images:
        assert fs.memorisation[0] < 0.5 < 0.8 < fs.memorisation[1]
    s = fs.summary()
    assert s["frac_stroke"] == s["frac_digit"] == s["frac_blob"] == pytest.approx(1 / 3)
    assert len(fs.rows()) == 3 and fs.rows()[0]["label"] == "stroke"


def test_a_compact_mid_sized_shape_is_a_fragment():
    square = torch.zeros(28, 28)
    square[10:14, 10:14] = 1  # 16 pixels, elongation 1
    assert feature_shapes(square.flatten()[None]).labels == ["fragment"]


def test_faint_positive_noise_does_not_count_as_shape():
    rows = torch.zeros(2, 28, 28, dtype=torch.float64)
    rows[:, 7, 3:15] = 1.0
    rows[1] += 0.05 * torch.rand(28, 28, generator=torch.Generator().manual_seed(0))
    rows[1, 7, 3:15] = 1.0
    area, elong, _ = positive_mass_shape(rows.flatten(1))
    assert area[1] == area[0] == 12.0 and elong[1] == elong[0] == 12.0
    area0, _, _ = positive_mass_shape(rows.flatten(1), floor=0.0)
    assert area0[1] > 30  # without the floor, the noise would triple the area


def test_a_large_blurred_shape_that_is_no_training_image_is_diffuse():
    blur = torch.exp(-((YY - 14) ** 2 + (XX - 14) ** 2) / (2 * 6.0**2))
    fs = feature_shapes(blur.flatten()[None], training_digits())
    assert fs.memorisation[0] < 0.6 and fs.area[0] > 60
    assert fs.labels == ["diffuse"]


def test_feature_shapes_rejects_bad_input():
    with pytest.raises(ValueError, match="image_shape"):
        feature_shapes(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="floor"):
        feature_shapes(torch.ones(1, 784), floor=1.0)
    with pytest.raises(ValueError, match="memorised"):
        feature_shapes(torch.ones(1, 784), memorised=0)
    with pytest.raises(ValueError, match="NaN"):
        feature_shapes(torch.full((1, 784), math.nan))
    with pytest.raises(ValueError, match="images has shape"):
        feature_shapes(torch.ones(1, 784), torch.ones(3, 100))
    with pytest.raises(ValueError, match="same d"):
        memorisation(torch.ones(1, 784), torch.ones(3, 100))


# ----------------------------------------------------------------------------- smoothness


def test_high_frequency_fraction_of_pure_waves():
    xx, yy = XX.double(), YY.double()
    low = torch.cos(2 * math.pi * 2 * xx / 28)  # 2/28 cycles/pixel: 0.14 of Nyquist
    high = torch.cos(2 * math.pi * 12 * xx / 28) * torch.cos(2 * math.pi * 3 * yy / 28)
    hf = high_frequency_fraction(torch.stack([low, high]).flatten(1))
    assert hf[0] == pytest.approx(0.0, abs=1e-24)  # leakage is float64 rounding, ~eps²
    assert hf[1] == pytest.approx(1.0, abs=1e-12)


def test_smooth_images_score_low_and_noise_scores_its_expected_value():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(400, 784, generator=g, dtype=torch.float64)
    centres = torch.rand(50, 2, generator=g) * 10 + 9
    bumps = torch.exp(-((YY - centres[:, :1, None]) ** 2 + (XX - centres[:, 1:, None]) ** 2)
                      / (2 * 3.0**2))
    hf_noise, hf_smooth = high_frequency_fraction(noise), high_frequency_fraction(bumps)
    # each noise image: ~392 independent frequency pairs, sd of its fraction ≈ 0.02, so the
    # mean of 400 has sd ≈ 0.001; 0.01 is ten of them
    assert hf_noise.mean() == pytest.approx(noise_high_frequency_fraction(), abs=0.01)
    assert noise_high_frequency_fraction() == pytest.approx(1 - 149 / 784)
    assert hf_smooth.max() < 1e-4  # σ=3 bumps ≥ 9 px from the edge: tails cut at the border
    tv_noise, tv_smooth = total_variation_ratio(noise), total_variation_ratio(bumps)
    assert tv_noise.mean() == pytest.approx(1.0, abs=0.01)
    assert tv_smooth.max() < 0.3
    torch.testing.assert_close(total_variation_ratio(-4 * bumps), tv_smooth, rtol=1e-12, atol=0)


def test_total_variation_ratio_expectation_is_exact_over_all_permutations():
    x = torch.tensor([0.3, -1.0, 2.5, 0.0, 0.7, 4.0], dtype=torch.float64)
    ratios = torch.cat([total_variation_ratio(x[list(p)][None], (2, 3))
                        for p in itertools.permutations(range(6))])
    assert ratios.mean().item() == pytest.approx(1.0, abs=1e-12)


def test_smoothness_of_constant_image_is_nan_and_bad_cutoff_raises():
    assert math.isnan(total_variation_ratio(torch.ones(1, 784))[0])
    assert math.isnan(high_frequency_fraction(torch.zeros(1, 784))[0])
    with pytest.raises(ValueError, match="cutoff"):
        high_frequency_fraction(torch.ones(1, 784), cutoff=2.0)
