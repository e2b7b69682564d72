"""Sweeps over widths and sparsities (flat and hierarchical): one checkpoint per grid point,
reruns that reuse a stored row only when every setting that shaped it is the same, and the
MDL surrogate trained at the sweep's tolerance."""

from __future__ import annotations

import json
import warnings

import pytest
from builders import SHORT_TRAIN, bitwise_equal, sparse_sums

from tl_mdl import SAE, SAEConfig, description_length, sweep, train_sae
from tl_mdl.mdl import select_mdl, select_mdl_row
from tl_mdl.mdl.hierarchical import hierarchical_dl_report
from tl_mdl.training.code_length import CodeLengthObjective
from tl_mdl.training.hierarchical import HierarchicalSweepTable, sweep_hierarchical
from tl_mdl.training.sweep import SweepTable


# ------------------------------------------------------------------ checkpoints per grid point
def test_sweep_gives_each_grid_point_its_own_checkpoint(tmp_path):
    x = sparse_sums()
    table = sweep(x, widths=[16], sparsities=[0.01, 10.0], objective="l1",
                  checkpoint_dir=tmp_path / "ck", **SHORT_TRAIN)
    for row in table:
        ref = train_sae(x, SAEConfig(d_in=8, d_sae=16), "l1", sparsity=row["sparsity"],
                        **SHORT_TRAIN)
        assert bitwise_equal(row["sae"], ref)
        assert (tmp_path / "ck" / f"w16_s{row['sparsity']:g}" / "train_state.json").is_file()
    assert not bitwise_equal(table[0]["sae"], table[1]["sae"])
    # different widths no longer collide on one checkpoint
    topk = sweep(x, widths=[16, 32], sparsities=[2], objective="topk",
                 checkpoint_dir=tmp_path / "ck_topk", **SHORT_TRAIN)
    assert [r["width"] for r in topk] == [16, 32]
    # a rerun resumes each point's finished checkpoint: the same SAEs
    again = sweep(x, widths=[16], sparsities=[0.01, 10.0], objective="l1",
                  checkpoint_dir=tmp_path / "ck", **SHORT_TRAIN)
    assert all(bitwise_equal(a["sae"], b["sae"]) for a, b in zip(table, again, strict=True))


def test_hierarchical_sweep_gives_each_grid_point_its_own_checkpoint(tmp_path):
    x = sparse_sums()
    table = sweep_hierarchical(x, parents=(2,), children=(1,), sparsities=(0.0, 1.0),
                               checkpoint_dir=tmp_path / "ck", **SHORT_TRAIN)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["p2_c1_s0", "p2_c1_s1"]
    assert not bitwise_equal(table[0]["sae"], table[1]["sae"])



# ----------------------------------------------- reruns reuse only rows with the same settings
def test_sweep_rerun_reuses_only_rows_with_the_same_settings(tmp_path):
    x = sparse_sums()
    kw = dict(widths=[16], sparsities=[2], objective="topk", out_dir=tmp_path, **SHORT_TRAIN)
    first = sweep(x, tolerance=0.01, **kw)[0]
    same = sweep(x, tolerance=0.01, **kw)[0]
    assert same["train_seconds"] == first["train_seconds"]  # reused as is
    assert same["bits_per_input"] == first["bits_per_input"]
    # another tolerance: the same SAE (not retrained), scored again
    loose = sweep(x, tolerance=0.2, **kw)[0]
    truth = description_length(first["sae"], x, tolerance=0.2)
    assert loose["train_seconds"] == first["train_seconds"]
    assert bitwise_equal(loose["sae"], first["sae"])
    assert (loose["bin_width"], loose["bits_per_input"]) == (truth.bin_width,
                                                             truth.bits_per_input)
    stored = json.loads((tmp_path / "w16_s2" / "scores.json").read_text())
    assert stored["bin_width"] == truth.bin_width
    assert stored["settings"]["score"]["tolerance"] == 0.2
    # another eval set: scored again on it
    ev = sparse_sums(seed=1)
    other = sweep(x, tolerance=0.2, eval_activations=ev, **kw)[0]
    assert other["bits_per_input"] == description_length(first["sae"], ev,
                                                         tolerance=0.2).bits_per_input
    # another objective / learning rate / training data: trained again
    l1 = sweep(x, **{**kw, "objective": "l1"})[0]
    assert l1["objective"] == "l1" and l1["sae"].cfg.activation == "relu"
    fast = sweep(x, **{**kw, "lr": 1e-2})[0]
    ref = train_sae(x, SAEConfig(d_in=8, d_sae=16, activation="topk", k=2), "topk",
                    sparsity=2.0, **{**SHORT_TRAIN, "lr": 1e-2})
    assert bitwise_equal(fast["sae"], ref)
    x2 = sparse_sums(seed=2)
    moved = sweep(x2, **{**kw, "lr": 1e-2})[0]
    ref2 = train_sae(x2, SAEConfig(d_in=8, d_sae=16, activation="topk", k=2), "topk",
                     sparsity=2.0, **{**SHORT_TRAIN, "lr": 1e-2})
    assert bitwise_equal(moved["sae"], ref2)
    # arguments that do not change the SAE keep the row
    kept = sweep(x2, **{**kw, "lr": 1e-2, "log_every": 1, "checkpoint_every": 3})[0]
    assert kept["train_seconds"] == moved["train_seconds"]


