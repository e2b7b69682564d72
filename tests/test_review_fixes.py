"""Regression tests for reviewed bugs: SAE folders saved as a pair, the caller's config left
alone by training, resume checks of the training settings, sweep resume and checkpoints
per grid point, NaN latents in the DL scorer, and ``cfg`` following ``sae.to(...)``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tl_mdl import (
    SAE,
    SAEConfig,
    description_length,
)


def _data(n: int = 256, d: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(16, d, generator=g)
    active = torch.rand(n, 16, generator=g) < 0.2
    return (active * (torch.rand(n, 16, generator=g) + 0.5)) @ dirs


def _bitwise_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


TRAIN = dict(steps=8, batch_size=64, lr=3e-3, progress=False)


# -------------------------------------------------------------------- 5. NaN latents
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
