"""Hierarchical MDL-SAEs: conditional DL known answers, codec, gating property, save/load,
training and feature splitting."""

from __future__ import annotations

import json
import math

import pytest
import torch
from beartype import beartype
from hypothesis import given, settings
from hypothesis import strategies as st
from jaxtyping import jaxtyped

import tl_mdl
from tl_mdl import (
    SAE,
    HierarchicalSAE,
    HierarchicalSAEConfig,
    SAEConfig,
    description_length,
    feature_splitting,
    hierarchical_description_length,
    hierarchical_dl_report,
    latent_description_length,
    quantize,
    sweep_hierarchical,
    train_hierarchical_sae,
)
from tl_mdl.codec import hierarchical as hcodec
from tl_mdl.mdl.hierarchical import hierarchical_code_stats
from tl_mdl.sae.hierarchical import check_parent_index, hierarchy_parent_index
from tl_mdl.training.hierarchical import hierarchical_mdl_penalty


def hb(p: float) -> float:
    return 0.0 if p in (0.0, 1.0) else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


# Features: 0 = parent A, 1 = parent B, 2 and 3 = children of A.  N = 8 inputs.
HAND_Q = torch.tensor(
    [
        # A  B  a1 a2
        [1, 0, 1, 3],
        [1, 0, 2, 0],
        [1, 2, 0, 0],
        [2, 0, 0, 3],
        [0, 2, 0, 0],
        [0, 2, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
    ]
)
HAND_PARENTS = [-1, -1, 0, 0]


def hand_bits() -> tuple[float, float]:
    """(conditional, flat) bits per input of HAND_Q, term by term."""
    n = 8
    # parent A: active 4/8, values {1,1,1,2} -> H(3/4, 1/4)
    a = hb(4 / 8) + 4 / n * hb(1 / 4)
    # parent B: active 3/8, one value -> no value bits
    b = hb(3 / 8) + 0.0
    # child a1: active 2 of A's 4 inputs, values {1, 2} -> 1 bit each
    a1_cond, a1_flat = 4 / n * hb(2 / 4), hb(2 / 8)
    a1_val = 2 / n * 1.0
    # child a2: active 2 of A's 4, one value
    a2_cond, a2_flat = 4 / n * hb(2 / 4), hb(2 / 8)
    cond = a + b + a1_cond + a1_val + a2_cond
    flat = a + b + a1_flat + a1_val + a2_flat
    return cond, flat


def test_hand_built_conditional_dl():
    cond, flat = hand_bits()
    # by hand: 1 + 0.5·0.811278 + 0.954434 + 0.5 + 0.25 + 0.5 = 3.6081...
    assert cond == pytest.approx(1 + 0.5 * (2 - 0.75 * math.log2(3)) + hb(3 / 8) + 1.25)
    assert hierarchical_description_length(HAND_Q, HAND_PARENTS) == pytest.approx(cond, abs=1e-12)
    assert latent_description_length(HAND_Q, torch.tensor(HAND_PARENTS)) == pytest.approx(cond)
    stats = hierarchical_code_stats(HAND_Q, HAND_PARENTS)
    assert stats.presence_bits.tolist() == pytest.approx([1.0, hb(3 / 8), 0.5, 0.5])
    assert stats.parent_counts.tolist() == [8, 8, 4, 4]


def test_same_code_costs_more_flat():
    cond, flat = hand_bits()
    assert latent_description_length(HAND_Q) == pytest.approx(flat, abs=1e-12)
    assert flat - cond == pytest.approx(2 * (hb(1 / 4) - 0.5))  # 0.6226 bits saved
    assert tl_mdl.latent_description_length(HAND_Q) > tl_mdl.latent_description_length(
        HAND_Q, HAND_PARENTS
    )
    # all roots = the flat code exactly
    assert latent_description_length(HAND_Q, [-1] * 4) == pytest.approx(flat, abs=1e-12)


def test_child_always_on_with_parent_costs_no_presence():
    q = torch.tensor([[1, 1], [2, 1], [0, 0], [0, 0]])
    stats = hierarchical_code_stats(q, [-1, 0])
    assert float(stats.presence_bits[1]) == 0.0
    assert float(stats.flat_presence_bits[1]) == pytest.approx(1.0)


def test_child_without_parent_rejected():
    q = HAND_Q.clone()
    q[6, 3] = 5  # child a2 active in row 6, where parent A is off
    q[7, 2] = 1  # and a1 in row 7
    with pytest.raises(ValueError, match=r"child feature 3 .* row 6 .* parent feature 0"):
        hcodec.encode(q, HAND_PARENTS)
    with pytest.raises(ValueError, match=r"child feature 3 .* row 6 .* parent feature 0"):
        latent_description_length(q, HAND_PARENTS)


@pytest.mark.parametrize(
    "parents, why",
    [([-1, 0, 5], "parent_index\\[2\\] = 5"), ([1, 0, -1], "cycle"), ([-1, 0], "shape")],
)
def test_bad_hierarchy_rejected(parents, why):
    with pytest.raises(ValueError, match=why):
        check_parent_index(torch.tensor(parents), 3)


def random_hierarchical_code(n: int, n_parents: int, c: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rates = torch.linspace(0.05, 0.6, n_parents)
    par = (torch.rand(n, n_parents, generator=g) < rates) * torch.randint(
        1, 6, (n, n_parents), generator=g
    )
    kid = (torch.rand(n, n_parents, c, generator=g) < 0.3) * torch.randint(
        -3, 4, (n, n_parents, c), generator=g
    )
    kid = kid * (par != 0)[..., None]
    return torch.cat([par, kid.flatten(1)], 1)


def test_codec_round_trip_hand_built():
    data = hcodec.encode(HAND_Q, HAND_PARENTS)
    q, pi = hcodec.decode(data)
    assert torch.equal(q, HAND_Q) and pi.tolist() == HAND_PARENTS


@pytest.mark.parametrize(
    "rows, parents",
    [
        ([[1, 0], [0, 0]], [-1, 0]),  # last feature never active (a dead child)
        ([[0, 0, 0]] * 3, [-1, 0, 0]),  # nothing active at all
        ([[2, 0, 1], [1, 0, 0]], [-1, -1, 0]),  # dead parent in the middle
        ([[4, 4], [4, 4]], [-1, 0]),  # child always on with its parent
        ([[-3, 1], [0, 0], [5, -2]], [-1, 0]),  # negative values
    ],
)
def test_codec_round_trip_edge_cases(rows, parents):
    q = torch.tensor(rows)
    out, pi = hcodec.decode(hcodec.encode(q, parents))
    assert torch.equal(out, q) and pi.tolist() == parents


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 40), p=st.integers(1, 3), c=st.integers(0, 3))
def test_codec_round_trip_property(seed, n, p, c):
    q = random_hierarchical_code(n, p, c, seed)
    pi = hierarchy_parent_index(p, c)
    out, _ = hcodec.decode(hcodec.encode(q, pi))
    assert torch.equal(out, q)


