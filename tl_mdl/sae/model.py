"""The sparse autoencoder: ReLU, TopK and JumpReLU activations over one shared model."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from tl_mdl._sparse import topk
from tl_mdl.sae.config import SAEConfig, dtype_to_str
from tl_mdl.sae.files import CFG_FILENAME, check_state_shapes, read_sae_folder, write_sae_folder


class _JumpReLUFn(torch.autograd.Function):
    """``pre · [pre > θ]`` with a straight-through gradient for θ (Rajamanoharan et al. 2024):
    d/dθ ≈ -(θ/ε) · K((pre-θ)/ε) with a rectangle kernel K of width ε."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad_out * (pre > threshold)
        kernel = ((pre - threshold).abs() < eps / 2).to(pre.dtype) / eps
        grad_threshold = -(threshold * kernel * grad_out)
        grad_threshold = grad_threshold.reshape(-1, threshold.shape[-1]).sum(0)
        return grad_pre, grad_threshold, None


ActivationFn = Callable[["SAE", Tensor], Tensor]


def _relu(sae: SAE, pre: Tensor) -> Tensor:
    return torch.relu(pre)


def _topk(sae: SAE, pre: Tensor) -> Tensor:
    k = sae.cfg.k
    assert k is not None
    flat = pre.reshape(-1, pre.shape[-1])
    values, indices = topk(flat, k)
    return torch.zeros_like(flat).scatter(-1, indices, torch.relu(values)).reshape(pre.shape)


def _jumprelu(sae: SAE, pre: Tensor) -> Tensor:
    return _JumpReLUFn.apply(pre, sae.threshold, sae.jumprelu_bandwidth)


#: Activation registry: name -> ``fn(sae, pre_acts) -> latents``. Extend with
#: :func:`register_activation` to add an architecture without forking.
ACTIVATIONS: dict[str, ActivationFn] = {"relu": _relu, "topk": _topk, "jumprelu": _jumprelu}


def register_activation(name: str, fn: ActivationFn, architecture: str | None = None) -> None:
    """Register a new SAE activation ``fn(sae, pre) -> latents`` under ``name``."""
    from tl_mdl.sae import config

    ACTIVATIONS[name] = fn
    arch = architecture or name
    config.ARCHITECTURE_OF_ACTIVATION[name] = arch
    config.ACTIVATION_OF_ARCHITECTURE[arch] = name