def test_sweep_rows_without_settings_are_recomputed(tmp_path):
    x = sparse_sums()
    kw = dict(widths=[16], sparsities=[2], objective="topk", out_dir=tmp_path, **SHORT_TRAIN)
    first = sweep(x, **kw)[0]
    scores = tmp_path / "w16_s2" / "scores.json"
    row = json.loads(scores.read_text())
    del row["settings"]  # as written by an older tl_mdl
    row["bits_per_input"] = -1.0
    scores.write_text(json.dumps(row))
    again = sweep(x, **kw)[0]
    assert again["bits_per_input"] == first["bits_per_input"]
    assert "settings" in json.loads(scores.read_text())
    # an SAE that no longer loads (a truncated file) is trained again
    weights = tmp_path / "w16_s2" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    third = sweep(x, **kw)[0]
    assert bitwise_equal(third["sae"], first["sae"])
    assert bitwise_equal(SAE.load(tmp_path / "w16_s2"), first["sae"])


def test_sweep_rows_of_the_old_mdl_defaults_are_trained_again(tmp_path, monkeypatch):
    """A row stored before 'jump' and BatchTopK were the mdl objective's defaults
    (straight_through and warm_start unset: 'threshold' and TopK then) is not a row of
    today's defaults; rows stored now are reused."""
    x = sparse_sums()
    kw = dict(widths=[16], sparsities=[1e-3], objective="mdl", out_dir=tmp_path,
              **SHORT_TRAIN)
    with monkeypatch.context() as m:  # the objective as it was
        m.setattr(CodeLengthObjective, "straight_through", "threshold")
        m.setattr(CodeLengthObjective, "warm_start", "topk")
        old = sweep(x, **kw)[0]
    new = sweep(x, **kw)[0]
    assert not bitwise_equal(new["sae"], old["sae"])
    training = new["sae"].cfg.metadata["training"]
    assert (training["straight_through"], training["warm_start"]) == ("jump", "batch_topk")
    assert sweep(x, **kw)[0]["train_seconds"] == new["train_seconds"]  # reused
    # settings asked for by name are part of the row already
    assert sweep(x, straight_through="jump", warm_start="batch_topk", **kw)[0][
        "train_seconds"] == new["train_seconds"]


def test_hierarchical_sweep_rerun_checks_settings(tmp_path):
    x = sparse_sums()
    kw = dict(parents=(2,), children=(1,), out_dir=tmp_path, **SHORT_TRAIN)
    first = sweep_hierarchical(x, tolerance=0.05, **kw)[0]
    assert sweep_hierarchical(x, tolerance=0.05, **kw)[0]["train_seconds"] == (
        first["train_seconds"])
    # another eval set: re-scored, not retrained
    x2 = sparse_sums(seed=1)
    rescored = sweep_hierarchical(x, tolerance=0.05, eval_activations=x2, **kw)[0]
    truth = hierarchical_dl_report(first["sae"], x2, tolerance=0.05)
    assert rescored["train_seconds"] == first["train_seconds"]
    assert (rescored["bin_width"], rescored["bits_per_input"]) == (truth.bin_width,
                                                                   truth.bits_per_input)
    # another tolerance: the MDL surrogate trains at it, so the SAE is trained again
    loose = sweep_hierarchical(x, tolerance=0.3, **kw)[0]
    assert json.loads((tmp_path / "p2_c1_s0.001" / "scores.json").read_text())[
        "settings"]["score"]["tolerance"] == 0.3
    assert not bitwise_equal(loose["sae"], first["sae"])
    retrained = sweep_hierarchical(x, tolerance=0.3, **{**kw, "lr": 1e-2})[0]
    assert not bitwise_equal(retrained["sae"], loose["sae"])


def test_sweep_trains_the_mdl_surrogate_at_its_tolerance():
    """sweep(tolerance=t) scores at t, and the MDL objective's surrogate trains at t too."""
    x = sparse_sums()
    row = sweep(x, widths=[16], sparsities=[1e-3], tolerance=0.05, **SHORT_TRAIN).rows[0]
    alone = train_sae(x, SAEConfig(d_in=8, d_sae=16), "mdl", sparsity=1e-3, tolerance=0.05,
                      seed=0, **SHORT_TRAIN)
    assert bitwise_equal(row["sae"], alone)
    default = train_sae(x, SAEConfig(d_in=8, d_sae=16), "mdl", sparsity=1e-3, seed=0, **SHORT_TRAIN)
    assert not bitwise_equal(row["sae"], default)



