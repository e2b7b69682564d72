"""Bilinear MNIST: pixels → embedding → bilinear layer → 10 logits, then read the classifier
off its weights (Pearce, Dooms et al., "Bilinear MLPs enable weight-based mechanistic
interpretability"), trained as the paper's reference notebook does.

Each logit is a quadratic form of the pixels, ``logit_c(x) = xᵀ Q_c x`` with
``Q_c = W_E Q(u_c) W_Eᵀ`` (``W_E`` the embedding, ``u_c`` the digit's unembedding row; the
model has no biases, like the paper's). Its eigenvectors are 28×28 images: positive ones vote
for the digit, negative ones against. Keeping only the top-k eigenvectors per digit and
classifying with the truncated logits gives accuracy vs k. The eigenvectors' smoothness is
measured (:mod:`tl_mdl.metrics.shapes`): the fraction of their energy above half the Nyquist
frequency (white noise 0.81, MNIST digits ≈ 0.10) and their total variation against the same
pixels shuffled (noise 1).

Training (the reference notebook's recipe): d_hidden 300, AdamW lr 1e-3, weight decay 0.5,
batch 100, 22 epochs (2 of linear warm-up, the learning rate halved every 2 epochs for 10,
then constant), Gaussian input noise σ = 0.33 and hidden noise 0.33·std on the bilinear
layer's output. Without the weight decay and noise the eigenvectors keep the random
initialisation's salt-and-pepper on pixels the digits never use.

Writes PNGs and CSVs into ``out/bilinear_mnist/``. About 5 minutes on one CPU core:
``python demos/bilinear_mnist.py [--epochs 22] [--d-mlp 300] [--threads 1] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import csv
import json
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
from tl_mdl.metrics.shapes import (  # noqa: E402
    high_frequency_fraction,
    noise_high_frequency_fraction,
    total_variation_ratio,
)


class BilinearClassifier(torch.nn.Module):
    """``logits = mlp(x W_E) W_U``: an embedding ``W_E [784, d]`` (no bias), a
    :class:`BilinearMLP` with ``d_model = d_mlp = d`` and its biases fixed at 0 (the paper's
    layers have none), and an unembedding ``W_U [d, 10]``. In training, noise of
    ``hidden_noise × std`` is added to the bilinear product, as in the reference."""

    def __init__(self, d_mlp: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        cfg = HookedTransformerConfig(
            n_layers=1, d_model=d_mlp, d_mlp=d_mlp, d_head=1, n_ctx=1, d_vocab=10,
            act_fn="silu", gated_mlp=True,
        )
        self.W_E = torch.nn.Parameter(torch.randn(784, d_mlp) / 784**0.5 / 3**0.5)
        self.mlp = BilinearMLP(cfg, seed=seed)
        for b in (self.mlp.b_in, self.mlp.b_gate, self.mlp.b_out):
            b.requires_grad_(False).zero_()
        self.W_U = torch.nn.Parameter(torch.randn(d_mlp, 10) / d_mlp**0.5)

    def forward(self, x: torch.Tensor, hidden_noise: float = 0.0) -> torch.Tensor:
        if not self.training:
            return self.mlp((x @ self.W_E)[:, None])[:, 0] @ self.W_U
        # the same function with noise on the bilinear product; (post W_out) W_U = post (W_out W_U)
        m, h = self.mlp, x @ self.W_E
        post = (h @ m.W_gate) * (h @ m.W_in)
        if hidden_noise:
            post = post + hidden_noise * post.std() * torch.randn_like(post)
        return post @ (m.W_out @ self.W_U)


def reference_schedule(opt, steps_per_epoch: int, epochs: int):
    """Per-step version of the reference's per-epoch schedule: linear warm-up from 1% over 2
    epochs, then ×0.5 every 2 epochs for 10 epochs, then constant."""
    def factor(step: int) -> float:
        e = step / steps_per_epoch
        if e < 2:
            return 0.01 + 0.99 * e / 2
        return 0.5 ** (min(e - 2, 10) // 2)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def train(model, x, y, x_test, y_test, epochs, batch_size, lr, noise, hidden_noise, wd):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=wd)
    steps_per_epoch = len(x) // batch_size
    sched = reference_schedule(opt, steps_per_epoch, epochs)
    history = []
    bar = tqdm(total=epochs * steps_per_epoch, desc="train bilinear MNIST", unit="step")
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        model.train()
        for s in range(0, steps_per_epoch * batch_size, batch_size):
            idx = perm[s : s + batch_size]
            xb = x[idx] + noise * torch.randn(batch_size, 784)
            loss = torch.nn.functional.cross_entropy(model(xb, hidden_noise), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
        acc = accuracy(model, x_test, y_test)
        history.append({"epoch": epoch + 1, "train_loss": loss.item(), "test_acc": acc})
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", test_acc=f"{acc:.4f}")
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


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=22, help="the reference trains 2 + 10 + 10")
    ap.add_argument("--d-mlp", type=int, default=300, help="embedding and bilinear width")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--noise", type=float, default=0.33, help="Gaussian input noise σ")
    ap.add_argument("--hidden-noise", type=float, default=0.33,
                    help="noise on the bilinear product, × its std")
    ap.add_argument("--wd", type=float, default=0.5, help="AdamW weight decay")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: these small GEMMs gain little from more, "
                         "and multi-threaded torch slows down badly on a busy machine; 0 = "
                         "torch's choice)")
    ap.add_argument("--out", type=Path, default=Path("out/bilinear_mnist"))
    return ap.parse_args(argv)


def top_eigvecs(eig, c: int, n: int = 3) -> list[tuple[int, str]]:
    """Indices (into ``eig.vectors[c]``) of the ``n`` largest positive and ``n`` most negative
    eigenvalues of digit ``c``, with their sign."""
    vals = eig.values[c]
    pos = torch.nonzero(vals > 0).flatten()[:n].tolist()
    neg = torch.nonzero(vals < 0).flatten()[:n].tolist()
    return [(j, "+") for j in pos] + [(j, "−") for j in neg]


def smoothness_rows(eig) -> list[dict]:
    """High-frequency fraction and total-variation ratio of each digit's top 3 positive and
    negative eigenvectors."""
    rows = []
    for c in range(10):
        for rank, (j, sign) in enumerate(top_eigvecs(eig, c)):
            v = eig.vectors[c, j][None]
            rows.append({"digit": c, "sign": sign, "rank": rank % 3, "eigenvalue":
                         eig.values[c, j].item(), "high_freq": high_frequency_fraction(v).item(),
                         "tv_ratio": total_variation_ratio(v).item()})
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()

    x, y = load_mnist("train")
    x_test, y_test = load_mnist("test")
    model = BilinearClassifier(args.d_mlp, seed=args.seed)
    history = train(model, x, y, x_test, y_test, args.epochs, args.batch_size, args.lr,
                    args.noise, args.hidden_noise, args.wd)
    write_csv(args.out / "training.csv", history)
    test_acc = history[-1]["test_acc"]

    # --- weight-based decomposition: one Q_c per digit, in pixel space ---------------------
    # in_basis=W_E: inputs are pixels p with h = p W_E, so Q_c = W_E Q(u_c) W_Eᵀ exactly
    mlp, U, W_E = model.mlp, model.W_U.detach().T, model.W_E.detach()
    eig = eigendecompose(mlp, U, bias=False, in_basis=W_E, dtype=torch.float64)
    bias_logit = torch.zeros(10, dtype=torch.float64)  # no biases anywhere

    # exactness check: the full expansion reproduces the logits
    with torch.no_grad():
        model.eval()
        logits = model(x_test[:500]).double()
    recon = eigen_expansion(eig, x_test[:500].double()) + bias_logit
    err = (recon - logits).abs().max().item()

    smooth = smoothness_rows(eig)
    write_csv(args.out / "eigen_smoothness.csv", smooth)
    hf = torch.tensor([r["high_freq"] for r in smooth])
    tv = torch.tensor([r["tv_ratio"] for r in smooth])
    ref_hf = high_frequency_fraction(x_test[:1000]).median().item()
    ref_tv = total_variation_ratio(x_test[:1000]).median().item()

    # --- accuracy vs number of eigenvectors kept per digit ---------------------------------
    ks = [0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 30, 50, 100, 200, 784]
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
    fig, axes = plt.subplots(4, 10, figsize=(16, 7.6))
    for c in range(10):
        top = top_eigvecs(eig, c, 2)
        shown = [t for t in top if t[1] == "+"] + [None] * 2
        shown = shown[:2] + ([t for t in top if t[1] == "−"] + [None] * 2)[:2]
        for r, item in enumerate(shown):
            ax = axes[r, c]
            ax.axis("off")
            if item is None:
                continue
            j, sign = item
            img = eig.vectors[c, j].reshape(28, 28)
            img = img * img.flatten()[img.abs().argmax()].sign()  # the sign is arbitrary
            lim = img.abs().max().item()
            ax.imshow(img, cmap="RdBu", vmin=-lim, vmax=lim)
            hf_j = high_frequency_fraction(img[None]).item()
            ax.set_title(f"{c}: {sign}λ={eig.values[c, j].item():.2f}\nHF {hf_j:.2f}", fontsize=7)
    fig.suptitle("Top positive (rows 1–2) and negative (rows 3–4) eigenvectors of Q_digit; HF = "
                 f"energy above Nyquist/2 (white noise {noise_high_frequency_fraction():.2f}, "
                 f"MNIST digits {ref_hf:.2f})")
    fig.tight_layout()
    fig.savefig(args.out / "eigenvectors.png", dpi=80)
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
    ax.set_title("Truncating each digit's quadratic form to its top-k eigenvectors\n"
                 f"test acc {test_acc:.4f}; top eigenvectors' HF {hf.median():.3f}, TV ratio "
                 f"{tv.median():.2f} (median)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out / "accuracy_vs_k.png", dpi=110)
    plt.close(fig)

    acc_k = {r["k"]: r["accuracy"] for r in rows}
    summary = {
        "test_accuracy": test_acc, "expansion_max_abs_error": err,
        "accuracy_top_k": {str(k): acc_k[k] for k in (1, 2, 5, 10, 20, 50)},
        "eigvec_high_freq_median": hf.median().item(),
        "eigvec_tv_ratio_median": tv.median().item(),
        "mnist_high_freq_median": ref_hf, "mnist_tv_ratio_median": ref_tv,
        "noise_high_freq": noise_high_frequency_fraction(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "seconds": time.perf_counter() - t0,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"test accuracy {test_acc:.4f} (d_mlp={args.d_mlp}, {args.epochs} epochs)")
    print(f"full eigen expansion reproduces logits to {err:.2e}")
    print(
        "accuracy with top-k eigenvectors per digit: "
        + ", ".join(f"k={k}: {acc_k[k]:.4f}" for k in (1, 2, 5, 10, 20, 50))
    )
    print(f"smoothness of the top 3 positive and negative eigenvectors per digit (median of 60): "
          f"high-frequency energy {hf.median():.3f}, TV ratio {tv.median():.3f}; for reference "
          f"MNIST digits {ref_hf:.3f} / {ref_tv:.3f}, white noise "
          f"{noise_high_frequency_fraction():.3f} / 1")
    print(f"wrote {args.out}/ in {summary['seconds']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
