"""The description-length report: one SAE's DL at one precision, its scalars and its
per-feature table (CSV)."""

from __future__ import annotations

import csv
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor


@dataclass
class DLReport:
    """Description length of ``N`` activations under an SAE at one precision.

    ``bits_per_input = Σ_i [H_b(p_i) + p_i H_i]`` of the quantised code (docs/math.md §1).
    """

    bits_per_input: float
    bin_width: float
    tolerance: float | None
    loss: str
    #: loss with unquantised / quantised latents (FVU, or nats for CE/KL)
    loss_unquantized: float
    loss_quantized: float
    l0: float  # mean number of active (q != 0) latents per input
    l0_unquantized: float  # mean number of nonzero latents before quantisation
    fvu: float  # FVU of the unquantised reconstruction
    fvu_quantized: float  # FVU of decode(q · w)
    bits_per_value: float  # log2(#distinct nonzero q values): a fixed-length value code
    naive_bits: float  # L0 · (bits_per_value + log2 F)
    raw_bits: float  # Σ_d H(round(x_d / w_raw)), per-dimension coding of the activations
    raw_bin_width: float  # coarsest grid w_raw with FVU(x, round(x/w_raw) w_raw) within the
    # FVU tolerance (or, for model losses / fixed widths, the SAE code's own FVU increase)
    n_inputs: int
    d_in: int
    d_sae: int
    #: per-feature table, each ``[F]``: p_active, value_entropy_bits, bits
    features: dict[str, Tensor] = field(repr=False, default_factory=dict)
    search_trace: list[tuple[float, float]] = field(repr=False, default_factory=list)

    @property
    def explained_variance(self) -> float:
        return 1.0 - self.fvu

    @property
    def explained_variance_quantized(self) -> float:
        return 1.0 - self.fvu_quantized

    @property
    def raw_bits_per_float(self) -> float:
        return self.raw_bits / self.d_in

    def summary(self) -> dict[str, Any]:
        """Scalars only (JSON-serialisable)."""
        d = asdict(self)
        d.pop("features")
        d.pop("search_trace")
        d["explained_variance"] = self.explained_variance
        d["raw_bits_per_float"] = self.raw_bits_per_float
        return d

    def feature_rows(self) -> list[dict[str, float]]:
        """One dict per feature: index, p_active, value_entropy_bits, bits."""
        cols = {k: v.tolist() for k, v in self.features.items()}
        return [{"feature": i, **{k: cols[k][i] for k in cols}} for i in range(self.d_sae)]

    def write_feature_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = self.feature_rows()
        with open(path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return path

    def __str__(self) -> str:
        return (
            f"DL {self.bits_per_input:.2f} bits/input (w={self.bin_width:.4g}, "
            f"L0 {self.l0:.2f}, FVU {self.fvu:.4f} -> {self.fvu_quantized:.4f}; "
            f"naive {self.naive_bits:.1f}, raw {self.raw_bits:.1f} bits)"
        )
