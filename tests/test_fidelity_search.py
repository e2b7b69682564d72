"""The k search of the MNIST demo on hand-built FVU(k) curves with known answers."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "_fidelity", Path(__file__).resolve().parents[1] / "demos" / "_fidelity.py")
fid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fid)


def make_probe(fvu, bits=lambda k: 10.0 * k):
    calls = []

    def probe(k):
        calls.append(k)
        return {"k": k, "fvu_quantized": fvu(k), "bits_per_input": bits(k)}

    return probe, calls


@pytest.mark.parametrize("width", [16, 64, 1000])
@pytest.mark.parametrize("guess", [1, 7, 40])
def test_search_finds_the_smallest_feasible_k(width, guess):
    fvu = lambda k: 1 / (1 + k / 5)  # noqa: E731  FVU_q ≤ t  ⇔  k ≥ 5 (1/t − 1)
    probe, calls = make_probe(fvu)
    levels = [0.1, 0.2, 0.3]
    res = fid.search_k(probe, width, levels, guesses={t: guess for t in levels}, rel=0.0001)
    assert len(calls) == len(set(calls))  # no SAE trained twice
    for t in levels:
        k_min = math.ceil(5 * (1 / t - 1) - 1e-9)
        lo, hi = res[t]
        if k_min > width:
            assert hi is None and lo["k"] == width
        else:
            assert hi["k"] == k_min and (lo is None or lo["k"] == k_min - 1)


def test_relative_precision_bounds_the_bracket_and_saves_probes():
    probe, calls = make_probe(lambda k: 1 / (1 + k / 5))
    res = fid.search_k(probe, 1000, [0.01], rel=0.15)
    lo, hi = res[0.01]
    assert hi["fvu_quantized"] <= 0.01 < lo["fvu_quantized"]
    assert hi["k"] - lo["k"] <= 0.15 * hi["k"]
    assert len(calls) <= 12


def test_dl_at_level_interpolates_log_dl_linearly_in_fvu():
    lo = {"fvu_quantized": 0.3, "bits_per_input": 50.0}
    hi = {"fvu_quantized": 0.1, "bits_per_input": 200.0}
    assert fid.dl_at_level(lo, hi, 0.2) == pytest.approx(100.0)  # geometric mean
    assert fid.dl_at_level(None, hi, 0.2) == 200.0
    assert math.isnan(fid.dl_at_level(lo, None, 0.2))


def test_bad_levels_raise():
    probe, _ = make_probe(lambda k: 1 / k)
    with pytest.raises(ValueError, match="levels"):
        fid.search_k(probe, 10, [0.0])

