"""Attach an SAE to any TransformerLens hook point: splice, splice with error term, observe.

``attach_sae(model, hook_name, sae, mode=...)`` leaves the model's own ``HookPoint`` object
in place. It registers one forward hook on it (prepended, outside TransformerLens's hook
bookkeeping, so ``model.reset_hooks()`` never removes it) and adds six child ``HookPoint``s
named like SAELens's, so ``f"{hook_name}.hook_sae_acts_post"`` appears in ``model.hook_dict``,
``run_with_cache`` and ``run_with_hooks``. Detaching removes both and calls ``model.setup()``,
which gives back the same ``hook_dict`` (same names, same objects) and bitwise-equal logits.

What flows downstream of ``hook_name`` (and what hooks on ``hook_name`` itself see):

* ``"splice"``: ``x̂ = decode(encode(x))``.
* ``"splice_error"``: ``x̂ + (x − x̂)``; unless a hook inside the SAE changes a value this is
  ``x`` bitwise (hooks that only read, like ``run_with_cache``'s, keep it so), and gradients
  reach the latents. When a hook changes a value (returns another tensor, or writes into
  its input), the error term comes from a clean, hook-free pass (as in SAELens), so
  interventions on latents change the output. Hooks inside a ``sae_lens.SAE`` always count
  as changing.
* ``"observe"``: ``x`` untouched; the latents are computed, fire their hook points, and the
  last batch is kept on ``handle.latents``.

Head-indexed hooks (``attn.hook_z`` ``[batch, pos, n_heads, d_head]``) are flattened to
``n_heads·d_head`` before the SAE, like SAELens (an SAE with ``d_in = d_head`` is applied
per head instead). ``hook_sae_input``/``acts``/``recons`` carry the flattened shape;
``hook_sae_error`` and ``hook_sae_output`` the hook's own shape.
"""

from __future__ import annotations

import difflib
import re
import sys
import weakref
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from tl_mdl._sparse import csr_decode, to_csr, topk, topk_decode
from tl_mdl.sae import SAE

MODES = ("splice", "splice_error", "observe")
SAE_HOOK_NAMES = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_error",
    "hook_sae_output",
)
_INNER = SAE_HOOK_NAMES[:4]  # hook points whose hooks may intervene on the SAE's code
#: Decode through a gather (``embedding_bag``) instead of a dense GEMM when at most this
#: fraction of the latents is nonzero.
SPARSE_DECODE_MAX_DENSITY = 0.05

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


# --------------------------------------------------------------------------- helpers
def hook_layer(hook_name: str) -> int | None:
    """Block index of ``blocks.{L}.…`` hook names, ``-1`` for the embedding hooks, ``None``
    for hooks after the last block (``ln_final``, ``unembed``)."""
    m = _LAYER_RE.match(hook_name)
    if m:
        return int(m.group(1))
    if hook_name.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")):
        return -1
    return None


def check_hook_name(model: Any, hook_name: str) -> None:
    """Raise ``ValueError`` naming close matches when ``hook_name`` is not a model hook point."""
    if not isinstance(hook_name, str):
        raise TypeError(
            f"hook_name must be a str like 'blocks.0.hook_resid_pre', got {hook_name!r}"
        )
    if hook_name in model.hook_dict:
        return
    if f"{hook_name}.hook_sae_input" in model.hook_dict:  # SAELens' HookedSAEWrapper
        raise ValueError(
            f"an SAE was added at {hook_name!r} with SAELens' add_sae, which replaced the "
            "hook point; remove it first (model.reset_saes()) to attach an SAE with tl_mdl"
        )
    names = sorted(model.hook_dict)
    close = difflib.get_close_matches(hook_name, names, n=5, cutoff=0.6)
    n_layers = getattr(model.cfg, "n_layers", "?")
    hint = f"; did you mean {close}?" if close else ""
    raise ValueError(
        f"hook {hook_name!r} is not a hook point of this model (n_layers={n_layers}){hint} "
        f"Valid names are the keys of model.hook_dict, e.g. {names[:6]}"
    )


def expected_hook_shape(model: Any, hook_name: str) -> tuple[int, ...] | None:
    """Trailing activation dims at ``hook_name`` from the model config (``None`` if unknown)."""
    cfg = model.cfg
    last = hook_name.rsplit(".", 1)[-1]
    n_heads, d_head = cfg.n_heads, cfg.d_head
    n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
    if last in ("hook_z", "hook_q", "hook_rot_q"):
        return (n_heads, d_head)
    if last in ("hook_k", "hook_v", "hook_rot_k"):
        return (n_kv, d_head)
    if last == "hook_result":
        return (n_heads, cfg.d_model)
    if last in ("hook_pattern", "hook_attn_scores"):
        return ()
    if ".mlp." in hook_name and last in ("hook_pre", "hook_post", "hook_pre_linear"):
        return (cfg.d_mlp,) if cfg.d_mlp else None
    if last in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
                "hook_mlp_out", "hook_embed", "hook_pos_embed", "hook_mlp_in"):
        return (cfg.d_model,)
    return None