# ------------------------------------------------- selection: fvu_threshold (tolerance deprecated)
def _rows() -> list[dict]:
    """Hand-built rows: the shortest (b) fails 0.2; of the two that pass, c is shorter."""
    return [
        {"name": "a", "bits_per_input": 9.0, "fvu_quantized": 0.05, "sae": "sae_a"},
        {"name": "b", "bits_per_input": 2.0, "fvu_quantized": 0.50, "sae": "sae_b"},
        {"name": "c", "bits_per_input": 4.0, "fvu_quantized": 0.20, "sae": "sae_c"},
    ]


@pytest.mark.parametrize("table_cls", [SweepTable, HierarchicalSweepTable])
def test_selection_threshold_is_fvu_threshold(table_cls):
    rows, table = _rows(), table_cls(_rows())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns about nothing
        assert select_mdl_row(rows, fvu_threshold=0.2)["name"] == "c"
        assert select_mdl_row(rows, 0.6)["name"] == "b"
        assert select_mdl(rows, fvu_threshold=0.2) == "sae_c"
        assert table.select(fvu_threshold=0.2)["name"] == "c"
        assert table.select(0.1)["name"] == "a"
        assert table.select_sae(fvu_threshold=0.2) == "sae_c"
    with pytest.raises(ValueError, match=r"no SAE meets fvu_quantized <= 0.01.*fvu_threshold"):
        select_mdl(rows, fvu_threshold=0.01)


@pytest.mark.parametrize("call, name", [
    (lambda rows: select_mdl_row(rows, tolerance=0.2)["name"], "select_mdl_row"),
    (lambda rows: select_mdl(rows, tolerance=0.2), "select_mdl"),
    (lambda rows: SweepTable(rows).select(tolerance=0.2)["name"], "SweepTable.select"),
    (lambda rows: SweepTable(rows).select_sae(tolerance=0.2), "SweepTable.select_sae"),
    (lambda rows: HierarchicalSweepTable(rows).select_sae(tolerance=0.2),
     "HierarchicalSweepTable.select_sae"),
])  # fmt: skip
def test_the_old_tolerance_keyword_still_selects_with_a_deprecation_warning(call, name):
    match = rf"{name}\(tolerance=\.\.\.\).*fvu_threshold=0.2"
    with pytest.warns(DeprecationWarning, match=match) as record:
        got = call(_rows())
    assert got in ("c", "sae_c")
    assert record[0].filename == __file__  # the warning points at the caller's line


def test_fvu_threshold_and_tolerance_together_or_neither_is_an_error():
    with pytest.raises(TypeError, match="pass only fvu_threshold"):
        select_mdl(_rows(), fvu_threshold=0.2, tolerance=0.2)
    with pytest.raises(TypeError, match="pass only fvu_threshold"):
        SweepTable(_rows()).select(0.2, tolerance=0.2)
    with pytest.raises(TypeError, match="needs fvu_threshold"):
        select_mdl(_rows())


def test_no_sae_meeting_the_threshold_is_a_typed_error_carrying_the_closest_row():
    """Callers (the CLI) read what came closest from the exception, not from its text."""
    from tl_mdl.mdl import NoSAEMeetsThreshold

    rows = _rows()
    closest = min(rows, key=lambda r: r["fvu_quantized"])
    for call in (lambda: select_mdl_row(rows, 0.01), lambda: SweepTable(rows).select(0.01)):
        with pytest.raises(NoSAEMeetsThreshold) as info:
            call()
        assert isinstance(info.value, ValueError)  # code catching ValueError keeps working
        assert info.value.best == closest and info.value.fvu_threshold == 0.01
        assert info.value.loss_key == "fvu_quantized"


def test_rows_stored_before_warm_start_max_steps_are_reused_only_where_it_changes_nothing():
    """A row stored without ``warm_start_max_steps`` warmed up for ``warm_start_frac ·
    max_steps`` steps: the same training as today's where that is at most the new limit
    (or the budget is explicit, or the objective has no warm start), not otherwise."""
    from tl_mdl.training.sweep import row_settings

    cfg = SAEConfig(d_in=8, d_sae=16)

    def has_field(objective, **train_kwargs):
        s = row_settings(cfg, objective, 1e-3, 0, train_kwargs, 0.01, None, None)
        return "warm_start_max_steps" in s["train"]

    assert has_field("mdl", max_steps=20_000)  # 0.2 · 20,000 = 4,000 warm steps then
    assert not has_field("mdl", max_steps=10_000)  # 2,000: the same as today
    assert not has_field("mdl", steps=50_000)  # an explicit budget: frac · steps, as before
    assert not has_field("topk", max_steps=20_000)  # no warm start
    assert has_field("mdl", max_steps=10_000, warm_start_max_steps=500)  # asked for
