"""``bench_scale.py --real``: SAELens-sized SAEs on activation shards on disk.

From ``--rows`` (200,000) x ``--d-in`` (768) activations in safetensors shards (written once
to ``--shards DIR``, or to a temporary folder), with a TopK SAE of ``--d-sae`` (24,576)
latents, k 32:

* ``real_dl_vs_one_encode_time``: ``description_length(sae, DIR)`` (default settings; the
  latents of all rows would take rows x d_sae x 4 bytes, 19.7 GB here, so it streams them)
  against one encode pass over every row (in blocks, latents discarded).
* ``real_dl_peak_rss_vs_dense_latents``: its peak RSS rise against the size of the dense
  latents of all rows.
* ``real_train_time``: ``train_sae`` for ``--steps`` (200) steps of ``--batch`` (4096) rows,
  reading the shards through ``ShardedActivations``, against SAELens's ``SAETrainer`` fed
  the same batches; ``real_train_peak_rss``: their peak RSS rises (the dense latents of all
  rows are printed alongside for scale).

The SAE scored is built, not trained: its first ``4 d_in`` latents are the directions the
activations are made of (the rest random), so its code is sparse (L0 ~5 of k 32) and its
FVU ~0.2, like a trained SAE's; the cost is what is measured. Each variant runs in its own
process; ``--variants`` (comma list of encode, dl, train_ours, train_sl; default all) runs
some of them, e.g. ``--variants train_ours,train_sl`` for the training pair alone.
At ``--batch 1024`` on one core this takes about half an hour (estimated from 5-step runs:
encode ~2.5 min, DL about one encode, train_ours ~3 min, train_sl ~15 min; the training
pair alone ~20 min); reduce ``--rows``/``--steps`` to check that it works.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

K = 32
SHARD_ROWS = 25_000
VARIANTS = ("encode", "dl", "train_ours", "train_sl")


def write_shards(folder: Path, rows: int, d_in: int) -> None:
    """Synthetic activations (sparse sums of random unit directions plus noise) in shards."""
    import torch

    import tl_mdl

    folder.mkdir(parents=True, exist_ok=True)
    if sorted(folder.glob("*.safetensors")):
        x = tl_mdl.load_activations(folder)
        if x.shape == (rows, d_in):
            return
        raise SystemExit(f"--shards {folder} holds {tuple(x.shape)}, not ({rows}, {d_in}); "
                         "pass an empty folder")
    g = torch.Generator().manual_seed(1)
    D = _dictionary(d_in)
    n_feat = D.shape[0]
    for i, s in enumerate(range(0, rows, SHARD_ROWS)):
        m = min(SHARD_ROWS, rows - s)
        on = torch.rand(m, n_feat, generator=g) < 8 / n_feat
        mag = torch.empty(m, n_feat).exponential_(generator=g)
        x = (on * mag) @ D + 0.05 * torch.randn(m, d_in, generator=g)
        tl_mdl.save_activations(x, folder / f"shard_{i:04d}.safetensors")


def _dictionary(d_in: int):
    """The ``4 d_in`` unit directions the synthetic activations are built from."""
    import torch

    D = torch.randn(4 * d_in, d_in, generator=torch.Generator().manual_seed(0))
    return D / D.norm(dim=1, keepdim=True)


def _sae(d_in: int, d_sae: int, folder: str):
    """A TopK SAE whose first ``4 d_in`` latents read and write the generating directions
    (the rest random), so its code is sparse and its reconstruction good, as a trained
    SAE's: the DL search then works as on a real SAE."""
    import torch

    import tl_mdl

    sae = tl_mdl.SAE(tl_mdl.SAEConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=K), seed=0)
    D = _dictionary(d_in)
    n = min(D.shape[0], d_sae)
    with torch.no_grad():
        sae.W_enc[:, :n] = D[:n].T
        sae.W_dec[:n] = D[:n]
        sae.b_enc.fill_(-0.5)  # spurious overlaps with other directions stay off
        sae.b_dec.zero_()
    return sae


