"""Eigen-truncation ablations: replace a bilinear MLP's output along chosen directions by the
top-k terms of its eigen expansion, and measure loss vs k."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from tl_mdl._tl import gated_mlp_parts
from tl_mdl.bilinear.decompose import Eigen, _out_dirs, _weights, eigen_expansion, eigendecompose
from tl_mdl.bilinear.swap import _get_mlp


def _bilinear_mlp(model: Any, layer: int) -> tuple[nn.Module, nn.Module]:
    """``(mlp, runs)``: block ``layer``'s bilinear MLP as the user names it
    (``model.blocks[layer].mlp``) and the module that computes it (on a bridge, the module
    the MLP bridge wraps), whose forward hook sees the MLP's own input and output."""
    n_layers = model.cfg.n_layers
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range for model with n_layers={n_layers}")
    mlp = getattr(model.blocks[layer], "mlp", None)
    parts = None if mlp is None else gated_mlp_parts(mlp)
    if parts is None or not (parts.bilinear or parts.act is None):
        raise TypeError(
            f"blocks.{layer}.mlp is a {type(mlp).__name__}, not a BilinearMLP; "
            "convert it first with tl_mdl.to_bilinear(model, layers=[layer])"
        )
    runs = _get_mlp(model, layer)
    assert runs is not None
    return mlp, runs


@dataclass
class EigenAblation:
    """Handle from :func:`ablate_eigen`: a context manager; ``remove()`` detaches the hook."""

    mlp: nn.Module
    out_dirs: Tensor
    eigen: Eigen
    k: int
    _handle: object = field(default=None, repr=False)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> EigenAblation:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def ablate_eigen(
    model: Any,
    layer: int,
    out_dirs: Float[Tensor, "n d_model"],
    k: int,
    *,
    eigen: Eigen | None = None,
) -> EigenAblation:
    """Replace ``blocks[layer].mlp``'s output along each row ``u`` of ``out_dirs`` by its top-``k``
    eigen expansion: with ``y_u = u·out(x)`` and ``ŷ_u = u·b_out + Σ_{j<k} λ_j (v_j·x̃)²``,

        out'(x) = out(x) + U⁺ (ŷ − y),     U⁺ = pinv(U)  [d_model, n]

    so ``u·out'(x) = ŷ_u`` for every ``u`` and the component of ``out`` orthogonal to
    ``span(U)`` is untouched (``U`` needs full row rank, ``n ≤ d_model``). ``x`` is the MLP's
    own input (after ``ln2``), read by a forward hook on the MLP module, so the edit is exact
    whatever the normalisation. ``eigen``: a precomputed decomposition with at least ``k``
    pairs per direction (default: computed with the exact top-``k`` mode). Returns a context
    manager; the hook is removed on exit or by ``remove()``.
    """
    mlp, runs = _bilinear_mlp(model, layer)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k={k!r} must be an int >= 0 (eigenpairs kept per direction)")
    *_, W_out, _, _, b_out = _weights(mlp)
    d_model = W_out.shape[1]
    U = _out_dirs(out_dirs, d_model, W_out)
    if U.shape[0] > U.shape[1] or torch.linalg.matrix_rank(U.double()) < U.shape[0]:
        raise ValueError(
            f"out_dirs [{U.shape[0]}, {U.shape[1]}] must have full row rank (linearly independent "
            "rows, n ≤ d_model) to replace the output along each of them; ablate fewer directions"
        )
    d = d_model + 1
    if eigen is None:
        eigen = eigendecompose(mlp, U, k=min(max(k, 1), d), dtype=torch.float64)
    if eigen.values.shape[-1] < min(k, d):
        raise ValueError(f"eigen holds {eigen.values.shape[-1]} pairs per direction; k={k}")
    if eigen.vectors.shape[-1] != d:
        raise ValueError("eigen must be a decomposition with bias=True and no in_basis")
    if eigen.values.shape[0] != U.shape[0]:
        raise ValueError(
            f"eigen decomposes {eigen.values.shape[0]} output directions but out_dirs has "
            f"{U.shape[0]}; pass the eigen of these out_dirs (or eigen=None)"
        )
    U64 = U.double()
    pinv_T = torch.linalg.pinv(U64).T  # [n, d_model]
    u_bout = U64 @ b_out.double()

    def hook(module, args, output):
        (x,) = args[:1]
        y = output.double() @ U64.T
        if k > 0:
            y_hat = eigen_expansion(eigen, x.double(), k) + u_bout
        else:
            y_hat = u_bout.expand_as(y)
        return output + ((y_hat - y) @ pinv_T).to(output.dtype)

    handle = EigenAblation(mlp, U, eigen, k)
    handle._handle = runs.register_forward_hook(hook)
    return handle


@dataclass
class TruncationCurve:
    """Loss (mean next-token CE) and top-1 accuracy vs number of kept eigenpairs ``ks``;
    ``base_loss``/``base_accuracy`` are for the unablated model."""

    ks: list[int]
    loss: list[float]
    accuracy: list[float]
    base_loss: float
    base_accuracy: float

    def rows(self) -> list[dict]:
        return [
            {"k": k, "loss": lo, "accuracy": a}
            for k, lo, a in zip(self.ks, self.loss, self.accuracy, strict=True)
        ]


@torch.no_grad()
def _loss_acc(
    model: Any, tokens: Tensor, batch_size: int, labels: Tensor | None
) -> tuple[float, float]:
    total_loss, total_correct, count = 0.0, 0.0, 0
    for s in range(0, tokens.shape[0], batch_size):
        batch = tokens[s : s + batch_size]
        logits = model(batch, return_type="logits").float()
        batch = batch.to(logits.device)
        if labels is None:  # next-token prediction
            logits, target = logits[:, :-1], batch[:, 1:]
        else:  # one label per sequence, read at the last position
            logits, target = logits[:, -1], labels[s : s + batch_size].to(logits.device)
        logp = logits.log_softmax(-1)
        total_loss += -logp.gather(-1, target[..., None]).sum().item()
        total_correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    return total_loss / count, total_correct / count


def truncation_curve(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    layer: int,
    out_dirs: Float[Tensor, "n d_model"],
    ks: Sequence[int],
    *,
    labels: Int[Tensor, " batch"] | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> TruncationCurve:
    """Loss and accuracy of ``model`` on ``tokens`` with :func:`ablate_eigen` at each ``k`` in
    ``ks``. Loss is the mean next-token cross-entropy (or, with ``labels``, the CE of one label
    per sequence read at the last position); accuracy is top-1 over the same targets. The
    top-``max(ks)`` eigenpairs are computed once and shared by every ``k``."""
    mlp, _ = _bilinear_mlp(model, layer)
    ks = [int(k) for k in ks]
    W_out = _weights(mlp)[2]
    d = W_out.shape[1] + 1
    kmax = min(max(max(ks), 1), d)
    U = _out_dirs(out_dirs, W_out.shape[1], W_out)
    eigen = eigendecompose(mlp, U, k=kmax, dtype=torch.float64)
    base_loss, base_acc = _loss_acc(model, tokens, batch_size, labels)
    losses, accs = [], []
    for k in tqdm(ks, desc="truncation curve", disable=not progress):
        with ablate_eigen(model, layer, U, min(k, d), eigen=eigen):
            loss, acc = _loss_acc(model, tokens, batch_size, labels)
        losses.append(loss)
        accs.append(acc)
    return TruncationCurve(ks, losses, accs, base_loss, base_acc)
