"""Description length of a hierarchical code: children coded conditionally on their parents
(docs/math.md §6).

A hierarchy gives each feature ``i`` a parent ``a = parent_index[i]`` (``-1`` for a root),
and a child may be active (``q[n, i] != 0``) only on inputs where its parent is. With
``c_i`` the number of inputs where ``i`` is active, ``p_i = c_i / N``, ``H_i`` the entropy
of its nonzero values (as in the flat code) and ``p_{i|a} = c_i / c_a``:

    roots:     H_b(p_i)              + p_i · H_i
    children:  p_a · H_b(p_{i|a})    + p_i · H_i      (presence coded only where a is active)

    DL = Σ_i (that)  bits per input.

Since ``H(1[i active]) >= H(1[i active] | 1[a active]) = p_a H_b(p_{i|a})`` (the child is
never active where the parent is not), the conditional code is never longer than the flat
one; it is shorter whenever a child's parent is not always active. The value streams are
identical in both codes. :mod:`tl_mdl.codec.hierarchical` achieves these bits.

Also here: :func:`hierarchical_dl_report` (the precision search of
:func:`~tl_mdl.mdl.description_length`, bits recomputed conditionally) and
:func:`feature_splitting` (how features of a narrow SAE split in a wider one, and where a
hierarchical SAE puts them).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_mdl.codec.hierarchy import check_gating, check_parent_index
from tl_mdl.mdl.description_length import (
    DEFAULT_TOLERANCE,
    DLReport,
    _as_activations,
    description_length,
    encode_all,
)
from tl_mdl.mdl.quantize import (
    FeatureCode,
    binary_entropy,
    feature_code_stats,
    quantize,
)


@dataclass
class HierarchicalFeatureCode(FeatureCode):
    """Per-feature statistics of a hierarchical code (tensors ``[F]``): ``presence_bits``
    and ``bits`` are conditional; ``flat_presence_bits`` / ``flat_bits`` are the flat code's."""

    parent_index: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    parent_counts: Tensor = field(default_factory=lambda: torch.zeros(0))  # c_a (N for roots)
    flat_presence_bits: Tensor = field(default_factory=lambda: torch.zeros(0))
    flat_bits: Tensor = field(default_factory=lambda: torch.zeros(0))

    @property
    def flat_bits_per_input(self) -> float:
        return float(self.flat_bits.sum())


def hierarchical_code_stats(
    q: Int[Tensor, "n d_sae"], parent_index: Int[Tensor, " d_sae"] | list[int]
) -> HierarchicalFeatureCode:
    """Per-feature bits of the integer code ``q [N, F]`` under the hierarchy
    ``parent_index [F]`` (module docstring). Raises ``ValueError`` naming the child, parent
    and first row if a child is active where its parent is not."""
    flat = feature_code_stats(q)  # validates q
    n, f = q.shape
    pi, _ = check_parent_index(parent_index, f)
    check_gating(q, pi)
    counts = flat.active_counts.double().cpu()
    is_child = pi >= 0
    parent_counts = torch.where(is_child, counts[pi.clamp_min(0)], torch.full_like(counts, n))
    # p_a H_b(c_i / c_a), with 0 when c_a = 0 (then c_i = 0 too: nothing to code)
    cond = torch.where(parent_counts > 0, counts / parent_counts.clamp_min(1), 0.0)
    presence = parent_counts / n * binary_entropy(cond)
    value_bits = (flat.bits - flat.presence_bits).cpu()  # p_i H_i, as in the flat code
    return HierarchicalFeatureCode(
        n_inputs=n,
        active_counts=flat.active_counts,
        p_active=flat.p_active,
        value_entropy_bits=flat.value_entropy_bits,
        presence_bits=presence,
        bits=presence + value_bits,
        parent_index=pi,
        parent_counts=parent_counts,
        flat_presence_bits=flat.presence_bits,
        flat_bits=flat.bits,
    )