def test_codec_round_trip_and_rate_large_n():
    n, p, c = 12_000, 6, 3
    q = random_hierarchical_code(n, p, c)
    pi = hierarchy_parent_index(p, c)
    data = hcodec.encode(q, pi)
    out, pi_out = hcodec.decode(data)
    assert torch.equal(out, q) and torch.equal(pi_out, pi)
    rate = hcodec.inspect(data).payload_bits_per_input
    dl = latent_description_length(q, pi)
    assert abs(rate / dl - 1) < 0.01, (rate, dl)
    assert dl < latent_description_length(q)  # and shorter than the flat code of q
    flat_rate = tl_mdl.codec.inspect(tl_mdl.codec.encode(q)).payload_bits_per_input
    assert rate < flat_rate


def test_codec_three_levels_and_corruption():
    # grandchild 2 of child 1 of root 0
    q = torch.tensor([[3, 1, 1], [3, 1, 0], [1, 0, 0], [0, 0, 0]] * 50)
    data = hcodec.encode(q, [-1, 0, 1])
    assert torch.equal(hcodec.decode(data)[0], q)
    with pytest.raises(ValueError, match="corrupted"):
        hcodec.decode(data[:-5] + bytes(5))
    with pytest.raises(ValueError, match="bad magic"):
        hcodec.decode(tl_mdl.codec.encode(q))


def test_codec_round_trip_of_sae_code():
    torch.manual_seed(0)
    sae = HierarchicalSAE(HierarchicalSAEConfig(d_in=12, n_parents=4, children_per_parent=3))
    q = quantize(sae.encode(torch.randn(300, 12)).detach(), 0.02)
    out, _ = hcodec.decode(hcodec.encode(q, sae.parent_index))
    assert torch.equal(out, q)


