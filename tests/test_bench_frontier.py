"""``benchmarks/bench_frontier.py``'s budgets and its LM-study case, on tiny sizes: the
``--converge CAP`` mode hands every run to ``train_sae``'s own convergence rule (no
``steps=``, ``max_steps=CAP``) and reports where each run stopped; the LM case is the LM
study's model, built by the study's code into a study folder and reused from it."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from builders import require_hooked_transformer

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_frontier as bf  # noqa: E402


def test_converge_mode_leaves_the_steps_to_the_rule():
    a = bf.parse_args(["--converge", "10000", "--batch-size", "64"])
    kw = bf.train_kwargs(a, seed=2)
    assert "steps" not in kw and kw["max_steps"] == 10000 and kw["seed"] == 2
    assert a.steps is None
    fixed = bf.parse_args([])
    assert bf.train_kwargs(fixed, 0)["steps"] == 1500 and "max_steps" not in bf.train_kwargs(
        fixed, 0)
    # fixed-budget cache keys keep their old form (old caches stay valid); converge keys differ
    assert bf.budget_key(fixed) == "1500x256_lr0.003"
    assert bf.budget_key(a) == "conv10000x64_lr0.003"
    lines = " ".join(bf.budget_lines(a))
    assert "capped at 10000" in lines and "8000 steps" in lines and "0.5%" in lines


@pytest.mark.parametrize("argv", [["--converge", "500", "--steps", "100"],
                                  ["--converge", "0"]])
def test_converge_mode_refuses_bad_budgets(argv, capsys):
    with pytest.raises(SystemExit):
        bf.parse_args(argv)
    assert "--converge" in capsys.readouterr().err


def test_convergence_lines_say_where_each_run_stopped(capsys):
    a = bf.parse_args(["--converge", "1000"])
    run = {"topk": [{"steps": 375, "converged_at": 300, "converged": True},
                    {"steps": 1000, "converged_at": None, "converged": False}],
           "mdl": {0.15: {"steps": 1000, "converged_at": 900, "converged": False}},
           "l1": []}
    bf.convergence_line("case", [run], a)
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "# case topk: converged (rule stopped it) in 1/2 runs (cap 1000); stopped at: "
        "375 (rule held at 300), 1000 (cap; not converged)",
        "# case mdl: converged (rule stopped it) in 0/1 runs (cap 1000); stopped at: "
        "1000 (cap; not converged)",
    ]
    bf.convergence_line("case", [run], bf.parse_args(["--steps", "1000"]))
    assert capsys.readouterr().out.splitlines()[0] == (
        "# case topk: plateau rule held in 1/2 runs, at steps 300, never (budget 1000)")


def test_converge_mode_runs_every_side_by_the_rule(tmp_path, monkeypatch):
    """Every run's steps follow train_sae's rule: a converged run stops at the step the rule
    held plus the documented decay (a quarter of it), an unconverged one at the cap. Gaussian
    rows (no sparse structure: the FVU plateaus at once) and evaluations every 10 steps keep
    it cheap. A rerun with ``--cache`` trains nothing."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=g)
    train, test = x[:2500], x[2500:]
    cap = 1000
    a = bf.parse_args(["--converge", str(cap), "--batch-size", "64", "--cache",
                       str(tmp_path), "--targets", "0.6"])
    assert a.converge == cap
    budget = bf.train_kwargs
    monkeypatch.setattr(bf, "train_kwargs", lambda a, s: {**budget(a, s), "eval_every": 10})
    monkeypatch.setattr(bf, "source_tree", lambda: "tree0")  # MDL runs cached too
    run = bf.one_seed("tiny", train, test, 16, (2, 4), 0, a)
    rows = run["topk"] + list(run["mdl"].values())
    assert len(rows) == 3
    for r in rows:
        assert isinstance(r["converged"], bool)
        if r["converged"]:
            held = r["converged_at"]
            assert held % 10 == 0 and r["steps"] == min(held + math.ceil(held / 4), cap)
        else:
            assert r["steps"] == cap
        assert math.isfinite(r["bits_per_input"]) and 0 <= r["fvu_quantized"] < 1
        assert 0 < r["heldout_fvu_quantized"] < 1  # the training rows' held-out estimate
    assert any(r["converged"] for r in rows)  # the rule, not the cap, stopped some
    assert len(os.listdir(tmp_path)) == 3

    def no_training(*args, **kwargs):
        raise AssertionError("a cached run was trained again")

    monkeypatch.setattr(bf, "train_sae", no_training)
    assert bf.one_seed("tiny", train, test, 16, (2, 4), 0, a) == run


