"""MDL selection: the shortest description among SAEs that reconstruct well enough.

``fvu_threshold`` is the largest quantised FVU an SAE may have to be chosen; it is not the
precision ``tolerance`` of :func:`~tl_mdl.mdl.description_length` (docs/math.md §3)."""

from __future__ import annotations

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