# ---------------------------------------------------------------- the encoder gate
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_parents=st.integers(1, 5),
    children=st.integers(0, 4),
    d_in=st.integers(1, 9),
    log_w=st.floats(-8, 2),
    scale=st.floats(0.1, 10),
    child_topk=st.one_of(st.none(), st.integers(1, 3)),
    activation=st.sampled_from(["relu", "jumprelu"]),
)
def test_encoder_never_activates_orphan_child(
    seed, n_parents, children, d_in, log_w, scale, child_topk, activation
):
    cfg = HierarchicalSAEConfig(
        d_in=d_in, n_parents=n_parents, children_per_parent=children, child_topk=child_topk,
        activation=activation,
    )
    sae = HierarchicalSAE(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # arbitrary weights, not just the initialisation
        sae.W_enc.copy_(torch.randn(d_in, cfg.d_sae, generator=g))
        sae.b_enc.copy_(torch.randn(cfg.d_sae, generator=g))
        if activation == "jumprelu":
            sae.threshold.copy_(torch.rand(cfg.d_sae, generator=g) * scale)
    x = scale * torch.randn(64, d_in, generator=g)
    f = sae.encode(x).detach()
    parent_of = sae.parent_index
    kids = parent_of >= 0
    assert (f >= 0).all()
    on_kids, on_parents = f[:, kids] != 0, f[:, parent_of[kids]] != 0
    assert not (on_kids & ~on_parents).any()
    assert (f[:, kids] <= f[:, parent_of[kids]]).all()
    if child_topk is not None and children:
        per_group = (f[:, n_parents:] != 0).unflatten(1, (n_parents, children)).sum(-1)
        assert (per_group <= child_topk).all()
    # ... and after quantisation at any bin width: the code is always hierarchical
    q = quantize(f, 2.0**log_w)
    hierarchical_code_stats(q, parent_of)  # raises on an orphan child
    assert not ((q[:, kids] != 0) & (q[:, parent_of[kids]] == 0)).any()


def test_latent_order_and_shapes():
    cfg = HierarchicalSAEConfig(d_in=5, n_parents=3, children_per_parent=2)
    sae = HierarchicalSAE(cfg)
    assert cfg.d_sae == 9
    assert sae.parent_index.tolist() == [-1, -1, -1, 0, 0, 1, 1, 2, 2]
    assert list(sae.children_of(1)) == [5, 6]
    x = torch.randn(2, 7, 5)
    assert sae.encode(x).shape == (2, 7, 9) and sae(x).shape == x.shape
    checked = jaxtyped(typechecker=beartype)(sae.encode)
    assert checked(torch.randn(4, 5)).shape == (4, 9)
    with pytest.raises(ValueError, match="d_in=5"):
        sae.encode(torch.randn(3, 4))
    with pytest.raises(ValueError, match="n_parents"):
        HierarchicalSAEConfig(d_in=5, n_parents=0, children_per_parent=2)


def test_save_load_round_trip(tmp_path):
    cfg = HierarchicalSAEConfig(
        d_in=6,
        n_parents=3,
        children_per_parent=2,
        hook_name="blocks.0.hook_resid_pre",
        metadata={"note": "x"},
    )
    sae = HierarchicalSAE(cfg, seed=3)
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    sae.save(tmp_path / "h")
    d = json.loads((tmp_path / "h" / "cfg.json").read_text())
    assert d["architecture"] == "tl_mdl_hierarchical" and d["d_sae"] == 9
    back = HierarchicalSAE.load(tmp_path / "h")
    assert back.cfg == cfg
    x = torch.randn(10, 6)
    assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x), sae(x))
    assert torch.equal(back.parent_index, sae.parent_index)
    with pytest.raises(ValueError, match="tl_mdl_hierarchical"):
        SAE.load(tmp_path / "h")
    SAE(SAEConfig(d_in=6, d_sae=4)).save(tmp_path / "flat")
    with pytest.raises(ValueError, match="not a hierarchical SAE"):
        HierarchicalSAE.load(tmp_path / "flat")


# ------------------------------------------------------------- reports and training
def blobs(n: int = 3000, seed: int = 0) -> torch.Tensor:
    """Data with a two-level structure: a few general directions, each with variants."""
    g = torch.Generator().manual_seed(seed)
    d, p, c = 16, 3, 2
    general = torch.randn(p, d, generator=g)
    special = torch.randn(p, c, d, generator=g) * 0.5
    which = torch.randint(p, (n,), generator=g)
    variant = torch.randint(c + 1, (n,), generator=g)  # c = no specialisation
    x = general[which] * (1 + torch.rand(n, 1, generator=g))
    sp = special[which, variant.clamp_max(c - 1)] * (variant < c)[:, None]
    return x + sp + 0.01 * torch.randn(n, d, generator=g)


