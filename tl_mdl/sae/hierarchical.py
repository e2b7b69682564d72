"""Hierarchical SAE: parent features, each with a group of children that can be active only
when their parent is.

Latent order (``F = P + P·C`` features for ``P`` parents with ``C`` children each)::

    [ parent 0 .. parent P-1 | children of parent 0 (C) | children of parent 1 (C) | ... ]

so ``parent_index[i] = -1`` for ``i < P`` and ``parent_index[P + a·C + j] = a``.

Encoder (``x̃ = x − b_dec`` when ``apply_b_dec_to_input``; ``act`` is ``ReLU`` or, with
``activation="jumprelu"``, ``JumpReLU(z) = z · [z > θ_i]`` with a learned threshold per
feature, what the ``mdl`` objective trains)::

    f_a = act(x̃ W_enc[:, a] + b_enc[a])                                   (parents)
    f_c = min(act(x̃ W_enc[:, c] + b_enc[c]), f_{parent(c)})              (children)

The gate ``f_c <= f_{parent(c)}`` makes a child inactive wherever its parent is, and more:
for *every* bin width ``w`` a child that survives quantisation (``round(f_c / w) != 0``, so
``f_c / w > 1/2``) has a parent with ``f_a / w >= f_c / w > 1/2``, which survives too. The
conditional code of :mod:`tl_mdl.mdl.hierarchical` therefore applies to any quantisation of
these latents. Decoder = parents + children: ``x̂ = f W_dec + b_dec`` over all ``F`` rows.

Saved like :class:`~tl_mdl.sae.SAE` (``cfg.json`` with ``"architecture":
"tl_mdl_hierarchical"`` + ``sae_weights.safetensors``, written atomically).
"""

from __future__ import annotations

import copy
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_mdl.codec.hierarchy import check_gating, check_parent_index
from tl_mdl.sae.config import dtype_from_str, normalise_dtype_device
from tl_mdl.sae.files import read_sae_folder
from tl_mdl.sae.model import SAEBase, _JumpReLUFn

ARCHITECTURE = "tl_mdl_hierarchical"


def hierarchy_parent_index(n_parents: int, children_per_parent: int) -> Int[Tensor, " F"]:
    """``parent_index [F]`` of the layout above: ``-1`` for the ``P`` parents, then each
    parent's index repeated ``C`` times."""
    roots = torch.full((n_parents,), -1, dtype=torch.int64)
    kids = torch.arange(n_parents, dtype=torch.int64).repeat_interleave(children_per_parent)
    return torch.cat([roots, kids])