class SAEBase(nn.Module):
    """What :class:`SAE` and :class:`~tl_mdl.sae.HierarchicalSAE` share: the weights
    ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``,
    the affine maps around the activation (``encode = activation ∘ encode_pre``,
    ``decode``) and :meth:`save`. Subclasses set ``cfg`` (with ``d_in``, ``d_sae``,
    ``apply_b_dec_to_input``, ``torch_dtype``, ``device``, ``to_dict()``) and define
    :meth:`activation`."""

    cfg: Any

    def _apply(self, fn, *args, **kwargs):
        """``to`` / ``double`` / ``cuda`` / ... then keep ``cfg.dtype`` and ``cfg.device`` in
        step with the parameters (so ``save``, ``to_sae_lens`` and checkpoints record where
        the weights really are)."""
        out = super()._apply(fn, *args, **kwargs)
        w, cfg = getattr(self, "W_enc", None), getattr(self, "cfg", None)
        if w is not None and cfg is not None:
            if getattr(cfg, "dtype", None) is not None and dtype_to_str(w.dtype) != cfg.dtype:
                cfg.dtype = dtype_to_str(w.dtype)
            if not _same_device(getattr(cfg, "device", None), w.device):
                cfg.device = str(w.device)
        return out

    def _make_parameters(self) -> None:
        cfg = self.cfg
        kw = {"dtype": cfg.torch_dtype, "device": cfg.device}
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, **kw))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **kw))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, cfg.d_in, **kw))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, **kw))

    @torch.no_grad()
    def _set_tied_weights(self, w: Tensor) -> None:
        """Decoder rows ``w [d_sae, d_in]``, encoder ``wᵀ``, zero biases."""
        self.W_dec.copy_(w.to(self.W_dec))
        self.W_enc.copy_(w.T.to(self.W_enc))
        self.b_enc.zero_()
        self.b_dec.zero_()

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def _check_input(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"input has last dimension {x.shape[-1]} but the SAE has d_in={self.cfg.d_in}; "
                "pass activations of shape [..., d_in]"
            )

    def encode_pre(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Pre-activations ``(x - b_dec) W_enc + b_enc``."""
        self._check_input(x)
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        raise NotImplementedError

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Latents ``f = activation(encode_pre(x))``."""
        return self.activation(self.encode_pre(x))

    def decode(self, latents: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        """Reconstruction ``f W_dec + b_dec``."""
        if latents.shape[-1] != self.cfg.d_sae:
            raise ValueError(
                f"latents have last dimension {latents.shape[-1]} but the SAE has "
                f"d_sae={self.cfg.d_sae}"
            )
        return latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        return self.decode(self.encode(x))

    def uses_stock(self, *methods: str, activation: str | None = None) -> bool:
        """Whether ``methods`` (of ``encode``, ``encode_pre``, ``activation``, ``decode``)
        are this class's definitions as shipped: not overridden by a subclass, not patched
        on the class, not replaced on this instance; with ``activation=name``, also whether
        ``cfg.activation`` is ``name`` with its built-in function (``register_activation``
        may replace it). Fast paths that compute these methods their own way ask this
        first, and otherwise call the methods, so a user's replacement is always what
        runs."""
        unknown = set(methods) - set(_STOCK_METHODS)
        if unknown:
            raise ValueError(f"uses_stock: unknown method(s) {sorted(unknown)}; "
                             f"known: {sorted(_STOCK_METHODS)}")
        if activation is not None:
            if getattr(self.cfg, "activation", None) != activation or (
                    ACTIVATIONS.get(activation) is not _BUILTIN_ACTIVATIONS.get(activation)):
                return False
            methods = (*methods, "activation")
        return all(m not in vars(self) and getattr(type(self), m) is _STOCK_METHODS[m]
                   for m in methods)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` into folder ``path``
        (atomically: temp files then rename). Returns the folder."""
        return write_sae_folder(path, self.state_dict(), self.cfg.to_dict())

    @classmethod
    def _from_saved(
        cls,
        cfg: Any,
        state: dict[str, Tensor],
        weights_path: Path,
        transform: Callable[[dict[str, Tensor]], None] | None = None,
    ) -> Any:
        """The module for ``cfg`` with the saved ``state``: shapes checked first (a clear
        error), then ``transform(state)`` in place if given, loaded in ``cfg``'s dtype and
        moved to its device."""
        sae = cls(cfg)
        check_state_shapes(sae, state, weights_path)
        if transform is not None:
            transform(state)
        sae.load_state_dict({k: v.to(cfg.torch_dtype) for k, v in state.items()})
        return sae.to(cfg.device)

    @torch.no_grad()
    def _unit_norm_decoder_rows(self) -> Tensor:
        """Scale decoder rows to unit norm and the encoder columns and ``b_enc`` by the
        old norms (so pre-activations scale with them); returns the norms ``[d_sae]``."""
        norms = self.W_dec.norm(dim=-1).clamp_min(1e-12)
        self.W_dec /= norms[:, None]
        self.W_enc *= norms[None, :]
        self.b_enc *= norms
        return norms


class SAE(SAEBase):
    """Sparse autoencoder ``x -> f = act((x - b_dec) W_enc + b_enc) -> x̂ = f W_dec + b_dec``.

    Weights: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
    ``b_dec [d_in]`` (and ``threshold [d_sae]`` for JumpReLU). Saved in SAELens's
    layout, so one folder loads in tl_mdl and in ``sae_lens.SAE.load_from_disk``.
    """

    jumprelu_bandwidth: float = 1e-3

    def __init__(self, cfg: SAEConfig, *, seed: int | None = None):
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise TypeError(f"SAE needs an SAEConfig, got {type(cfg).__name__}")
        # A copy: the SAE's cfg follows the SAE (dtype/device after ``to``, training
        # metadata) without changing the caller's config object.
        self.cfg = cfg = copy.deepcopy(cfg)
        self._make_parameters()
        kw = {"dtype": cfg.torch_dtype, "device": cfg.device}
        if cfg.activation == "jumprelu":
            self.threshold = nn.Parameter(
                torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold, **kw)
            )
        self.reset_parameters(seed)

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Decoder rows uniform on the unit sphere scaled to norm 0.1; encoder = decoderᵀ."""
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0 if seed is None else seed)
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=gen, dtype=torch.float64)
        self._set_tied_weights(w / w.norm(dim=-1, keepdim=True) * 0.1)

    # ---------------------------------------------------------------- forward
    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """The activation function applied to pre-activations."""
        return ACTIVATIONS[self.cfg.activation](self, pre)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self, *, allow_topk: bool = False) -> None:
        """Scale decoder rows to unit norm, compensating in the encoder (and JumpReLU
        thresholds) so ``forward`` is unchanged for ReLU and JumpReLU SAEs.

        For TopK it is *not* output-preserving: rescaling pre-activations per feature changes
        which ``k`` are largest, so it raises unless ``allow_topk=True``."""
        if self.cfg.activation == "topk" and not allow_topk:
            raise ValueError(
                "set_decoder_norm_to_unit_norm changes which latents a TopK SAE keeps; "
                "pass allow_topk=True to do it anyway"
            )
        norms = self._unit_norm_decoder_rows()
        if self.cfg.activation == "jumprelu":
            self.threshold *= norms

    # -------------------------------------------------------------- save/load
    @classmethod
    def load(
        cls, path: str | os.PathLike, *, device: str | None = None, dtype: str | None = None
    ) -> SAE:
        """Load an SAE saved by :meth:`save` (or a SAELens standard/topk/jumprelu save)."""
        cfg_dict, state, weights_path = read_sae_folder(
            path, device=device, dtype=dtype, written_by="SAE.save or sae_lens"
        )
        if "d_in" not in cfg_dict or "d_sae" not in cfg_dict:
            raise ValueError(f"{weights_path.parent / CFG_FILENAME} is not an SAE config "
                             "(needs d_in, d_sae, architecture)")
        # SAELens TopK option: select on pre·‖W_dec_i‖, decode f/‖W_dec_i‖. Folding the norms
        # into the weights (W_enc·n, b_enc·n, W_dec/n) gives the same latents and output.
        rescale = bool(cfg_dict.pop("rescale_acts_by_decoder_norm", False))
        written_by_sae_lens = "activation" not in cfg_dict  # tl_mdl always writes it
        cfg = SAEConfig.from_dict(cfg_dict)

        def fold_decoder_norms(state: dict[str, Tensor]) -> None:
            n = state["W_dec"].double().norm(dim=-1)
            state["W_enc"] = (state["W_enc"].double() * n).to(state["W_enc"].dtype)
            state["b_enc"] = (state["b_enc"].double() * n).to(state["b_enc"].dtype)
            state["W_dec"] = (state["W_dec"].double() / n[:, None]).to(state["W_dec"].dtype)

        def transform(state: dict[str, Tensor]) -> None:
            if rescale and cfg.activation == "topk":
                fold_decoder_norms(state)
            if written_by_sae_lens and cfg.activation == "jumprelu":
                # SAELens computes relu(pre)·[pre > θ]: a threshold below 0 acts as 0, and
                # tl_mdl's pre·[pre > θ] with θ clamped at 0 is the same function.
                state["threshold"] = state["threshold"].clamp_min(0)

        return cls._from_saved(cfg, state, weights_path, transform)

    def extra_repr(self) -> str:
        c = self.cfg
        extra = f", k={c.k}" if c.k is not None else ""
        return f"d_in={c.d_in}, d_sae={c.d_sae}, activation={c.activation!r}{extra}"


#: the methods and activations as defined here, captured before anything can patch them
_STOCK_METHODS = {m: getattr(SAE, m) for m in ("encode", "encode_pre", "activation", "decode")}
_BUILTIN_ACTIVATIONS = dict(ACTIVATIONS)


def _same_device(name: str | None, device: torch.device) -> bool:
    """Whether a config's device string names ``device`` (``"cuda"`` names any CUDA device:
    the config keeps what the user wrote when it is still right)."""
    if name is None:
        return True
    try:
        d = torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return d.type == device.type and (d.index is None or d.index == device.index)


def identity_sae(d_in: int, *, dtype: str = "float32") -> SAE:
    """An SAE that reconstructs exactly: ``W_enc = W_dec = I``, ``b = 0`` on inputs ≥ 0
    (ReLU); used in tests and as a sanity reference."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_in, dtype=dtype))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d_in))
        sae.W_dec.copy_(torch.eye(d_in))
    return sae


__all__ = ["SAE", "SAEBase", "ACTIVATIONS", "register_activation", "identity_sae"]
