"""The study's figures: DL vs width per hook, the truncation curve, interaction spectra and
the training curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from lm_study.stages import read_csv  # noqa: E402


def plot_dl(all_rows: dict[str, list], best: dict[str, dict], threshold: float, path: Path):
    keys = list(all_rows)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        rows = all_rows[key]
        for k in sorted({int(r["sparsity"]) for r in rows}):
            rk = sorted((r for r in rows if int(r["sparsity"]) == k), key=lambda r: r["width"])
            ax.plot([r["width"] for r in rk], [r["bits_per_input"] for r in rk], "o-", ms=4,
                    label=f"k={k}")
            bad = [r for r in rk if r["fvu_quantized"] > threshold]
            ax.scatter([r["width"] for r in bad], [r["bits_per_input"] for r in bad],
                       facecolors="none", edgecolors="k", s=60, lw=0.8)
        b = best[key]
        ax.scatter([b["width"]], [b["bits_per_input"]], marker="*", s=220, c="tab:red",
                   zorder=5, label="MDL-optimal")
        ax.axhline(float(b["raw_bits"]), ls=":", c="k", label=f"raw ({b['raw_bits']:.0f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("SAE width F")
        ax.set_ylabel("DL (bits / token)")
        ax.set_title(key, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"description length vs width (circled: FVU_q > {threshold:g})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_truncation(info: dict, path: Path, layer: int) -> None:
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    ks = [max(k, 0.5) for k in info["ks"]]
    ax.plot(ks, info["loss"], "o-", label=f"blocks.{layer}.mlp truncated to top-k")
    ax.axhline(info["base_loss"], ls="--", c="k", label=f"full model ({info['base_loss']:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("eigenvectors kept per output direction (k; 0 plotted at ½)")
    ax.set_ylabel("held-out loss (nats / token)")
    ax.set_title("truncation curve (output dirs: top singular vectors)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectra(eig, sel, Q: torch.Tensor, m: int, path: Path) -> None:
    n = len(sel)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.6), squeeze=False)
    for r, ax in enumerate(axes[0]):
        vals = torch.linalg.eigvalsh(Q[r, :m, :m])
        vals = vals[vals.abs().argsort(descending=True)][:30]
        ax.bar(range(len(vals)), vals.tolist(),
               color=["tab:blue" if v > 0 else "tab:red" for v in vals.tolist()])
        ax.set_title(f"out feature {int(sel[r])}", fontsize=8)
        ax.set_xlabel("eigen index (by |λ|)", fontsize=7)
    fig.suptitle("interaction-matrix spectra in the MLP-in SAE basis", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if (out / "lm_train_log.csv").is_file():
        rows = read_csv(out / "lm_train_log.csv")
        axes[0].plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], lw=0.8,
                     label="train batch")
        ho = [r for r in rows if r.get("held_out")]
        axes[0].plot([int(r["step"]) for r in ho], [float(r["held_out"]) for r in ho], "o-",
                     label="held out")
        axes[0].set_title("LM training (SiLU GatedMLP)", fontsize=9)
        axes[0].legend(fontsize=8)
    if (out / "anneal_log.csv").is_file():
        rows = read_csv(out / "anneal_log.csv")
        axes[1].plot([int(r["step"]) for r in rows], [float(r["ce"]) for r in rows], lw=0.8,
                     label="CE")
        ax2 = axes[1].twinx()
        ax2.plot([int(r["step"]) for r in rows], [float(r["beta"]) for r in rows], c="tab:red",
                 label="β")
        ax2.set_ylabel("β", color="tab:red")
        axes[1].set_title("anneal Swish_β → bilinear", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats)")
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)
