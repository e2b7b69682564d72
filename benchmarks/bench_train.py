"""Training throughput: tl_mdl ``train_sae`` vs SAELens's ``SAETrainer``, same activations.

    python benchmarks/bench_train.py          # d_in 128, d_sae 1024, batch 1024, 30 steps
    python benchmarks/bench_train.py --full   # d_in 256, d_sae 4096, batch 4096, 100 steps

Both sides train a fresh SAE of the same size with Adam at the same learning rate and batch
size, on the same in-memory activations (synthetic: sparse non-negative combinations of
random unit directions plus noise, so a trained SAE has something to find):

* TopK (k = 32): tl_mdl ``objective="topk"`` vs SAELens ``TopKTrainingSAE`` (which adds its
  dead-latent auxiliary loss, as shipped).
* ReLU + L1: tl_mdl ``objective="l1"`` (λ 0.1, its default) vs SAELens
  ``StandardTrainingSAE`` (``l1_coefficient`` 1.0, its default). The two penalties are
  scaled differently (tl_mdl's is relative to the data's rms), so the L0 each reaches is
  printed beside its FVU; the time per step does not depend on λ.

Each call is timed whole (SAE construction, initialisation and every step), in interleaved
rounds (``--rounds``, default 3; see ``_harness.py``). The FVU of each side's last SAE is
measured on held-out rows with ``tl_mdl.metrics.fvu``. Prints ``name: ours X, baseline Y,
ratio Z`` lines (ratio = tl_mdl / SAELens).
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from _harness import Bench, add_args  # noqa: E402
from sae_lens import (  # noqa: E402
    SAETrainer,
    StandardTrainingSAE,
    StandardTrainingSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.config import SAETrainerConfig  # noqa: E402

from tl_mdl import SAEConfig, train_sae  # noqa: E402
from tl_mdl.metrics import fvu  # noqa: E402

K = 32
OUR_L1 = 0.1
THEIR_L1 = 1.0


def make_activations(n: int, d_in: int, seed: int) -> torch.Tensor:
    """``n`` rows: each a sum of ~8 of ``4 d_in`` random unit directions with exponential
    magnitudes, plus N(0, 0.05²) noise."""
    g = torch.Generator().manual_seed(seed)
    n_feat = 4 * d_in
    D = torch.randn(n_feat, d_in, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    x = torch.empty(n, d_in)
    for s in range(0, n, 8192):  # in blocks: the codes are [rows, n_feat]
        m = min(8192, n - s)
        on = torch.rand(m, n_feat, generator=g) < 8 / n_feat
        mag = torch.empty(m, n_feat).exponential_(generator=g)
        x[s : s + m] = (on * mag) @ D + 0.05 * torch.randn(m, d_in, generator=g)
    return x


def ours(kind: str, x: torch.Tensor, a: argparse.Namespace):
    if kind == "topk":
        cfg = SAEConfig(d_in=a.d_in, d_sae=a.d_sae, activation="topk", k=K)
        return train_sae(x, cfg, "topk", steps=a.steps, batch_size=a.batch, lr=a.lr,
                         progress=False)
    cfg = SAEConfig(d_in=a.d_in, d_sae=a.d_sae, activation="relu")
    return train_sae(x, cfg, "l1", sparsity=OUR_L1, steps=a.steps, batch_size=a.batch,
                     lr=a.lr, progress=False)


def theirs(kind: str, x: torch.Tensor, a: argparse.Namespace):
    if kind == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, k=K))
    else:
        sae = StandardTrainingSAE(
            StandardTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, l1_coefficient=THEIR_L1))
    cfg = SAETrainerConfig(total_training_samples=a.steps * a.batch,
                           train_batch_size_samples=a.batch, lr=a.lr, lr_end=a.lr,
                           device="cpu")
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:  # shuffled epochs over the same rows tl_mdl samples from
            yield from x[torch.randperm(x.shape[0], generator=g)].split(a.batch)

    return SAETrainer(cfg, sae, batches()).fit()


@torch.no_grad()
def evaluate(sae, x: torch.Tensor) -> tuple[float, float]:
    """(FVU, L0) of ``sae`` on ``x``."""
    f = sae.encode(x)
    return fvu(x, sae.decode(f)), float((f != 0).sum(-1).float().mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="d_in 256, d_sae 4096, batch 4096, "
                    "100 steps")
    ap.add_argument("--kinds", default="topk,l1")
    ap.add_argument("--lr", type=float, default=1e-3)
    a = add_args(ap, rounds=3).parse_args()
    a.d_in, a.d_sae, a.batch, a.steps = (256, 4096, 4096, 100) if a.full else (128, 1024,
                                                                                1024, 30)
    bench = Bench(f"bench_train: d_in {a.d_in}, d_sae {a.d_sae}, batch {a.batch}, "
                  f"{a.steps} steps, lr {a.lr}, whole training call timed", a)
    # at most 16 distinct batches, cycled (the step's cost does not depend on which rows)
    x = make_activations(min(a.steps, 16) * a.batch, a.d_in, seed=0)
    x_test = make_activations(8192, a.d_in, seed=1)
    for kind in a.kinds.split(","):
        trained = {}
        warm = argparse.Namespace(**{**vars(a), "steps": 2})
        ours(kind, x, warm), theirs(kind, x, warm)  # first-call costs out of the rounds

        def run(side, fn, kind=kind, trained=trained):
            return lambda: trained.__setitem__(side, fn(kind, x, a))

        t = bench.interleaved({"ours": run("ours", ours), "sl": run("sl", theirs)},
                              warmup=False)
        per_step = {s: [v / a.steps * 1e3 for v in t[s]] for s in t}
        bench.line(f"train_{kind}_step_time_ms", per_step["ours"], per_step["sl"], "ms",
                   ".1f")
        (f_o, l0_o), (f_s, l0_s) = evaluate(trained["ours"], x_test), evaluate(
            trained["sl"], x_test)
        bench.line(f"train_{kind}_final_fvu", [f_o], [f_s], fmt=".4f", check_spread=False,
                   note=f"held-out rows; L0 ours {l0_o:.1f}, SAELens {l0_s:.1f}")
    return bench.finish()


if __name__ == "__main__":
    raise SystemExit(main())
