"""Description length at equal fidelity: the MDL objective against the TopK frontier.

    python benchmarks/bench_frontier.py          # MNIST width 128 and LM residual, 1 seed
    python benchmarks/bench_frontier.py --full   # MNIST widths 128 and 512, LM, 3 seeds
    python benchmarks/bench_frontier.py --only lm --seeds 3 --converge 10000 --cache DIR

For each dataset, width and seed, both sides train with the same budget, batch size and
learning rate:

* baseline: TopK SAEs at several ``k``; their Pareto frontier of bits/input against the
  quantised FVU (test rows, precision tolerance 0.01), with ``log(bits)`` interpolated
  linearly in the FVU between neighbouring ``k`` (:func:`tl_mdl.mdl.frontier_bits_at`);
* ours: ``train_sae(objective="mdl", target_fvu=t)`` for each target ``t`` (0.15, 0.25),
  scored the same way; the baseline is the TopK frontier *at the FVU_q the MDL SAE reached*
  (not at ``t``), so the comparison is at equal fidelity whatever the target's accuracy;
* ``--l1 λ,λ,...`` (MNIST width 128): an L1 frontier too (ReLU SAEs, ``sparsity=λ``), with
  its own ratio lines (``... vs l1``).

Budget: ``--steps N`` (default 1500, ``--full`` 3000) trains every run exactly N steps;
``--converge CAP`` instead trains every run, TopK and MDL alike, with ``train_sae``'s own
convergence rule (README "Training budget": no ``steps=``, ``max_steps=CAP``): held-out
evaluation every 100 steps, converged at the first evaluation where the best of the last 10
is not 0.5% below the best before them, then the learning rate decays to 0 over another
quarter of the steps taken; a run not converged by 0.8·CAP decays and stops at CAP. The MDL
side's TopK warm start ends when its own plateau rule holds (or at min(0.2·CAP, 2000)).

Both sides hold out the same rows (``min(N // 10, 4096)`` training rows drawn from the
seed, never trained on), and each case ends with a line per side saying, per run, at which
step the rule held (fixed budget: ``None`` = the budget was not enough) or where the run
stopped and whether it converged (``--converge``). ``--cache DIR`` keeps every run's result
(MDL runs keyed by the committed ``tl_mdl`` tree) so reruns train only what changed.

Datasets (offline): MNIST pixels (``tl_mdl.data``: the first ``--train`` training images,
the first 2,000 test images). LM (``--lm study``, the default): the LM study's model
(``demos/lm_study``, default settings: 2 layers, d_model 128, BBC News text, 600 LM steps,
then its bilinear conversion), its residual stream ``blocks.1.hook_resid_pre`` harvested as
the study does (training rows: 512 training windows of 128 tokens; test rows: the 128
held-out windows), built once into the study folder ``--lm-study`` (default
``DIR/lm_study`` with ``--cache DIR``, else the study's own ``out/lm_study``) and reused from
there (:mod:`_lm_case`); width 512 (4 × d_model, the study's widest), TopK k 1-8 (this
residual is easy: FVU_q 0.165 at k 4). ``--lm random``: a random 2-layer model
(d_model 64) on Zipf tokens, as before.

Each case prints ``name: ours X, baseline Y, ratio Z`` (bits/input, mean over seeds; ratio
= mean of per-seed ours/baseline, with its sd). ``ratio < 0.95`` is the issue's goal (5%
fewer bits). A case whose MDL SAE lands outside the TopK frontier's FVU range says so
instead of extrapolating.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from _harness import Bench, add_args  # noqa: E402
from _lm_case import random_residual, study_residual  # noqa: E402

from tl_mdl import SAEConfig, description_length, train_sae  # noqa: E402
from tl_mdl.mdl import frontier_bits_at  # noqa: E402
from tl_mdl.training import TrainConfig  # noqa: E402
from tl_mdl.training.code_length import CodeLengthObjective  # noqa: E402
from tl_mdl.training.config import warm_start_limit  # noqa: E402

TOLERANCE = 0.01
LEVELS = (0.15, 0.25)  # the fidelity levels (FVU_q) at which the frontiers are compared
TARGET_SLACK = 0.015  # train_sae's own "target met" slack (the "within 0.015")


def mnist(n_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    from tl_mdl.data import load_mnist

    return load_mnist("train")[0][:n_train], load_mnist("test")[0][:2000]


def score(sae, test: torch.Tensor) -> dict[str, float]:
    rep = description_length(sae, test, tolerance=TOLERANCE)
    return {"bits_per_input": rep.bits_per_input, "fvu_quantized": rep.fvu_quantized,
            "l0": rep.l0}


def trained(train, test, cfg: SAEConfig, objective: str, kw: dict, **extra) -> dict:
    """Train and score one SAE; its score, the steps taken, the step at which the plateau
    rule held on the held-out history (both sides hold out the same rows and evaluate every
    100 steps: ``track_heldout`` under a fixed budget, the default rule under
    ``--converge``) and whether the rule stopped it (``--converge``; None: fixed budget)."""
    res = train_sae(train, cfg, objective, return_history=True, track_heldout=True, **kw,
                    **extra)
    return {**score(res.sae, test), "steps": res.steps, "converged_at": res.converged_at,
            "converged": res.converged, "heldout_fvu_quantized": res.heldout_fvu_quantized,
            "sparsity": res.sparsity}


def train_kwargs(a, seed: int) -> dict:
    """``train_sae``'s budget for every run: exactly ``--steps``, or (``--converge CAP``)
    no ``steps=`` so its convergence rule decides, with ``max_steps=CAP``."""
    budget = {"max_steps": a.converge} if a.converge else {"steps": a.steps}
    return dict(budget, batch_size=a.batch_size, lr=a.lr, seed=seed, progress=False)


def budget_key(a) -> str:
    """The budget's part of a cache key (fixed-budget keys as before, so old caches hold)."""
    return (f"conv{a.converge}" if a.converge else str(a.steps)) + f"x{a.batch_size}_lr{a.lr}"


