"""``tl-mdl train`` (one SAE) and ``tl-mdl sweep`` (a grid of SAEs and the MDL pick)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer

from tl_mdl.cli.common import (
    ACTS_HELP,
    DEVICE_HELP,
    FORMAT_HELP,
    PROGRESS_HELP,
    TOLERANCE_HELP,
    Format,
    Objective,
    _check_device,
    _check_tolerance,
    _fmt,
    _positive,
    app,
    emit_json,
    load_acts,
    parse_list,
    print_report,
    user_errors,
)
from tl_mdl.mdl.select import NoSAEMeetsThreshold

# Optional[...] rather than `X | None` in signatures: typer reads the annotations at runtime.
# ruff: noqa: UP007, UP045


def _sae_cfg(d_in: int, width: int, objective: Objective, k: Optional[int], hook: Optional[str]):
    from tl_mdl import SAEConfig

    if objective is Objective.topk:
        if k is None:
            raise ValueError("--objective topk needs --k (active latents per input)")
        return SAEConfig(d_in=d_in, d_sae=width, activation="topk", k=k, hook_name=hook)
    if k is not None:
        raise ValueError(f"--k is only for --objective topk (got --objective {objective.value})")
    return SAEConfig(d_in=d_in, d_sae=width, hook_name=hook)


AUX_K_HELP = (
    "AuxK dead-latent revival for --objective topk (Gao et al. 2024): 'auto' (d_in // 2) or "
    "the number of dead latents (an integer count) reconstructing each input's residual. "
    "Default: off."
)
AUX_COEFFICIENT_HELP = "Weight of the AuxK term (unit-free, an FVU); default 1/32. Needs --aux-k."
DEAD_STEPS_HELP = (
    "Optimiser steps without firing after which a latent counts as dead (AuxK); default "
    "1000. Needs --aux-k."
)


def _auxk_kwargs(aux_k: Optional[str], aux_coefficient: Optional[float],
                 dead_steps: Optional[int], objective: Objective) -> dict[str, Any]:
    """train_sae's AuxK arguments from the --aux-k / --aux-coefficient / --dead-steps
    options (only those given: the rest keep train_sae's defaults)."""
    if aux_k is None:
        for value, name in ((aux_coefficient, "--aux-coefficient"), (dead_steps, "--dead-steps")):
            if value is not None:
                raise ValueError(f"{name} is a setting of AuxK, which is off; add --aux-k auto "
                                 f"(or an integer) to turn it on, or drop {name}")
        return {}
    if objective is not Objective.topk:
        raise ValueError(f"--aux-k revives dead latents of --objective topk, not of "
                         f"--objective {objective.value}; drop --aux-k")
    value: int | str = aux_k.strip().lower()
    if value != "auto":
        try:
            value = int(value)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"--aux-k must be 'auto' (d_in // 2) or a positive integer, got "
                             f"{aux_k!r}")
    kwargs: dict[str, Any] = {"aux_k": value}
    if aux_coefficient is not None:
        if not (math.isfinite(aux_coefficient) and aux_coefficient >= 0):
            raise ValueError(f"--aux-coefficient must be finite and >= 0 (Gao et al. use "
                             f"1/32 = 0.03125), got {aux_coefficient}")
        kwargs["aux_coefficient"] = aux_coefficient
    if dead_steps is not None:
        _positive(dead_steps, "--dead-steps")
        kwargs["dead_steps"] = dead_steps
    return kwargs