TINY_STUDY = ("--quick", "--max-docs", "60", "--lm-steps", "4", "--anneal-steps", "2",
              "--harvest-windows", "6", "--eval-windows", "3")


@pytest.mark.slow
def test_lm_case_is_the_study_residual_and_is_reused(tmp_path):
    """The study's model (bilinear, after the study's own training) and hook; training rows
    from the harvested training windows, test rows from the held-out windows; a second call
    reuses the folder (same rows bitwise, the model not retrained)."""
    require_hooked_transformer()
    from _lm_case import DEMOS, study_residual

    if str(DEMOS) not in sys.path:
        sys.path.insert(0, str(DEMOS))
    from lm_study.settings import parse_args
    from lm_study.stages import Stages
    from lm_study.study import data_stage

    from tl_mdl.models import load_model

    out = tmp_path / "lm_study"
    logged: list[str] = []
    train, test, info = study_residual(out, TINY_STUDY, log=logged.append)
    assert info["hook"] == "blocks.1.hook_resid_pre" and info["layer"] == 1
    assert train.shape == (6 * 32, 64) and test.shape == (3 * 32, 64)
    assert all(m.startswith("# lm_study: ") for m in logged)
    assert any("train LM" in m or "lm:" in m for m in logged)

    # the test rows are the bilinear model's residual on the study's held-out windows
    model = load_model(out / "model_bilinear")
    args = parse_args(["--out", str(out), *TINY_STUDY])
    data = data_stage(args, out, Stages(out), None)
    with torch.no_grad():
        _, cache = model.run_with_cache(data.eval, names_filter=info["hook"])
    ref = cache[info["hook"]].reshape(-1, 64)
    scale = ref.abs().max().item()
    assert torch.allclose(test, ref, rtol=0, atol=64 * torch.finfo(torch.float32).eps * scale)

    stamp = (out / "model_bilinear" / "model.safetensors").stat().st_mtime_ns
    train2, test2, _ = study_residual(out, TINY_STUDY, log=lambda m: None)
    assert torch.equal(train2, train) and torch.equal(test2, test)
    assert (out / "model_bilinear" / "model.safetensors").stat().st_mtime_ns == stamp


def test_mdl_options_reach_train_sae_and_the_cache_key(tmp_path, monkeypatch):
    a = bf.parse_args(["--mdl-option", "straight_through=jump", "--mdl-option",
                       "warm_start_frac=0.1", "--cache", str(tmp_path)])
    assert bf.mdl_options(a) == {"straight_through": "jump", "warm_start_frac": 0.1}
    seen = {}

    def fake(train, test, cfg, objective, kw, **extra):
        seen.update(extra)
        return {"bits_per_input": 1.0}

    monkeypatch.setattr(bf, "trained", fake)
    monkeypatch.setattr(bf, "source_tree", lambda: "tree0")
    bf.mdl_cached("c", torch.zeros(4, 2), torch.zeros(4, 2), 4, 0.25, 0, a, {})
    assert seen == {"target_fvu": 0.25, "straight_through": "jump", "warm_start_frac": 0.1}
    assert os.listdir(tmp_path) == [
        "c_w4_mdl0.25_straight_through-jump_warm_start_frac-0.1_s0_1500x256_lr0.003_tree0.json"]
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        bf.mdl_options(bf.parse_args(["--mdl-option", "jump"]))


