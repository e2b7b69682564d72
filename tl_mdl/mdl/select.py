"""MDL selection: the shortest description among SAEs that reconstruct well enough, and the
Pareto frontier of description length against quantised FVU.

``fvu_threshold`` is the largest quantised FVU an SAE may have to be chosen; it is not the
precision ``tolerance`` of :func:`~tl_mdl.mdl.description_length` (docs/math.md §3)."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from tl_mdl.sae import SAE


class NoSAEMeetsThreshold(ValueError):
    """No row of a table reaches the selection threshold. ``best`` is the row with the lowest
    ``loss_key`` (what came closest), ``fvu_threshold`` and ``loss_key`` what was asked."""

    def __init__(self, best: Mapping[str, Any], fvu_threshold: float, loss_key: str):
        self.best, self.fvu_threshold, self.loss_key = best, fvu_threshold, loss_key
        super().__init__(
            f"no SAE meets {loss_key} <= {fvu_threshold:g} (the best has {best[loss_key]:.4g}); "
            "raise fvu_threshold or train wider / denser SAEs"
        )


def resolve_fvu_threshold(
    fvu_threshold: float | None, tolerance: float | None, where: str
) -> float:
    """``fvu_threshold``, or the deprecated ``tolerance=`` keyword of ``where`` (with a
    ``DeprecationWarning``). Exactly one of the two must be given."""
    if tolerance is None:
        if fvu_threshold is None:
            raise TypeError(f"{where}() needs fvu_threshold (the largest quantised FVU allowed)")
        return fvu_threshold
    if fvu_threshold is not None:
        raise TypeError(
            f"{where}() got fvu_threshold={fvu_threshold!r} and tolerance={tolerance!r}; "
            "pass only fvu_threshold"
        )
    warnings.warn(
        f"{where}(tolerance=...) is deprecated and will be removed in the next release: the "
        "selection threshold is now called fvu_threshold (tolerance is the precision "
        f"tolerance of description_length); use {where}(..., fvu_threshold={tolerance!r})",
        DeprecationWarning,
        stacklevel=3,
    )
    return tolerance


def select_mdl_row(
    table: Iterable[Mapping[str, Any]],
    fvu_threshold: float | None = None,
    *,
    loss_key: str = "fvu_quantized",
    tolerance: float | None = None,
) -> Mapping[str, Any]:
    """The row with the smallest ``bits_per_input`` among rows whose ``loss_key``
    (default: FVU of the quantised reconstruction) is ``<= fvu_threshold``.

    Rows are mappings with at least ``bits_per_input`` and ``loss_key`` (e.g. the rows of
    ``tl_mdl.sweep``). Ties go to the earlier row. ``tolerance=`` is the deprecated name of
    ``fvu_threshold``."""
    fvu_threshold = resolve_fvu_threshold(fvu_threshold, tolerance, "select_mdl_row")
    return _select_row(table, fvu_threshold, loss_key)


def _select_row(
    table: Iterable[Mapping[str, Any]], fvu_threshold: float, loss_key: str
) -> Mapping[str, Any]:
    if not (
        isinstance(fvu_threshold, (int, float))
        and math.isfinite(fvu_threshold)
        and fvu_threshold > 0
    ):
        raise ValueError(f"fvu_threshold must be a finite number > 0, got {fvu_threshold!r}")
    rows = list(table)
    if not rows:
        raise ValueError("the table is empty: train or score some SAEs first (tl_mdl.sweep)")
    for r in rows:
        if "bits_per_input" not in r or loss_key not in r:
            raise KeyError(f"table rows need 'bits_per_input' and {loss_key!r}; got {sorted(r)}")
    ok = [r for r in rows if r[loss_key] <= fvu_threshold]
    if not ok:
        raise NoSAEMeetsThreshold(min(rows, key=lambda r: r[loss_key]), fvu_threshold, loss_key)
    return min(ok, key=lambda r: r["bits_per_input"])


def select_mdl(
    table: Iterable[Mapping[str, Any]],
    fvu_threshold: float | None = None,
    *,
    loss_key: str = "fvu_quantized",
    tolerance: float | None = None,
) -> SAE:
    """The minimum-description-length SAE among those with ``loss_key <= fvu_threshold``
    (see :func:`select_mdl_row`). Rows carry the SAE itself (``"sae"``) or its folder
    (``"path"``). ``tolerance=`` is the deprecated name of ``fvu_threshold``."""
    fvu_threshold = resolve_fvu_threshold(fvu_threshold, tolerance, "select_mdl")
    row = _select_row(table, fvu_threshold, loss_key)
    if row.get("sae") is not None:
        return row["sae"]
    if row.get("path"):
        return SAE.load(row["path"])
    raise KeyError("the selected row has neither 'sae' nor 'path'")


def pareto_frontier(
    rows: Iterable[Mapping[str, Any]], *, loss_key: str = "fvu_quantized",
    bits_key: str = "bits_per_input",
) -> list[Mapping[str, Any]]:
    """The rows no other row beats on both axes: none has ``bits <=`` and ``loss <=`` with
    one of them strictly smaller (of equal rows the earliest stays). Sorted by ``loss_key``
    ascending, so ``bits_key`` descends along the list."""
    ordered = sorted(enumerate(rows), key=lambda ir: (ir[1][loss_key], ir[1][bits_key], ir[0]))
    out: list[Mapping[str, Any]] = []
    for _, r in ordered:
        if not out or r[bits_key] < out[-1][bits_key]:
            out.append(r)
    return out


def frontier_bits_at(
    rows: Iterable[Mapping[str, Any]], fvu: float, *, loss_key: str = "fvu_quantized",
    bits_key: str = "bits_per_input",
) -> float | None:
    """The frontier's description length at quantised FVU ``fvu``: ``log(bits)`` linear in
    the FVU between the two frontier points around it (exact at a point); None outside the
    frontier's FVU range (no extrapolation)."""
    front = pareto_frontier(rows, loss_key=loss_key, bits_key=bits_key)
    for a, b in itertools.pairwise(front):
        fa, fb = a[loss_key], b[loss_key]
        if fa <= fvu <= fb:
            if fvu in (fa, fb):  # exactly a frontier point
                return float(a[bits_key] if fvu == fa else b[bits_key])
            t = (fvu - fa) / (fb - fa)
            la, lb = math.log(a[bits_key]), math.log(b[bits_key])
            return math.exp(la + t * (lb - la))
    if front and front[0][loss_key] == fvu:
        return float(front[0][bits_key])
    return None


def plot_frontiers(
    rows: Iterable[Mapping[str, Any]], path: str | Any, *, group_key: str = "objective",
    title: str = "description length vs quantised FVU",
) -> Any:
    """Plot every row (dots) and one Pareto frontier per ``group_key`` value (e.g.
    ``topk``, ``l1``, ``mdl``, ``hierarchical``) of bits per input against quantised FVU,
    log y axis; saved as a PNG at ``path`` (returned)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(rows)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r.get(group_key, "")), []).append(r)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for i, (name, rs) in enumerate(sorted(groups.items())):
        color = f"C{i}"
        ax.scatter([r["fvu_quantized"] for r in rs], [r["bits_per_input"] for r in rs],
                   s=12, alpha=0.35, color=color)
        front = pareto_frontier(rs)
        ax.plot([r["fvu_quantized"] for r in front], [r["bits_per_input"] for r in front],
                "-o", ms=4, color=color, label=f"{name} frontier")
    ax.set_yscale("log")
    ax.set_xlabel("quantised FVU (lower is more faithful)")
    ax.set_ylabel("description length (bits / input)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