def topk_cached(name, train, test, width, k, seed, a, kw) -> dict:
    """A TopK run, from ``--cache`` when the same (case, width, k, seed, budget) was run."""
    key = f"{name.replace(' ', '_')}_w{width}_k{k}_s{seed}_{budget_key(a)}"
    return cached(key, a, lambda: trained(
        train, test, SAEConfig(train.shape[1], width, activation="topk", k=k), "topk", kw))


def mdl_cached(name, train, test, width, t, seed, a, kw) -> dict:
    """An MDL run, from ``--cache`` when the same case, budget and ``tl_mdl`` source (its git
    tree hash; no cache for an uncommitted tree) was run."""
    tree = source_tree()
    opts = mdl_options(a)
    extra = "".join(f"_{k}-{v}" for k, v in sorted(opts.items()))
    key = f"{name.replace(' ', '_')}_w{width}_mdl{t:g}{extra}_s{seed}_{budget_key(a)}_{tree}"
    return cached(key if tree else None, a, lambda: trained(
        train, test, SAEConfig(train.shape[1], width), "mdl", kw, target_fvu=t, **opts))


def mdl_options(a) -> dict:
    """``--mdl-option KEY=VALUE`` (repeatable): extra ``train_sae`` keywords for the MDL
    runs, e.g. ``straight_through=jump``; numbers are parsed as such."""
    opts = {}
    if a.straight_through is not None:
        opts["straight_through"] = a.straight_through
    for item in a.mdl_option or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--mdl-option {item!r}: write KEY=VALUE, e.g. "
                             "straight_through=jump")
        try:
            opts[key] = json.loads(value)
        except json.JSONDecodeError:
            opts[key] = value
    return opts


