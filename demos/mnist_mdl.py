"""MDL-SAEs on MNIST (Ayonrinde, Pearce & Sharkey 2024, "Interpretability as Compression").

Treat the 784 pixels of each digit as the activations; train SAEs over a grid of widths
and sparsities; score each by its description length (bits per image) at one precision
tolerance; and pick, per width and overall, the shortest description among SAEs whose
quantised reconstruction meets an FVU threshold. The DL-vs-width curve is U-shaped:
narrow dictionaries need many active features per digit, wide ones pay log2(F) bits per
feature and memorise. Writes to ``out/mnist_mdl/``:

* ``sweep.csv`` (one row per SAE), ``dl_vs_width.csv`` (best SAE per width),
  ``summary.json``;
* ``dl_vs_width.png``; ``features_optimal.png``, ``features_narrow.png``,
  ``features_wide.png`` (decoder directions as 28×28 images);
* ``saes/`` every trained SAE (a rerun resumes from them).

Run: ``make demo`` or ``python demos/mnist_mdl.py [--mnist-path DIR_WITH_IDX_FILES]``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from tl_mdl import SAE, codec, description_length, quantize, sweep  # noqa: E402
from tl_mdl.data import load_mnist  # noqa: E402
from tl_mdl.mdl import encode_all  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/mnist_mdl", help="output folder")
    p.add_argument("--mnist-path", default=None, help="folder with MNIST IDX files (optional)")
    p.add_argument("--objective", default="topk", choices=["topk", "mdl", "l1"])
    p.add_argument("--widths", default="32,64,128,256,512,1024")
    p.add_argument("--sparsities", default=None,
                   help="k values for topk, λ for mdl/l1 (comma separated)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="precision tolerance: allowed FVU increase from quantising latents")
    p.add_argument("--fvu-threshold", type=float, default=0.3,
                   help="selection: quantised reconstruction must have FVU <= this")
    p.add_argument("--train-size", type=int, default=None, help="use the first N train images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these small GEMMs gain little from more, "
                        "and multi-threaded torch slows down badly on a busy machine; 0 = torch's "
                        "choice)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


DEFAULT_SPARSITIES = {"topk": "6,8,12,16,32", "mdl": "3e-4,1e-3,3e-3,1e-2", "l1": "0.03,0.1,0.3"}


def best_per_width(rows: list[dict], threshold: float) -> list[dict]:
    """Per width, the minimum-DL row meeting the FVU threshold (widths with none skipped)."""
    out = []
    for w in sorted({r["width"] for r in rows}):
        ok = [r for r in rows if r["width"] == w and r["fvu_quantized"] <= threshold]
        if ok:
            out.append(min(ok, key=lambda r: r["bits_per_input"]))
    return out


def plot_features(sae: SAE, images: torch.Tensor, path: Path, title: str, n: int = 64) -> None:
    """Decoder directions of the most frequently active features as 28×28 images."""
    with torch.no_grad():
        freq = (encode_all(sae, images) != 0).float().mean(0)
    order = freq.argsort(descending=True)[: min(n, sae.cfg.d_sae)]
    cols = min(8, len(order))
    rows = math.ceil(len(order) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, order.tolist(), strict=False):
        img = sae.W_dec[i].detach().reshape(28, 28)
        lim = float(img.abs().max()) or 1.0
        ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"{100 * float(freq[i]):.1f}%", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(rows: list[dict], best: list[dict], raw_bits: float, threshold: float,
               path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([r["width"] for r in rows], [r["bits_per_input"] for r in rows],
               s=12, c=["tab:gray" if r["fvu_quantized"] > threshold else "tab:blue" for r in rows],
               alpha=0.6, label="all SAEs (grey: FVU above threshold)")
    ax.plot([r["width"] for r in best], [r["bits_per_input"] for r in best], "o-", c="tab:red",
            label=f"min DL with FVU ≤ {threshold:g}")
    ax.plot([r["width"] for r in best], [r["naive_bits"] for r in best], "--", c="tab:orange",
            label="naive L0·(B + log2 F)")
    ax.axhline(raw_bits, ls=":", c="k", label=f"raw pixels ({raw_bits:.0f} bits)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("dictionary width F")
    ax.set_ylabel("description length (bits / image)")
    ax.set_title("MNIST: description length vs SAE width")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, _ = load_mnist("train", args.mnist_path)
    test, _ = load_mnist("test", args.mnist_path)
    if args.train_size:
        train = train[: args.train_size]
        test = test[: max(args.train_size // 6, 100)]
    widths = [int(w) for w in args.widths.split(",")]
    spec = args.sparsities or DEFAULT_SPARSITIES[args.objective]
    sparsities = [float(s) for s in spec.split(",")]
    print(f"MNIST: {train.shape[0]} train / {test.shape[0]} test images, 784 pixels; "
          f"{args.objective} SAEs, widths {widths}, sparsities {sparsities}")

    table = sweep(train, widths=widths, sparsities=sparsities, objective=args.objective,
                  eval_activations=test, tolerance=args.tolerance, out_dir=out / "saes",
                  progress=not args.no_progress, seed=args.seed, epochs=args.epochs, lr=args.lr)
    table.to_csv(out / "sweep.csv")
    rows = list(table)
    best = best_per_width(rows, args.fvu_threshold)
    if not best:
        raise SystemExit(f"no SAE reached FVU <= {args.fvu_threshold}; train longer or wider")
    with open(out / "dl_vs_width.csv", "w", newline="") as fh:
        cols = ["width", "sparsity", "bits_per_input", "bin_width", "l0", "fvu", "fvu_quantized",
                "naive_bits", "raw_bits"]
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(best)

    optimal = table.select(args.fvu_threshold)
    narrow, wide = best[0], best[-1]
    raw_bits = float(optimal["raw_bits"])
    plot_curve(rows, best, raw_bits, args.fvu_threshold, out / "dl_vs_width.png")
    for name, row in (("optimal", optimal), ("narrow", narrow), ("wide", wide)):
        plot_features(row["sae"], test, out / f"features_{name}.png",
                      f"{name}: F={row['width']}, L0={row['l0']:.1f}, "
                      f"{row['bits_per_input']:.0f} bits/image")

    # Keep the DL honest: code the optimal SAE's test latents for real.
    sae = optimal["sae"]
    rep = description_length(sae, test, tolerance=args.tolerance)
    q = quantize(encode_all(sae, test), rep.bin_width)
    data = codec.encode(q)
    stats = codec.inspect(data)
    assert torch.equal(codec.decode(data), q), "codec round trip failed"

    summary = {
        "objective": args.objective,
        "fvu_threshold": args.fvu_threshold,
        "precision_tolerance": args.tolerance,
        "optimal": {k: optimal[k] for k in ("width", "sparsity", "bits_per_input", "l0",
                                            "fvu_quantized", "bin_width")},
        "too_narrow": {k: narrow[k] for k in ("width", "sparsity", "bits_per_input", "l0")},
        "too_wide": {k: wide[k] for k in ("width", "sparsity", "bits_per_input", "l0")},
        "raw_bits_per_image": raw_bits,
        "codec_payload_bits_per_image": stats.payload_bits_per_input,
        "codec_header_bits": stats.header_bits,
        "seconds": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\nwidth  best DL (bits/image)  L0     FVU_q")
    for r in best:
        mark = "  <- MDL-optimal" if r is optimal or r["width"] == optimal["width"] and \
            r["sparsity"] == optimal["sparsity"] else ""
        print(f"{r['width']:>5}  {r['bits_per_input']:>10.1f}          {r['l0']:>5.1f}  "
              f"{r['fvu_quantized']:.3f}{mark}")
    print(f"\nraw pixels at the same tolerance: {raw_bits:.0f} bits/image; "
          f"MDL-optimal SAE: {optimal['bits_per_input']:.1f} bits/image "
          f"(codec payload {stats.payload_bits_per_input:.1f}, header {stats.header_bits} bits)")
    print(f"wrote {out}/ (dl_vs_width.png, features_*.png, sweep.csv, dl_vs_width.csv) "
          f"in {summary['seconds']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