def test_straight_through_choice_is_in_the_mdl_cache_key(tmp_path, monkeypatch):
    monkeypatch.setattr(bf, "trained", lambda *args, **kw: {"bits_per_input": 1.0})
    monkeypatch.setattr(bf, "source_tree", lambda: "tree0")
    for st in ("threshold", "jump"):
        a = bf.parse_args(["--straight-through", st, "--cache", str(tmp_path)])
        bf.mdl_cached("c", torch.zeros(4, 2), torch.zeros(4, 2), 4, 0.25, 0, a, {})
    a = bf.parse_args(["--cache", str(tmp_path)])  # train_sae's default: no key part
    bf.mdl_cached("c", torch.zeros(4, 2), torch.zeros(4, 2), 4, 0.25, 0, a, {})
    assert sorted(os.listdir(tmp_path)) == [
        "c_w4_mdl0.25_s0_1500x256_lr0.003_tree0.json",
        "c_w4_mdl0.25_straight_through-jump_s0_1500x256_lr0.003_tree0.json",
        "c_w4_mdl0.25_straight_through-threshold_s0_1500x256_lr0.003_tree0.json"]


def test_report_flags_a_missed_target(capsys):
    """An MDL SAE above target + 0.015 is called missed; beyond the TopK frontier's range
    there is no ratio."""
    topk = [{"fvu_quantized": 0.339, "bits_per_input": 9.0},
            {"fvu_quantized": 0.203, "bits_per_input": 18.0}]
    runs = [{"topk": topk, "mdl": {0.15: {"fvu_quantized": 0.16, "bits_per_input": 1.0},
                                   0.25: {"fvu_quantized": 0.386, "bits_per_input": 5.9}}}]
    bf.report("c", runs, bf.parse_args(["--targets", "0.25"]))
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "# c target 0.25: target missed in 1/1 seed(s) (test FVU_q 0.386; met means <= 0.265)",
        "# c target 0.25: the MDL SAE's FVU_q (0.386) is outside the topk frontier's range; "
        "no interpolation",
    ]


def test_frontier_report_reads_both_frontiers_at_the_levels(capsys):
    """Frontier against frontier: at FVU_q 0.25 the MDL points (0.22, 40 bits) and (0.28,
    20 bits) give exp(mean(log 40, log 20)) = 28.28 bits, the TopK points (0.2, 80) and
    (0.3, 20) give 80 · (1/4)^(1/2) = 40 bits: ratio 0.7071. At 0.15 the MDL points do not
    bracket the level, so that seed is left out and said so."""
    topk = [{"fvu_quantized": 0.3, "bits_per_input": 20.0},
            {"fvu_quantized": 0.2, "bits_per_input": 80.0},
            {"fvu_quantized": 0.1, "bits_per_input": 160.0}]
    mdl = {0.2: {"fvu_quantized": 0.22, "bits_per_input": 40.0},
           0.25: {"fvu_quantized": 0.28, "bits_per_input": 20.0}}
    bf.frontier_report("c", [{"topk": topk, "mdl": mdl, "l1": []}])
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "# c frontier at FVU_q 0.15: 1/1 seed(s) left out (their MDL targets or the topk "
        "runs do not bracket FVU_q 0.15 on the test rows)",
        "c frontier at FVU_q 0.25: ours 28.28 bits, baseline 40 bits, ratio 0.707  "
        "(± 0.000 sd over 1 seed(s))",
    ]


def test_targets_are_checked():
    assert bf.parse_args([]).targets == (0.15, 0.25)
    assert bf.parse_args(["--targets", "0.13,0.25"]).targets == (0.13, 0.25)
    for bad in ("0.2,x", "0,0.2", "1.5"):
        with pytest.raises(SystemExit):
            bf.parse_args(["--targets", bad])
