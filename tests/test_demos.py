"""The MNIST demos run end to end on small settings and write their tables and plots."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import require_hooked_transformer

DEMOS = Path(__file__).resolve().parents[1] / "demos"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DEMOS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mnist_mdl_demo_passes_aux_k_to_train_sae():
    demo = _load("mnist_mdl")
    assert "aux_k" not in demo.train_kwargs(demo.parse_args([]))
    assert demo.train_kwargs(demo.parse_args(["--aux-k", "auto", "--steps", "0"])) == {
        "aux_k": "auto"}
    assert demo.train_kwargs(demo.parse_args(["--aux-k", "64", "--dead-steps", "50"])) == {
        "steps": 600, "aux_k": 64, "dead_steps": 50}
    with pytest.raises(SystemExit):
        demo.parse_args(["--dead-steps", "50"])


@pytest.mark.slow
def test_mnist_mdl_demo_small(tmp_path):
    demo = _load("mnist_mdl")
    out = tmp_path / "mnist"
    summary = demo.main(["--out", str(out), "--train-size", "1200", "--test-size", "300",
                         "--widths", "8,32", "--levels", "0.5,0.7", "--steps", "150",
                         "--no-progress"])
    for f in ("searched.csv", "dl_vs_width.csv", "shapes.csv", "summary.json",
              "dl_vs_width.png", "features.png"):
        assert (out / f).is_file(), f
    trained = list(csv.DictReader(open(out / "searched.csv")))
    table = list(csv.DictReader(open(out / "dl_vs_width.csv")))
    assert {"width", "k", "bits_per_input", "fvu_quantized", "l0", "alive"} <= set(trained[0])
    assert all(1 <= int(t["alive"]) <= int(t["width"]) for t in trained)
    for r in table:  # k_hi is the smallest trained k meeting the level, k_lo the largest below
        ks = {int(t["k"]): float(t["fvu_quantized"]) for t in trained
              if t["width"] == r["width"] and t["seed"] == r["seed"]}
        level = float(r["level"])
        if r["k_hi"]:
            assert ks[int(r["k_hi"])] <= level
            assert all(f > level for k, f in ks.items() if k < int(r["k_hi"]))
        if r["k_lo"]:
            assert ks[int(r["k_lo"])] > level
    assert len({(t["width"], t["k"]) for t in trained}) == len(trained)  # none trained twice
    shapes = list(csv.DictReader(open(out / "shapes.csv")))
    assert {s["which"] for s in shapes} == {"narrow", "optimal", "wide"}
    assert all(0 <= float(s["median_memorisation"]) <= 1 for s in shapes)
    # the real codec agrees with the computed DL (small N: header excluded, rate within 5%)
    check = summary["codec_check"]
    assert check["codec_payload_bits"] == pytest.approx(check["dl"], rel=0.05)
    assert json.loads((out / "summary.json").read_text())["levels"] == [0.5, 0.7]


def test_mnist_mdl_alive_latents_are_the_dl_reports_active_ones():
    """The demo's ``alive`` count is the number of latents the DL charges (``p_active > 0``
    in :func:`description_length`'s report at the same bin width)."""
    from tl_mdl import SAEConfig, description_length
    from tl_mdl.sae import SAE

    demo = _load("mnist_mdl")
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(d_in=12, d_sae=40, activation="topk", k=3))
    x = torch.randn(300, 12, generator=g)
    rep = description_length(sae, x, tolerance=0.01)
    alive = demo.alive_latents(sae, x, rep.bin_width)
    assert alive == int((rep.features["p_active"] > 0).sum())
    assert 0 < alive < 40  # some latents never win a top-3 on these rows


@pytest.mark.slow
def test_bilinear_mnist_demo_small(tmp_path):
    require_hooked_transformer()  # the demo builds HookedTransformers
    out = tmp_path / "bil"
    r = subprocess.run([sys.executable, str(DEMOS / "bilinear_mnist.py"), "--epochs", "1",
                        "--d-mlp", "32", "--out", str(out)], capture_output=True, text=True,
                       timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    pngs = {p.name for p in out.glob("*.png")}
    assert {"eigenvectors.png", "accuracy_vs_k.png"} <= pngs
    acc = list(csv.DictReader(open(out / "accuracy_vs_k.csv")))
    assert float(acc[-1]["accuracy"]) > 0.85  # one epoch, 32 hidden units
    summary = json.loads((out / "summary.json").read_text())
    assert summary["expansion_max_abs_error"] < 1e-3  # float32 logits vs float64 expansion
    smooth = list(csv.DictReader(open(out / "eigen_smoothness.csv")))
    assert len(smooth) == 60 and all(0 <= float(r["high_freq"]) <= 1 for r in smooth)


@pytest.mark.slow
def test_mnist_hierarchical_demo_small(tmp_path):
    demo = _load("mnist_hierarchical")
    out = tmp_path / "hier"
    summary = demo.main(["--out", str(out), "--topk-cache", str(tmp_path / "topk"),
                         "--train-size", "1500", "--test-size", "300", "--topk-widths", "16,32",
                         "--mdl-widths", "32", "--parents", "8", "--children", "2",
                         "--levels", "0.5", "--steps", "100", "--no-progress"])
    for f in ("frontier.csv", "topk.csv", "frontier.png", "summary.json"):
        assert (out / f).is_file(), f
    rows = list(csv.DictReader(open(out / "frontier.csv")))
    assert {r["kind"] for r in rows} == {"mdl", "hierarchical"}
    topk = [(float(r["fvu_quantized"]), float(r["bits_per_input"]))
            for r in csv.DictReader(open(out / "topk.csv"))]
    for r in rows:  # the frontier DL lies between the TopK points around the row's FVU_q
        f, b = float(r["fvu_quantized"]), float(r["topk_frontier_bits"])
        if b == b:  # not NaN: inside the frontier's range
            below = max(bb for ff, bb in topk if ff <= f)
            assert min(bb for ff, bb in topk if ff >= f) <= b * (1 + 1e-9) <= below * (1 + 1e-9)
            assert float(r["ratio_to_topk"]) == pytest.approx(float(r["bits_per_input"]) / b)
    assert summary["levels"] == [0.5] and len(summary["comparison"]) == 2