def source_tree() -> str | None:
    """The git tree hash of ``tl_mdl/`` when it has no uncommitted changes, else None."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "tl_mdl"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        tree = subprocess.run(["git", "rev-parse", "HEAD:tl_mdl"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return None if dirty else tree[:12]


def cached(key: str | None, a, make) -> dict:
    path = os.path.join(a.cache, key + ".json") if a.cache and key else None
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    row = make()
    if path:
        os.makedirs(a.cache, exist_ok=True)
        with open(path, "w") as f:
            json.dump(row, f)
    return row


def l1_cached(name, train, test, width, lam, seed, a, kw) -> dict:
    """An L1 run (ReLU SAE, ``sparsity=lam``), cached like the TopK runs."""
    key = f"{name.replace(' ', '_')}_w{width}_l1{lam:g}_s{seed}_{budget_key(a)}"
    return cached(key, a, lambda: trained(
        train, test, SAEConfig(train.shape[1], width), "l1", kw, sparsity=lam))


def one_seed(name, train, test, width: int, ks, seed: int, a, l1s=()) -> dict:
    kw = train_kwargs(a, seed)
    topk = [topk_cached(name, train, test, width, k, seed, a, kw) for k in ks if k <= width]
    mdl = {t: mdl_cached(name, train, test, width, t, seed, a, kw) for t in a.targets}
    l1 = [l1_cached(name, train, test, width, lam, seed, a, kw) for lam in l1s]
    return {"topk": topk, "mdl": mdl, "l1": l1}


def convergence_line(name: str, runs: list[dict], a) -> None:
    """Per side, where each run's plateau rule held: under a fixed budget, whether the budget
    was enough; under ``--converge``, where each run stopped and whether it converged."""
    for side in ("topk", "mdl", "l1"):
        rows = [r for run in runs for r in (run[side].values() if side == "mdl"
                                            else run[side])]
        if not rows:
            continue
        at = [r["converged_at"] for r in rows]
        if a.converge:
            ok = [r for r in rows if r.get("converged")]
            print(f"# {name} {side}: converged (rule stopped it) in {len(ok)}/{len(rows)} "
                  f"runs (cap {a.converge}); stopped at: " + ", ".join(
                      stop_label(r) for r in rows), flush=True)
            continue
        hit = [s for s in at if s is not None]
        print(f"# {name} {side}: plateau rule held in {len(hit)}/{len(at)} runs, at steps "
              + ", ".join("never" if s is None else str(s) for s in at)
              + f" (budget {a.steps})", flush=True)


def stop_label(row: dict) -> str:
    """``"3750 (rule held at 3000)"``, or ``"10000 (cap; not converged)"``."""
    if row.get("converged"):
        return f"{row['steps']} (rule held at {row['converged_at']})"
    return f"{row['steps']} (cap; not converged)"


def report(name: str, runs: list[dict], a, side: str = "topk") -> None:
    """One ratio line per target against the ``side`` frontier (``topk`` or ``l1``)."""
    for t in a.targets:
        ours, base, ratios, fvus = [], [], [], []
        for run in runs:
            row = run["mdl"][t]
            b = frontier_bits_at(run[side], row["fvu_quantized"])
            fvus.append(row["fvu_quantized"])
            if b is None:
                continue
            ours.append(row["bits_per_input"])
            base.append(b)
            ratios.append(row["bits_per_input"] / b)
        label = f"{name} target {t:g}" + ("" if side == "topk" else f" vs {side}")
        fq = ", ".join(f"{f:.3f}" for f in fvus)
        missed = [f for f in fvus if f > t + TARGET_SLACK]
        if missed and side == "topk":
            print(f"# {label}: target missed in {len(missed)}/{len(fvus)} seed(s) (test FVU_q "
                  f"{fq}; met means <= {t + TARGET_SLACK:g})", flush=True)
        if not ratios:
            print(f"# {label}: the MDL SAE's FVU_q ({fq}) is outside the {side} frontier's "
                  "range; no interpolation", flush=True)
            continue
        sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        print(f"{label}: ours {statistics.mean(ours):.4g} bits, baseline "
              f"{statistics.mean(base):.4g} bits, ratio {statistics.mean(ratios):.3f}"
              f"  (± {sd:.3f} sd over {len(ratios)} seed(s); MDL FVU_q {fq})", flush=True)


def frontier_report(name: str, runs: list[dict], side: str = "topk") -> None:
    """Frontier against frontier at each of the issue's levels: the MDL runs' own Pareto
    frontier (one point per target, ``log(bits)`` interpolated in the FVU_q exactly as the
    baseline's) against the ``side`` frontier, both read at FVU_q = level on the test rows.
    A seed whose MDL points do not bracket the level is left out and counted."""
    for level in LEVELS:
        ours, base, ratios, outside = [], [], [], 0
        for run in runs:
            o = frontier_bits_at(run["mdl"].values(), level)
            b = frontier_bits_at(run[side], level)
            if o is None or b is None:
                outside += 1
                continue
            ours.append(o)
            base.append(b)
            ratios.append(o / b)
        label = f"{name} frontier at FVU_q {level:g}" + ("" if side == "topk" else f" vs {side}")
        if outside:
            print(f"# {label}: {outside}/{len(runs)} seed(s) left out (their MDL targets or "
                  f"the {side} runs do not bracket FVU_q {level:g} on the test rows)",
                  flush=True)
        if not ratios:
            continue
        sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
        print(f"{label}: ours {statistics.mean(ours):.4g} bits, baseline "
              f"{statistics.mean(base):.4g} bits, ratio {statistics.mean(ratios):.3f}"
              f"  (± {sd:.3f} sd over {len(ratios)} seed(s))", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="the issue's protocol (slow)")
    ap.add_argument("--steps", type=int, default=None, help="fixed budget of every run")
    ap.add_argument("--converge", type=int, default=None, metavar="CAP",
                    help="instead of --steps: every run trains until train_sae's "
                    "convergence rule holds, capped at CAP steps (e.g. 10000)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--train", type=int, default=10_000, help="MNIST training images")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--only", choices=["mnist", "lm"], default=None)
    ap.add_argument("--widths", default=None, help="MNIST widths, e.g. 128,512")
    ap.add_argument("--ks", default=None, help="MNIST TopK k values, e.g. 6,10,16,24")
    ap.add_argument("--lm", choices=["study", "random"], default="study",
                    help="LM case: the LM study's model (default) or a random model")
    ap.add_argument("--lm-ks", default=None, help="LM TopK k values, e.g. 8,12,16,24,32")
    ap.add_argument("--lm-study", default=None,
                    help="study folder holding (or receiving) the LM study's model and "
                    "activations (default: DIR/lm_study with --cache DIR, else out/lm_study)")
    ap.add_argument("--mdl-option", action="append", metavar="KEY=VALUE",
                    help="extra train_sae keyword for the MDL runs (repeatable), e.g. "
                    "straight_through=jump; part of their cache key")
    ap.add_argument("--straight-through", choices=["threshold", "jump"], default=None,
                    help="the MDL objective's JumpReLU straight-through estimator "
                    "(train_sae's straight_through=, docs/math.md §5; default: train_sae's "
                    "own); same as --mdl-option straight_through=...")
    ap.add_argument("--targets", default=None,
                    help="MDL fidelity targets, e.g. 0.13,0.15,0.22,0.25 (default: the "
                    "levels 0.15,0.25); with more than one, the MDL frontier itself is also "
                    "compared with the baseline's at FVU_q 0.15 and 0.25")
    ap.add_argument("--l1", default=None,
                    help="also an L1 frontier at these λ (MNIST width 128 only), e.g. "
                    "0.03,0.1,0.3; printed as its own ratio lines")
    ap.add_argument("--cache", default=None,
                    help="folder for results, reused by reruns with the same budget (MDL "
                    "runs also need the same committed tl_mdl source)")
    a = add_args(ap, rounds=1).parse_args(argv)
    if a.converge is not None and a.steps is not None:
        ap.error("--steps and --converge exclude each other: --converge CAP lets the "
                 "convergence rule choose every run's steps, capped at CAP")
    if a.converge is not None and a.converge <= 0:
        ap.error(f"--converge takes a positive cap in steps, e.g. 10000; got {a.converge}")
    if not a.converge:
        a.steps = a.steps or (3000 if a.full else 1500)
    try:
        a.targets = (tuple(float(t) for t in a.targets.split(",")) if a.targets
                     else LEVELS)
    except ValueError:
        ap.error(f"--targets takes FVU_q values separated by commas, e.g. 0.13,0.15,0.22,"
                 f"0.25; got {a.targets!r}")
    if not all(0 < t < 1 for t in a.targets):
        ap.error(f"--targets must lie in (0, 1); got {a.targets}")
    return a


def budget_lines(a) -> list[str]:
    """The budget and the convergence rule, as printed at the top."""
    if not a.converge:
        return [f"{a.steps} steps of {a.batch_size} for every run (fixed budget)",
                "convergence check (README 'Training budget'): held-out evaluation every 100 "
                "steps; the rule holds at the first evaluation where the best of the last 10 "
                "is not 0.5% below the best before them (after the MDL side's TopK warm "
                "start)"]
    frac = TrainConfig.lr_decay_frac
    warm_limit = int(warm_start_limit(TrainConfig.warm_start_frac, a.converge,
                                      TrainConfig.warm_start_max_steps))
    return [f"every run (TopK and MDL) trained until converged, capped at {a.converge} steps "
            f"of {a.batch_size} (train_sae without steps=, max_steps={a.converge})",
            "convergence rule (README 'Training budget'): held-out evaluation every 100 steps "
            "on min(N // 10, 4096) held-out rows; converged at the first evaluation where the "
            "best of the last 10 is not 0.5% below the best before them; the learning rate "
            f"then decays to 0 over {frac / (1 - frac):g} x the steps taken; not converged by "
            f"{int((1 - frac) * a.converge)} steps: decay, stop at {a.converge} (not "
            "converged). MDL: its TopK warm start ends at the rule (or "
            f"{warm_limit} steps), then the rule restarts"]


def lm_case(a) -> tuple[str, torch.Tensor, torch.Tensor, int, tuple[int, ...]]:
    """The LM case: ``(name, train, test, width, ks)``."""
    pick = (lambda default: tuple(int(k) for k in a.lm_ks.split(",")) if a.lm_ks
            else default)
    if a.lm == "random":
        train, test = random_residual(64 * 1024 if a.full else 32 * 1024)
        return "lm resid w512", train, test, 512, pick((4, 6, 8, 12, 16))
    folder = a.lm_study or (os.path.join(a.cache, "lm_study") if a.cache else "out/lm_study")
    t0 = time.perf_counter()
    train, test, info = study_residual(folder, log=lambda m: print(m, flush=True))
    print(f"# lm study: {info['model']}, held-out loss {info['held_out_loss']:.3f} nats/token; "
          f"{info['hook']} (the study's layer {info['layer']}): {train.shape[0]:,} training "
          f"rows ({info['windows'][0]} windows of {info['windows'][2]}), {test.shape[0]:,} "
          f"test rows ({info['windows'][1]} held-out windows), d {train.shape[1]}; from "
          f"{folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    # k 1-8 brackets FVU_q 0.15 and 0.25 here (1500-step probe: k 4 at 0.165, k 8 at 0.119)
    return "lm study resid w512", train, test, 512, pick((1, 2, 3, 4, 6, 8))


def main(argv=None) -> int:
    a = parse_args(argv)
    seeds = range(a.seeds or (3 if a.full else 1))
    bench = Bench("bench_frontier: MDL objective vs the TopK frontier at equal quantised FVU",
                  a)
    print(f"# batch {a.batch_size}, lr {a.lr}, precision tolerance {TOLERANCE}, seeds "
          f"{list(seeds)}; MDL straight-through "
          f"{a.straight_through or CodeLengthObjective.straight_through!r}, warm start "
          f"{mdl_options(a).get('warm_start', CodeLengthObjective.warm_start)!r}", flush=True)
    for line in budget_lines(a):
        print("# " + line, flush=True)
    cases = []
    if a.only in (None, "mnist"):
        train, test = mnist(a.train)
        widths = (128, 512) if a.full else (128,)
        if a.widths:
            widths = tuple(int(w) for w in a.widths.split(","))
        for width in widths:
            ks = tuple(int(k) for k in a.ks.split(",")) if a.ks else (8, 12, 16, 24, 32)
            cases.append((f"mnist w{width}", train, test, width, ks))
    if a.only in (None, "lm"):
        cases.append(lm_case(a))
    for name, train, test, width, ks in cases:
        run_case(name, train, test, width, ks, seeds, a)
    return bench.finish()


def run_case(name, train, test, width: int, ks, seeds, a) -> None:
    t0 = time.perf_counter()
    runs = []
    for s in seeds:
        l1s = (tuple(float(v) for v in a.l1.split(","))
               if a.l1 and name == "mnist w128" else ())
        runs.append(one_seed(name, train, test, width, ks, s, a, l1s))
        for t, row in runs[-1]["mdl"].items():  # each seed as it finishes
            b = frontier_bits_at(runs[-1]["topk"], row["fvu_quantized"])
            held = row.get("heldout_fvu_quantized")  # absent from older cached rows
            held = "" if held is None else f", held-out {held:.4f}, final λ {row['sparsity']:.3g}"
            print(f"# {name} seed {s} target {t:g}: MDL {row['bits_per_input']:.2f} bits "
                  f"at FVU_q {row['fvu_quantized']:.4f} (L0 {row['l0']:.1f}{held}); TopK "
                  f"frontier there {'n/a' if b is None else f'{b:.2f}'}; TopK "
                  + ", ".join(f"{r['fvu_quantized']:.3f}:{r['bits_per_input']:.1f}"
                              for r in runs[-1]["topk"]), flush=True)
    print(f"# {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    report(name, runs, a)
    if len(a.targets) > 1:
        for side in ("topk", "l1") if runs[0]["l1"] else ("topk",):
            frontier_report(name, runs, side)
    if runs[0]["l1"]:
        for run in runs:
            print(f"# {name} L1 (bits at FVU_q): " + ", ".join(
                f"{r['fvu_quantized']:.3f}:{r['bits_per_input']:.1f}" for r in run["l1"]),
                flush=True)
        report(name, runs, a, "l1")
    convergence_line(name, runs, a)


if __name__ == "__main__":
    raise SystemExit(main())