#: Hooks whose activations carry a head axis ``[..., n_heads, d]``.
HEAD_HOOKS = ("hook_z", "hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k", "hook_result")


def flatten_heads(x: Tensor, d_in: int, hook_name: str) -> Tensor:
    """``[..., d_in]`` unchanged; at a head-indexed hook (:data:`HEAD_HOOKS`),
    ``[..., n_heads, d_head]`` with ``n_heads·d_head = d_in`` flattened to ``[..., d_in]``
    (SAELens's hook_z convention). Any other shape raises (never mixes other axes)."""
    if x.shape[-1] == d_in:
        return x
    heads = hook_name.rsplit(".", 1)[-1] in HEAD_HOOKS
    if heads and x.ndim >= 2 and x.shape[-2] * x.shape[-1] == d_in:
        return x.flatten(-2)
    raise ValueError(
        f"activation at {hook_name!r} has shape {tuple(x.shape)}, which does not fit an SAE "
        f"with d_in={d_in}: the last dim is {x.shape[-1]}"
        + (f", the flattened heads {x.shape[-2] * x.shape[-1]}" if heads and x.ndim >= 2
           else "")
    )


def is_sae_lens_sae(sae: Any) -> bool:
    mod = sys.modules.get("sae_lens")
    return mod is not None and isinstance(sae, mod.SAE)


def sae_param(sae: Any) -> Tensor:
    return sae.W_enc


def _model_dtype_device(model: Any) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters(), None)
    if p is None:
        return model.cfg.dtype, torch.device(model.cfg.device or "cpu")
    return p.dtype, p.device


def check_sae_fits(model: Any, hook_name: str, sae: Any) -> None:
    """Validate SAE type, ``d_in`` against the hook's shape, dtype and device."""
    if not (isinstance(sae, SAE) or is_sae_lens_sae(sae)):
        raise TypeError(
            f"sae must be a tl_mdl.SAE or a sae_lens.SAE, got {type(sae).__name__}"
        )
    d_in = sae.cfg.d_in
    shape = expected_hook_shape(model, hook_name)
    if shape == ():
        raise ValueError(
            f"hook {hook_name!r} carries attention patterns/scores [batch, head, q, k], not "
            "[..., d_in] activations; attach SAEs to residual, hook_z, mlp or *_out hooks"
        )
    if shape is not None:
        valid = {shape[-1]} | ({shape[-2] * shape[-1]} if len(shape) >= 2 else set())
        if d_in not in valid:
            dims = " x ".join(map(str, shape))
            raise ValueError(
                f"SAE d_in={d_in} does not fit hook {hook_name!r} with activations [..., {dims}]; "
                f"valid d_in: {sorted(valid)}"
                + (" (heads flattened, like SAELens, or one head)" if len(shape) >= 2 else "")
            )
    m_dtype, m_device = _model_dtype_device(model)
    p = sae_param(sae)
    if p.dtype != m_dtype:
        raise TypeError(
            f"SAE dtype {p.dtype} differs from model dtype {m_dtype}; convert one of them, "
            f"e.g. sae.to({m_dtype})"
        )
    if p.device.type != m_device.type or (
        p.device.index is not None and m_device.index is not None and p.device != m_device
    ):
        raise ValueError(
            f"SAE is on device {p.device} but the model is on {m_device}; move it with "
            f"sae.to({str(m_device)!r})"
        )


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
    #: on to the latents (no hook on them, no gradient, not kept for ``observe``).
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

    def release(self) -> None:
        self._buf = None

    def _encode_pre(self, x: Tensor, reuse: bool = False) -> Tensor:
        sae = self.sae
        if type(sae).encode_pre is not SAE.encode_pre or x.dtype != sae.W_enc.dtype:
            return sae.encode_pre(x)
        x2 = x.reshape(-1, x.shape[-1])
        if sae.cfg.apply_b_dec_to_input:
            x2 = x2 - sae.b_dec
        # one fused GEMM + bias (same value as SAE.encode_pre)
        out = self._scratch(x2.shape[0], sae.W_enc) if reuse else None
        return torch.addmm(sae.b_enc, x2, sae.W_enc, out=out).reshape(*x.shape[:-1], -1)

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
        pre = _fire(h["hook_sae_acts_pre"], self._encode_pre(x, reuse=private), use_hooks, seen)
        need_grad = torch.is_grad_enabled() and (pre.requires_grad or sae.W_dec.requires_grad)
        acts: Tensor | None = None
        recons: Tensor | None = None
        if (
            sae.cfg.activation == "topk" and need_recons and not need_acts and not need_grad
            and not (use_hooks and has_hooks(h["hook_sae_acts_post"]))
            and pre.device.type == "cpu"
        ):
            # TopK fast path: decode the k winners directly, never build [N, d_sae].
            values, indices = topk(pre.reshape(-1, pre.shape[-1]), sae.cfg.k)
            recons = topk_decode(indices, values.relu_(), sae.W_dec, sae.b_dec)
        else:
            if (
                sae.cfg.activation == "relu" and type(sae).activation is SAE.activation
                and type(sae).encode_pre is SAE.encode_pre
                and not need_grad and not pre_seen
            ):
                acts = pre.relu_()  # our own temporary, seen by no hook: no second buffer
            else:
                acts = sae.activation(pre)
            acts = _fire(h["hook_sae_acts_post"], acts, use_hooks, seen)
            if need_recons:
                flat = acts.reshape(-1, acts.shape[-1]).to(sae.W_dec.dtype)
                recons = decode_maybe_sparse(flat, sae.W_dec, sae.b_dec)
        if recons is not None:
            recons = _fire(h["hook_sae_recons"], recons.reshape(*lead, -1), use_hooks, seen)
        self.changed = any(seen)
        return acts, recons