def hierarchical_description_length(
    q: Int[Tensor, "n d_sae"], parent_index: Int[Tensor, " d_sae"] | list[int]
) -> float:
    """Bits per input of ``q [N, F]`` with children coded conditionally on their parents:
    ``Σ_roots [H_b(p_i) + p_i H_i] + Σ_children [p_a H_b(p_{i|a}) + p_i H_i]``."""
    return hierarchical_code_stats(q, parent_index).bits_per_input


def latent_description_length(
    q: Int[Tensor, "n d_sae"], parent_index: Int[Tensor, " d_sae"] | list[int] | None = None
) -> float:
    """Bits per input of the integer latent code ``q [N, F]``.

    Flat (``parent_index=None``): ``Σ_i [H_b(p_i) + p_i · H_i]`` (presence stream + value
    stream per feature). With a hierarchy ``parent_index [F]`` (``-1`` for roots), children
    pay presence only where their parent is active: ``p_a · H_b(p_{i|a}) + p_i · H_i``
    (:func:`hierarchical_description_length`)."""
    if parent_index is None:
        return feature_code_stats(q).bits_per_input
    return hierarchical_description_length(q, parent_index)


# --------------------------------------------------------------------- reports
@dataclass
class HierarchicalDLReport(DLReport):
    """A :class:`~tl_mdl.mdl.DLReport` whose ``bits_per_input`` is the conditional
    (hierarchical) DL; ``flat_bits_per_input`` is the same code coded flat. ``features``
    gains ``parent_index``, ``presence_bits`` and ``flat_bits``."""

    flat_bits_per_input: float = float("nan")

    @property
    def bits_saved(self) -> float:
        """Flat minus conditional bits per input (>= 0)."""
        return self.flat_bits_per_input - self.bits_per_input


@torch.no_grad()
def hierarchical_dl_report(
    sae: Any,
    activations: Float[Tensor, "n d_in"] | str | os.PathLike,
    *,
    parent_index: Int[Tensor, " d_sae"] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    bin_width: float | None = None,
    **dl_kwargs: Any,
) -> HierarchicalDLReport:
    """Description length of ``activations`` under a hierarchical SAE, children coded
    conditionally.

    The precision search is :func:`~tl_mdl.mdl.description_length`'s (same bin width ``w``,
    same FVU/loss tolerance: quantisation does not depend on how the code is written); the
    code ``q = round(encode(x) / w)`` is then scored with :func:`hierarchical_code_stats`.
    ``parent_index`` defaults to ``sae.parent_index``; any SAE (a flat one with a hierarchy
    imposed, say) works if its code respects it. Extra keyword arguments go to
    ``description_length`` (``loss``, ``model``, ``hook_name``, ``tokens``, ``raw_cost``)."""
    if parent_index is None:
        parent_index = getattr(sae, "parent_index", None)
        if parent_index is None:
            raise ValueError(
                f"{type(sae).__name__} has no parent_index; pass parent_index= (one parent per "
                "feature, -1 for roots)"
            )
    x = _as_activations(activations, sae.cfg.d_in)  # loads safetensors shards if a path
    rep = description_length(sae, x, tolerance=tolerance, bin_width=bin_width, **dl_kwargs)
    q = quantize(encode_all(sae, x), rep.bin_width)
    stats = hierarchical_code_stats(q, parent_index)
    d = {k: getattr(rep, k) for k in DLReport.__dataclass_fields__}
    d["bits_per_input"] = stats.bits_per_input
    d["features"] = {
        **rep.features,
        "parent_index": stats.parent_index,
        "presence_bits": stats.presence_bits,
        "flat_bits": stats.flat_bits,
        "bits": stats.bits,
    }
    return HierarchicalDLReport(**d, flat_bits_per_input=stats.flat_bits_per_input)