def worker(variant: str, folder: str, d_in: int, d_sae: int, steps: int, batch: int,
           measure) -> dict[str, float]:
    import torch

    import tl_mdl

    if variant == "encode":
        sae, x = _sae(d_in, d_sae, folder), tl_mdl.load_activations(folder)

        @torch.no_grad()
        def run() -> None:
            for i in range(0, x.shape[0], 4096):
                sae.encode(x[i : i + 4096])

        return measure(run)
    if variant == "dl":
        sae = _sae(d_in, d_sae, folder)
        out: dict[str, float] = {}

        def run() -> None:
            rep = tl_mdl.description_length(sae, folder, tolerance=0.01)
            out["bits"] = rep.bits_per_input

        return {**measure(run), **out}

    def batches():
        return tl_mdl.ShardedActivations(folder, batch_size=batch, buffer_size=16 * batch,
                                         seed=0)

    # one-off costs out of both sides' timing: the first Adam imports torch._dynamo
    # (seconds); SAELens is imported before its measured call too
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    if variant == "train_ours":
        cfg = tl_mdl.SAEConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=K)
        return measure(lambda: tl_mdl.train_sae(batches(), cfg, "topk", steps=steps,
                                                batch_size=batch, progress=False))
    if variant == "train_sl":
        from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import SAETrainerConfig

        def run() -> None:
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=K))
            cfg = SAETrainerConfig(total_training_samples=steps * batch,
                                   train_batch_size_samples=batch, lr=1e-3, lr_end=1e-3,
                                   device="cpu")
            SAETrainer(cfg, sae, iter(batches())).fit()

        return measure(run)
    raise ValueError(f"unknown --real variant {variant!r}")


def bench_real(argv: list[str], run, bench) -> None:
    """``run(kind, variant, **args)`` runs one variant in its own process (bench_scale's
    ``_run``); ``bench`` is the harness."""
    ap = argparse.ArgumentParser(prog="bench_scale.py --real")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--d-sae", type=int, default=24_576)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--shards", default=None, help="folder for the shards (kept)")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma list of " + ",".join(VARIANTS) + " (default: all); a ratio "
                    "is printed for each pair measured (encode+dl, train_ours+train_sl)")
    a, _ = ap.parse_known_args(argv)
    variants = tuple(v for v in VARIANTS if v in a.variants.split(","))
    unknown = set(a.variants.split(",")) - set(VARIANTS)
    if unknown or not variants:
        ap.error(f"--variants {a.variants!r}: use a comma list of {','.join(VARIANTS)}")
    dense_mb = a.rows * a.d_sae * 4 / 2**20
    print(f"# --real: {a.rows} x {a.d_in} activations in shards of {SHARD_ROWS} rows, TopK "
          f"SAE d_sae {a.d_sae} k {K}; {a.steps} steps of {a.batch} rows; dense latents of "
          f"all rows would take {dense_mb:.0f} MB", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.shards or tmp)
        t0 = time.perf_counter()
        write_shards(folder, a.rows, a.d_in)
        print(f"# shards ready in {folder} ({time.perf_counter() - t0:.0f} s)", flush=True)
        args = dict(folder=str(folder), d_in=a.d_in, d_sae=a.d_sae, steps=a.steps,
                    batch=a.batch)
        res: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(bench.rounds):  # interleaved: encode, DL, ours, SAELens, again ...
            bench.sample_load()
            for v in variants:
                r = run("real", v, **args)
                if r is None:
                    raise SystemExit(f"--real variant {v} failed (see above)")
                res[v].append(r)
                # each variant takes minutes: report it as it ends (a stopped run keeps what
                # it measured) and sample the load there too, not only between rounds
                bench.sample_load()
                print(f"# {v}: {r['seconds']:.1f} s, peak RSS rise {r['peak_mb']:.0f} MB, "
                      f"load {os.getloadavg()[0]:.2f}", flush=True)
    sec = {v: [r["seconds"] for r in rs] for v, rs in res.items()}
    mb = {v: [r["peak_mb"] for r in rs] for v, rs in res.items()}
    if "dl" in res:
        print(f"# DL {res['dl'][0]['bits']:.2f} bits/input", flush=True)
        bench.line("real_dl_peak_rss_vs_dense_latents", mb["dl"], [dense_mb] * bench.rounds,
                   "MB", ".4g", check_spread=False)
        if "encode" in res:
            bench.line("real_dl_vs_one_encode_time", sec["dl"], sec["encode"], "s", ".4g")
    if "train_ours" in res and "train_sl" in res:
        bench.line("real_train_time", sec["train_ours"], sec["train_sl"], "s", ".4g",
                   note=f"{a.steps} steps of {a.batch} rows")
        bench.line("real_train_peak_rss", mb["train_ours"], mb["train_sl"], "MB", ".4g",
                   note=f"dense latents of all rows: {dense_mb:.0f} MB", check_spread=False)
