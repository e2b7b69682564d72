"""Description length: tl_mdl vs SAEBench's MDL eval, on the same SAE and activations.

    python benchmarks/bench_dl.py          # d_in 256, d_sae 512, N 5,000 (a minute or two),
                                           # plus DL/encode at d_sae 2048, N 20,000 (no SAEBench)
    python benchmarks/bench_dl.py --full   # d_in 256, d_sae 2048, N 20,000 (SAEBench ~10+ min)

* ``ours``      ``tl_mdl.description_length`` (precision search, exact DL, raw cost).
* ``baseline``  SAEBench 0.6 ``sae_bench.evals.mdl.main.run_eval_single_sae`` with the
  settings of its ``__main__`` (``num_bins`` 8/16/32/64, ``k`` None, MSE threshold 0.2),
  driven offline: the activations store, model and SAE are small shims over the same
  tensors, and ``Tensor.cuda`` is the identity while it runs (it hard-codes ``.cuda()``).
  Its DL is the minimum over the bin counts that meet its threshold (its
  ``pick_minimum_viable``).

The tl_mdl timings (DL vs one encode pass) run in interleaved rounds (``--rounds``,
default 5; see ``_harness.py``). Prints ``name: ours X, baseline Y, ratio Z`` lines
(ratio = ours / baseline), ``UNRELIABLE:`` lines, then why the two DL values differ.
SAEBench is installed with ``--no-deps`` plus ``collectibles``,
``loguru``, ``tabulate`` (``make bench``); without it the SAEBench lines are skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import statistics
import sys
import time
import types
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # SAEBench's per-latent progress bar

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _harness import Bench, add_args, order_problem  # noqa: E402

from tl_mdl.mdl import description_length  # noqa: E402
from tl_mdl.sae import SAE, SAEConfig  # noqa: E402

SAEBENCH_NUM_BINS = [8, 16, 32, 64]
SAEBENCH_MSE_THRESHOLD = 0.2


# ------------------------------------------------------------------------ SAEBench shims
class _SAEShim(torch.nn.Module):
    """What SAEBench's MDL eval uses of a sae_lens SAE: ``encode``/``decode`` on
    ``[B, 1, d]`` tensors, ``cfg.d_in``/``cfg.d_sae``, ``.to``."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.sae = sae
        self.cfg = types.SimpleNamespace(d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(f)

    def to(self, *args, **kwargs):  # SAEBench moves the SAE to its device: stay on CPU
        return self


class _ModelShim:
    def to(self, *args, **kwargs):
        return self


class _StoreShim:
    """An ActivationsStore whose every buffer is the whole activation matrix (the eval
    runs with ``sae_batch_size = 1``, so each buffer SAEBench asks for is one batch)."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def get_filtered_llm_batch(self) -> torch.Tensor:
        return self.x

    @classmethod
    def bind(cls, x: torch.Tensor):
        return types.SimpleNamespace(from_sae=lambda *a, **k: cls(x))


@contextlib.contextmanager
def _offline_saebench(sbm, x: torch.Tensor, config):
    """Patch SAEBench's module for an offline CPU run; undo afterwards."""
    saved = (sbm.ActivationsStore, getattr(sbm, "config", None), torch.Tensor.cuda)
    sbm.ActivationsStore = _StoreShim.bind(x)
    sbm.config = config  # calculate_dl and the threshold check read a module global
    torch.Tensor.cuda = lambda self, *a, **k: self  # never touch a GPU
    try:
        yield
    finally:
        sbm.ActivationsStore, cfg, torch.Tensor.cuda = saved
        if cfg is None:
            del sbm.config
        else:
            sbm.config = cfg


def run_saebench(sae: SAE, x: torch.Tensor) -> tuple[float, list[dict]] | str:
    """Time SAEBench's MDL eval; returns (seconds, its per-setting results) or why not."""
    try:
        import sae_bench.evals.mdl.main as sbm
        from loguru import logger
        from sae_bench.evals.mdl.eval_config import MDLEvalConfig
    except Exception as e:  # ImportError, or a broken dependency chain
        return f"{type(e).__name__}: {e}"
    logger.remove()  # it logs every latent's maximum at DEBUG level
    config = MDLEvalConfig(
        k_values=[None],  # type: ignore[list-item]
        num_bins_values=SAEBENCH_NUM_BINS,
        mse_epsilon_threshold=SAEBENCH_MSE_THRESHOLD,
        sae_batch_size=1,
    )
    with (
        _offline_saebench(sbm, x, config),
        contextlib.redirect_stdout(io.StringIO()),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        results = sbm.run_eval_single_sae(config, _SAEShim(sae), _ModelShim(), device="cpu")
        seconds = time.perf_counter() - t
    torch.set_grad_enabled(True)  # run_eval_single_sae switches autograd off globally
    return seconds, results  # type: ignore[return-value]


def pick_minimum_viable(results: list[dict]) -> dict:
    """SAEBench's ``MDLEvalResultsCollection.pick_minimum_viable``."""
    viable = [r for r in results if r["within_threshold"]]
    return min(viable or results, key=lambda r: r["description_length"])


def saebench_style_dl(f: torch.Tensor, num_bins: int) -> float:
    """SAEBench's DL formula, vectorised (for the rescaling demonstration): bins
    ``linspace(0, max(100, max f_i), num_bins + 1)`` per latent, a histogram of *all* N
    values (zeros included), ``Σ_i H_b(p_i) + p_i · H(histogram_i)``."""
    n, _ = f.shape
    top = f.max(0).values.clamp_min(100.0)
    b = (f / (top / num_bins)).floor().clamp(0, num_bins - 1).long()
    b = b.masked_fill(f < 0, -1)  # below the first edge: not counted by torch.histogram
    counts = torch.zeros(f.shape[1], num_bins + 1, dtype=torch.float64)
    counts.scatter_add_(1, (b + 1).T, torch.ones_like(b.T, dtype=torch.float64))
    counts = counts[:, 1:]
    probs = counts / counts.sum(1, keepdim=True).clamp_min(1)
    h = -torch.special.xlogy(probs, probs).sum(1) / math.log(2)
    p = (f > 0).double().mean(0)
    hb = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p)) / math.log(2)
    return float((hb + p * h).sum())


