"""MDL-SAEs on MNIST (Ayonrinde, Pearce & Sharkey 2024, "Interpretability as Compression").

Treat the 784 pixels of each digit as the activations. For each dictionary width and each
fidelity level ``t`` (quantised FVU ≤ 0.1, 0.2, 0.3), search TopK's ``k`` for the shortest
description that meets the level (:mod:`_fidelity`: bracket, then interpolate, sharing SAEs
between levels), and read the DL at exactly ``FVU_q = t`` off the bracket. DL vs width is
U-shaped per level: narrow dictionaries need many active features per digit, wide ones pay
``log2 F`` bits per feature and memorise. The features of the narrow, MDL-optimal and wide
SAE at each level are measured with :func:`tl_mdl.metrics.feature_shapes` (memorisation =
best cosine with a training image; area and elongation of the positive mass; a label).

``make demo`` trains every SAE for a fixed 600 steps (near convergence at these sizes, see
``QUICK``); ``--full`` trains each until ``train_sae``'s convergence rule stops it (as does
``--steps 0``). Writes to ``out/mnist_mdl/``:

* ``searched.csv`` (every SAE trained: seed, width, k, DL, FVU_q, ...), ``dl_vs_width.csv``
  (per seed, level and width: the bracket and the DL at the level), ``shapes.csv`` (narrow /
  optimal / wide per level: shape measures), ``summary.json``;
* ``dl_vs_width.png``; ``features.png`` (levels × narrow/optimal/wide, 16 most used features
  each, shape measures in the titles); ``saes/`` every trained SAE (a rerun resumes).

Run: ``make demo`` (reduced protocol, < 10 min on 2 cores) or ``python demos/mnist_mdl.py
--full`` (all 60,000 training images, widths to 2048, 3 seeds); ``--help`` for the rest.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _fidelity import dl_at_level, search_k  # noqa: E402

from tl_mdl import codec, description_length, feature_splitting, quantize, sweep  # noqa: E402
from tl_mdl.data import load_mnist  # noqa: E402
from tl_mdl.mdl import encode_all  # noqa: E402
from tl_mdl.metrics.shapes import feature_shapes  # noqa: E402

#: ``make demo``: a fixed budget of 600 steps per SAE (at F=256, k=12 on these 10,000 images
#: the held-out FVU after 600 steps is within 1.5% of its value after 1200 and 2400) and a
#: coarser k search, to stay within minutes on 2 cores; ``--full``: converged SAEs.
QUICK = {"widths": "32,64,128,256,512", "train_size": 10000, "test_size": 2000, "seeds": "0",
         "steps": 600, "rel": 0.25}
FULL = {"widths": "16,32,64,128,256,512,1024,2048", "train_size": 60000, "test_size": 10000,
        "seeds": "0,1,2", "steps": None, "rel": 0.15}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output folder (default out/mnist_mdl[_full])")
    p.add_argument("--mnist-path", default=None, help="folder with MNIST IDX files (optional)")
    p.add_argument("--full", action="store_true",
                   help=f"the full protocol: {FULL} (hours on 2 CPU cores)")
    p.add_argument("--widths", default=None, help=f"comma separated (default {QUICK['widths']})")
    p.add_argument("--levels", default="0.1,0.2,0.3", help="fidelity levels: FVU_q thresholds")
    p.add_argument("--seeds", default=None, help="comma separated (default 0; --full 0,1,2)")
    p.add_argument("--train-size", type=int, default=None,
                   help=f"use the first N train images (default {QUICK['train_size']})")
    p.add_argument("--test-size", type=int, default=None,
                   help=f"score on the first N test images (default {QUICK['test_size']})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"fixed training steps per SAE (default {QUICK['steps']}; with --full, "
                        "or 0: until converged by train_sae's rule)")
    p.add_argument("--epochs", type=int, default=None, help="fixed epochs per SAE (instead)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--aux-k", default=None,
                   help="AuxK dead-latent revival for the TopK SAEs: 'auto' (d_in // 2) or "
                        "an int (train_sae's aux_k; default off)")
    p.add_argument("--dead-steps", type=int, default=None,
                   help="with --aux-k: steps without firing after which a latent is dead "
                        "(train_sae's dead_steps; default 1000)")
    p.add_argument("--rel", type=float, default=None,
                   help="k search precision: stop when k_hi - k_lo <= max(1, rel * k_hi) "
                        f"(default {QUICK['rel']}; --full {FULL['rel']})")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="precision tolerance: allowed FVU increase from quantising latents")
    p.add_argument("--n-features", type=int, default=64,
                   help="shape measures over this many most used features per SAE")
    p.add_argument("--fvu-threshold", type=float, default=None,
                   help="(older option) a single level; same as --levels T")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these small GEMMs gain little from more, "
                        "and multi-threaded torch slows down badly on a busy machine; 0 = torch's "
                        "choice)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    base = FULL if a.full else QUICK
    a.widths = [int(w) for w in (a.widths or base["widths"]).split(",")]
    a.seeds = [int(s) for s in (a.seeds or base["seeds"]).split(",")]
    a.levels = sorted({float(t) for t in ([a.fvu_threshold] if a.fvu_threshold
                                          else a.levels.split(","))})
    a.train_size = a.train_size or base["train_size"]
    a.test_size = a.test_size or base["test_size"]
    a.out = Path(a.out or ("out/mnist_mdl_full" if a.full else "out/mnist_mdl"))
    a.rel = a.rel or base["rel"]
    if a.steps is None and a.epochs is None:
        a.steps = base["steps"]
    if a.aux_k not in (None, "auto"):
        a.aux_k = int(a.aux_k)
    if a.dead_steps is not None and a.aux_k is None:
        p.error("--dead-steps is a setting of --aux-k; pass --aux-k too")
    return a


def train_kwargs(args) -> dict:
    kw: dict = {"steps": args.steps} if args.steps else (
        {"epochs": args.epochs} if args.epochs else {})
    if args.aux_k is not None:
        kw["aux_k"] = args.aux_k
        if args.dead_steps is not None:
            kw["dead_steps"] = args.dead_steps
    return kw


def make_probe(args, train, test, width: int, seed: int, log: list[dict]):
    """``probe(k)``: train (or load) and score the TopK SAE of this width, k and seed."""
    def probe(k: int) -> dict:
        row = dict(sweep(train, widths=[width], sparsities=[k], objective="topk",
                         eval_activations=test, tolerance=args.tolerance, seed=seed,
                         out_dir=args.out / "saes" / f"seed{seed}", lr=args.lr,
                         progress=not args.no_progress, **train_kwargs(args))[0])
        row["k"], row["seed"] = k, seed
        row["alive"] = alive_latents(row["sae"], test, row["bin_width"])
        log.append(row)
        print(f"  seed {seed} F={width:<5} k={k:<4} DL {row['bits_per_input']:7.1f} bits  "
              f"FVU_q {row['fvu_quantized']:.3f}  alive {row['alive']}", flush=True)
        return row
    return probe


def alive_latents(sae, images: torch.Tensor, bin_width: float) -> int:
    """Latents active on any of ``images`` in the SAE's code at ``bin_width`` (``q != 0``,
    as the DL counts them): the width the code actually uses. Dead latents cost no bits,
    so a DL curve can only rise with the width through the latents that stay alive."""
    q = quantize(encode_all(sae, images), bin_width)
    return int((q != 0).any(0).sum())


def level_rows(args, train, test) -> tuple[list[dict], list[dict]]:
    """Every trained SAE, and per (seed, level, width) the bracket and DL at the level."""
    trained, table = [], []
    for seed in args.seeds:
        guesses: dict[float, int] = {}
        for width in args.widths:
            res = search_k(make_probe(args, train, test, width, seed, trained), width,
                           args.levels, guesses=dict(guesses), rel=args.rel)
            for t, (lo, hi) in res.items():
                if hi is not None:
                    guesses[t] = hi["k"]
                table.append({
                    "seed": seed, "level": t, "width": width,
                    "k_lo": lo["k"] if lo else "", "k_hi": hi["k"] if hi else "",
                    "dl_at_level": dl_at_level(lo, hi, t),
                    "bits_k_hi": hi["bits_per_input"] if hi else math.nan,
                    "fvu_q_k_hi": hi["fvu_quantized"] if hi else math.nan,
                    "l0_k_hi": hi["l0"] if hi else math.nan,
                    "alive_k_hi": hi["alive"] if hi else math.nan,
                    "raw_bits": (hi or lo)["raw_bits"], "_sae": hi["sae"] if hi else None,
                })
    return trained, table


def mean_sd(v: list[float]) -> tuple[float, float]:
    v = [x for x in v if not math.isnan(x)]
    if not v:
        return math.nan, math.nan
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def curves(args, table: list[dict]) -> dict[float, list[dict]]:
    """Per level: per width, the DL at the level (mean ± sd over seeds)."""
    out = {}
    for t in args.levels:
        pts = []
        for w in args.widths:
            m, s = mean_sd([r["dl_at_level"] for r in table if r["level"] == t and r["width"] == w])
            pts.append({"width": w, "dl": m, "sd": s})
        out[t] = pts
    return out


def pick_three(args, table: list[dict], curve: list[dict], t: float) -> dict[str, dict]:
    """Narrow (smallest width meeting the level), MDL-optimal (min mean DL) and wide (largest
    width) SAEs at level ``t``, from the first seed."""
    ok = [p for p in curve if not math.isnan(p["dl"])]
    opt = min(ok, key=lambda p: p["dl"])["width"]
    rows = {r["width"]: r for r in table if r["level"] == t and r["seed"] == args.seeds[0]}
    return {"narrow": rows[ok[0]["width"]], "optimal": rows[opt], "wide": rows[ok[-1]["width"]]}


def splitting_rows(args, table: list[dict], cv: dict[float, list[dict]]) -> list[dict]:
    """Per level: the MDL-selected width against the width a sparsity-first choice takes
    (the fewest active latents per input meeting the level), and how the MDL SAE's features
    split in the sparsity-first SAE (:func:`tl_mdl.feature_splitting`, cosine ≥ 0.5)."""
    out = []
    for t, pts in cv.items():
        rows = [r for r in table if r["level"] == t and r["seed"] == args.seeds[0]
                and r["_sae"] is not None]
        if not rows:
            continue
        opt_w = min((p for p in pts if not math.isnan(p["dl"])), key=lambda p: p["dl"])["width"]
        mdl = next(r for r in rows if r["width"] == opt_w)
        sparse = min(rows, key=lambda r: (r["l0_k_hi"], r["width"]))
        row = {"level": t, "mdl_width": mdl["width"], "mdl_l0": mdl["l0_k_hi"],
               "mdl_dl": mdl["dl_at_level"], "sparse_width": sparse["width"],
               "sparse_l0": sparse["l0_k_hi"], "sparse_dl": sparse["dl_at_level"]}
        if sparse["width"] != mdl["width"]:
            narrow, wide = sorted((mdl, sparse), key=lambda r: r["width"])
            s = feature_splitting(narrow["_sae"], wide["_sae"], threshold=0.5).summary()
            row |= {k: s[k] for k in ("wide_best_cos_mean", "frac_split", "frac_vanished",
                                      "wide_n_split_mean")}
        out.append(row)
    return out


def plot_curves(args, cv: dict[float, list[dict]], raw_bits: float, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for t, pts in cv.items():
        w = [p["width"] for p in pts]
        line = ax.errorbar(w, [p["dl"] for p in pts], yerr=[p["sd"] for p in pts], marker="o",
                           ms=4, capsize=2, label=f"FVU_q ≤ {t:g}")
        ok = [p for p in pts if not math.isnan(p["dl"])]
        best = min(ok, key=lambda p: p["dl"])
        ax.plot(best["width"], best["dl"], "*", ms=14, c=line[0].get_color(), mec="k")
    ax.axhline(raw_bits, ls=":", c="k", label=f"raw pixels at FVU ≤ {args.tolerance:g} "
                                               f"({raw_bits:.0f} bits)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("dictionary width F")
    ax.set_ylabel("description length at the level (bits / image)")
    seeds = f"{len(args.seeds)} seeds, mean ± sd" if len(args.seeds) > 1 else "1 seed"
    ax.set_title(f"MNIST: DL vs SAE width (TopK, k searched per width; {seeds}; ★ optimum)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def top_features(sae, images: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder rows of the ``n`` most frequently active features, and their frequencies."""
    with torch.no_grad():
        freq = (encode_all(sae, images) != 0).double().mean(0)
    order = freq.argsort(descending=True)[: min(n, sae.cfg.d_sae)]
    return sae.W_dec.detach()[order], freq[order]


