"""Saving and loading TransformerLens models (``tl_mdl.models``): a config saved on a GPU loads
on a CPU, and a config that is not one names the file."""

from __future__ import annotations

import pytest
import torch
from builders import edit_model_cfg, require_hooked_transformer, tiny_model

from tl_mdl.models import load_model, save_model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    require_hooked_transformer()  # model folders hold HookedTransformers
    root = tmp_path_factory.mktemp("models")
    save_model(tiny_model(n_layers=1), root / "model")
    return root


# --------------------------------------------------------- load_model: devices and bad configs
def test_load_model_saved_on_cuda_loads_on_cpu(files, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = edit_model_cfg(files / "model", tmp_path / "m", lambda c: {**c, "device": "cuda"})
    with pytest.warns(UserWarning, match="cpu"):
        model = load_model(path)
    assert model.cfg.device == "cpu" and model.W_U.device.type == "cpu"
    assert load_model(path, device="cpu").cfg.device == "cpu"


def test_load_model_keeps_an_available_saved_device(files):
    assert load_model(files / "model").cfg.device == "cpu"


def test_load_model_config_not_an_object(files, tmp_path):
    path = edit_model_cfg(files / "model", tmp_path / "m", lambda c: [1, 2])
    with pytest.raises(ValueError, match="is not a valid model config"):
        load_model(path)


def test_load_model_config_rejected(files, tmp_path):
    path = edit_model_cfg(files / "model", tmp_path / "m", lambda c: {**c, "act_fn": "foo"})
    with pytest.raises(ValueError, match="is not a valid model config"):
        load_model(path)

