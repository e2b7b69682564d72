"""The ``tl-mdl`` command line on tiny inputs: in-process through typer's CliRunner, and in a
real subprocess (``python -m tl_mdl.cli``)."""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from builders import edit_model_cfg, hooked_transformer_classes
from safetensors.torch import load_file
from typer.testing import CliRunner

import tl_mdl
from tl_mdl import cli
from tl_mdl.cli import QUICK_ARGS, Demo, app
from tl_mdl.models import save_model

HookedTransformer, HookedTransformerConfig = hooked_transformer_classes()

D_IN = 16


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, D_IN, generator=gen).relu()
    tl_mdl.save_activations(x[:128], root / "acts" / "a.safetensors")
    tl_mdl.save_activations(x[128:], root / "acts" / "b.safetensors")
    tl_mdl.save_activations(torch.randn(32, 8, generator=gen), root / "acts8.safetensors")
    sae = tl_mdl.SAE(tl_mdl.SAEConfig(d_in=D_IN, d_sae=32), seed=0)
    sae.save(root / "sae")
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=D_IN,
        d_head=4,
        n_heads=4,
        d_mlp=32,
        d_vocab=20,
        n_ctx=8,
        act_fn="silu",
        gated_mlp=True,
        seed=0,
    )
    model = HookedTransformer(cfg)
    tl_mdl.to_bilinear(model, layers=[1], init="random", seed=0)  # layer 0 stays GatedMLP
    save_model(model, root / "model")
    return {
        "root": root,
        "x": x,
        "acts": root / "acts",
        "shards": [root / "acts" / "a.safetensors", root / "acts" / "b.safetensors"],
        "acts8": root / "acts8.safetensors",
        "sae": root / "sae",
        "sae_obj": sae,
        "model": root / "model",
        "model_obj": model,
    }


