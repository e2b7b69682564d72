"""MDL selection: the shortest description among SAEs that reconstruct well enough."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from tl_mdl.sae import SAE


def select_mdl_row(
    table: Iterable[Mapping[str, Any]], tolerance: float, *, loss_key: str = "fvu_quantized"
) -> Mapping[str, Any]:
    """The row with the smallest ``bits_per_input`` among rows whose ``loss_key``
    (default: FVU of the quantised reconstruction) is ``<= tolerance``.

    Rows are mappings with at least ``bits_per_input`` and ``loss_key`` (e.g. the rows of
    ``tl_mdl.sweep``). Ties go to the earlier row."""
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise ValueError(f"tolerance must be a finite number > 0, got {tolerance!r}")
    rows = list(table)
    if not rows:
        raise ValueError("the table is empty: train or score some SAEs first (tl_mdl.sweep)")
    for r in rows:
        if "bits_per_input" not in r or loss_key not in r:
            raise KeyError(f"table rows need 'bits_per_input' and {loss_key!r}; got {sorted(r)}")
    ok = [r for r in rows if r[loss_key] <= tolerance]
    if not ok:
        best = min(r[loss_key] for r in rows)
        raise ValueError(
            f"no SAE meets {loss_key} <= {tolerance:g} (the best has {best:.4g}); raise the "
            "tolerance or train wider / denser SAEs"
        )
    return min(ok, key=lambda r: r["bits_per_input"])


def select_mdl(
    table: Iterable[Mapping[str, Any]], tolerance: float, *, loss_key: str = "fvu_quantized"
) -> SAE:
    """The minimum-description-length SAE among those meeting ``tolerance`` (see
    :func:`select_mdl_row`). Rows carry the SAE itself (``"sae"``) or its folder (``"path"``)."""
    row = select_mdl_row(table, tolerance, loss_key=loss_key)
    if row.get("sae") is not None:
        return row["sae"]
    if row.get("path"):
        return SAE.load(row["path"])
    raise KeyError("the selected row has neither 'sae' nor 'path'")
