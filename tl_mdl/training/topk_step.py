"""The TopK objective's forward and backward without dense latents.

A TopK SAE's code has ``k`` nonzeros a row, but written densely (``[batch, d_sae]``) every
product with it is a dense GEMM: the decode, and in the backward the decoder's two
gradients and the encoder's two (``W_enc`` and, through ``x − b_dec``, ``b_dec``). Of those
six GEMMs only the encoder's forward is needed: the rest touch ``k`` rows or columns a row.
Here the code stays ``(values [batch, k], columns [batch, k])``:

* decode: a weighted embedding bag over decoder rows (:func:`~tl_mdl._sparse.topk_decode`;
  its backward gives ``W_dec``'s gradient and the values' gradient by gathers);
* encoder backward (:class:`_TopKCode`): the gradient ``g`` of the kept pre-activations
  (zero where the ReLU clamps) gives ``∂b_enc[i] = Σ_{(n,j): col=i} g[n,j]``, ``∂W_enc[:, i]
  = Σ_{(n,j): col=i} g[n,j] (x_n − b_dec)`` (an embedding bag over input rows, grouped
  by column) and ``∂b_dec = −W_enc ∂b_enc``.

The forward values are bitwise those of ``SAE.encode`` (the same GEMM and top-k); the
gradients equal the dense ones up to float summation order. Used by the training loop for
the stock ``"topk"`` objective on a plain :class:`~tl_mdl.sae.SAE`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from tl_mdl._sparse import topk, topk_decode
from tl_mdl.sae import SAE


class _TopKCode(torch.autograd.Function):
    """``(relu(top-k values of (x − b_dec) W_enc + b_enc), their columns)``, with the
    encoder's gradients from the ``k`` kept entries a row."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int):
        x_in = x if b_dec is None else x - b_dec
        pre = x_in @ W_enc
        pre += b_enc  # in place: the value of ``x_in @ W_enc + b_enc``, one buffer fewer
        values, cols = topk(pre, k)
        del pre
        values = torch.relu(values)
        ctx.save_for_backward(x_in, W_enc, cols, values)
        ctx.with_b_dec = b_dec is not None
        ctx.mark_non_differentiable(cols)
        return values, cols

    @staticmethod
    def backward(ctx, grad_values: Tensor, _grad_cols: Tensor | None):
        x_in, W_enc, cols, values = ctx.saved_tensors
        n, k = cols.shape
        d_sae = W_enc.shape[1]
        g = torch.ops.aten.threshold_backward(grad_values, values, 0)  # relu's backward
        # group the (row, column) pairs by column: bag i sums g · x_in over its pairs
        # (int32 indices: the embedding bag's fast kernel, 2x faster than int64 here)
        flat = cols.reshape(-1)
        order = torch.argsort(flat, stable=True)
        per_col = torch.bincount(flat, minlength=d_sae)
        offsets = torch.zeros(d_sae, dtype=torch.int32, device=flat.device)
        torch.cumsum(per_col[:-1], 0, out=offsets[1:])
        rows = torch.div(order, k, rounding_mode="floor").to(torch.int32)
        weights = g.reshape(-1)[order]
        grad_W_t = F.embedding_bag(rows, x_in, offsets, mode="sum", per_sample_weights=weights)
        grad_W = grad_W_t.T.contiguous()  # W_enc's layout, [d_in, d_sae]
        grad_b = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, flat,
                                                                            g.reshape(-1))
        grad_b_dec = -(W_enc @ grad_b) if ctx.with_b_dec else None
        return None, grad_W, grad_b, grad_b_dec, None


def applies(sae, objective) -> bool:
    """Whether :func:`loss_and_grads` computes ``objective`` for ``sae`` (the stock TopK
    activation and objective on a plain SAE; anything else takes the dense path)."""
    from tl_mdl.training import objectives

    return (objective is objectives._topk and type(sae) is SAE
            and sae.uses_stock("encode", "encode_pre", "decode", activation="topk")
            and sae.W_enc.device.type == "cpu")


def loss_and_grads(sae: SAE, objective, x: Tensor, lam: float, tolerance: float):
    """``(loss, parts, values)`` of the TopK objective on batch ``x`` with the gradients in
    ``.grad``; ``values [batch, k]`` hold the code's nonzeros (its L0 is theirs)."""
    sae._check_input(x)
    b_dec = sae.b_dec if sae.cfg.apply_b_dec_to_input else None
    values, cols = _TopKCode.apply(x.to(sae.W_enc.dtype), sae.W_enc, sae.b_enc, b_dec,
                                   sae.cfg.k)
    x_hat = topk_decode(cols, values, sae.W_dec, sae.b_dec)
    loss, parts = objective(sae, x, None, x_hat, lam, tolerance)
    loss.backward()
    return loss, parts, values.detach()