@app.command()
@user_errors
def train(
    acts: list[Path] = typer.Argument(..., help=ACTS_HELP, show_default=False, metavar="ACTS"),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Folder to save the trained SAE in (SAELens layout).",
        show_default=False,
    ),
    width: int = typer.Option(
        ..., "--width", "-w", help="Dictionary size F (number of latents).", show_default=False
    ),
    objective: Objective = typer.Option(
        Objective.mdl,
        help="Training loss: 'mdl' (FVU + λ·description-length surrogate in bits), 'l1' "
        "(FVU + λ·decoder-norm-weighted L1), 'topk' (FVU with exactly --k active latents).",
    ),
    k: Optional[int] = typer.Option(
        None, help="Active latents per input for --objective topk (an integer count)."
    ),
    aux_k: Optional[str] = typer.Option(None, "--aux-k", help=AUX_K_HELP),
    aux_coefficient: Optional[float] = typer.Option(None, help=AUX_COEFFICIENT_HELP),
    dead_steps: Optional[int] = typer.Option(None, help=DEAD_STEPS_HELP),
    sparsity: Optional[float] = typer.Option(
        None,
        "--sparsity",
        "--lambda",
        help="λ, the penalty weight (FVU per bit for mdl, per unit of L1 for l1); "
        "default 1e-3 (mdl) / 0.1 (l1).",
    ),
    epochs: Optional[int] = typer.Option(
        None,
        help="Passes over the activations (ignored with --steps). Default, with neither "
        "--epochs nor --steps: train until the held-out objective stops improving (README, "
        "'Training budget').",
    ),
    steps: Optional[int] = typer.Option(
        None, help="Optimiser steps in total (default: epochs × N / batch size)."
    ),
    batch_size: int = typer.Option(256, help="Activation vectors per optimiser step."),
    lr: float = typer.Option(1e-3, help="Adam learning rate (per step)."),
    seed: int = typer.Option(0, help="Random seed (initialisation and batch order)."),
    tolerance: float = typer.Option(
        0.01, help=TOLERANCE_HELP + " Also sets the mdl surrogate's bin width."
    ),
    checkpoint_dir: Optional[Path] = typer.Option(
        None,
        help="Write the training state here every 500 steps and on Ctrl-C; a rerun with the "
        "same folder resumes.",
    ),
    hook_name: Optional[str] = typer.Option(
        None, help="TransformerLens hook the activations came from (stored in cfg.json)."
    ),
    format: Format = typer.Option(Format.table, "--format", "-f", help=FORMAT_HELP),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
    progress: bool = typer.Option(True, help=PROGRESS_HELP),
) -> None:
    """Train one SAE on ACTS, save it to --out, and print its DL report on ACTS."""
    from tl_mdl import description_length, train_sae

    _check_tolerance(tolerance)
    for value, name in (
        (width, "--width"),
        (epochs, "--epochs"),
        (steps, "--steps"),
        (batch_size, "--batch-size"),
        (lr, "--lr"),
        (k, "--k"),
    ):
        _positive(value, name)
    if sparsity is not None and not (math.isfinite(sparsity) and sparsity >= 0):
        raise ValueError(f"--sparsity must be >= 0, got {sparsity}")
    _check_device(device)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the SAE")
    auxk = _auxk_kwargs(aux_k, aux_coefficient, dead_steps, objective)
    x = load_acts(acts)
    cfg = _sae_cfg(int(x.shape[-1]), width, objective, k, hook_name)
    cfg.device = device
    sae = train_sae(
        x.to(device),
        cfg,
        objective.value,
        sparsity=sparsity,
        steps=steps,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        tolerance=tolerance,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        progress=progress,
        **auxk,
    )
    sae.save(out)
    report = description_length(sae, x, tolerance=tolerance)
    print_report(report, format, {"saved": str(out)})


# --------------------------------------------------------------------------- sweep

DEFAULT_SPARSITY = {"mdl": "1e-3", "l1": "0.1"}
SWEEP_COLUMNS = (
    ("width", "F"),
    ("sparsity", "sparsity"),
    ("bits_per_input", "bits/input"),
    ("bin_width", "bin width"),
    ("l0", "L0"),
    ("fvu", "FVU"),
    ("fvu_quantized", "FVU quant"),
    ("naive_bits", "naive bits"),
    ("raw_bits", "raw bits"),
)


def sweep_table(rows: list[dict[str, Any]], selected: dict[str, Any] | None) -> str:
    header = [label for _, label in SWEEP_COLUMNS] + [""]
    body = []
    for r in rows:
        cells = [_fmt(r.get(key)) for key, _ in SWEEP_COLUMNS]
        is_sel = selected is not None and (r["width"], r["sparsity"]) == (
            selected["width"],
            selected["sparsity"],
        )
        body.append(cells + ["<- MDL" if is_sel else ""])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    ]
    return "\n".join(lines)