# ------------------------------------------------------------- feature splitting
def decoder_cosine(
    a: Float[Tensor, "fa d_in"], b: Float[Tensor, "fb d_in"]
) -> Float[Tensor, "fa fb"]:
    """Cosine similarity ``⟨a_i, b_j⟩ / (‖a_i‖ ‖b_j‖)`` between decoder rows (float64)."""
    a = a.detach().double()
    b = b.detach().double()
    a = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    b = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return a @ b.T


@dataclass
class FeatureSplitting:
    """How the ``Fn`` features of a narrow SAE reappear in a wider flat SAE (``Fw``) and,
    optionally, in a hierarchical SAE (``P`` parents, ``C`` children each).

    Per narrow feature ``j`` (tensors ``[Fn]``):

    * ``wide_best_cos[j] = max_k cos(n_j, w_k)``: does the wide SAE keep the feature?
    * ``wide_n_split[j] = #{k : cos(n_j, w_k) >= threshold}``: into how many wide features
      it split (the wide features whose nearest narrow feature is ``j`` are in
      ``wide_nearest``).
    * ``parent_best_cos[j] = max_a cos(n_j, parent_a)`` and ``parent_match[j]`` the argmax:
      does the hierarchical SAE keep it as a parent?
    * ``children_wide_cos[j]``: mean over the matched parent's children ``c`` of
      ``max_k cos(d_c^eff, w_k)``, with ``d_c^eff = E[f_a W_a + f_c W_c | c active]`` the
      child's mean contribution together with its parent (``W_a + W_c`` without data):
      do the children look like the wide SAE's specialisations?
    """

    threshold: float
    cos_narrow_wide: Tensor  # [Fn, Fw]
    wide_best_cos: Tensor
    wide_n_split: Tensor
    wide_nearest: Tensor  # [Fw] nearest narrow feature of each wide feature
    dl_narrow: float | None = None
    dl_wide: float | None = None
    parent_best_cos: Tensor | None = None
    parent_match: Tensor | None = None
    children_wide_cos: Tensor | None = None
    dl_hierarchical: float | None = None
    dl_hierarchical_flat: float | None = None

    @property
    def dl_went_up(self) -> bool | None:
        """Whether widening the flat SAE raised the description length."""
        if self.dl_narrow is None or self.dl_wide is None:
            return None
        return self.dl_wide > self.dl_narrow

    def summary(self) -> dict[str, float | None]:
        """Means of the per-feature columns, the DLs, and the fraction of narrow features
        that split (``wide_n_split >= 2``) or vanish (``0``) in the wide SAE."""

        def mean(t: Tensor | None) -> float | None:
            return None if t is None else float(t.double().mean())

        return {
            "threshold": self.threshold,
            "n_narrow": int(self.cos_narrow_wide.shape[0]),
            "n_wide": int(self.cos_narrow_wide.shape[1]),
            "wide_best_cos_mean": mean(self.wide_best_cos),
            "frac_split": float((self.wide_n_split >= 2).double().mean()),
            "frac_vanished": float((self.wide_n_split == 0).double().mean()),
            "wide_n_split_mean": mean(self.wide_n_split),
            "parent_best_cos_mean": mean(self.parent_best_cos),
            "children_wide_cos_mean": mean(self.children_wide_cos),
            "dl_narrow": self.dl_narrow,
            "dl_wide": self.dl_wide,
            "dl_hierarchical": self.dl_hierarchical,
            "dl_hierarchical_flat": self.dl_hierarchical_flat,
        }

    def rows(self) -> list[dict[str, float]]:
        """One dict per narrow feature (for a CSV)."""
        out = []
        for j in range(self.cos_narrow_wide.shape[0]):
            r: dict[str, float] = {
                "narrow_feature": j,
                "wide_best_cos": float(self.wide_best_cos[j]),
                "wide_n_split": int(self.wide_n_split[j]),
            }
            if self.parent_best_cos is not None:
                r["parent_match"] = int(self.parent_match[j])
                r["parent_best_cos"] = float(self.parent_best_cos[j])
                r["children_wide_cos"] = float(self.children_wide_cos[j])
            out.append(r)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not isinstance(v, Tensor)}