def plot_features(panels: list[tuple[str, dict]], images, path: Path, n: int = 16) -> None:
    """One row of panels per level, narrow / optimal / wide across; each panel a 4×4 grid
    of the most used features."""
    levels = sorted({p[1]["level"] for p in panels})
    fig = plt.figure(figsize=(10.5, 3.6 * len(levels)))
    sub = fig.subfigures(len(levels), 3, squeeze=False)
    for (name, r), sf in zip(panels, sub.flat, strict=True):
        rows, _ = top_features(r["_sae"], images, n)
        axes = sf.subplots(4, 4)
        for ax in axes.flat:
            ax.axis("off")
        for ax, w in zip(axes.flat, rows, strict=False):
            lim = float(w.abs().max()) or 1.0
            ax.imshow(w.reshape(28, 28), cmap="RdBu_r", vmin=-lim, vmax=lim)
        s = r["shapes"]
        sf.suptitle(f"FVU_q≤{r['level']:g} {name}: F={r['width']}, k={r['k_hi']}, "
                    f"{r['dl_at_level']:.0f} bits\nmemo {s['median_memorisation']:.2f}, area "
                    f"{s['median_area']:.0f}, elong {s['median_elongation']:.1f}, "
                    f"{s['majority']} {100 * s['frac_' + s['majority']]:.0f}%", fontsize=8)
    fig.savefig(path, dpi=60)
    plt.close(fig)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        cols = [k for k in rows[0]
                if not k.startswith("_") and k not in ("sae", "settings", "grid_index")]
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = load_mnist("train", args.mnist_path)[0][: args.train_size]
    test = load_mnist("test", args.mnist_path)[0][: args.test_size]
    print(f"MNIST: {len(train)} train / {len(test)} test images; TopK SAEs, widths "
          f"{args.widths}, levels FVU_q ≤ {args.levels}, seeds {args.seeds}; training: "
          f"{train_kwargs(args) or 'converged (train_sae default)'}")

    trained, table = level_rows(args, train, test)
    write_csv(args.out / "searched.csv", trained)
    write_csv(args.out / "dl_vs_width.csv", table)
    cv = curves(args, table)
    raw_bits = float(trained[0]["raw_bits"])
    plot_curves(args, cv, raw_bits, args.out / "dl_vs_width.png")

    memo_images = train[:10000]
    panels, shape_rows = [], []
    for t in args.levels:
        if all(math.isnan(p["dl"]) for p in cv[t]):
            print(f"no width reached FVU_q <= {t}; skipping its features")
            continue
        for name, r in pick_three(args, table, cv[t], t).items():
            rows, _ = top_features(r["_sae"], test, args.n_features)
            r["shapes"] = feature_shapes(rows, memo_images).summary()
            panels.append((name, r))
            shape_rows.append({"level": t, "which": name, "width": r["width"], "k": r["k_hi"],
                               "dl_at_level": r["dl_at_level"]} | r["shapes"])
    write_csv(args.out / "shapes.csv", shape_rows)
    split = splitting_rows(args, table, cv)
    if split:
        write_csv(args.out / "splitting.csv", split)
    plot_features(panels, test, args.out / "features.png")

    # keep the DL honest: code the loosest level's optimal SAE's test latents for real
    opt = next(r for name, r in panels if name == "optimal")
    rep = description_length(opt["_sae"], test, tolerance=args.tolerance)
    q = quantize(encode_all(opt["_sae"], test), rep.bin_width)
    data = codec.encode(q)
    assert torch.equal(codec.decode(data), q), "codec round trip failed"
    payload = codec.inspect(data).payload_bits_per_input

    summary = {
        "levels": args.levels, "widths": args.widths, "seeds": args.seeds,
        "train_size": len(train), "test_size": len(test), "training": train_kwargs(args)
        or "train_sae default (converged)", "precision_tolerance": args.tolerance,
        "curves": {str(t): pts for t, pts in cv.items()},
        "shapes": shape_rows, "splitting": split, "raw_bits_per_image": raw_bits,
        "codec_check": {"level": opt["level"], "width": opt["width"], "k": opt["k_hi"],
                        "dl": rep.bits_per_input, "codec_payload_bits": payload},
        "n_saes_trained": len(trained), "seconds": time.perf_counter() - t0,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))

    print("\nDL (bits/image) at each level vs width" + (" (mean ± sd over seeds)"
                                                         if len(args.seeds) > 1 else ""))
    print("width " + "".join(f"  FVU_q≤{t:<12g}" for t in args.levels))
    for i, w in enumerate(args.widths):
        cells = [cv[t][i] for t in args.levels]
        print(f"{w:>5} " + "".join(f"  {c['dl']:7.1f} ± {c['sd']:<5.1f}  " for c in cells))
    print("\nlevel  SAE      F     k    DL    memorisation  area  elongation  majority label")
    for s in shape_rows:
        print(f"{s['level']:<5g}  {s['which']:<8} {s['width']:<5} {s['k']:<4} "
              f"{s['dl_at_level']:5.0f}  {s['median_memorisation']:12.2f}  "
              f"{s['median_area']:4.0f}  {s['median_elongation']:10.1f}  {s['majority']} "
              f"({100 * s['frac_' + s['majority']]:.0f}%)")
    for r in split:
        msg = (f"FVU_q≤{r['level']:g}: MDL selects F={r['mdl_width']} (L0 {r['mdl_l0']:.1f}, "
               f"{r['mdl_dl']:.0f} bits); sparsity-first F={r['sparse_width']} (L0 "
               f"{r['sparse_l0']:.1f}, {r['sparse_dl']:.0f} bits)")
        if "frac_split" in r:
            msg += (f"; the narrower one's features split in the wider one: "
                    f"{100 * r['frac_split']:.0f}% into >=2 (mean {r['wide_n_split_mean']:.2f}), "
                    f"{100 * r['frac_vanished']:.0f}% vanish, best cosine "
                    f"{r['wide_best_cos_mean']:.2f}")
        print(msg)
    print(f"\nraw pixels at the same tolerance: {raw_bits:.0f} bits/image; codec payload of the "
          f"FVU_q≤{opt['level']:g} optimum: {payload:.1f} bits/image (DL {rep.bits_per_input:.1f})")
    print(f"wrote {args.out}/ ({len(trained)} SAEs) in {summary['seconds']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