@dataclass
class HierarchicalSAEConfig:
    """Configuration of a two-level hierarchical SAE.

    Args:
        d_in: input (activation) dimension.
        n_parents: number of parent features ``P``.
        children_per_parent: children in each parent's group ``C`` (0 = a flat ReLU SAE).
        child_topk: if set, at most this many children of a parent are active on an input
            (the largest gated ones; ``1`` = mutually exclusive specialisations). ``None``:
            any number.
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding.
        hook_name: the TransformerLens hook the SAE was trained on (metadata, optional).
        dtype, device: where the parameters live.
        metadata: free-form JSON-serialisable dict kept through save/load.
        activation: ``"relu"`` or ``"jumprelu"`` (one learned threshold per feature, applied
            before the gate; :func:`~tl_mdl.train_hierarchical_sae` with the ``mdl``
            objective chooses it). Configs saved without it load as ``"relu"``.
        jumprelu_init_threshold: initial threshold for ``"jumprelu"``.

    ``d_sae = P · (1 + C)`` is derived.
    """

    d_in: int
    n_parents: int
    children_per_parent: int
    child_topk: int | None = None
    apply_b_dec_to_input: bool = True
    hook_name: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    metadata: dict[str, Any] = field(default_factory=dict)
    activation: str = "relu"
    jumprelu_init_threshold: float = 1e-3

    def __post_init__(self) -> None:
        for name, low in (("d_in", 1), ("n_parents", 1), ("children_per_parent", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(
                    f"HierarchicalSAEConfig.{name} must be an int >= {low}, got {value!r}"
                )
        k = self.child_topk
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(
                f"HierarchicalSAEConfig.child_topk must be None or an int >= 1, got {k!r}"
            )
        if self.activation not in ("relu", "jumprelu"):
            raise ValueError(
                f"HierarchicalSAEConfig.activation={self.activation!r} is unknown; use 'relu' "
                "or 'jumprelu'"
            )
        normalise_dtype_device(self)

    @property
    def d_sae(self) -> int:
        """Total number of features ``F = P · (1 + C)``."""
        return self.n_parents * (1 + self.children_per_parent)

    @property
    def n_children(self) -> int:
        return self.n_parents * self.children_per_parent

    @property
    def architecture(self) -> str:
        return ARCHITECTURE

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_str(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """The ``cfg.json`` dict (``architecture`` and the derived ``d_sae`` included)."""
        d = asdict(self)
        d["architecture"] = ARCHITECTURE
        d["d_sae"] = self.d_sae
        d["normalize_activations"] = "none"
        if self.hook_name is not None:
            d["metadata"] = {**d["metadata"], "hook_name": self.hook_name}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HierarchicalSAEConfig:
        """Inverse of :meth:`to_dict` (checks ``architecture`` and ``d_sae``)."""
        d = dict(d)
        arch = d.pop("architecture", ARCHITECTURE)
        if arch != ARCHITECTURE:
            raise ValueError(
                f"cfg architecture {arch!r} is not a hierarchical SAE ({ARCHITECTURE!r}); "
                "load it with tl_mdl.SAE.load"
            )
        d_sae = d.pop("d_sae", None)
        metadata = dict(d.get("metadata") or {})
        if metadata.get("hook_name") == d.get("hook_name"):
            metadata.pop("hook_name", None)
        d["metadata"] = metadata
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        if d_sae is not None and d_sae != cfg.d_sae:
            raise ValueError(
                f"cfg d_sae={d_sae} disagrees with n_parents={cfg.n_parents} × "
                f"(1 + children_per_parent={cfg.children_per_parent}) = {cfg.d_sae}"
            )
        return cfg


class HierarchicalSAE(SAEBase):
    """Two-level SAE ``x -> f -> x̂ = f W_dec + b_dec`` whose children are gated by their
    parents (see the module docstring for the latent order and the gate).

    Weights: ``W_enc [d_in, F]``, ``b_enc [F]``, ``W_dec [F, d_in]``, ``b_dec [d_in]``, in
    the latent order; ``parent_index [F]`` (a buffer, derived from the config) gives each
    feature's parent (``-1`` for parents). Same interface as :class:`~tl_mdl.sae.SAE`:
    ``encode``, ``decode``, ``forward``, ``save``, ``load``; ``description_length`` and
    ``quantize`` apply unchanged.
    """

    def __init__(self, cfg: HierarchicalSAEConfig, *, seed: int | None = None):
        super().__init__()
        if not isinstance(cfg, HierarchicalSAEConfig):
            raise TypeError(f"HierarchicalSAE needs a HierarchicalSAEConfig, got {type(cfg)}")
        self.cfg = cfg = copy.deepcopy(cfg)  # the SAE's own: the caller's is never changed
        self._make_parameters()
        if cfg.activation == "jumprelu":
            self.threshold = torch.nn.Parameter(torch.full(
                (cfg.d_sae,), cfg.jumprelu_init_threshold, dtype=cfg.torch_dtype,
                device=cfg.device))
        pi = hierarchy_parent_index(cfg.n_parents, cfg.children_per_parent)
        self.register_buffer("parent_index", pi.to(cfg.device), persistent=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Decoder rows uniform on the sphere, norm 0.1; each child's row starts as its
        parent's plus an equal-norm random part (a specialisation of it); encoder =
        decoderᵀ."""
        gen = torch.Generator(device="cpu").manual_seed(0 if seed is None else seed)
        c = self.cfg
        w = torch.randn(c.d_sae, c.d_in, generator=gen, dtype=torch.float64)
        w = w / w.norm(dim=-1, keepdim=True)
        if c.children_per_parent:
            w[c.n_parents :] += w[: c.n_parents].repeat_interleave(c.children_per_parent, 0)
            w[c.n_parents :] /= w[c.n_parents :].norm(dim=-1, keepdim=True)
        self._set_tied_weights(0.1 * w)

    # ---------------------------------------------------------------- forward
    @property
    def n_parents(self) -> int:
        return self.cfg.n_parents

    def children_of(self, parent: int) -> range:
        """Feature indices of ``parent``'s children (``0 <= parent < P``)."""
        if not 0 <= parent < self.cfg.n_parents:
            raise IndexError(f"parent {parent} out of range [0, {self.cfg.n_parents})")
        c = self.cfg.children_per_parent
        start = self.cfg.n_parents + parent * c
        return range(start, start + c)

    jumprelu_bandwidth: float = 1e-3

    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """Parents ``act(pre)``; children ``min(act(pre), parent's latent)``, then (with
        ``child_topk``) only the ``k`` largest children of each parent kept."""
        if self.cfg.activation == "jumprelu":
            return self.gate(_JumpReLUFn.apply(pre, self.threshold, self.jumprelu_bandwidth))
        return self.gate(torch.relu(pre))

    def gate(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """The hierarchy applied to non-negative latents ``f``: parents kept, each child
        ``min(f_c, f_parent)``, then (with ``child_topk``) the ``k`` largest children of
        each parent kept."""
        p, c = self.cfg.n_parents, self.cfg.children_per_parent
        if c == 0:
            return f
        parents = f[..., :p]
        children = f[..., p:].unflatten(-1, (p, c))  # [..., P, C]
        gated = torch.minimum(children, parents.unsqueeze(-1))
        k = self.cfg.child_topk
        if k is not None and k < c:
            values, idx = gated.topk(k, dim=-1)
            gated = torch.zeros_like(gated).scatter(-1, idx, values)
        return torch.cat([parents, gated.flatten(-2)], dim=-1)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Scale decoder rows to unit norm, compensating in the encoder.

        Not output-preserving in general (the gate compares a child's latent with its
        parent's, and rescaling them differently moves where ``min`` switches); use it
        during training only, like SAELens does. JumpReLU thresholds take the scale with
        the encoder."""
        norms = self._unit_norm_decoder_rows()
        if self.cfg.activation == "jumprelu":
            self.threshold *= norms

    # -------------------------------------------------------------- save/load
    @classmethod
    def load(
        cls, path: str | os.PathLike, *, device: str | None = None, dtype: str | None = None
    ) -> HierarchicalSAE:
        """Load a hierarchical SAE written by :meth:`save`."""
        cfg_dict, state, weights_path = read_sae_folder(
            path, device=device, dtype=dtype, written_by="HierarchicalSAE.save"
        )
        return cls._from_saved(HierarchicalSAEConfig.from_dict(cfg_dict), state, weights_path)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"d_in={c.d_in}, n_parents={c.n_parents}, "
            f"children_per_parent={c.children_per_parent}, d_sae={c.d_sae}"
            + (", activation='jumprelu'" if c.activation == "jumprelu" else "")
        )


__all__ = [
    "HierarchicalSAE",
    "HierarchicalSAEConfig",
    "hierarchy_parent_index",
    "check_parent_index",
    "check_gating",
    "ARCHITECTURE",
]
