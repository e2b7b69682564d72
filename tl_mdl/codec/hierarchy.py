"""The hierarchy a hierarchical code is written over, checked: ``parent_index [F]`` (the parent
of each feature, ``-1`` for roots) is a forest, and in an integer code ``q [N, F]`` every child
is active only where its parent is. The codec, the DL and the hierarchical SAE all check with
these."""

from __future__ import annotations

import torch
from jaxtyping import Int
from torch import Tensor


def check_parent_index(
    parent_index: Int[Tensor, " F"] | list[int], n_features: int
) -> tuple[Int[Tensor, " F"], Int[Tensor, " F"]]:
    """Validate a hierarchy and return it with a parents-first order.

    ``parent_index[i]`` is the parent feature of ``i`` or ``-1`` for a root; any forest
    (depth >= 1) is allowed. Returns ``(parent_index as int64 on the CPU, order)``, where
    ``order`` lists every feature after its parent (by depth, then index). Raises
    ``ValueError`` naming the bad entry for out-of-range parents and cycles."""
    pi = torch.as_tensor(parent_index).detach().cpu()
    if pi.ndim != 1 or pi.shape[0] != n_features:
        raise ValueError(
            f"parent_index must have shape [F={n_features}] (one parent per feature, -1 for "
            f"roots), got {tuple(pi.shape)}"
        )
    if pi.is_floating_point() or pi.is_complex() or pi.dtype == torch.bool:
        raise TypeError(f"parent_index must be an integer tensor, got {pi.dtype}")
    pi = pi.to(torch.int64)
    bad = ((pi < -1) | (pi >= n_features)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(
            f"parent_index[{i}] = {int(pi[i])} is not a feature index in [0, {n_features}) "
            "or -1 (root)"
        )
    depth = torch.zeros(n_features, dtype=torch.int64)
    up = pi.clone()
    for _ in range(n_features + 1):  # follow every chain to its root at once
        has = up >= 0
        if not has.any():
            break
        depth += has.to(torch.int64)
        up = torch.where(has, pi[up.clamp_min(0)], up)
    else:
        i = int((up >= 0).nonzero()[0])
        raise ValueError(f"parent_index has a cycle through feature {i}; it must be a forest")
    order = torch.argsort(depth * n_features + torch.arange(n_features))
    return pi, order


def check_gating(q: Int[Tensor, "n F"], parent_index: Int[Tensor, " F"]) -> None:
    """Raise ``ValueError`` if some child is active (``q != 0``) where its parent is not,
    naming the child, its parent and the first offending row."""
    kids = (parent_index >= 0).nonzero().squeeze(1).to(q.device)
    if kids.numel() == 0:
        return
    parents = parent_index.to(q.device)[kids]
    viol = (q[:, kids] != 0) & (q[:, parents] == 0)
    if viol.any():
        row, k = (int(v) for v in viol.nonzero()[0])  # row-major: first row, then feature
        child, parent = int(kids[k]), int(parents[k])
        raise ValueError(
            f"child feature {child} is active (q={int(q[row, child])}) in row {row} where its "
            f"parent feature {parent} is not; a hierarchical code needs every child active "
            "only where its parent is (encode with HierarchicalSAE, or pass the right "
            "parent_index)"
        )
