"""Data-parallel training and sweeps: 2 CPU processes (gloo) against single-process runs."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from tl_mdl import SAE, SAEConfig, sweep, train_sae
from tl_mdl.training import distributed as ddp
from tl_mdl.training.trainer import load_checkpoint

WORLD = 2
STEPS = 30
TRAIN = dict(steps=STEPS, batch_size=64, lr=3e-3, seed=5, progress=False)
SWEEP = dict(widths=[8, 16, 24], sparsities=[2], objective="topk", steps=10, batch_size=64,
             lr=3e-3, seed=1, progress=False)


def sparse_data(n: int = 512, d: int = 12, n_feat: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=-1)
    active = torch.rand(n, n_feat, generator=g) < 3 / n_feat
    return (active * (torch.rand(n, n_feat, generator=g) * 2 + 0.5)) @ dirs


CASES = {  # name -> (SAEConfig kwargs, objective, sparsity)
    "mdl_relu": (dict(d_in=12, d_sae=20), "mdl", 1e-2),
    "l1_jumprelu": (dict(d_in=12, d_sae=20, activation="jumprelu"), "l1", 0.1),
    "topk": (dict(d_in=12, d_sae=20, activation="topk", k=3), "topk", None),
    "topk_auxk": (dict(d_in=12, d_sae=48, activation="topk", k=2), "topk", None),
}
#: more train_sae arguments of a case: AuxK with latents dead after 2 steps without firing
#: (each rank's share of the AuxK term, firing summed over ranks)
EXTRA = {"topk_auxk": dict(aux_k=4, dead_steps=2)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        data = sparse_data()
        assert ddp.is_distributed() and ddp.rank() == rank
        for name, (kw, objective, sp) in CASES.items():
            ck = Path(out) / f"ck_{name}"
            sae = train_sae(data, SAEConfig(**kw), objective, sparsity=sp, checkpoint_dir=ck,
                            checkpoint_every=10, **TRAIN, **EXTRA.get(name, {}))
            save_file(sae.state_dict(), str(Path(out) / f"{name}_rank{rank}.safetensors"))
        # iterable input (one list of global batches, the same on every rank)
        batches = [data[i : i + 64] for i in range(0, 512, 64)]
        sae = train_sae(batches, SAEConfig(**CASES["mdl_relu"][0]), "mdl", steps=8,
                        progress=False)
        save_file(sae.state_dict(), str(Path(out) / f"iter_rank{rank}.safetensors"))
        table = sweep(data, out_dir=Path(out) / "sweep", **SWEEP)
        rows = [(r["width"], r["bits_per_input"], r["sae"].W_dec.sum().item()) for r in table]
        torch.save(rows, Path(out) / f"sweep_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    # fork: the workers inherit the imported modules (spawn would re-import torch, tl_mdl)
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True,
                       start_method="fork")
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_training_matches_single_process(ddp_run, name):
    kw, objective, sp = CASES[name]
    single = train_sae(sparse_data(), SAEConfig(**kw), objective, sparsity=sp,
                       return_history=True, log_every=1, **TRAIN, **EXTRA.get(name, {}))
    if name in EXTRA:  # the AuxK term was at work
        assert sum(h["dead"] > 0 for h in single.history) >= STEPS // 3
    single = single.sae
    r0 = load_file(str(ddp_run / f"{name}_rank0.safetensors"))
    r1 = load_file(str(ddp_run / f"{name}_rank1.safetensors"))
    for k, v in single.state_dict().items():
        assert torch.equal(r0[k], r1[k]), f"ranks disagree on {k}"
        torch.testing.assert_close(r0[k], v, rtol=1e-5, atol=1e-5, msg=f"{name}: {k}")
    meta, tensors = load_checkpoint(ddp_run / f"ck_{name}")  # written by rank 0 alone
    assert meta["step"] == STEPS
    torch.testing.assert_close(tensors["sae.W_enc"], r0["W_enc"])
    assert not list((ddp_run / f"ck_{name}").glob("*.tmp"))


def test_ddp_iterable_batches_match_single_process(ddp_run):
    data = sparse_data()
    batches = [data[i : i + 64] for i in range(0, 512, 64)]
    single = train_sae(batches, SAEConfig(**CASES["mdl_relu"][0]), "mdl", steps=8,
                       progress=False)
    r0 = load_file(str(ddp_run / "iter_rank0.safetensors"))
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0[k], v, rtol=1e-5, atol=1e-5)


def test_ddp_sweep_gathers_rows_on_rank0(ddp_run):
    rows0 = torch.load(ddp_run / "sweep_rank0.pt")
    rows1 = torch.load(ddp_run / "sweep_rank1.pt")
    assert [r[0] for r in rows0] == [8, 16, 24]  # every row, in grid order
    assert [r[0] for r in rows1] == [16]  # rank 1 keeps only its own share
    single = sweep(sparse_data(), **SWEEP)
    for (w, bits, wsum), r in zip(rows0, single, strict=True):
        assert w == r["width"]
        assert bits == pytest.approx(r["bits_per_input"], rel=1e-6)
        assert wsum == pytest.approx(r["sae"].W_dec.sum().item(), rel=1e-6)
    csv = (ddp_run / "sweep" / "sweep.csv").read_text().splitlines()
    assert len(csv) == 4
    for w in (8, 16, 24):  # each rank saved its SAEs where a rerun finds them
        assert SAE.load(ddp_run / "sweep" / f"w{w}_s2").cfg.d_sae == w


def test_helpers_without_process_group():
    assert not ddp.is_distributed() and ddp.rank() == 0 and ddp.world_size() == 1
    assert ddp.is_main_process()
    assert ddp.init_distributed() == (0, 1) or "RANK" in __import__("os").environ
    assert [ddp.shard_rows(10, 3, r) for r in range(3)] == [slice(0, 4), slice(4, 7),
                                                             slice(7, 10)]
    with pytest.raises(RuntimeError, match="process group"):
        train_sae(sparse_data(), SAEConfig(d_in=12, d_sae=8), "l1", steps=1, progress=False,
                  distributed=True)


def test_entry_point_trains_on_shards(tmp_path):
    """``tl-mdl ddp-train`` (here in-process, world size 1; the same command runs under
    ``torchrun --nproc_per_node N -m tl_mdl.cli ddp-train``)."""
    from typer.testing import CliRunner

    from tl_mdl import save_activations
    from tl_mdl.cli import app

    data = sparse_data()
    save_activations(data[:300], tmp_path / "shards" / "a.safetensors")
    save_activations(data[300:], tmp_path / "shards" / "b.safetensors")
    r = CliRunner().invoke(app, ["ddp-train", str(tmp_path / "shards"), "--d-sae", "16",
                                 "--steps", "5", "--batch-size", "32", "--buffer-size", "128",
                                 "--out", str(tmp_path / "sae")])
    assert r.exit_code == 0 and "world size 1" in r.output, r.output
    assert SAE.load(tmp_path / "sae").cfg.d_sae == 16
    assert "--d-sae" in CliRunner().invoke(app, ["ddp-train", "--help"]).output
