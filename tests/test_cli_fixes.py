"""Regression tests for CLI / IO fixes: demo --quick arguments, --device and --sparsities
checks, the sweep's selection error, saved-file permissions and model loading."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from typer.testing import CliRunner

import tl_mdl
from tl_mdl import cli
from tl_mdl.cli import QUICK_ARGS, Demo, app
from tl_mdl.models import load_model, save_model

D_IN = 8


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_user_error(result, *words):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in result.output
    for w in words:
        assert w in err, (w, err)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_fixes")
    x = torch.randn(64, D_IN, generator=torch.Generator().manual_seed(0)).relu()
    tl_mdl.save_activations(x, root / "acts.safetensors")
    tl_mdl.SAE(tl_mdl.SAEConfig(d_in=D_IN, d_sae=16), seed=0).save(root / "sae")
    cfg = HookedTransformerConfig(
        n_layers=1, d_model=D_IN, d_head=4, n_heads=2, d_mlp=16, d_vocab=10, n_ctx=4,
        act_fn="relu", seed=0, device="cpu",
    )  # fmt: skip
    save_model(HookedTransformer(cfg), root / "model")
    return root


def _opt(args, name):
    return args[args.index(name) + 1]


# ------------------------------------------------------------------------- B1, B2: demos


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


# -------------------------------------------------------------------------- B3: --device


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
        "score": ["score", files / "sae", files / "acts.safetensors"],
        "train": ["train", files / "acts.safetensors", "--out", tmp_path / "t", "--width", "8"],
        "decompose": ["decompose", files / "model", "--layer", "0"],
    }[command]
    assert_user_error(run(*args, "--device", "foo"), "--device 'foo'", "not a torch device")


def test_cuda_device_without_cuda_is_a_user_error(files, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = run("score", files / "sae", files / "acts.safetensors", "--device", "cuda")
    assert_user_error(r, "--device 'cuda'", "--device cpu")


# ---------------------------------------------------------------------- B4: --sparsities


@pytest.mark.parametrize("lam", ["-0.1", "nan", "inf"])
@pytest.mark.parametrize("objective", ["mdl", "l1"])
def test_sweep_rejects_bad_lambda(files, tmp_path, objective, lam):
    r = run(
        "sweep", files / "acts.safetensors", "--out", tmp_path / "s", "--objective", objective,
        "--sparsities", f"0.1,{lam}", "--widths", "8", "--steps", "1", "--no-progress",
    )  # fmt: skip
    assert_user_error(r, "--sparsities", ">= 0")
    assert not (tmp_path / "s").exists()


def test_sweep_rejects_non_positive_k(files, tmp_path):
    r = run(
        "sweep", files / "acts.safetensors", "--out", tmp_path / "s", "--objective", "topk",
        "--sparsities", "2,0", "--widths", "8", "--steps", "1", "--no-progress",
    )  # fmt: skip
    assert_user_error(r, "--sparsities", "> 0")


# ------------------------------------------------------------- B5: the sweep's selection


def test_sweep_no_pick_names_fvu_threshold(files, tmp_path):
    r = run(
        "sweep", files / "acts.safetensors", "--out", tmp_path / "s", "--objective", "topk",
        "--sparsities", "2", "--widths", "8", "--steps", "2", "--fvu-threshold", "1e-6",
        "--no-progress",
    )  # fmt: skip
    assert_user_error(r, "--fvu-threshold 1e-06", "--epochs", "--widths")
    assert "raise the tolerance" not in r.stderr


# -------------------------------------------------------------------- B6: file permissions


def _plain_open_mode(folder):
    p = folder / "plain"
    with open(p, "w"):
        pass
    mode = stat.S_IMODE(os.stat(p).st_mode)
    p.unlink()
    return mode


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_get_the_mode_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        expected = _plain_open_mode(tmp_path)
        acts = tl_mdl.save_activations(torch.zeros(2, 3), tmp_path / "a.safetensors")
        tl_mdl.SAE(tl_mdl.SAEConfig(d_in=3, d_sae=4), seed=0).save(tmp_path / "sae")
    finally:
        os.umask(old)
    files = [acts, *(tmp_path / "sae").iterdir()]
    assert len(files) >= 3
    for f in files:
        assert stat.S_IMODE(os.stat(f).st_mode) == expected, f


def test_overwrite_keeps_the_existing_mode(tmp_path):
    path = tl_mdl.save_activations(torch.zeros(2, 3), tmp_path / "a.safetensors")
    os.chmod(path, 0o640)
    tl_mdl.save_activations(torch.ones(2, 3), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


# ------------------------------------------------------------------- B7, B8: load_model


def _edit_cfg(src, dst, edit):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "model_cfg.json").read_text())
    (dst / "model_cfg.json").write_text(json.dumps(edit(cfg)))
    return dst


def test_load_model_saved_on_cuda_loads_on_cpu(files, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = _edit_cfg(files / "model", tmp_path / "m", lambda c: {**c, "device": "cuda"})
    with pytest.warns(UserWarning, match="cpu"):
        model = load_model(path)
    assert model.cfg.device == "cpu" and model.W_U.device.type == "cpu"
    assert load_model(path, device="cpu").cfg.device == "cpu"


def test_load_model_keeps_an_available_saved_device(files):
    assert load_model(files / "model").cfg.device == "cpu"


def test_load_model_config_not_an_object(files, tmp_path):
    path = _edit_cfg(files / "model", tmp_path / "m", lambda c: [1, 2])
    with pytest.raises(ValueError, match="is not a valid model config"):
        load_model(path)


def test_load_model_config_rejected(files, tmp_path):
    path = _edit_cfg(files / "model", tmp_path / "m", lambda c: {**c, "act_fn": "foo"})
    with pytest.raises(ValueError, match="is not a valid model config"):
        load_model(path)


def test_decompose_on_a_corrupt_config_is_a_user_error(files, tmp_path):
    path = _edit_cfg(files / "model", tmp_path / "m", lambda c: "text")
    assert_user_error(run("decompose", path, "--layer", "0"), "not a valid model config")


# ------------------------------------------------------------------ minor: load_activations


def test_load_activations_empty_list():
    with pytest.raises(ValueError, match="no activation files"):
        tl_mdl.load_activations([])


def test_load_activations_folder_in_a_list(tmp_path):
    tl_mdl.save_activations(torch.zeros(2, 3), tmp_path / "d" / "a.safetensors")
    tl_mdl.save_activations(torch.ones(1, 3), tmp_path / "d" / "b.safetensors")
    tl_mdl.save_activations(torch.ones(4, 3), tmp_path / "c.safetensors")
    x = tl_mdl.load_activations([tmp_path / "d", tmp_path / "c.safetensors"])
    assert x.shape == (7, 3)


# ------------------------------------------------------------------------ minor: IDX files


@pytest.mark.parametrize("data", [b"\x00\x00\x08\x03\x00\x00", b"\x00\x00\x08\x01"])
def test_idx_truncated_header_is_a_clear_error(tmp_path, data):
    from tl_mdl.data import _read_idx

    (tmp_path / "x-idx3-ubyte").write_bytes(data)
    with pytest.raises(ValueError, match="truncated"):
        _read_idx(tmp_path / "x-idx3-ubyte")


def test_idx_truncated_gzip_is_a_clear_error(tmp_path):
    import gzip

    from tl_mdl.data import _read_idx

    blob = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x04abcd")
    (tmp_path / "x.gz").write_bytes(blob[:-6])
    with pytest.raises(ValueError, match="x.gz"):
        _read_idx(tmp_path / "x.gz")
