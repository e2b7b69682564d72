"""Activation files (safetensors, one tensor 'activations' [N, d_in]) and atomic writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tl_mdl
from tl_mdl import load_activations, save_activations
from tl_mdl._io import atomic_write


def acts(n: int, d: int = 4, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_round_trip(tmp_path, dtype):
    x = acts(13, dtype=dtype)
    path = save_activations(x, tmp_path / "a.safetensors")
    assert path == tmp_path / "a.safetensors"
    y = load_activations(path)
    assert y.dtype == dtype
    assert torch.equal(x, y)
    assert torch.equal(load_activations(str(path)), x)


def test_round_trip_non_contiguous(tmp_path):
    x = acts(5, d=7).T  # [7, 5], non-contiguous view
    save_activations(x, tmp_path / "t.safetensors")
    assert torch.equal(load_activations(tmp_path / "t.safetensors"), x)


def test_save_leaves_only_target(tmp_path):
    save_activations(acts(3), tmp_path / "a.safetensors")
    save_activations(acts(4), tmp_path / "a.safetensors")  # overwrite
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    assert load_activations(tmp_path / "a.safetensors").shape == (4, 4)


def test_folder_of_shards_concatenated_in_order(tmp_path):
    shards = [acts(n, seed=i) for i, n in enumerate([3, 1, 5, 2])]
    # written out of order; names sort as shard_000 < shard_001 < ...
    for i in [2, 0, 3, 1]:
        save_activations(shards[i], tmp_path / f"shard_{i:03d}.safetensors")
    (tmp_path / "notes.txt").write_text("not a shard")
    y = load_activations(tmp_path)
    assert torch.equal(y, torch.cat(shards))
    # an explicit list keeps the caller's order
    order = [3, 0, 2]
    y = load_activations([tmp_path / f"shard_{i:03d}.safetensors" for i in order])
    assert torch.equal(y, torch.cat([shards[i] for i in order]))
    y = load_activations([str(tmp_path / "shard_001.safetensors")])
    assert torch.equal(y, shards[1])


def test_save_wrong_ndim(tmp_path):
    for bad in (torch.ones(5), torch.ones(2, 3, 4), torch.tensor(1.0)):
        with pytest.raises(ValueError, match=r"\[N, d_in\]"):
            save_activations(bad, tmp_path / "a.safetensors")
    assert not list(tmp_path.iterdir())


def test_missing_key(tmp_path):
    save_file({"acts": torch.ones(3, 2)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match="activations") as e:
        load_activations(tmp_path / "a.safetensors")
    assert "a.safetensors" in str(e.value) and "acts" in str(e.value)


def test_wrong_ndim_in_file(tmp_path):
    save_file({"activations": torch.ones(2, 3, 4)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(ValueError, match=r"a\.safetensors.*\(2, 3, 4\)"):
        load_activations(tmp_path / "a.safetensors")


def test_disagreeing_d_in(tmp_path):
    save_activations(acts(3, d=4), tmp_path / "s0.safetensors")
    save_activations(acts(3, d=5), tmp_path / "s1.safetensors")
    with pytest.raises(ValueError, match="d_in"):
        load_activations(tmp_path)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_activations(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_activations([tmp_path / "nope.safetensors"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_activations(tmp_path / "empty")


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, None], ids=["empty", "foreign", "trunc"])
def test_unreadable_file(tmp_path, content):
    path = tmp_path / "a.safetensors"
    if content is None:
        save_activations(acts(10), path)
        content = path.read_bytes()[:-9]
    path.write_bytes(content)
    with pytest.raises(ValueError, match="a.safetensors"):
        load_activations(path)


# ---------------------------------------------------------------- atomic_write


def test_atomic_write_success_creates_parents(tmp_path):
    target = tmp_path / "deep" / "er" / "file.txt"
    atomic_write(target, lambda p: Path(p).write_text("hello"))
    assert target.read_text() == "hello"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_atomic_write_failure_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("old")

    def failing(p: Path) -> None:
        Path(p).write_text("half-writ")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "new.txt", lambda p: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


# -------------------------------------------------------------------- saved files: permissions
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



# --------------------------------------------------------------------- load_activations: lists
def test_load_activations_empty_list():
    with pytest.raises(ValueError, match="no activation files"):
        tl_mdl.load_activations([])


def test_load_activations_folder_in_a_list(tmp_path):
    tl_mdl.save_activations(torch.zeros(2, 3), tmp_path / "d" / "a.safetensors")
    tl_mdl.save_activations(torch.ones(1, 3), tmp_path / "d" / "b.safetensors")
    tl_mdl.save_activations(torch.ones(4, 3), tmp_path / "c.safetensors")
    x = tl_mdl.load_activations([tmp_path / "d", tmp_path / "c.safetensors"])
    assert x.shape == (7, 3)