# --------------------------------------------------------------------------------- main
def random_problem(d_in: int, d_sae: int, n: int, seed: int) -> tuple[SAE, torch.Tensor]:
    """A random ReLU SAE and ``n`` N(0, I) activations (the issue's benchmark input)."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, activation="relu"), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    return sae, torch.randn(n, d_in, generator=gen)


def time_dl_vs_encode(bench: Bench, sae: SAE, x: torch.Tensor, tolerance: float):
    """Seconds per round of one ``sae.encode`` pass, ``description_length`` and
    ``description_length(raw_cost=False)``, interleaved so the three see the same load.
    Returns (the samples by name, the DL report, the latents)."""
    with torch.no_grad():
        f = sae.encode(x)
    rep = description_length(sae, x, tolerance=tolerance)

    @torch.no_grad()
    def encode():
        return sae.encode(x)

    t = bench.interleaved({
        "encode": encode,
        "dl": lambda: description_length(sae, x, tolerance=tolerance),
        "dl0": lambda: description_length(sae, x, tolerance=tolerance, raw_cost=False),
    })
    return t, rep, f


def dl_vs_encode_lines(bench: Bench, t: dict[str, list[float]], suffix: str = "") -> None:
    bench.line(f"dl_vs_encode_time{suffix}", t["dl"], t["encode"])
    bench.line(f"dl_vs_encode_time_no_raw_cost{suffix}", t["dl0"], t["encode"])
    bench.flag(order_problem(f"dl_vs_encode_time{suffix}", t["dl0"], t["encode"],
                             "DL scoring faster than the encode pass it contains"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="d_sae 2048, N 20,000 (slow baseline)")
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--d-sae", type=int, default=None)
    ap.add_argument("--n", type=int, default=None, help="number of activations")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--skip-baseline", action="store_true", help="tl_mdl lines only")
    args = add_args(ap, rounds=5).parse_args(argv)
    d_sae = args.d_sae or (2048 if args.full else 512)
    n = args.n or (20_000 if args.full else 5_000)

    sae, x = random_problem(args.d_in, d_sae, n, args.seed)
    bench = Bench(f"bench_dl: random ReLU SAE d_in {args.d_in}, d_sae {d_sae}, seed "
                  f"{args.seed}; {n} activations (N(0, I)); SAEBench runs once (too slow to "
                  "repeat)", args)
    t, rep, f = time_dl_vs_encode(bench, sae, x, args.tolerance)
    print(f"# tl_mdl: {rep}", flush=True)

    base = None if args.skip_baseline else run_saebench(sae, x)
    if isinstance(base, str) or base is None:
        why = "--skip-baseline" if base is None else f"sae_bench not importable ({base})"
        print(
            f"SKIP saebench_mdl: {why}; install: pip install --no-deps 'sae-bench==0.6.*' "
            "collectibles loguru tabulate"
        )
    else:
        sb_s, results = base
        best = pick_minimum_viable(results)
        bench.line("dl_time_s", [statistics.median(t["dl"])], [sb_s], note="SAEBench: 1 run")
        bench.line("dl_bits_per_input", [rep.bits_per_input], [best["description_length"]],
                   check_spread=False)
        for r in results:
            print(
                f"# SAEBench num_bins {r['num_bins']}: DL {r['description_length']:.2f} bits, "
                f"sqrt(MSE)/d_in {r['mse_loss']:.3g} "
                f"({'meets' if r['within_threshold'] else 'misses'} {SAEBENCH_MSE_THRESHOLD})"
            )
        ours_style = saebench_style_dl(f, best["num_bins"])
        print(
            f"# SAEBench's formula re-computed here (vectorised): "
            f"{ours_style:.2f} bits at num_bins {best['num_bins']}"
        )
    dl_vs_encode_lines(bench, t)
    if not args.full and args.d_sae is None and args.n is None:
        # the issue states the <= 3x target on its own input (d_sae 2048, N 20,000): time
        # tl_mdl there too (no SAEBench run at that size without --full)
        big_sae, big_x = random_problem(args.d_in, 2048, 20_000, args.seed)
        print("# the same ratios at d_sae 2048, N 20,000", flush=True)
        t_big, _, _ = time_dl_vs_encode(bench, big_sae, big_x, args.tolerance)
        dl_vs_encode_lines(bench, t_big, "_d_sae2048_n20000")

    # Rescaling the SAE (latents ×s, decoder ÷s; s a power of 2, so exact in floating
    # point and on tl_mdl's 2^(j/8) grid) changes nothing it reconstructs.
    s = 1024.0
    sae2 = SAE(SAEConfig(d_in=args.d_in, d_sae=d_sae, activation="relu"), seed=args.seed)
    with torch.no_grad():
        sae2.W_enc.mul_(s)
        sae2.b_enc.mul_(s)
        sae2.W_dec.div_(s)
        f2 = sae2.encode(x)
    rep2 = description_length(sae2, x, tolerance=args.tolerance, raw_cost=False)
    nb = 16
    bench.line(
        f"dl_rescaled_x{s:g}_over_original",
        [rep2.bits_per_input / rep.bits_per_input],
        [saebench_style_dl(f2, nb) / saebench_style_dl(f, nb)],
        check_spread=False,
    )
    print(
        f"""