@app.command()
@user_errors
def sweep(
    acts: list[Path] = typer.Argument(..., help=ACTS_HELP, show_default=False, metavar="ACTS"),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Folder for the SAEs (one subfolder w{F}_s{sparsity} each, with scores.json) and "
        "sweep.csv; a rerun resumes from what is there.",
        show_default=False,
    ),
    widths: str = typer.Option(
        "16,32,64", help="Dictionary sizes F to train, comma separated (number of latents)."
    ),
    sparsities: Optional[str] = typer.Option(
        None,
        help="Comma separated: λ for mdl / l1 (penalty weight; default 1e-3 / 0.1), or k for "
        "topk (active latents per input; required). Pairs with k > F are skipped.",
    ),
    objective: Objective = typer.Option(
        Objective.mdl, help="Training loss: mdl, l1 or topk (see `tl-mdl train --help`)."
    ),
    aux_k: Optional[str] = typer.Option(None, "--aux-k", help=AUX_K_HELP),
    aux_coefficient: Optional[float] = typer.Option(None, help=AUX_COEFFICIENT_HELP),
    dead_steps: Optional[int] = typer.Option(None, help=DEAD_STEPS_HELP),
    eval: Optional[list[Path]] = typer.Option(
        None,
        "--eval",
        help="Held-out activations to score on (files or folders; repeat the option for "
        "several). Default: the training activations.",
    ),
    tolerance: float = typer.Option(0.01, help=TOLERANCE_HELP),
    fvu_threshold: float = typer.Option(
        0.25,
        help="Selection: the MDL pick is the SAE with the fewest bits per input among those "
        "whose quantised reconstruction has FVU <= this (fraction of variance).",
    ),
    epochs: Optional[int] = typer.Option(
        None,
        help="Passes over the activations per SAE. Default, with neither --epochs nor "
        "--steps: each SAE trains until its held-out objective stops improving.",
    ),
    steps: Optional[int] = typer.Option(None, help="Optimiser steps per SAE (overrides epochs)."),
    batch_size: int = typer.Option(256, help="Activation vectors per optimiser step."),
    lr: float = typer.Option(1e-3, help="Adam learning rate (per step)."),
    seed: int = typer.Option(0, help="Random seed (initialisation and batch order)."),
    format: Format = typer.Option(
        Format.table,
        "--format",
        "-f",
        help="'table' or 'json' ({'rows': [...], 'selected': {...}}).",
    ),
    progress: bool = typer.Option(True, help=PROGRESS_HELP),
) -> None:
    """Train and score a grid of SAEs (widths × sparsities) and pick the MDL one.

    Writes OUT/sweep.csv (one row per SAE: width, sparsity, bits per input, bin width, L0,
    FVU, ...) and prints the table with the minimum-description-length SAE marked.
    """
    from tl_mdl import sweep as run_sweep

    _check_tolerance(tolerance)
    _positive(fvu_threshold, "--fvu-threshold")
    for value, name in (
        (epochs, "--epochs"),
        (steps, "--steps"),
        (batch_size, "--batch-size"),
        (lr, "--lr"),
    ):
        _positive(value, name)
    width_list = parse_list(widths, int, "--widths")
    for w in width_list:
        _positive(w, "--widths")
    if sparsities is None:
        if objective is Objective.topk:
            raise ValueError("--objective topk needs --sparsities (k values, e.g. 4,8,16)")
        sparsities = DEFAULT_SPARSITY[objective.value]
    kind = int if objective is Objective.topk else float
    sparsity_list = parse_list(sparsities, kind, "--sparsities")
    for value in sparsity_list:
        if objective is Objective.topk:
            _positive(value, "--sparsities (k for topk)")
        elif not (math.isfinite(value) and value >= 0):
            raise ValueError(
                f"--sparsities (λ for {objective.value}) must be finite and >= 0, got {value}"
            )
    auxk = _auxk_kwargs(aux_k, aux_coefficient, dead_steps, objective)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder for the sweep")
    x = load_acts(acts)
    x_eval = load_acts(eval) if eval else None
    if x_eval is not None and x_eval.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"--eval activations have d_in={x_eval.shape[-1]} but the training activations "
            f"have d_in={x.shape[-1]}"
        )
    table = run_sweep(
        x,
        widths=width_list,
        sparsities=sparsity_list,
        objective=objective.value,
        eval_activations=x_eval,
        tolerance=tolerance,
        out_dir=out,
        progress=progress,
        seed=seed,
        epochs=epochs,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        **auxk,
    )
    if not len(table):
        raise ValueError("the grid is empty (every k exceeds its width); check --sparsities")
    table.to_csv(out / "sweep.csv")
    rows = [{k: v for k, v in r.items() if k != "sae"} for r in table]
    selected, why = None, None
    try:
        selected = {k: v for k, v in table.select(fvu_threshold).items() if k != "sae"}
    except NoSAEMeetsThreshold as e:
        why = (
            f"no SAE meets fvu_quantized <= --fvu-threshold {fvu_threshold:g} (the best "
            f"quantised FVU is {e.best[e.loss_key]:.4g}); raise --fvu-threshold, or train "
            "longer (--epochs / --steps) or wider (--widths)"
        )
    except ValueError as e:
        why = str(e)
    if format is Format.json:
        emit_json({"rows": rows, "selected": selected, "csv": str(out / "sweep.csv")})
    else:
        typer.echo(sweep_table(rows, selected))
        typer.echo(f"wrote {out / 'sweep.csv'}")
        if selected is not None:
            typer.echo(
                f"MDL pick (FVU quantised <= {fvu_threshold:g}): F={selected['width']}, "
                f"sparsity={selected['sparsity']:g}, {selected['bits_per_input']:.2f} bits/input, "
                f"L0 {selected['l0']:.2f}, FVU quantised {selected['fvu_quantized']:.4f}; "
                f"SAE in {selected['path']}"
            )
    if why is not None:
        raise ValueError(why)