class _SAELensKernel(_Kernel):
    """Runs a ``sae_lens.SAE`` through its own ``encode``/``decode``, which fire its own hook
    points; those are the ones exposed under the model's hook name (as SAELens does)."""

    def run(self, x, *, use_hooks=True, need_acts=False, need_recons=True):
        # its hooks fire inside SAELens' own code: any of them may have changed a value
        self.changed = use_hooks and any(has_hooks(self.hooks[n]) for n in _INNER)
        if use_hooks:
            acts = self.sae.encode(x)
            return acts, (self.sae.decode(acts) if need_recons else None)
        from sae_lens.saes.sae import _disable_hooks

        with _disable_hooks(self.sae):
            acts = self.sae.encode(x)
            return acts, (self.sae.decode(acts) if need_recons else None)


# ------------------------------------------------------------------------- handle
#: sae_lens SAEs attached somewhere -> their hook name: a sae_lens SAE brings its own hook
#: points, which can be children of one model hook only.
_SAE_LENS_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class SAEHandle:
    """An SAE attached to one hook point. Context manager; :meth:`detach` restores the model.

    Attributes:
        model, hook_name, sae, mode: what was attached where.
        hook_points: ``{name: HookPoint}`` for the six ``hook_sae_*`` points.
        latents: in ``"observe"`` mode, the latents of the last forward (flattened heads).
    """

    def __init__(self, model: Any, hook_name: str, sae: Any, mode: str):
        self.model, self.hook_name, self.sae, self.mode = model, hook_name, sae, mode
        self.latents: Tensor | None = None
        self.attached = False
        self._hp: HookPoint = model.hook_dict[hook_name]
        self._saelens = is_sae_lens_sae(sae)
        if self._saelens:
            # SAELens's own hook points stay the ones its encode/decode fire.
            self.hook_points = {n: getattr(sae, n) for n in _INNER}
            self.hook_points["hook_sae_error"] = HookPoint()
            self.hook_points["hook_sae_output"] = HookPoint()
            self._saved_names = {n: hp.name for n, hp in self.hook_points.items()}
            self._reshapes = bool(getattr(sae, "hook_z_reshaping_mode", False))
            self._kernel: _Kernel = _SAELensKernel(sae, self.hook_points)
        else:
            self.hook_points = {n: HookPoint() for n in SAE_HOOK_NAMES}
            self._saved_names = {}
            self._reshapes = False
            self._kernel = _TlMdlKernel(sae, self.hook_points)
        self._torch_handle: Any = None

    # -- attach / detach
    def _attach(self) -> SAEHandle:
        hp = self._hp
        clash = [n for n in SAE_HOOK_NAMES if n in hp._modules]
        if clash:
            raise RuntimeError(
                f"an SAE is already attached at {self.hook_name!r}; detach it first "
                "(handle.detach() or leave its `with` block)"
            )
        if self._saelens:
            where = _SAE_LENS_ATTACHED.get(self.sae)
            if where is not None:
                raise RuntimeError(
                    f"this sae_lens.SAE is already attached at {where!r}; its own hook points "
                    "can sit under one hook only. Attach a copy (copy.deepcopy(sae)) or "
                    "tl_mdl.from_sae_lens(sae), or detach it first"
                )
            _SAE_LENS_ATTACHED[self.sae] = self.hook_name
        for name, point in self.hook_points.items():
            hp.add_module(name, point)
        self._torch_handle = hp.register_forward_hook(self._forward_hook, prepend=True)
        self.attached = True
        self.model.setup()
        return self

    def detach(self) -> None:
        """Remove the SAE; the model's ``hook_dict`` and outputs are as before attaching."""
        if not self.attached:
            return
        self.attached = False
        if self._torch_handle is not None:
            self._torch_handle.remove()
            self._torch_handle = None
        for name in self.hook_points:
            self._hp._modules.pop(name, None)
        for name, old in self._saved_names.items():
            self.hook_points[name].name = old
        if self._saelens:
            _SAE_LENS_ATTACHED.pop(self.sae, None)
        self.latents = None
        if isinstance(self._kernel, _TlMdlKernel):
            self._kernel.release()
        self.model.setup()

    def __enter__(self) -> SAEHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return f"SAEHandle({self.hook_name!r}, mode={self.mode!r}, {state})"

    # -- the forward hook on the model's HookPoint
    def _to_sae_shape(self, x: Tensor) -> Tensor:
        if self._reshapes:
            return x  # SAELens flattens hook_z itself
        return flatten_heads(x, self.sae.cfg.d_in, self.hook_name)

    def _forward_hook(self, module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
        x = output
        h = self.hook_points
        x_sae = self._to_sae_shape(x)

        def back(t: Tensor) -> Tensor:  # SAE shape -> the hook's own shape and dtype
            return (t if t.shape == x.shape else t.reshape(x.shape)).to(x.dtype)

        if self.mode == "observe":
            tail = any(has_hooks(h[n]) for n in SAE_HOOK_NAMES[3:])
            acts, recons = self._kernel.run(x_sae, need_acts=True, need_recons=tail)
            if recons is not None:
                if has_hooks(h["hook_sae_error"]):
                    h["hook_sae_error"](x - back(recons).detach())
                if has_hooks(h["hook_sae_output"]):
                    h["hook_sae_output"](x)
            self.latents = acts
            return None

        _, recons = self._kernel.run(x_sae)
        assert recons is not None
        recons = back(recons)
        if self.mode == "splice":
            if has_hooks(h["hook_sae_error"]):
                h["hook_sae_error"](x - recons.detach())
            return h["hook_sae_output"](recons)
        # splice_error
        if self._kernel.changed:  # a hook intervened: the error term of the clean SAE pass
            with torch.no_grad():
                _, clean = self._kernel.run(x_sae, use_hooks=False)
            assert clean is not None
            out = recons + h["hook_sae_error"](x.detach() - back(clean))
        else:
            error = (x - recons).detach()
            seen: list[bool] = []
            error = _fire(h["hook_sae_error"], error, True, seen)
            if any(seen):
                out = recons + error
            else:
                # == x bitwise, also when hooks only read (run_with_cache). As in SAELens the
                # error term is a constant: gradients reach the latents, and flow upstream
                # only through the SAE.
                out = x.detach() + (recons - recons.detach())
        return h["hook_sae_output"](out)


def attach_sae(
    model: Any, hook_name: str, sae: Any, *, mode: str = "splice"
) -> SAEHandle:
    """Attach ``sae`` at ``model``'s hook point ``hook_name``.

    Args:
        model: a TransformerLens ``HookedTransformer`` (or any ``HookedRootModule``).
        hook_name: a key of ``model.hook_dict`` (``blocks.0.hook_resid_pre``,
            ``blocks.1.attn.hook_z``, ``blocks.0.mlp.hook_post``, …).
        sae: a ``tl_mdl.SAE`` or a ``sae_lens.SAE`` with ``d_in`` equal to the hook's last
            dim (or ``n_heads·d_head`` for head-indexed hooks), same dtype and device.
        mode: ``"splice"`` (activation ← ``x̂``), ``"splice_error"`` (``x̂ + error``: output
            unchanged, latents in the graph) or ``"observe"`` (activation untouched).

    Returns:
        An :class:`SAEHandle`: use as ``with attach_sae(...) as h:`` or call ``h.detach()``.
        The SAE's hook points are ``f"{hook_name}.hook_sae_{input,acts_pre,acts_post,recons,
        error,output}"``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; use one of {list(MODES)}")
    check_hook_name(model, hook_name)
    if isinstance(model.hook_dict[hook_name], HookPoint) and any(
        n in model.hook_dict[hook_name]._modules for n in SAE_HOOK_NAMES
    ):
        raise RuntimeError(
            f"an SAE is already attached at {hook_name!r}; detach it first "
            "(handle.detach() or leave its `with` block)"
        )
    check_sae_fits(model, hook_name, sae)
    return SAEHandle(model, hook_name, sae, mode)._attach()