@torch.no_grad()
def _child_effective_directions(hsae: Any, x: Tensor | None) -> Tensor:
    """``[P·C, d_in]``: ``E[f_a W_a + f_c W_c | c active]`` per child (``W_a + W_c``
    without data, or for a child never active)."""
    p, c = hsae.cfg.n_parents, hsae.cfg.children_per_parent
    w = hsae.W_dec.detach().double()
    parents_w = w[:p].repeat_interleave(c, 0)
    fallback = parents_w + w[p:]
    if x is None:
        return fallback
    f = encode_all(hsae, x).double()
    fa = f[:, :p].repeat_interleave(c, 1)  # [N, P·C] parent latent of each child
    fc = f[:, p:]
    active = (fc > 0).double()
    n_act = active.sum(0)
    mean_fa = (fa * active).sum(0) / n_act.clamp_min(1)
    mean_fc = (fc * active).sum(0) / n_act.clamp_min(1)
    eff = mean_fa[:, None] * parents_w + mean_fc[:, None] * w[p:]
    return torch.where((n_act > 0)[:, None], eff, fallback)


@torch.no_grad()
def feature_splitting(
    narrow: Any,
    wide: Any,
    activations: Float[Tensor, "n d_in"] | None = None,
    *,
    hierarchical: Any = None,
    threshold: float = 0.5,
    tolerance: float = DEFAULT_TOLERANCE,
) -> FeatureSplitting:
    """Measure feature splitting from ``narrow`` to ``wide`` (two flat SAEs on the same
    activations) by decoder cosine similarity, and where ``hierarchical`` (a
    :class:`~tl_mdl.HierarchicalSAE`, optional) puts the narrow features (see
    :class:`FeatureSplitting`). With ``activations``, each SAE's DL at ``tolerance`` is
    computed too (the hierarchical one both conditional and flat)."""
    cos = decoder_cosine(narrow.W_dec, wide.W_dec)
    res = FeatureSplitting(
        threshold=threshold,
        cos_narrow_wide=cos,
        wide_best_cos=cos.max(1).values,
        wide_n_split=(cos >= threshold).sum(1),
        wide_nearest=cos.argmax(0),
    )
    x = None if activations is None else _as_activations(activations, narrow.cfg.d_in)
    if x is not None:
        res.dl_narrow = description_length(narrow, x, tolerance=tolerance).bits_per_input
        res.dl_wide = description_length(wide, x, tolerance=tolerance).bits_per_input
    if hierarchical is not None:
        p, c = hierarchical.cfg.n_parents, hierarchical.cfg.children_per_parent
        cos_np = decoder_cosine(narrow.W_dec, hierarchical.W_dec[:p])
        res.parent_best_cos, res.parent_match = cos_np.max(1)
        if c:
            eff = _child_effective_directions(hierarchical, x)
            child_best = decoder_cosine(eff, wide.W_dec).max(1).values.view(p, c)
            res.children_wide_cos = child_best.mean(1)[res.parent_match]
        else:
            res.children_wide_cos = torch.full((cos.shape[0],), math.nan)
        if x is not None:
            rep = hierarchical_dl_report(hierarchical, x, tolerance=tolerance, raw_cost=False)
            res.dl_hierarchical = rep.bits_per_input
            res.dl_hierarchical_flat = rep.flat_bits_per_input
    return res


__all__ = [
    "HierarchicalFeatureCode",
    "hierarchical_code_stats",
    "hierarchical_description_length",
    "latent_description_length",
    "HierarchicalDLReport",
    "hierarchical_dl_report",
    "decoder_cosine",
    "FeatureSplitting",
    "feature_splitting",
]
