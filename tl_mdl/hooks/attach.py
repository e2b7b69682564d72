"""Attach an SAE to any TransformerLens hook point: splice, splice with error term, observe.

``attach_sae(model, hook_name, sae, mode=...)`` leaves the model's own ``HookPoint`` object
in place. It registers one forward hook on it (prepended, outside TransformerLens's hook
bookkeeping, so ``model.reset_hooks()`` never removes it) and adds six child ``HookPoint``s
named like SAELens's, so ``f"{hook_name}.hook_sae_acts_post"`` appears in ``model.hook_dict``,
``run_with_cache`` and ``run_with_hooks``, under the ``hook_name`` given (on a
``TransformerBridge`` an old-name alias works too). Detaching removes both and rebuilds the
hook names (``model.setup()``, or a bridge's hook registry), which gives back the same
``hook_dict`` (same names, same objects) and bitwise-equal logits. Hook names and the shape
checks live in :mod:`tl_mdl.hooks.names`, the SAE computation in :mod:`tl_mdl.hooks.kernels`.

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

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from tl_mdl._tl import HookPoint, add_named_hooks, remove_named_hooks
from tl_mdl.hooks.kernels import (  # noqa: F401  (decode_maybe_sparse: kept importable here)
    SPARSE_DECODE_MAX_DENSITY,
    _fire,
    _Kernel,
    _SAELensKernel,
    _TlMdlKernel,
    decode_maybe_sparse,
    has_hooks,
)
from tl_mdl.hooks.names import (  # noqa: F401  (hook helpers' old home: kept importable)
    HEAD_HOOKS,
    SAE_HOOK_NAMES,
    SAE_INNER_HOOKS,
    SAE_OUTER_HOOKS,
    SAE_RECONS_HOOKS,
    check_hook_name,
    check_sae_fits,
    expected_hook_shape,
    flatten_heads,
    hook_layer,
    is_sae_lens_sae,
    sae_param,
)

MODES = ("splice", "splice_error", "observe")


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
            self.hook_points = {n: getattr(sae, n) for n in SAE_INNER_HOOKS}
            self.hook_points.update({n: HookPoint() for n in SAE_OUTER_HOOKS})
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
        try:  # all or nothing: a failure anywhere leaves the model as it was
            add_named_hooks(self.model, hp, self.hook_name, self.hook_points)
            self._torch_handle = hp.register_forward_hook(self._forward_hook, prepend=True)
        except BaseException:
            self._undo()
            raise
        self.attached = True
        return self

    def detach(self) -> None:
        """Remove the SAE; the model's ``hook_dict`` and outputs are as before attaching."""
        if not self.attached:
            return
        self.attached = False
        self._undo()

    def _undo(self) -> None:
        """Take back every step of :meth:`_attach` (each one only if it was done)."""
        if self._torch_handle is not None:
            self._torch_handle.remove()
            self._torch_handle = None
        try:
            remove_named_hooks(self.model, self._hp, self.hook_name, list(self.hook_points))
        finally:
            for name, old in self._saved_names.items():
                self.hook_points[name].name = old
            if self._saelens and _SAE_LENS_ATTACHED.get(self.sae) == self.hook_name:
                _SAE_LENS_ATTACHED.pop(self.sae, None)
            self.latents = None
            if isinstance(self._kernel, _TlMdlKernel):
                self._kernel.release()

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
            tail = any(has_hooks(h[n]) for n in SAE_RECONS_HOOKS)
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
        model: a TL 3.9 ``HookedTransformer`` (or any ``HookedRootModule``) or a
            ``TransformerBridge`` (TL 3.9 or 4).
        hook_name: a key of ``model.hook_dict`` (``blocks.0.hook_resid_pre``,
            ``blocks.1.attn.hook_z``, ``blocks.0.mlp.hook_post``, …; on a bridge the old
            names are aliases of the new ones, and either works).
        sae: a ``tl_mdl.SAE`` or a ``sae_lens.SAE`` with ``d_in`` equal to the hook's last
            dim (or ``n_heads·d_head`` for head-indexed hooks), same dtype and device.
        mode: ``"splice"`` (activation ← ``x̂``), ``"splice_error"`` (``x̂ + error``: output
            unchanged, latents in the graph) or ``"observe"`` (activation untouched).

    Returns:
        An :class:`SAEHandle`: use as ``with attach_sae(...) as h:`` or call ``h.detach()``.
        The SAE's hook points are ``f"{hook_name}.hook_sae_{input,acts_pre,acts_post,recons,
        error,output}"`` under the ``hook_name`` given. A failed attach changes nothing.
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