def test_dl_report_same_precision_fewer_bits():
    x = blobs(2000)
    sae = HierarchicalSAE(HierarchicalSAEConfig(d_in=16, n_parents=3, children_per_parent=2))
    rep = hierarchical_dl_report(sae, x, tolerance=0.05, raw_cost=False)
    flat = description_length(sae, x, tolerance=0.05, raw_cost=False)
    assert rep.bin_width == flat.bin_width
    assert rep.flat_bits_per_input == pytest.approx(flat.bits_per_input, rel=1e-9)
    assert rep.bits_per_input <= rep.flat_bits_per_input + 1e-9
    q = quantize(tl_mdl.mdl.encode_all(sae, x), rep.bin_width)
    assert rep.bits_per_input == pytest.approx(latent_description_length(q, sae.parent_index))
    assert set(rep.features) >= {"parent_index", "presence_bits", "flat_bits", "bits"}


def test_surrogate_matches_exact_presence_for_hard_latents():
    # latents either 0 or far above the bin width: soft presence is exact
    q = HAND_Q.clone().double() * 100
    sae = HierarchicalSAE(HierarchicalSAEConfig(d_in=3, n_parents=2, children_per_parent=2))
    pi = torch.tensor([-1, -1, 0, 0])
    exact = hierarchical_code_stats(HAND_Q, pi).presence_bits.sum()
    got = hierarchical_mdl_penalty(q, sae, parent_index=pi, bin_width=1.0)
    values = (q > 0) * torch.log2(1 + q)
    assert float(got) == pytest.approx(float(exact + values.sum(-1).mean()), rel=1e-4)


def test_train_and_sweep(tmp_path):
    x = blobs(1536)
    res = train_hierarchical_sae(
        x,
        HierarchicalSAEConfig(d_in=16, n_parents=3, children_per_parent=2),
        sparsity=1e-3,
        epochs=6,
        lr=1e-2,
        progress=False,
        return_history=True,
    )
    assert isinstance(res.sae, HierarchicalSAE)
    assert res.history[-1]["fvu"] < res.history[0]["fvu"]
    table = sweep_hierarchical(
        x,
        parents=(2, 3),
        children=(1,),
        epochs=2,
        lr=1e-2,
        tolerance=0.05,
        out_dir=tmp_path,
        progress=False,
    )
    assert [(r["n_parents"], r["children_per_parent"]) for r in table] == [(2, 1), (3, 1)]
    assert all(r["bits_per_input"] <= r["flat_bits_per_input"] + 1e-9 for r in table)
    assert (tmp_path / "sweep.csv").is_file()
    again = sweep_hierarchical(  # the same settings: rows reused
        x, parents=(2, 3), children=(1,), epochs=2, lr=1e-2, tolerance=0.05,
        out_dir=tmp_path, progress=False,
    )
    assert [r["bits_per_input"] for r in again] == [r["bits_per_input"] for r in table]


def test_feature_splitting_known_answer():
    e = torch.eye(4)
    narrow = SAE(SAEConfig(d_in=4, d_sae=2))
    wide = SAE(SAEConfig(d_in=4, d_sae=3))
    hier = HierarchicalSAE(HierarchicalSAEConfig(d_in=4, n_parents=2, children_per_parent=1))
    r2 = 2**-0.5
    with torch.no_grad():
        narrow.W_dec.copy_(e[:2])
        # feature 1 (e2) splits into (e2 ± e3)/√2; feature 0 survives
        wide.W_dec.copy_(torch.stack([e[0], r2 * (e[1] + e[2]), r2 * (e[1] - e[2])]))
        # hierarchy keeps e2 as parent 0 (and e1 as parent 1), children = specialisations
        hier.W_dec.copy_(torch.stack([e[1], e[0], e[2], e[3]]))
    res = feature_splitting(narrow, wide, hierarchical=hier, threshold=0.5)
    assert res.wide_best_cos.tolist() == pytest.approx([1.0, r2])
    assert res.wide_n_split.tolist() == [1, 2]
    assert res.parent_best_cos.tolist() == pytest.approx([1.0, 1.0])
    assert res.parent_match.tolist() == [1, 0]
    # child of parent 0 (e2) has effective direction e2 + e3 = wide feature 1 exactly
    assert float(res.children_wide_cos[1]) == pytest.approx(1.0)
    assert res.summary()["frac_split"] == 0.5


def test_train_hierarchical_sae_defaults_to_training_until_converged():
    x = blobs(512)  # 2 batches: one epoch would be 2 steps
    res = train_hierarchical_sae(
        x, HierarchicalSAEConfig(d_in=16, n_parents=3, children_per_parent=2),
        lr=1e-2, progress=False, return_history=True,
    )
    assert res.converged is not None and res.steps > 2
    fixed = train_hierarchical_sae(
        x, HierarchicalSAEConfig(d_in=16, n_parents=3, children_per_parent=2),
        epochs=1, progress=False, return_history=True,
    )
    assert fixed.converged is None and fixed.steps == 2
