"""SAE computation through the SAE's own hook points, for :mod:`tl_mdl.hooks.attach`: one
kernel for ``tl_mdl.SAE`` (fused encode; when nothing outside the kernel sees the latents, a
row-blocked encode of ReLU and TopK SAEs that keeps only the sparse code, in a cache-sized
reused buffer; sparse decodes) and one for ``sae_lens.SAE`` (its own ``encode``/``decode``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_mdl._sparse import csr_decode, to_csr, topk, topk_decode
from tl_mdl._tl import HookPoint
from tl_mdl.hooks.names import SAE_INNER_HOOKS
from tl_mdl.sae import SAE

#: Decode through a gather (``embedding_bag``) instead of a dense GEMM when at most this
#: fraction of the latents is nonzero.
SPARSE_DECODE_MAX_DENSITY = 0.05

#: Bytes of one pre-activation block ``[R, d_sae]`` of the row-blocked encode, per torch
#: thread: 4 MiB (256 rows at d_sae 4096, float32). The block the GEMM writes is still in
#: cache (a core's L2 plus its share of L3) when the selection reads it, and the buffer is
#: a few pages to fault in rather than ``rows × d_sae`` (32 MiB at 2048 × 4096). Smaller
#: blocks were slower (TopK splice, d_in 256, d_sae 4096, 2048 rows, MKL, 9 paired rounds:
#: 1 MiB 1.19×, 2 MiB 1.10×, 8 MiB 1.06× the time of 4 MiB): each GEMM call packs all of
#: ``W_enc`` again.
ENCODE_BLOCK_BYTES = 1 << 22
#: Fewest rows of a block: below this the GEMM's per-call packing of ``W_enc`` dominates.
ENCODE_BLOCK_MIN_ROWS = 32


def encode_block_rows(d_sae: int, itemsize: int, threads: int | None = None) -> int:
    """Rows ``R`` of a block of the row-blocked encode: ``ENCODE_BLOCK_BYTES`` of
    pre-activations per thread (at least ``ENCODE_BLOCK_MIN_ROWS`` rows per thread)."""
    threads = torch.get_num_threads() if threads is None else threads
    per_thread = max(ENCODE_BLOCK_MIN_ROWS, ENCODE_BLOCK_BYTES // max(1, d_sae * itemsize))
    return per_thread * max(1, threads)


# ------------------------------------------------------------------- sparse decoding
def decode_maybe_sparse(
    acts: Float[Tensor, "n d_sae"], W_dec: Tensor, b_dec: Tensor
) -> Float[Tensor, "n d_in"]:
    """``acts @ W_dec + b_dec``; when the code is sparse (density ≤
    :data:`SPARSE_DECODE_MAX_DENSITY`) and no gradient is needed, through a gather of the
    active decoder rows. Same value up to float summation order."""
    n, f = acts.shape
    if (
        n == 0
        or (torch.is_grad_enabled() and (acts.requires_grad or W_dec.requires_grad))
        or acts.device.type != "cpu"
    ):
        return torch.addmm(b_dec, acts, W_dec)
    probe = acts[:: max(1, n // 64)]  # density estimate from ~64 rows, not a full pass
    if int(torch.count_nonzero(probe)) > SPARSE_DECODE_MAX_DENSITY * probe.numel():
        return torch.addmm(b_dec, acts, W_dec)
    cols, values, offsets = to_csr(acts, nonneg=False)
    return csr_decode(cols, offsets, values, W_dec, b_dec)


# ------------------------------------------------------------------------- kernels
def has_hooks(hp: nn.Module) -> bool:
    """Whether calling ``hp`` would run any user hook (forward, pre-forward or backward)."""
    return bool(hp._forward_hooks or hp._forward_pre_hooks or hp._backward_hooks)


def _fire(hp: HookPoint, x: Tensor, use_hooks: bool, seen: list[bool] | None = None) -> Tensor:
    """``hp(x)`` when it has hooks. With ``seen``, appends whether the hooks may have changed
    the value: they returned another tensor or wrote into ``x`` (its version counter moved;
    inference tensors have none, so there any hook counts as a change)."""
    if not (use_hooks and has_hooks(hp)):
        return x
    if seen is None:
        return hp(x)
    try:
        version = x._version
    except RuntimeError:  # an inference tensor
        version = None
    y = hp(x)
    seen.append(y is not x or version is None or x._version != version)
    return y


class _Kernel:
    """SAE computation through its hook points: ``run(x) -> (latents | None, recons | None)``.
    ``latents`` is ``None`` only when it was never materialised (TopK fast path). After a
    run, ``changed`` tells whether a hook may have changed a value inside the SAE."""

    def __init__(self, sae: Any, hooks: dict[str, HookPoint]):
        self.sae, self.hooks = sae, hooks
        self.changed = False

    def run(
        self, x: Tensor, *, use_hooks: bool = True, need_acts: bool = False,
        need_recons: bool = True,
    ) -> tuple[Tensor | None, Tensor | None]:
        raise NotImplementedError


class _TlMdlKernel(_Kernel):
    sae: SAE
    #: pre-activation buffer reused across forwards when nothing outside the kernel can hold
    #: on to the latents (no hook on them, no gradient, not kept for ``observe``): one
    #: ``[R, d_sae]`` block for the row-blocked encode, ``[rows, d_sae]`` otherwise.
    _buf: Tensor | None = None

    def _scratch(self, rows: int, like: Tensor) -> Tensor:
        shape = (rows, self.sae.cfg.d_sae)
        b = self._buf
        if (
            b is None or b.shape != shape or b.dtype != like.dtype or b.device != like.device
            or b.is_inference() != torch.is_inference_mode_enabled()
        ):
            b = self._buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        return b

    #: set when a ReLU code's first block was dense: later calls skip the blocked encode
    #: (its small buffer and the full one would replace each other every call)
    _dense_code = False

    def release(self) -> None:
        self._buf = None
        self._dense_code = False

    def _encode_pre(self, x: Tensor, reuse: bool = False) -> Tensor:
        sae = self.sae
        if not sae.uses_stock("encode_pre") or x.dtype != sae.W_enc.dtype:
            return sae.encode_pre(x)
        x2 = x.reshape(-1, x.shape[-1])
        if sae.cfg.apply_b_dec_to_input:
            x2 = x2 - sae.b_dec
        # one fused GEMM + bias (same value as SAE.encode_pre)
        out = self._scratch(x2.shape[0], sae.W_enc) if reuse else None
        return torch.addmm(sae.b_enc, x2, sae.W_enc, out=out).reshape(*x.shape[:-1], sae.cfg.d_sae)

    def _blockable(self, x: Tensor) -> bool:
        """Whether :meth:`_blocked` computes what the plain path would: our own encode and
        decode, a ReLU or TopK activation, float32/64 on CPU, no gradient through the
        decoder."""
        sae = self.sae
        return (
            x.device.type == "cpu" and x.dtype == sae.W_enc.dtype == sae.W_dec.dtype
            and x.dtype in (torch.float32, torch.float64)
            and (sae.uses_stock("encode_pre", "decode", activation="relu")
                 or sae.uses_stock("encode_pre", "decode", activation="topk"))
            and not (torch.is_grad_enabled() and sae.W_dec.requires_grad)
        )

    def _blocked(self, x: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_in"]:
        """The reconstruction of a ReLU or TopK SAE, encoded ``R`` rows at a time
        (:func:`encode_block_rows`) into one small reused buffer: each block's
        pre-activations are reduced to their sparse code (TopK: the ``k`` winners; ReLU: the
        positive entries) while in cache, then decoded. No ``[rows, d_sae]`` tensor exists.

        Same value as the plain path (``addmm`` over all rows, selection, decode) when the
        BLAS gives a row the same result whatever rows share the call (checked bitwise on
        MKL in the tests) and the decode takes the same route (ReLU: the gather when the
        block's density is ≤ :data:`SPARSE_DECODE_MAX_DENSITY`, which the plain path
        estimates from ~64 rows instead; otherwise both equal up to float summation order)."""
        sae = self.sae
        n, d_sae = x.shape[0], sae.cfg.d_sae
        rows = encode_block_rows(d_sae, x.element_size())
        buf = self._scratch(min(rows, max(n, 1)), sae.W_enc)
        W_enc, b_enc, b_dec, W_dec = sae.W_enc, sae.b_enc, sae.b_dec, sae.W_dec
        shift = sae.cfg.apply_b_dec_to_input
        if sae.cfg.activation == "topk":
            k = sae.cfg.k
            values = x.new_empty(n, k)
            cols = torch.empty(n, k, dtype=torch.int64)
            for s in range(0, n, rows):
                xb = x[s:s + rows]
                pre = torch.addmm(b_enc, xb - b_dec if shift else xb, W_enc,
                                  out=buf[: xb.shape[0]])
                values[s:s + rows], cols[s:s + rows] = topk(pre, k)
            return topk_decode(cols, values.relu_(), W_dec, b_dec)
        out = W_dec.new_empty(n, W_dec.shape[1])
        for s in range(0, n, rows):
            xb = x[s:s + rows]
            acts = torch.addmm(b_enc, xb - b_dec if shift else xb, W_enc,
                               out=buf[: xb.shape[0]]).relu_()
            most = SPARSE_DECODE_MAX_DENSITY * acts.numel()
            if s == 0 and int(torch.count_nonzero(acts)) > most:
                # a dense code: the plain path, the first block not computed twice
                self._dense_code = True
                pre = self._scratch(n, W_enc)
                pre[:rows] = acts
                rest = x[rows:]
                torch.addmm(b_enc, rest - b_dec if shift else rest, W_enc, out=pre[rows:])
                return decode_maybe_sparse(pre.relu_(), W_dec, b_dec)
            c, v, o = to_csr(acts)  # the nonzeros (a NaN is kept, as in a dense decode)
            if v.numel() <= most:
                out[s:s + rows] = csr_decode(c, o, v, W_dec, b_dec)
            else:
                torch.addmm(b_dec, acts, W_dec, out=out[s:s + rows])
        return out

    def run(self, x, *, use_hooks=True, need_acts=False, need_recons=True):
        sae, h = self.sae, self.hooks
        lead = x.shape[:-1]
        seen: list[bool] = []
        x = _fire(h["hook_sae_input"], x, use_hooks, seen)
        pre_seen = use_hooks and has_hooks(h["hook_sae_acts_pre"])  # a hook may keep it
        pre_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (x, sae.W_enc, sae.b_enc, sae.b_dec)
        )
        private = not (
            need_acts or pre_grad or pre_seen
            or (use_hooks and has_hooks(h["hook_sae_acts_post"]))
        )
        if private and need_recons and not self._dense_code and self._blockable(x):
            recons = self._blocked(x.reshape(-1, x.shape[-1]))
            recons = _fire(h["hook_sae_recons"], recons.reshape(*lead, recons.shape[-1]),
                           use_hooks, seen)
            self.changed = any(seen)
            return None, recons
        pre = _fire(h["hook_sae_acts_pre"], self._encode_pre(x, reuse=private), use_hooks, seen)
        need_grad = torch.is_grad_enabled() and (pre.requires_grad or sae.W_dec.requires_grad)
        acts: Tensor | None = None
        recons: Tensor | None = None
        if (
            sae.uses_stock("decode", activation="topk")
            and need_recons and not need_acts and not need_grad
            and not (use_hooks and has_hooks(h["hook_sae_acts_post"]))
            and pre.device.type == "cpu"
        ):
            # TopK fast path: decode the k winners directly, never build [N, d_sae].
            values, indices = topk(pre.reshape(-1, pre.shape[-1]), sae.cfg.k)
            recons = topk_decode(indices, values.relu_(), sae.W_dec, sae.b_dec)
        else:
            if (
                sae.uses_stock("encode_pre", activation="relu")
                and not need_grad and not pre_seen
            ):
                acts = pre.relu_()  # our own temporary, seen by no hook: no second buffer
            else:
                acts = sae.activation(pre)
            acts = _fire(h["hook_sae_acts_post"], acts, use_hooks, seen)
            if need_recons:
                if not sae.uses_stock("decode"):  # a subclass's or a replaced decode
                    recons = sae.decode(acts)
                else:
                    flat = acts.reshape(-1, acts.shape[-1]).to(sae.W_dec.dtype)
                    recons = decode_maybe_sparse(flat, sae.W_dec, sae.b_dec)
        if recons is not None:
            recons = _fire(h["hook_sae_recons"], recons.reshape(*lead, recons.shape[-1]),
                           use_hooks, seen)
        self.changed = any(seen)
        return acts, recons


class _SAELensKernel(_Kernel):
    """Runs a ``sae_lens.SAE`` through its own ``encode``/``decode``, which fire its own hook
    points; those are the ones exposed under the model's hook name (as SAELens does)."""

    def run(self, x, *, use_hooks=True, need_acts=False, need_recons=True):
        # its hooks fire inside SAELens' own code: any of them may have changed a value
        self.changed = use_hooks and any(has_hooks(self.hooks[n]) for n in SAE_INNER_HOOKS)
        if use_hooks:
            acts = self.sae.encode(x)
            return acts, (self.sae.decode(acts) if need_recons else None)
        with _hooks_disabled(self.sae):
            acts = self.sae.encode(x)
            return acts, (self.sae.decode(acts) if need_recons else None)


@contextlib.contextmanager
def _hooks_disabled(sae: Any) -> Iterator[None]:
    """Run a ``sae_lens.SAE`` with its hook points silent: SAELens's private
    ``_disable_hooks`` when it has one, else the same by hand (each of its hook points
    swapped for a hook-free ``HookPoint`` for the duration)."""
    try:
        from sae_lens.saes.sae import _disable_hooks
    except ImportError:
        _disable_hooks = None
    if _disable_hooks is not None:
        with _disable_hooks(sae):
            yield
        return
    saved = {n: m for n, m in sae._modules.items() if isinstance(m, HookPoint)}
    try:
        for n in saved:
            sae._modules[n] = HookPoint()
        yield
    finally:
        sae._modules.update(saved)
