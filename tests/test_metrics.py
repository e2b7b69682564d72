"""Metrics against hand-computed answers, and evaluate() on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from beartype import beartype
from builders import exact_identity_sae, random_sae
from jaxtyping import jaxtyped

import tl_mdl.mdl
from tl_mdl import attach_sae, evaluate
from tl_mdl.metrics import (
    ce_loss,
    ce_loss_recovered,
    dead_fraction,
    dense_fraction,
    explained_variance,
    feature_frequency,
    fvu,
    kl_divergence,
    l0,
)
from tl_mdl.metrics.core import l0 as l0_raw

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_fvu_is_the_mdl_definition():
    assert fvu is tl_mdl.mdl.fvu


def test_explained_variance_hand_case():
    """SAELens #443/#659: numerator and denominator summed separately, variance about the
    per-dimension mean. x̄ = [1, 2]; TV = (1+4)+(1+4) = 10; SSE = 1+1 = 2 → EV = 0.8."""
    x = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    x_hat = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    assert fvu(x, x_hat) == pytest.approx(0.2)
    assert explained_variance(x, x_hat) == pytest.approx(0.8)
    # Asymmetric case: x̄ = [1, 7/3], TV = 96/9, SSE = 3 → FVU = 27/96 exactly; the per-input
    # average of ratios (legacy SAEBench/SAELens) would give 1 − 0.890 instead.
    x3 = torch.tensor([[2.0, 0.0], [0.0, 4.0], [1.0, 3.0]])
    x3_hat = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 2.0]])
    assert fvu(x3, x3_hat) == pytest.approx(27 / 96)
    assert explained_variance(x3, x3_hat) == pytest.approx(1 - 27 / 96)
    per_input = 1 - ((x3 - x3_hat).pow(2).sum(1) / (x3 - x3.mean(0)).pow(2).sum(1)).mean()
    assert float(per_input) == pytest.approx(1 - (9 / 58 + 9 / 34 + 9 / 4) / 3, rel=1e-5)
    # Not the variance about zero (SAELens #659): Σx² = 20 → 0.9.
    assert 1 - 2 / float(x.pow(2).sum()) == pytest.approx(0.9)


def test_explained_variance_limits():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=gen) + 10.0  # large mean: variance about zero would lie
    assert explained_variance(x, x.clone()) == 1.0
    assert explained_variance(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-12)
    assert explained_variance(x, torch.zeros_like(x)) < -100


def test_l0_dead_dense_hand_case():
    f = torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.5, 1.0, 0.0]])
    assert l0(f) == pytest.approx(5 / 3)
    assert feature_frequency(f).tolist() == pytest.approx([0, 2 / 3, 1, 0])
    assert dead_fraction(f) == 0.5
    assert dense_fraction(f, 0.7) == 0.25
    assert dense_fraction(f, 0.5) == 0.5
    assert l0(f.reshape(1, 3, 4)) == l0(f)


def test_ce_loss_hand_case():
    tokens = torch.tensor([[0, 1, 2]])
    uniform = torch.zeros(1, 3, 5)
    assert ce_loss(uniform, tokens) == pytest.approx(math.log(5))
    peaked = torch.full((1, 3, 5), -1e9)
    peaked[0, 0, 1] = 0
    peaked[0, 1, 2] = 0
    assert ce_loss(peaked, tokens) == pytest.approx(0.0, abs=1e-9)


def test_kl_hand_case():
    p = torch.tensor([[0.5, 0.5]]).log()
    q = torch.tensor([[0.25, 0.75]]).log()
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_divergence(p, q) == pytest.approx(expected)
    assert kl_divergence(p + 3.0, q - 1.0) == pytest.approx(expected)  # logits, not probs
    assert kl_divergence(q, q) == 0.0


def test_ce_loss_recovered_hand_case():
    assert ce_loss_recovered(ce_clean=2.0, ce_spliced=2.5, ce_zero=4.0) == pytest.approx(0.75)
    assert ce_loss_recovered(2.0, 2.0, 4.0) == 1.0
    assert ce_loss_recovered(2.0, 4.0, 4.0) == 0.0
    assert math.isnan(ce_loss_recovered(2.0, 3.0, 2.0))


def test_metric_signatures_typecheck():
    checked = jaxtyped(typechecker=beartype)(l0_raw)
    assert checked(torch.ones(3, 4)) == 4.0
    checked_ev = jaxtyped(typechecker=beartype)(explained_variance)
    with pytest.raises(Exception):  # noqa: B017 (jaxtyping raises its own error type)
        checked_ev(torch.ones(3, 4), torch.ones(3, 5))


def test_evaluate_identity_sae(model, tokens):
    r = evaluate(model, {"blocks.1.hook_resid_pre": exact_identity_sae(16)}, tokens,
                 batch_size=4, description_length=False)["blocks.1.hook_resid_pre"]
    assert r["fvu"] == 0.0 and r["explained_variance"] == 1.0
    assert r["ce_loss_spliced"] == pytest.approx(r["ce_loss_clean"], abs=1e-12)
    assert r["kl_clean_spliced"] == pytest.approx(0.0, abs=1e-12)
    assert r["ce_loss_recovered"] == pytest.approx(1.0)
    assert r["n_tokens"] == tokens.numel()


def test_evaluate_matches_manual_computation(model, tokens):
    hook_a, hook_b = "blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"
    sa = random_sae(16, "relu", hook_name=hook_a)
    sb = random_sae(16, "topk", seed=4, hook_name=hook_b)
    res = evaluate(model, [sa, sb], tokens, batch_size=4, dense_threshold=0.2)
    clean, cache = model.run_with_cache(tokens)
    ce_clean = float(model(tokens, return_type="loss"))
    for hook, sae in ((hook_a, sa), (hook_b, sb)):
        r = res[hook]
        x = cache[hook].reshape(tokens.numel(), -1)
        f = sae.encode(x)
        assert r["fvu"] == pytest.approx(fvu(x, sae.decode(f)), rel=1e-6)
        assert r["explained_variance"] == pytest.approx(1 - r["fvu"])
        assert r["l0"] == pytest.approx(l0(f))
        assert r["dead_fraction"] == pytest.approx(dead_fraction(f))
        assert r["dense_fraction"] == pytest.approx(dense_fraction(f, 0.2))
        with attach_sae(model, hook, sae):
            spliced = model(tokens)
            ce_spliced = float(model(tokens, return_type="loss"))
        ce_zero = float(model.run_with_hooks(
            tokens, return_type="loss", fwd_hooks=[(hook, lambda a, hook: torch.zeros_like(a))]))
        assert r["ce_loss_clean"] == pytest.approx(ce_clean, rel=1e-5)
        assert r["ce_loss_spliced"] == pytest.approx(ce_spliced, rel=1e-5)
        assert r["ce_loss_zero_ablated"] == pytest.approx(ce_zero, rel=1e-5)
        assert r["ce_loss_recovered"] == pytest.approx(
            ce_loss_recovered(ce_clean, ce_spliced, ce_zero), rel=1e-4)
        assert r["kl_clean_spliced"] == pytest.approx(kl_divergence(clean, spliced), rel=1e-4)
        assert r["dl_bits_per_token"] >= 0 and math.isfinite(r["dl_bits_per_token"])
        assert r["dl_bin_width"] > 0


def test_evaluate_errors(model):
    sae = random_sae(16)
    with pytest.raises(ValueError, match="n_ctx=16"):
        evaluate(model, {"blocks.0.hook_resid_pre": sae}, torch.zeros(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="no hook name"):
        evaluate(model, sae, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="is not a hook point"):
        evaluate(model, {"blocks.0.resid_pre": sae}, torch.zeros(2, 8, dtype=torch.long))