Why the DL values differ (same SAE, same activations):
* tl_mdl quantises every latent with one shared bin width w = {rep.bin_width:.4g}, searched
  as the coarsest grid width whose reconstruction raises FVU by <= {args.tolerance}; q = 0
  is "inactive" and costs only the presence bit stream, H_b(p_i); values are coded only
  where a latent is active: DL = sum_i H_b(p_i) + p_i H_i = {rep.bits_per_input:.2f} bits.
* SAEBench bins each latent over [0, max(100, max f_i)] in num_bins equal bins. The floor
  of 100 means a latent whose values are all far below 100 (here max f is
  {float(f.max()):.3g}) lands in the first bin: its value entropy is ~0, and its DL is just
  the presence entropy, so the baseline can look cheap while quantising coarsely.
* SAEBench's presence bit is f_i > 0 before quantisation ({float((f > 0).float().mean()):.1%} of
  the latent values here); tl_mdl's is q_i != 0 at w ({rep.l0 / d_sae:.1%}): what rounds to
  zero is what the decoder sees as zero.
* SAEBench's value histograms count the zeros (inactive inputs) too, then multiply by
  p_i again, so presence is paid twice, mixed into the value stream.
* It quantises zeros to the first bin's midpoint: a latent that is off is decoded as
  slightly on, which adds error that has nothing to do with precision.
* It ignores k: calculate_dl never applies TopK, so the k setting changes the MSE check
  but not the DL. Its fidelity test is sqrt(MSE)/d_in < {SAEBENCH_MSE_THRESHOLD}, not a
  fraction of variance.
* Its bins are absolute, so its DL is not scale-invariant: rescaling latents x{s:g} and
  the decoder /{s:g} (identical reconstructions) changes its DL (ratio above,
  num_bins {nb}); tl_mdl's precision search rescales w with it (the grid is 2^(j/8)), so
  its DL is unchanged (ratio {rep2.bits_per_input / rep.bits_per_input:.4g})."""
    )
    return bench.finish()


if __name__ == "__main__":
    raise SystemExit(main())
