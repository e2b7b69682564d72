"""The streamed DL path (``max_memory_mb`` below the dense latents) encodes the inputs once
when their nonzero latents, kept in sparse form, fit in its budget, and reports exactly
what re-encoding on every pass reports (DL is an exact claim: bitwise)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from test_dl_chunked import _acts, _budget_mb, _sae

from tl_mdl.mdl import description_length

dl_module = importlib.import_module("tl_mdl.mdl.description_length")


def _sparse_sae(arch: str):
    """An SAE with about 6 (topk) or 11 (relu) of its 256 latents active a row."""
    sae = _sae(arch, seed=3, d_sae=256)
    if arch == "relu":
        with torch.no_grad():
            sae.b_enc.fill_(-2.0)
    return sae


def _same_bits(a, b) -> None:
    for name, va in vars(a).items():
        vb = getattr(b, name)
        if name == "features":
            assert va.keys() == vb.keys()
            for k in va:
                assert torch.equal(va[k], vb[k]), k
        elif isinstance(va, float) and math.isnan(va):
            assert math.isnan(vb), name
        else:
            assert va == vb, name


def _counting_encode(sae, monkeypatch) -> list[int]:
    rows: list[int] = []
    encode = sae.encode

    def counted(x):
        rows.append(x.shape[0])
        return encode(x)

    monkeypatch.setattr(sae, "encode", counted)
    return rows


@pytest.mark.parametrize("arch", ["relu", "topk"])
@pytest.mark.parametrize("kw", [{"tolerance": 0.003}, {"tolerance": 0.02},
                                {"bin_width": 0.05}, {"bin_width": 0.3, "raw_cost": False}])
def test_kept_code_reports_the_same_bits_and_encodes_once(arch, kw, monkeypatch) -> None:
    n, d_sae = 1531, 256
    sae = _sparse_sae(arch)
    x = _acts(sae, n, seed=4)
    budget = _budget_mb(n, d_sae, 20)  # ~20 chunks; their sparse code fits in a quarter
    rows = _counting_encode(sae, monkeypatch)
    kept = description_length(sae, x, max_memory_mb=budget, **kw)
    assert sum(r for r in rows if r != 128) == n  # one pass (128: the proxy's subsample)
    rows.clear()
    monkeypatch.setattr(dl_module, "_KEEP_FRACTION", 0.0)  # re-encode on every pass
    again = description_length(sae, x, max_memory_mb=budget, **kw)
    assert sum(r for r in rows if r != 128) > n
    _same_bits(kept, again)


def test_code_too_large_for_the_budget_is_re_encoded(monkeypatch) -> None:
    n, d_sae = 1531, 256
    sae = _sparse_sae("relu")
    x = _acts(sae, n, seed=4)
    budget = _budget_mb(n, d_sae, 20)
    ref = description_length(sae, x, tolerance=0.01, max_memory_mb=budget)
    monkeypatch.setattr(dl_module, "_KEEP_FRACTION", 0.1)  # a few chunks' code, not all
    rows = _counting_encode(sae, monkeypatch)
    got = description_length(sae, x, tolerance=0.01, max_memory_mb=budget)
    assert sum(r for r in rows if r != 128) > n
    _same_bits(got, ref)
