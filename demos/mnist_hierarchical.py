"""Hierarchical MDL-SAEs on MNIST against the flat frontiers, at equal fidelity.

A hierarchical SAE has parent features, each with a group of children that are active only
where the parent is; a child's presence then costs ``p_a · H_b(p_{c|a})`` bits instead of
``H_b(p_c)``. The question is whether that buys a shorter description than the best flat
SAE *at the same quantised FVU*. This demo:

* traces the flat TopK frontier: for each width, TopK's ``k`` is searched to meet each
  fidelity level (:mod:`_fidelity`; the SAEs are shared with ``mnist_mdl.py``'s cache when
  the settings match) and the Pareto set of DL vs FVU_q over all of them is the frontier,
  ``log DL`` interpolated linearly in FVU_q between its points;
* trains flat SAEs with the MDL objective (straight-through code length, JumpReLU) and
  hierarchical SAEs with its conditional version (a child's presence coded given its
  parent: :mod:`tl_mdl.training.conditional_code`), each at a fidelity target
  (``target_fvu``: the multiplier λ is adapted so the held-out quantised FVU meets the
  level), with the same training budget;
* compares each with the TopK frontier at *its own* FVU_q (ratio < 1: shorter than TopK),
  and measures what the hierarchy buys: parents' L0 and density (the fraction of parents
  active on more than 90% of test images), and the bits the conditional code saves over
  coding the same latents flat.

Writes to ``out/mnist_hierarchical/``: ``frontier.csv`` (every MDL / hierarchical SAE: its
DL, FVU_q and the TopK frontier's DL there), ``topk.csv`` (every TopK SAE), ``frontier.png``,
``parents_children.png`` / ``children_residuals.png`` (the best hierarchical SAE's top
parents with their children), ``summary.json``, and the SAEs (a rerun resumes).

Run: ``python demos/mnist_hierarchical.py [--steps N] [--seeds 0,1,2]`` (``--help``).
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
from _fidelity import search_k  # noqa: E402

from tl_mdl import (  # noqa: E402
    HierarchicalSAE,
    hierarchical_dl_report,
    quantize,
    sweep,
    sweep_hierarchical,
)
from tl_mdl.codec import hierarchical as hcodec  # noqa: E402
from tl_mdl.data import load_mnist  # noqa: E402
from tl_mdl.mdl import encode_all, frontier_bits_at, pareto_frontier  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/mnist_hierarchical", help="output folder")
    p.add_argument("--topk-cache", default="out/mnist_mdl/saes",
                   help="where the TopK SAEs live (shared with mnist_mdl.py)")
    p.add_argument("--mnist-path", default=None, help="folder with MNIST IDX files (optional)")
    p.add_argument("--levels", default="0.2,0.3", help="fidelity targets (FVU_q)")
    p.add_argument("--topk-widths", default="32,64,128,256,512")
    p.add_argument("--mdl-widths", default="64,128,256", help="flat MDL SAEs")
    p.add_argument("--parents", default="16,32,64")
    p.add_argument("--children", default="4")
    p.add_argument("--child-topk", type=int, default=1,
                   help="at most this many children active per parent (0 = no limit)")
    p.add_argument("--sparsity", type=float, default=1e-3, help="starting λ of the MDL objectives")
    p.add_argument("--steps", type=int, default=None,
                   help="fixed training steps for every SAE (default: train_sae's convergence "
                        "rule)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--straight-through", choices=["jump", "threshold"], default=None,
                   help="both MDL objectives' JumpReLU estimator (default: each objective's "
                        "own: 'jump' for the flat, 'threshold' for the hierarchical)")
    p.add_argument("--warm-start", choices=["batch_topk", "topk"], default=None,
                   help="both MDL objectives' warm start code (default: each objective's "
                        "own: 'batch_topk' for the flat, 'topk' for the hierarchical)")
    p.add_argument("--rel", type=float, default=0.15, help="TopK k search precision")
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="precision tolerance: allowed FVU increase from quantising latents")
    p.add_argument("--train-size", type=int, default=10000, help="use the first N train images")
    p.add_argument("--test-size", type=int, default=2000, help="score on the first N test images")
    p.add_argument("--seeds", default="0")
    p.add_argument("--topk-seed", type=int, default=None,
                   help="compare every seed with this seed's TopK frontier (default: its own)")
    p.add_argument("--n-show", type=int, default=6, help="parents shown in the image grid")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (small GEMMs run fastest on one, esp. on a busy machine)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    a.levels = sorted(float(t) for t in a.levels.split(","))
    a.seeds = [int(s) for s in a.seeds.split(",")]
    return a


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",")]


def _img(ax, v: torch.Tensor, title: str) -> None:
    img = v.detach().double().reshape(28, 28)
    lim = float(img.abs().max()) or 1.0
    ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


@torch.no_grad()
def plot_hierarchy(hsae, images: torch.Tensor, out: Path, n_show: int) -> list[dict]:
    """Top parents (by frequency), each with its children. Returns one row per child."""
    p, c = hsae.cfg.n_parents, hsae.cfg.children_per_parent
    f = encode_all(hsae, images)
    on = f != 0
    freq = on.double().mean(0)
    parents = freq[:p].argsort(descending=True)[:n_show].tolist()
    w = hsae.W_dec.detach().double()
    rows = []
    figs = {
        "parents_children.png": "parent | children (parent + child, mean contribution)",
        "children_residuals.png": "parent | children (the child's own decoder row)",
    }
    for name, title in figs.items():
        fig, axes = plt.subplots(len(parents), 1 + c, figsize=(1.35 * (1 + c), 1.45 * len(parents)),
                                 squeeze=False)
        for r, a in enumerate(parents):
            _img(axes[r, 0], w[a], f"parent {a}\np={100 * float(freq[a]):.1f}%")
            for j, ch in enumerate(hsae.children_of(a)):
                act = on[:, ch]
                cond = float(act.double().sum() / on[:, a].double().sum().clamp_min(1))
                if name == "parents_children.png":
                    if act.any():
                        v = f[act, a].double().mean() * w[a] + f[act, ch].double().mean() * w[ch]
                    else:
                        v = w[a] + w[ch]
                else:
                    v = w[ch]
                _img(axes[r, 1 + j], v, f"child {ch}\np(c|a)={100 * cond:.0f}%")
                if name == "parents_children.png":
                    rows.append({"parent": a, "child": ch, "p_parent": float(freq[a]),
                                 "p_child_given_parent": cond})
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def topk_rows(args, train, test, seed: int, common: dict) -> list[dict]:
    """Every TopK SAE of the k searches (one per width, all levels)."""
    rows: list[dict] = []

    def probe_for(width):
        def probe(k):
            r = dict(sweep(train, widths=[width], sparsities=[k], objective="topk",
                           out_dir=Path(args.topk_cache) / f"seed{seed}", seed=seed,
                           **common)[0])
            r |= {"kind": "topk", "shape": f"F={width}", "k": k, "seed": seed}
            rows.append(r)
            return r
        return probe

    for w in _ints(args.topk_widths):
        search_k(probe_for(w), w, args.levels, rel=args.rel)
    return rows


@torch.no_grad()
def hierarchy_use(row: dict, test: torch.Tensor) -> dict:
    """What a hierarchical SAE's parents do on the test images, at its scored precision:
    the fraction of parents active on more than 90% of images, and the bits per image the
    conditional code saves over the flat code of the same latents."""
    sae = row["sae"] if row.get("sae") is not None else HierarchicalSAE.load(row["path"])
    q = quantize(encode_all(sae, test), row["bin_width"])
    p_parent = (q[:, : sae.cfg.n_parents] != 0).double().mean(0)
    return {"dense_parents": float((p_parent > 0.9).double().mean()),
            "saved_bits": row["flat_bits_per_input"] - row["bits_per_input"]}


def mdl_rows(args, train, seed: int, common: dict) -> list[dict]:
    """Flat MDL SAEs and hierarchical SAEs (conditional MDL), each at every target."""
    out = args.out_path
    common = common | {k: v for k, v in (("straight_through", args.straight_through),
                                         ("warm_start", args.warm_start)) if v is not None}
    rows = [dict(r) | {"kind": "mdl", "shape": f"F={r['width']}"} for r in sweep(
        train, widths=_ints(args.mdl_widths), sparsities=[args.sparsity], objective="mdl",
        target_fvus=args.levels, out_dir=out / "saes_flat" / f"seed{seed}", seed=seed,
        **common)]
    for t in args.levels:
        hier = sweep_hierarchical(
            train, parents=_ints(args.parents), children=_ints(args.children),
            sparsities=[args.sparsity], child_topk=args.child_topk or None, target_fvu=t,
            out_dir=out / "saes_hier" / f"seed{seed}_t{t:g}", seed=seed, **common)
        rows += [dict(r) | {"kind": "hierarchical", "target_fvu": t,
                            "shape": f"{r['n_parents']}x{r['children_per_parent']}",
                            **hierarchy_use(r, args.test)}
                 for r in hier]
    for r in rows:
        r["seed"] = seed
    return rows


def plot_frontier(topk: list[dict], front: list[dict], others: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    ax.scatter([r["fvu_quantized"] for r in topk], [r["bits_per_input"] for r in topk], s=8,
               c="lightgray", label="TopK SAEs (k searched per width)")
    ax.plot([r["fvu_quantized"] for r in front], [r["bits_per_input"] for r in front], "-",
            c="k", lw=1.2, label="TopK frontier")
    for kind, m, c in (("mdl", "o", "tab:blue"), ("hierarchical", "*", "tab:red")):
        rs = [r for r in others if r["kind"] == kind]
        ax.scatter([r["fvu_quantized"] for r in rs], [r["bits_per_input"] for r in rs],
                   marker=m, s=60 if m == "*" else 25, c=c, label=f"{kind} MDL (target_fvu)",
                   zorder=3)
    ax.set_yscale("log")
    ax.set_xlabel("quantised FVU (test images)")
    ax.set_ylabel("description length (bits / image)")
    ax.set_title("MNIST: MDL and hierarchical SAEs against the TopK frontier", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out_path = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train = load_mnist("train", args.mnist_path)[0][: args.train_size]
    test = args.test = load_mnist("test", args.mnist_path)[0][: args.test_size]
    budget = {"steps": args.steps} if args.steps else {}
    common = dict(eval_activations=test, tolerance=args.tolerance, lr=args.lr,
                  progress=not args.no_progress, **budget)
    print(f"MNIST: {len(train)} train / {len(test)} test images; levels {args.levels}; "
          f"training {budget or 'until converged'} for every SAE")

    topk, others, fronts = [], [], {}
    for seed in args.seeds:
        ts = seed if args.topk_seed is None else args.topk_seed
        if ts not in fronts:
            tk = topk_rows(args, train, test, ts, common)
            fronts[ts] = pareto_frontier(tk)
            topk += tk
        front = fronts[ts]
        for r in mdl_rows(args, train, seed, common):
            at = frontier_bits_at(front, r["fvu_quantized"])
            r["topk_frontier_bits"] = math.nan if at is None else at
            r["ratio_to_topk"] = r["bits_per_input"] / r["topk_frontier_bits"]
            others.append(r)
    cols = ["seed", "kind", "shape", "target_fvu", "sparsity", "bits_per_input", "fvu_quantized",
            "l0", "topk_frontier_bits", "ratio_to_topk", "flat_bits_per_input", "l0_parents",
            "dense_parents", "saved_bits"]
    _write_csv(out / "frontier.csv", [{k: r.get(k, "") for k in cols} for r in others])
    _write_csv(out / "topk.csv", [{k: r.get(k, "") for k in ("seed", "shape", "k",
                                  "bits_per_input", "fvu_quantized", "l0")} for r in topk])
    plot_frontier(topk, next(iter(fronts.values())), others, out / "frontier.png")

    # per kind, shape and target: ratio to the TopK frontier (mean ± sd over seeds)
    groups: dict[tuple, list[dict]] = {}
    for r in others:
        groups.setdefault((r["kind"], r["shape"], r.get("target_fvu")), []).append(r)
    summary_rows = []
    for (kind, shape, t), rs in sorted(groups.items(), key=lambda g: (g[0][2], g[0][0], g[0][1])):
        ratios = [r["ratio_to_topk"] for r in rs if not math.isnan(r["ratio_to_topk"])]
        summary_rows.append({
            "kind": kind, "shape": shape, "target_fvu": t, "n_seeds": len(rs),
            "fvu_q_mean": statistics.fmean(r["fvu_quantized"] for r in rs),
            "bits_mean": statistics.fmean(r["bits_per_input"] for r in rs),
            "ratio_mean": statistics.fmean(ratios) if ratios else math.nan,
            "ratio_sd": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
            "fvu_q_sd": statistics.stdev(r["fvu_quantized"] for r in rs) if len(rs) > 1 else 0.0,
            "bits_sd": statistics.stdev(r["bits_per_input"] for r in rs) if len(rs) > 1 else 0.0,
            "l0_mean": statistics.fmean(r["l0"] for r in rs),
            **({"l0_parents_mean": statistics.fmean(r["l0_parents"] for r in rs),
                "dense_parents_mean": statistics.fmean(r["dense_parents"] for r in rs),
                "saved_bits_mean": statistics.fmean(r["saved_bits"] for r in rs)}
               if kind == "hierarchical" else {}),
        })

    # the best hierarchical SAE (lowest ratio), its parents and children, its codec check
    hier = [r for r in others if r["kind"] == "hierarchical" and r["seed"] == args.seeds[0]
            and not math.isnan(r["ratio_to_topk"])]
    best = min(hier, key=lambda r: r["ratio_to_topk"]) if hier else None
    child_rows, payload = [], None
    if best is not None:
        hsae = best["sae"]
        child_rows = plot_hierarchy(hsae, test, out, args.n_show)
        rep = hierarchical_dl_report(hsae, test, tolerance=args.tolerance, raw_cost=False)
        hq = quantize(encode_all(hsae, test), rep.bin_width)
        data = hcodec.encode(hq, hsae.parent_index)
        assert torch.equal(hcodec.decode(data)[0], hq), "hierarchical codec round trip failed"
        payload = hcodec.inspect(data).payload_bits_per_input

    summary = {
        "levels": args.levels, "seeds": args.seeds, "training": budget or "until converged",
        "precision_tolerance": args.tolerance, "comparison": summary_rows,
        "best_hierarchical": None if best is None else {
            k: best[k] for k in ("shape", "target_fvu", "bits_per_input", "fvu_quantized",
                                 "topk_frontier_bits", "ratio_to_topk")
        } | {"codec_payload_bits": payload},
        "children": child_rows, "seconds": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))

    print("\nkind          shape   target  FVU_q           DL bits        TopK there  ratio"
          "            L0     (mean ± sd over seeds; hierarchical: parents' L0, dense "
          "parents, bits saved by the conditional code)")
    for g in summary_rows:
        front_bits = g["bits_mean"] / g["ratio_mean"] if g["ratio_mean"] else math.nan
        extra = (f"  parents L0 {g['l0_parents_mean']:.1f}, dense "
                 f"{100 * g['dense_parents_mean']:.0f}%, saved {g['saved_bits_mean']:.1f} bits"
                 if g["kind"] == "hierarchical" else "")
        print(f"{g['kind']:<13} {g['shape']:<7} {g['target_fvu']:<6g}  "
              f"{g['fvu_q_mean']:.3f} ± {g['fvu_q_sd']:.3f}  {g['bits_mean']:6.1f} ± "
              f"{g['bits_sd']:4.1f}  {front_bits:8.1f}  {g['ratio_mean']:.3f} ± "
              f"{g['ratio_sd']:.3f}  {g['l0_mean']:5.1f}{extra}")
    if best is not None:
        verdict = "on or below" if best["ratio_to_topk"] <= 1 else "ABOVE"
        print(f"\nbest hierarchical: {best['shape']} at target {best['target_fvu']:g}: "
              f"{best['bits_per_input']:.1f} bits/image at FVU_q {best['fvu_quantized']:.3f}, "
              f"{verdict} the TopK frontier ({best['topk_frontier_bits']:.1f} bits there, ratio "
              f"{best['ratio_to_topk']:.3f}); codec payload {payload:.1f} bits/image")
    print(f"wrote {out}/ in {summary['seconds']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
