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
from builders import require_hooked_transformer

DEMOS = Path(__file__).resolve().parents[1] / "demos"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DEMOS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_mnist_mdl_demo_small(tmp_path):
    demo = _load("mnist_mdl")
    out = tmp_path / "mnist"
    summary = demo.main(["--out", str(out), "--train-size", "1200", "--widths", "8,32",
                         "--sparsities", "2,8", "--fvu-threshold", "0.9", "--epochs", "10",
                         "--no-progress"])
    for f in ("sweep.csv", "dl_vs_width.csv", "summary.json", "dl_vs_width.png",
              "features_optimal.png", "features_narrow.png", "features_wide.png"):
        assert (out / f).is_file(), f
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert len(rows) == 4
    assert {"width", "sparsity", "bits_per_input", "bin_width", "l0", "fvu"} <= set(rows[0])
    best = min((r for r in rows if float(r["fvu_quantized"]) <= 0.9),
               key=lambda r: float(r["bits_per_input"]))
    assert summary["optimal"]["bits_per_input"] == pytest.approx(float(best["bits_per_input"]))
    # the real codec agrees with the computed DL (small N: header excluded, rate within 5%)
    assert summary["codec_payload_bits_per_image"] == pytest.approx(
        summary["optimal"]["bits_per_input"], rel=0.05)
    assert json.loads((out / "summary.json").read_text())["objective"] == "topk"


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
