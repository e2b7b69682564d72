"""Step cost of the MDL objective against the L1 objective, same SAE size and batch.

    python benchmarks/bench_objectives.py          # d_in 128, d_sae 2048, batch 2048, 30 steps
    python benchmarks/bench_objectives.py --full   # d_in 256, d_sae 4096, batch 4096, 100 steps

Each side is a whole ``train_sae`` call on the same in-memory activations (synthetic sparse
sums of random directions, as in ``bench_train.py``), timed in interleaved rounds
(``--rounds``, default 3; see ``_harness.py``):

* ``mdl``: ``objective="mdl"`` at a fixed λ, JumpReLU with the straight-through code length,
  warm start off (``warm_start_frac=0``), so every step is an MDL step;
* ``mdl target``: the same with ``target_fvu=0.2`` (λ adapted every step; held-out rows are
  set aside, and evaluated every 100 steps);
* baseline ``l1``: ``objective="l1"``, ReLU, the same steps.

Each side is called once for 2 steps before the rounds (first-call costs out of the
timing). NaN/Inf detection is on for all (the trainer's one fused check of batch, loss and gradients
before each update and of the weights after it). The issue's goal: ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

from _harness import Bench, add_args  # noqa: E402
from bench_train import make_activations  # noqa: E402

from tl_mdl import SAEConfig, train_sae  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the issue's size (slow)")
    a = add_args(ap, rounds=3).parse_args()
    d_in, d_sae, batch, steps = (256, 4096, 4096, 100) if a.full else (128, 2048, 2048, 30)
    bench = Bench("bench_objectives: MDL vs L1 objective, time per training call", a)
    x = make_activations(4 * batch, d_in, seed=0)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae)
    kw = dict(batch_size=batch, lr=1e-3, progress=False)
    print(f"# d_in {d_in}, d_sae {d_sae}, batch {batch}, {steps} steps per call", flush=True)
    calls = {
        "l1": lambda n: train_sae(x, cfg, "l1", steps=n, **kw),
        "mdl": lambda n: train_sae(x, cfg, "mdl", warm_start_frac=0.0, steps=n, **kw),
        "mdl target": lambda n: train_sae(x, cfg, "mdl", target_fvu=0.2, warm_start_frac=0.0,
                                          steps=n, **kw),
    }
    # One-off costs out of the rounds, alike for every side: the first call pays imports
    # (the first Adam imports torch._dynamo, seconds); without this they land in the first
    # round's first side, the l1 baseline.
    for f in calls.values():
        f(2)
    times = bench.interleaved({n: (lambda f=f: f(steps)) for n, f in calls.items()},
                              warmup=False)
    bench.line("mdl objective step time", times["mdl"], times["l1"], unit="s")
    bench.line("mdl objective with target_fvu step time", times["mdl target"], times["l1"],
               unit="s")
    return bench.finish()


if __name__ == "__main__":
    raise SystemExit(main())
