"""Bilinear MNIST: train pixels → bilinear layer → 10 logits, then read the classifier off its
weights (Pearce et al., "Bilinear MLPs enable weight-based mechanistic interpretability").

Each logit is a quadratic form of the pixels: ``logit_c(x) = u_c·b_out + x̃ᵀ Q(u_c) x̃`` with
``u_c`` the digit's unembedding row and ``x̃ = [pixels; 1]``. Its eigenvectors are 28×28
images: positive ones vote for the digit, negative ones against. Keeping only the top-k
eigenvectors per digit and classifying with the truncated logits gives accuracy vs k.

Writes PNGs and CSVs into ``out/bilinear_mnist/``. A few minutes on 2 CPU cores:
``python demos/bilinear_mnist.py [--epochs 4] [--d-mlp 384]``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402

from tl_mdl.bilinear import BilinearMLP, eigen_expansion, eigendecompose  # noqa: E402
from tl_mdl.data import load_mnist  # noqa: E402


class BilinearClassifier(torch.nn.Module):
    """``logits = out(x) @ W_U`` with ``out`` a :class:`BilinearMLP` on raw pixels
    (``d_model = 784``): logit ``c`` is the bilinear layer's output along ``u_c = W_U[:, c]``."""

    def __init__(self, d_mlp: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        cfg = HookedTransformerConfig(
            n_layers=1, d_model=784, d_mlp=d_mlp, d_head=1, n_ctx=1, d_vocab=10,
            act_fn="silu", gated_mlp=True,
        )
        self.mlp = BilinearMLP(cfg, seed=seed)
        self.W_U = torch.nn.Parameter(torch.randn(784, 10) / 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return self.mlp(x[:, None])[:, 0] @ self.W_U
        # same function, cheaper for training: (post W_out + b_out) W_U = post (W_out W_U) + …
        m = self.mlp
        post = (x @ m.W_gate + m.b_gate) * (x @ m.W_in + m.b_in)
        return post @ (m.W_out @ self.W_U) + m.b_out @ self.W_U


def train(model, x, y, x_test, y_test, epochs, batch_size, lr, noise, wd):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * (len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    history = []
    bar = tqdm(total=steps, desc="train bilinear MNIST", unit="step")
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        model.train()
        for s in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[s : s + batch_size]
            xb = x[idx] + noise * torch.randn(batch_size, 784)  # input noise → cleaner eigvecs
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        acc = accuracy(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "train_loss": loss.item(), "test_acc": acc})
        bar.write(f"epoch {epoch + 1}: test accuracy {acc:.4f}")
    bar.close()
    return history


@torch.no_grad()
def accuracy(model, x, y) -> float:
    model.eval()
    return sum(
        (model(x[s : s + 2000]).argmax(-1) == y[s : s + 2000]).sum().item()
        for s in range(0, len(x), 2000)
    ) / len(x)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--d-mlp", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=Path("out/bilinear_mnist"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    x, y = load_mnist("train")
    x_test, y_test = load_mnist("test")
    model = BilinearClassifier(args.d_mlp)
    history = train(
        model, x, y, x_test, y_test, args.epochs, args.batch_size, args.lr, args.noise, args.wd
    )
    write_csv(args.out / "training.csv", history)
    test_acc = history[-1]["test_acc"]

    # --- weight-based decomposition: one Q(u_c) per digit, in pixel space (+ bias) --------
    mlp, U = model.mlp, model.W_U.detach().T  # U: [10, 784] digit output directions
    eig = eigendecompose(mlp, U, dtype=torch.float64)  # values [10, 785], vectors [10, 785, 785]
    bias_logit = (U.double() @ mlp.b_out.detach().double())  # [10]

    # exactness check: the full expansion reproduces the logits
    with torch.no_grad():
        logits = model(x_test[:500]).double()
    recon = eigen_expansion(eig, x_test[:500].double()) + bias_logit
    err = (recon - logits).abs().max().item()

    # --- accuracy vs number of eigenvectors kept per digit ---------------------------------
    ks = [0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50, 100, 200, 785]
    xt = x_test.double()
    rows = []
    for k in tqdm(ks, desc="truncation curve"):
        trunc = eigen_expansion(eig, xt, k) + bias_logit if k else bias_logit.expand(len(xt), 10)
        pred = trunc.argmax(-1)
        row = {"k": k, "accuracy": (pred == y_test).double().mean().item()}
        for c in range(10):
            mask = y_test == c
            row[f"acc_digit_{c}"] = (pred[mask] == c).double().mean().item()
        rows.append(row)
    write_csv(args.out / "accuracy_vs_k.csv", rows)
    write_csv(
        args.out / "eigenvalues.csv",
        [
            {"digit": c, "rank": j, "eigenvalue": eig.values[c, j].item()}
            for c in range(10)
            for j in range(eig.values.shape[1])
        ],
    )

    # --- plots -------------------------------------------------------------------------------
    fig, axes = plt.subplots(4, 10, figsize=(16, 7.2))
    for c in range(10):
        vals, vecs = eig.values[c], eig.vectors[c, :, :784]
        pos = torch.nonzero(vals > 0).flatten()[:2]
        neg = torch.nonzero(vals < 0).flatten()[:2]
        for r, (idx, sign) in enumerate([(pos, "+"), (neg, "−")]):
            for t in range(2):
                ax = axes[2 * r + t, c]
                ax.axis("off")
                if t < len(idx):
                    j = idx[t].item()
                    img = vecs[j].reshape(28, 28)
                    img = img * img.flatten()[img.abs().argmax()].sign()  # sign is arbitrary
                    lim = img.abs().max().item()
                    ax.imshow(img, cmap="RdBu", vmin=-lim, vmax=lim)
                    ax.set_title(f"{c}: {sign}λ={vals[j].item():.2f}", fontsize=7)
    fig.suptitle("Top positive (rows 1–2) and negative (rows 3–4) eigenvectors of Q(u_digit)")
    fig.tight_layout()
    fig.savefig(args.out / "eigenvectors.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 5, figsize=(15, 5.5), sharey=True)
    for c, ax in enumerate(axes.flat):
        vals = eig.values[c].sort(descending=True).values
        ax.plot(vals.numpy(), ".", ms=2)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"digit {c}")
        ax.set_xlabel("eigenvalue index (sorted)")
    axes[0, 0].set_ylabel("λ")
    fig.suptitle("Eigenvalue spectra per digit (few large eigenvalues dominate)")
    fig.tight_layout()
    fig.savefig(args.out / "eigenvalue_spectra.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    kk = [r["k"] for r in rows]
    kplot = [max(k, 0.5) for k in kk]
    for c in range(10):
        ax.plot(kplot, [r[f"acc_digit_{c}"] for r in rows], lw=0.8, alpha=0.6, label=f"{c}")
    ax.plot(kplot, [r["accuracy"] for r in rows], "k-o", ms=3, lw=2, label="all")
    ax.axhline(test_acc, color="gray", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("eigenvectors kept per digit (k; k=0 plotted at 0.5)")
    ax.set_ylabel("test accuracy")
    ax.set_title("Truncating each digit's quadratic form to its top-k eigenvectors")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out / "accuracy_vs_k.png", dpi=110)
    plt.close(fig)

    acc_k = {r["k"]: r["accuracy"] for r in rows}
    print(f"test accuracy {test_acc:.4f} (d_mlp={args.d_mlp}, {args.epochs} epochs)")
    print(f"full eigen expansion reproduces logits to {err:.2e}")
    print(
        "accuracy with top-k eigenvectors per digit: "
        + ", ".join(f"k={k}: {acc_k[k]:.4f}" for k in (1, 2, 5, 10, 20, 50))
    )
    print(f"wrote {args.out}/ in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
