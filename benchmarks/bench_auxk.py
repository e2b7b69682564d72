"""AuxK on MNIST: latents kept alive, and what they cost in bits, against TopK without it.

    python benchmarks/bench_auxk.py --threads 1          # widths 512, 1024; about 6 minutes

TopK ``k=5`` SAEs on the first 10,000 MNIST training images (seed 0, lr 3e-3, batch 256),
each trained until ``train_sae``'s convergence rule stops it (README "Training budget"),
without AuxK (the baseline) and with ``aux_k="auto"`` at each ``--dead-steps`` window. Each
is scored on the first 2,000 test images with ``description_length`` (precision tolerance
0.01): *alive* = latents with ``p_active > 0`` there. Prints
``auxk w{F} dead_steps {T}: ours X alive, baseline Y alive, ratio Z`` and the bits at the
FVU_q reached. Counts and bits, not times: the load does not change them.
"""

from __future__ import annotations

import argparse
import os
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

from _harness import Bench, add_args  # noqa: E402

from tl_mdl import SAEConfig, description_length, train_sae  # noqa: E402


def one(train, test, width: int, dead_steps: int | None, k: int) -> dict:
    kw = {} if dead_steps is None else {"aux_k": "auto", "dead_steps": dead_steps}
    res = train_sae(train, SAEConfig(train.shape[1], width, activation="topk", k=k), "topk",
                    lr=3e-3, seed=0, progress=False, return_history=True, **kw)
    rep = description_length(res.sae, test, tolerance=0.01)
    return {"alive": int((rep.features["p_active"] > 0).sum()), "bits": rep.bits_per_input,
            "fvu_q": rep.fvu_quantized, "heldout": res.heldout_fvu, "steps": res.steps,
            "converged": res.converged}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="512,1024")
    ap.add_argument("--dead-steps", default="1000,100,20",
                    help="AuxK windows to try (train_sae's dead_steps)")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--train", type=int, default=10_000, help="MNIST training images")
    a = add_args(ap, rounds=1).parse_args(argv)
    from tl_mdl.data import load_mnist

    train, test = load_mnist("train")[0][:a.train], load_mnist("test")[0][:2000]
    bench = Bench("bench_auxk: latents alive with AuxK vs without (TopK, MNIST)", a)
    for width in (int(w) for w in a.widths.split(",")):
        base = one(train, test, width, None, a.k)
        print(f"# auxk w{width} off: {base['alive']} alive, {base['bits']:.1f} bits at FVU_q "
              f"{base['fvu_q']:.3f} (held-out FVU {base['heldout']:.3f}; {base['steps']} steps, "
              f"converged {base['converged']})", flush=True)
        for t in (int(s) for s in a.dead_steps.split(",")):
            r = one(train, test, width, t, a.k)
            print(f"# auxk w{width} dead_steps {t}: {r['bits']:.1f} bits at FVU_q "
                  f"{r['fvu_q']:.3f} (held-out FVU {r['heldout']:.3f}; {r['steps']} steps, "
                  f"converged {r['converged']})", flush=True)
            print(f"auxk w{width} dead_steps {t}: ours {r['alive']} alive, baseline "
                  f"{base['alive']} alive, ratio {r['alive'] / base['alive']:.3f}", flush=True)
    return bench.finish()


if __name__ == "__main__":
    raise SystemExit(main())
