"""``description_length`` of activations under an SAE: the precision it finds, custom losses,
fixed widths, the DLReport's fields, and its errors (bad arguments, non-finite latents)."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from tl_mdl import save_activations
from tl_mdl.mdl import (
    description_length,
    fvu,
    latent_description_length,
    quantize,
)
from tl_mdl.mdl.precision import grid_width
from tl_mdl.sae import SAE, SAEConfig, identity_sae

STEP = 2.0 ** (1 / 8)  # ratio of neighbouring grid widths


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
