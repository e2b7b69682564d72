"""The MDL objective's warm start codes (``warm_start="topk"`` / ``"batch_topk"``): hand-built
pre-activations with known selections, and the settings' checks."""

from __future__ import annotations

import pytest
import torch

from tl_mdl import SAEConfig, train_sae
from tl_mdl.training.code_length import CodeLengthObjective, warm_code


def test_batch_topk_keeps_the_k_times_b_largest_positive_entries():
    pre = torch.tensor([[5.0, 4.0, 3.0, -1.0],
                        [0.5, 0.2, -2.0, 0.1],
                        [6.0, 0.0, 2.5, 1.0]], requires_grad=True)
    out = warm_code(pre, 2, "batch_topk")  # 6 entries: 6, 5, 4, 3, 2.5, 1
    want = torch.tensor([[5.0, 4.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0], [6.0, 0.0, 2.5, 1.0]])
    assert torch.equal(out.detach(), want)  # rows fire 3, 0 and 3 (2 on average)
    out.sum().backward()
    assert torch.equal(pre.grad, (want != 0).float())  # gradient through the chosen only
    per_row = warm_code(pre.detach(), 2, "topk")
    assert torch.equal((per_row > 0).sum(1), torch.tensor([2, 2, 2]))


def test_batch_topk_never_keeps_a_non_positive_entry():
    pre = -torch.rand(4, 8)
    pre[0, 3] = 0.7
    out = warm_code(pre, 3, "batch_topk")
    assert out.count_nonzero() == 1 and out[0, 3] == 0.7


@pytest.mark.parametrize("bad,match", [
    ({"warm_start": "top-k"}, "warm_start='top-k' is unknown"),
    ({"warm_start": "batch_topk", "objective": "l1"}, "setting of objective='mdl'"),
])
def test_bad_warm_start_settings_are_refused(bad, match):
    kw = {"objective": "mdl", **bad}
    x = torch.randn(64, 4)
    with pytest.raises(ValueError, match=match):
        train_sae(x, SAEConfig(d_in=4, d_sae=8), kw.pop("objective"), steps=2,
                  progress=False, **kw)
    with pytest.raises(ValueError, match="unknown"):
        CodeLengthObjective(warm_start="nope")


def test_the_warm_start_kind_is_recorded_and_trains():
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(0))
    res = train_sae(x, SAEConfig(d_in=8, d_sae=16), "mdl", steps=40, batch_size=64,
                    warm_start="batch_topk", progress=False, return_history=True)
    assert res.sae.cfg.metadata["training"]["warm_start"] == "batch_topk"
    assert res.sae.cfg.activation == "jumprelu" and res.steps == 40
