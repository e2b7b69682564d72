"""``tl-mdl score``: the description length of activations in an SAE's latents."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tl_mdl.cli.common import (
    ACTS_HELP,
    DEVICE_HELP,
    FORMAT_HELP,
    TOLERANCE_HELP,
    Format,
    _check_d_in,
    _check_device,
    _check_tolerance,
    _positive,
    app,
    load_acts,
    load_sae,
    print_report,
    user_errors,
)

# Optional[...] rather than `X | None` in signatures: typer reads the annotations at runtime.
# ruff: noqa: UP007, UP045


@app.command()
@user_errors
def score(
    sae_dir: Path = typer.Argument(
        ...,
        metavar="SAE_DIR",
        help="SAE folder (cfg.json + sae_weights.safetensors): a tl_mdl save (SAE.save) or a "
        "SAELens save (standard / topk / jumprelu; other architectures via sae_lens).",
        show_default=False,
    ),
    acts: list[Path] = typer.Argument(..., help=ACTS_HELP, show_default=False, metavar="ACTS"),
    tolerance: float = typer.Option(0.01, help=TOLERANCE_HELP),
    bin_width: Optional[float] = typer.Option(
        None,
        help="Fixed bin width (in latent units: q = round(latent / width)) instead of "
        "searching one; --tolerance is then ignored.",
    ),
    format: Format = typer.Option(Format.table, "--format", "-f", help=FORMAT_HELP),
    features_csv: Optional[Path] = typer.Option(
        None,
        help="Also write one row per feature (p_active: fraction of inputs; "
        "value_entropy_bits and bits: bits per input) to this CSV file.",
    ),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Description length of ACTS written in the latents of the SAE in SAE_DIR.

    Prints bits per input (DL), the bin width found, L0 (active latents per input), FVU
    before / after quantisation, the naive bound L0·(bits per value + log2 F) and the raw
    cost of the activations themselves (bits per input at the same tolerance).
    """
    from tl_mdl import description_length

    _check_tolerance(tolerance)
    _positive(bin_width, "--bin-width")
    _check_device(device)
    sae = load_sae(sae_dir, device)
    x = load_acts(acts)
    _check_d_in(x, sae.cfg.d_in, sae_dir)
    report = description_length(sae, x, tolerance=tolerance, bin_width=bin_width)
    if features_csv is not None:
        report.write_feature_csv(features_csv)
    print_report(report, format)
