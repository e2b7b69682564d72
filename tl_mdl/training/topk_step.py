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
from tl_mdl.training.auxk import AuxK, total_variance


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
        g = torch.ops.aten.threshold_backward(grad_values, values, 0)  # relu's backward
        return None, *_encoder_grads(x_in, W_enc, cols, g, ctx.with_b_dec), None


def _encoder_grads(x_in: Tensor, W_enc: Tensor, cols: Tensor, g: Tensor, with_b_dec: bool
                   ) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(∂W_enc, ∂b_enc, ∂b_dec)`` from the gradient ``g [batch, k]`` of the kept
    pre-activations at columns ``cols``."""
    n, k = cols.shape
    d_sae = W_enc.shape[1]
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
    grad_b_dec = -(W_enc @ grad_b) if with_b_dec else None
    return grad_W, grad_b, grad_b_dec


class _TopKAuxCode(torch.autograd.Function):
    """:class:`_TopKCode` plus AuxK's code (:mod:`tl_mdl.training.auxk`): each row's
    ``aux_k`` largest pre-activations among the ``dead`` columns, ReLU'd, from the same
    pre-activations (one more top-k over the dead columns); the backward adds their
    gradient to the encoder's, the two codes' entries side by side."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int,
                dead: Tensor, aux_k: int):
        x_in = x if b_dec is None else x - b_dec
        pre = x_in @ W_enc
        pre += b_enc
        values, cols = topk(pre, k)
        aux_values, j = topk(pre.index_select(1, dead), min(aux_k, dead.numel()))
        del pre
        aux_cols = dead[j]
        values, aux_values = torch.relu(values), torch.relu(aux_values)
        ctx.save_for_backward(x_in, W_enc, cols, values, aux_cols, aux_values)
        ctx.with_b_dec = b_dec is not None
        ctx.mark_non_differentiable(cols, aux_cols)
        return values, cols, aux_values, aux_cols

    @staticmethod
    def backward(ctx, grad_values, _grad_cols, grad_aux, _grad_aux_cols):
        x_in, W_enc, cols, values, aux_cols, aux_values = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(grad_values, values, 0)
        g_aux = torch.ops.aten.threshold_backward(grad_aux, aux_values, 0)
        both = torch.cat([cols, aux_cols], 1), torch.cat([g, g_aux], 1)
        return (None, *_encoder_grads(x_in, W_enc, *both, ctx.with_b_dec),
                None, None, None)


def applies(sae, objective) -> bool:
    """Whether :func:`loss_and_grads` computes ``objective`` for ``sae`` (the stock TopK
    activation and objective on a plain SAE; anything else takes the dense path)."""
    from tl_mdl.training import objectives

    return (objective is objectives._topk and type(sae) is SAE
            and sae.uses_stock("encode", "encode_pre", "decode", activation="topk")
            and sae.W_enc.device.type == "cpu")


def loss_and_grads(sae: SAE, objective, x: Tensor, lam: float, tolerance: float,
                   aux: AuxK | None = None):
    """``(loss, parts, values)`` of the TopK objective on batch ``x`` with the gradients in
    ``.grad``; ``values [batch, k]`` hold the code's nonzeros (its L0 is theirs). With
    ``aux`` (AuxK, :mod:`tl_mdl.training.auxk`), the loss includes its term (on steps
    with dead latents), ``parts`` its value (``"aux"``) and the number of dead latents
    (``"dead"``), and ``aux`` records which latents fired."""
    sae._check_input(x)
    b_dec = sae.b_dec if sae.cfg.apply_b_dec_to_input else None
    xs = x.to(sae.W_enc.dtype)
    dead = None if aux is None else aux.dead()
    if dead is None:
        values, cols = _TopKCode.apply(xs, sae.W_enc, sae.b_enc, b_dec, sae.cfg.k)
    else:
        values, cols, aux_values, aux_cols = _TopKAuxCode.apply(
            xs, sae.W_enc, sae.b_enc, b_dec, sae.cfg.k, dead, aux.k)
    x_hat = topk_decode(cols, values, sae.W_dec, sae.b_dec)
    loss, parts = objective(sae, x, None, x_hat, lam, tolerance)
    if aux is not None:
        aux_loss = (torch.zeros((), dtype=loss.dtype) if dead is None else
                    aux.loss(sae.W_dec, residual := (xs - x_hat).detach(), aux_values,
                             aux_cols, total_variance(residual)))
        loss = loss + aux_loss
        parts = {**parts, "aux": float(aux_loss.detach()),
                 "dead": 0.0 if dead is None else float(dead.numel())}
    loss.backward()
    if aux is not None:
        aux.record(torch.bincount(cols[values > 0], minlength=sae.cfg.d_sae))
    return loss, parts, values.detach()