def run(*args, env=None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def assert_user_error(result, *words):
    """Exit code 2, no traceback, one line ``error: ...`` on stderr naming ``words``."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in result.output
    for w in words:
        assert w in err, (w, err)


# ---------------------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "command, units",
    [
        ("score", ["bits per input", "FVU", "latent units"]),
        ("train", ["number of latents", "FVU", "bits", "per step"]),
        ("sweep", ["number of latents", "fraction of variance", "active latents per input"]),
        ("decompose", ["d_model", "logits", "0-based"]),
        ("demo", ["mnist", "bilinear-mnist", "lm", "--quick"]),
    ],
)
def test_help_explains_options_with_units(command, units):
    r = run(command, "--help")
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())  # help is wrapped; compare on single spaces
    for u in units:
        assert u in text, (command, u)


def test_no_command_prints_help():
    r = run()
    assert "score" in r.output and "decompose" in r.output


# -------------------------------------------------------------------- --device (every command)


def test_check_device():
    cli._check_device("cpu")
    with pytest.raises(ValueError, match="'foo' is not a torch device"):
        cli._check_device("foo")


def test_check_device_cuda_unavailable(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="use --device cpu"):
        cli._check_device("cuda")


@pytest.mark.parametrize("command", ["score", "train", "decompose"])
def test_bad_device_is_a_user_error(files, tmp_path, command):
    args = {
        "score": ["score", files["sae"], files["acts"]],
        "train": ["train", files["acts"], "--out", tmp_path / "t", "--width", "8"],
        "decompose": ["decompose", files["model"], "--layer", "0"],
    }[command]
    assert_user_error(run(*args, "--device", "foo"), "--device 'foo'", "not a torch device")


def test_cuda_device_without_cuda_is_a_user_error(files, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = run("score", files["sae"], files["acts"], "--device", "cuda")
    assert_user_error(r, "--device 'cuda'", "--device cpu")


# --------------------------------------------------------------------------------------- score


def test_score_table_json_and_feature_csv(files):
    r = run("score", files["sae"], files["acts"])
    assert r.exit_code == 0, r.output
    assert "bits / input" in r.stdout and "FVU quantised" in r.stdout

    csv_path = files["root"] / "features.csv"
    r = run("score", files["sae"], *files["shards"], "--format", "json", "--features-csv", csv_path)
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    want = tl_mdl.description_length(files["sae_obj"], files["x"]).summary()
    assert set(got) == set(want)
    assert got["bits_per_input"] == pytest.approx(want["bits_per_input"])
    assert got["n_inputs"] == 256 and got["d_sae"] == 32
    with open(csv_path) as fh:
        assert len(list(csv.DictReader(fh))) == 32


def test_score_fixed_bin_width(files):
    r = run("score", files["sae"], files["acts"], "--bin-width", "0.5", "-f", "json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["bin_width"] == 0.5 and got["tolerance"] is None


def test_score_sae_lens_saves(files, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    tl_mdl.to_sae_lens(files["sae_obj"]).save_model(str(tmp_path / "std"))
    r = run("score", tmp_path / "std", files["acts"], "-f", "json")
    assert r.exit_code == 0, r.output
    want = tl_mdl.description_length(files["sae_obj"], files["x"])
    assert json.loads(r.stdout)["bits_per_input"] == pytest.approx(want.bits_per_input)

    gated = sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=D_IN, d_sae=8))
    gated.save_model(str(tmp_path / "gated"))
    assert_user_error(run("score", tmp_path / "gated", files["acts"]), "gated")


def test_score_user_errors(files, tmp_path):
    assert_user_error(run("score", tmp_path / "nope", files["acts"]), "does not exist")
    assert_user_error(run("score", files["sae"], tmp_path / "none.safetensors"), "does not exist")
    assert_user_error(run("score", files["acts"], files["acts"]), "cfg.json")  # not an SAE
    assert_user_error(run("score", files["sae"], files["acts8"]), "d_in=8", "d_in=16")
    assert_user_error(run("score", files["sae"], files["acts"], "--tolerance", "2"), "tolerance")
    assert_user_error(run("score", files["sae"], files["acts"], "--bin-width", "-1"), "bin-width")
    (tmp_path / "junk.safetensors").write_text("not safetensors")
    assert_user_error(run("score", files["sae"], tmp_path / "junk.safetensors"), "junk")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run("score", files["sae"], empty), "no *.safetensors")
    r = run("score", files["sae"], files["acts"], "--tolerance", "abc")  # click's own check
    assert r.exit_code == 2 and "Traceback" not in r.output


# --------------------------------------------------------------------------------------- train


def test_train_saves_a_loadable_sae(files, tmp_path):
    out = tmp_path / "topk"
    r = run(
        "train",
        files["acts"],
        "--out",
        out,
        "--width",
        "24",
        "--objective",
        "topk",
        "--k",
        "3",
        "--steps",
        "4",
        "--batch-size",
        "64",
        "--no-progress",
        "-f",
        "json",
        "--hook-name",
        "blocks.0.hook_resid_post",
    )
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["saved"] == str(out) and report["d_sae"] == 24
    assert report["l0_unquantized"] == pytest.approx(3.0)
    sae = tl_mdl.SAE.load(out)
    assert sae.cfg.k == 3 and sae.cfg.hook_name == "blocks.0.hook_resid_post"

    r = run(
        "train",
        files["shards"][0],
        "--out",
        tmp_path / "mdl",
        "-w",
        "8",
        "--steps",
        "2",
        "--no-progress",
    )
    assert r.exit_code == 0, r.output
    assert "bits / input" in r.stdout and (tmp_path / "mdl" / "cfg.json").is_file()


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_default_budget_is_train_until_converged(files, tmp_path, monkeypatch, command):
    """Without --epochs or --steps the CLI hands train_sae no budget, so it trains until the
    held-out objective stops improving (one epoch was the CLI's default before)."""
    seen = {}

    def fake_train_sae(acts, cfg, objective="topk", **kw):
        seen.update(steps=kw.get("steps"), epochs=kw.get("epochs"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(tl_mdl, "train_sae", fake_train_sae)
    monkeypatch.setattr(importlib.import_module("tl_mdl.training.sweep"), "train_sae",
                        fake_train_sae)
    args = {"train": ["--width", "8"], "sweep": ["--widths", "8", "--sparsities", "0.1"]}
    run(command, files["acts"], "--out", tmp_path / "o", "--no-progress", *args[command])
    assert seen == {"steps": None, "epochs": None}


def test_train_user_errors(files, tmp_path):
    base = ["train", files["acts"], "--out", tmp_path / "s", "--no-progress"]
    assert_user_error(run(*base, "--width", "8", "--k", "2"), "--k")
    assert_user_error(run(*base, "--width", "8", "--objective", "topk"), "--k")
    assert_user_error(run(*base, "--width", "0"), "--width")
    assert_user_error(run(*base, "--width", "8", "--objective", "topk", "--k", "9"), "k=9")
    assert_user_error(
        run("train", tmp_path / "x.safetensors", "--out", tmp_path / "s", "--width", "8"),
        "does not exist",
    )


def test_train_aux_k_options_reach_the_saved_sae(files, tmp_path):
    """--aux-k / --aux-coefficient / --dead-steps are train_sae's AuxK arguments: the saved
    SAE's training metadata records them."""
    out = tmp_path / "auxk"
    r = run("train", files["acts"], "--out", out, "--width", "24", "--objective", "topk",
            "--k", "3", "--steps", "4", "--batch-size", "64", "--no-progress", "--aux-k", "4",
            "--aux-coefficient", "0.0625", "--dead-steps", "2")
    assert r.exit_code == 0, r.output
    training = tl_mdl.SAE.load(out).cfg.metadata["training"]
    assert (training["aux_k"], training["aux_coefficient"], training["dead_steps"]) == (
        4, 0.0625, 2)


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_aux_k_options_pass_through(files, tmp_path, monkeypatch, command):
    """Only the AuxK options given reach train_sae (the rest keep its defaults); 'auto'
    stays a string, a count becomes an int."""
    seen = []

    def fake_train_sae(acts, cfg, objective="topk", **kw):
        seen.append({k: v for k, v in kw.items() if k in
                     ("aux_k", "aux_coefficient", "dead_steps")})
        raise RuntimeError("stop here")

    monkeypatch.setattr(tl_mdl, "train_sae", fake_train_sae)
    monkeypatch.setattr(importlib.import_module("tl_mdl.training.sweep"), "train_sae",
                        fake_train_sae)
    args = {"train": ["--width", "8", "--k", "2"], "sweep": ["--widths", "8",
                                                              "--sparsities", "2"]}
    base = [command, files["acts"], "--out", tmp_path / "o", "--no-progress", "--objective",
            "topk", *args[command]]
    run(*base)
    run(*base, "--aux-k", "auto")
    run(*base, "--aux-k", "5", "--aux-coefficient", "0.5", "--dead-steps", "7")
    assert seen == [{}, {"aux_k": "auto"},
                    {"aux_k": 5, "aux_coefficient": 0.5, "dead_steps": 7}]


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_aux_k_user_errors(files, tmp_path, command):
    args = {"train": ["--width", "8"], "sweep": ["--widths", "8"]}[command]
    topk = [*args, "--objective", "topk", "--k" if command == "train" else "--sparsities", "2"]
    base = [command, files["acts"], "--out", tmp_path / "o", "--no-progress"]
    assert_user_error(run(*base, *args, "--aux-k", "auto"), "--aux-k", "--objective topk",
                      "mdl")
    for bad in ("0", "-2", "half", "2.5"):
        assert_user_error(run(*base, *topk, "--aux-k", bad), "--aux-k", "'auto'", bad)
    assert_user_error(run(*base, *topk, "--dead-steps", "5"), "--dead-steps", "--aux-k auto")
    assert_user_error(run(*base, *topk, "--aux-coefficient", "0.1"), "--aux-coefficient",
                      "--aux-k auto")
    assert_user_error(run(*base, *topk, "--aux-k", "auto", "--aux-coefficient", "nan"),
                      "--aux-coefficient", "nan")
    assert_user_error(run(*base, *topk, "--aux-k", "auto", "--dead-steps", "0"),
                      "--dead-steps", "0")


# --------------------------------------------------------------------------------------- sweep


def test_sweep_writes_csv_and_selects(files, tmp_path):
    out = tmp_path / "sweep"
    args = [
        "sweep",
        files["acts"],
        "--out",
        out,
        "--widths",
        "8,16",
        "--objective",
        "topk",
        "--sparsities",
        "2,4",
        "--steps",
        "3",
        "--batch-size",
        "64",
        "--fvu-threshold",
        "1.5",
        "--no-progress",
    ]
    r = run(*args, "-f", "json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert len(got["rows"]) == 4
    ok = [row for row in got["rows"] if row["fvu_quantized"] <= 1.5]
    assert got["selected"]["bits_per_input"] == min(row["bits_per_input"] for row in ok)
    with open(out / "sweep.csv") as fh:
        assert [int(row["width"]) for row in csv.DictReader(fh)] == [8, 8, 16, 16]
    assert tl_mdl.SAE.load(got["selected"]["path"]).cfg.d_sae == got["selected"]["width"]

    r = run(*args, "--eval", files["shards"][1])  # table output; resumes from out/
    assert r.exit_code == 0, r.output
    assert "<- MDL" in r.stdout and "MDL pick" in r.stdout

    r = run(*args[:-2], "0.0001", "--no-progress")  # nothing meets the threshold
    assert r.exit_code == 2 and "bits/input" in r.stdout
    assert r.stderr.startswith("error: no SAE meets")


def test_sweep_user_errors(files, tmp_path):
    base = ["sweep", files["acts"], "--out", tmp_path / "s", "--no-progress"]
    assert_user_error(run(*base, "--widths", "8,x"), "--widths")
    assert_user_error(run(*base, "--objective", "topk"), "--sparsities")
    assert_user_error(run(*base, "--eval", files["acts8"]), "d_in=8")
    assert_user_error(run(*base, "--tolerance", "0"), "tolerance")


@pytest.mark.parametrize("lam", ["-0.1", "nan", "inf"])
@pytest.mark.parametrize("objective", ["mdl", "l1"])
def test_sweep_rejects_bad_lambda(files, tmp_path, objective, lam):
    r = run(
        "sweep", files["acts"], "--out", tmp_path / "s", "--objective", objective,
        "--sparsities", f"0.1,{lam}", "--widths", "8", "--steps", "1", "--no-progress",
    )  # fmt: skip
    assert_user_error(r, "--sparsities", ">= 0")
    assert not (tmp_path / "s").exists()


def test_sweep_rejects_non_positive_k(files, tmp_path):
    r = run(
        "sweep", files["acts"], "--out", tmp_path / "s", "--objective", "topk",
        "--sparsities", "2,0", "--widths", "8", "--steps", "1", "--no-progress",
    )  # fmt: skip
    assert_user_error(r, "--sparsities", "> 0")


def test_sweep_no_pick_names_fvu_threshold(files, tmp_path):
    r = run(
        "sweep", files["acts"], "--out", tmp_path / "s", "--objective", "topk",
        "--sparsities", "2", "--widths", "8", "--steps", "2", "--fvu-threshold", "1e-6",
        "--no-progress",
    )  # fmt: skip
    assert_user_error(r, "--fvu-threshold 1e-06", "--epochs", "--widths")
    assert "raise the tolerance" not in r.stderr


# ----------------------------------------------------------------------------------- decompose


def test_decompose_unembed_matches_the_layer(files, tmp_path):
    out = tmp_path / "eig.safetensors"
    d = D_IN + 1
    r = run(
        "decompose",
        files["model"],
        "--layer",
        "1",
        "--index",
        "3,7",
        "--top",
        str(d),
        "--out",
        out,
        "-f",
        "json",
    )
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert [row["index"] for row in got["rows"]] == [3, 7]
    saved = load_file(str(out))
    assert saved["values"].shape == (2, d) and saved["vectors"].shape == (2, d, d)
    model = files["model_obj"]
    U = model.W_U.detach().T[[3, 7]]
    assert torch.allclose(saved["directions"], U)
    # the saved eigenpairs reproduce u·out(x) − u·b_out on random MLP inputs
    mlp = model.blocks[1].mlp
    x = torch.randn(5, D_IN, dtype=torch.float64)
    with torch.no_grad():
        mlp64 = mlp.double()
        want = (mlp64(x[:, None])[:, 0] - mlp64.b_out) @ U.double().T
        mlp.float()
    xt = torch.cat([x, torch.ones(5, 1, dtype=torch.float64)], -1)
    proj = torch.einsum("bd,nkd->bnk", xt, saved["vectors"].double())
    expansion = (proj.square() * saved["values"].double()).sum(-1)
    torch.testing.assert_close(expansion, want, atol=1e-4, rtol=1e-4)


def test_decompose_svd_and_sae_directions(files):
    r = run("decompose", files["model"], "-l", "1", "--directions", "svd", "--k", "3", "--top", "4")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("svd ")]
    assert len(lines) == 3 and all(len(ln.split()) == 3 + 4 for ln in lines)

    r = run(
        "decompose",
        files["model"],
        "-l",
        "-1",
        "--directions",
        files["sae"],
        "--k",
        "5",
        "-f",
        "json",
    )
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert got["layer"] == 1 and [row["index"] for row in got["rows"]] == list(range(5))
    assert all(len(row["eigenvalues"]) == 10 for row in got["rows"])


def test_decompose_user_errors(files, tmp_path):
    m = files["model"]
    assert_user_error(run("decompose", m, "--layer", "0"), "GatedMLP", "tl_mdl.to_bilinear")
    assert_user_error(run("decompose", m, "--layer", "2"), "n_layers=2")
    assert_user_error(run("decompose", tmp_path / "none", "--layer", "1"), "does not exist")
    assert_user_error(run("decompose", files["acts"], "--layer", "1"), "model_cfg.json")
    assert_user_error(run("decompose", m, "--layer", "1", "--directions", "nope"), "unembed")
    assert_user_error(run("decompose", m, "--layer", "1", "--index", "20"), "out of range")
    small = tl_mdl.SAE(tl_mdl.SAEConfig(d_in=8, d_sae=4))
    small.save(tmp_path / "sae8")
    assert_user_error(
        run("decompose", m, "--layer", "1", "--directions", tmp_path / "sae8"), "d_model=16"
    )


def test_decompose_svd_refuses_index(files):
    assert_user_error(run("decompose", files["model"], "--layer", "1", "--directions", "svd",
                          "--index", "3"), "--index", "drop --index")


def test_decompose_on_a_corrupt_config_is_a_user_error(files, tmp_path):
    path = edit_model_cfg(files["model"], tmp_path / "m", lambda c: "text")
    assert_user_error(run("decompose", path, "--layer", "0"), "not a valid model config")


# ---------------------------------------------------------------------------------------- demo


def test_demo_passes_arguments_through(tmp_path):
    demos = tmp_path / "demos"
    demos.mkdir()
    record = tmp_path / "argv.json"
    (demos / "bilinear_mnist.py").write_text(
        textwrap.dedent(f"""
        import json, sys
        json.dump(sys.argv[1:], open({str(record)!r}, "w"))
        sys.exit(3 if "--fail" in sys.argv else 0)
    """)
    )
    env = {"TL_MDL_DEMOS": str(demos)}
    r = run("demo", "bilinear-mnist", "--quick", "--epochs", "2", env=env)
    assert r.exit_code == 0, r.output
    argv = json.loads(record.read_text())
    assert argv[:2] == ["--epochs", "1"] and argv[-2:] == ["--epochs", "2"]  # user's args win
    assert run("demo", "bilinear-mnist", "--fail", env=env).exit_code == 3


def test_demo_errors(tmp_path):
    r = run("demo", "mnist", env={"TL_MDL_DEMOS": str(tmp_path / "missing")})
    assert_user_error(r, "mnist_mdl.py", "not found")
    r = run("demo", "cifar")
    assert r.exit_code == 2 and "Traceback" not in r.output


def _opt(args, name):
    return args[args.index(name) + 1]


def test_mnist_quick_trains_longer_with_a_reachable_threshold():
    args = QUICK_ARGS[Demo.mnist]
    assert int(_opt(args, "--epochs")) >= 5
    assert float(_opt(args, "--fvu-threshold")) >= 0.5
    assert _opt(args, "--out") == "out/mnist_mdl_quick"


def test_lm_quick_has_its_own_out_folder():
    args = QUICK_ARGS[Demo.lm]
    assert "--quick" in args
    assert _opt(args, "--out") == "out/lm_study_quick"


def test_every_quick_run_has_its_own_out_folder():
    outs = [_opt(a, "--out") for a in QUICK_ARGS.values()]
    assert all(o.endswith("_quick") for o in outs) and len(set(outs)) == len(outs)


# ---------------------------------------------------------------------------------- subprocess


def test_subprocess_score_json_and_error(files):
    """Two real ``python -m tl_mdl.cli`` processes, started together (the import dominates)."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    cli = [sys.executable, "-m", "tl_mdl.cli", "score", str(files["sae"])]
    ok = subprocess.Popen(
        [*cli, str(files["acts"]), "--format", "json"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    bad = subprocess.Popen(
        [*cli, str(files["acts8"])],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    ok_out, ok_err = ok.communicate(timeout=300)
    bad_out, bad_err = bad.communicate(timeout=300)

    assert ok.returncode == 0, ok_err
    assert json.loads(ok_out)["d_in"] == D_IN  # stdout is exactly the JSON object
    assert bad.returncode == 2
    assert bad_err.strip().startswith("error: ") and "\n" not in bad_err.strip(), bad_err
    assert "d_in=8" in bad_err and "Traceback" not in bad_err and bad_out == ""
