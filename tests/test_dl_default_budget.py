"""``description_length`` with the default ``max_memory_mb=None`` never holds the dense
latents of all inputs once they would pass ``DEFAULT_MAX_MEMORY_MB``: it streams them, with
the report of an explicit budget of that size (SAELens-sized SAEs on 200k inputs would
otherwise need 19.7 GB)."""

from __future__ import annotations

import importlib

from test_dl_chunked import _acts, _assert_same, _sae

from tl_mdl.mdl import description_length
from tl_mdl.mdl.description_length import DEFAULT_MAX_MEMORY_MB, _chunk_rows

# the module (tl_mdl.mdl re-exports the function under the module's name)
dl_module = importlib.import_module("tl_mdl.mdl.description_length")


def test_default_budget_chunks_only_beyond_its_size():
    d_sae = 24_576
    fits = DEFAULT_MAX_MEMORY_MB * 2**20 // (4 * d_sae)  # rows whose latents fill the budget
    assert _chunk_rows(None, fits, d_sae) is None
    assert _chunk_rows(None, fits + 1, d_sae) == _chunk_rows(DEFAULT_MAX_MEMORY_MB, fits + 1,
                                                             d_sae)
    rows = _chunk_rows(None, 200_000, d_sae)
    assert rows is not None and rows * d_sae * 4 <= DEFAULT_MAX_MEMORY_MB * 2**20 / 16


def test_default_call_streams_past_the_budget(monkeypatch):
    sae = _sae("topk", 0)
    x = _acts(sae, 3000, 1)
    budget = 0.25  # MB; the latents take 0.73 MB: chunks of 64 rows
    explicit = description_length(sae, x, tolerance=0.02, max_memory_mb=budget)
    monkeypatch.setattr(dl_module, "DEFAULT_MAX_MEMORY_MB", budget)

    def no_dense(*a, **k):
        raise AssertionError("encode_all would hold the latents of all rows")

    monkeypatch.setattr(dl_module, "encode_all", no_dense)
    _assert_same(description_length(sae, x, tolerance=0.02), explicit)
