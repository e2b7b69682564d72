"""``tl-mdl``: score, train and sweep MDL-SAEs, decompose bilinear MLPs, run the demos.

Inputs are tl_mdl saves (``SAE.save``, ``tl_mdl.models.save_model``), SAELens SAE folders
(``cfg.json`` + ``sae_weights.safetensors``) and safetensors activation shards (one tensor
``activations [N, d_in]`` per file, or a folder of such files). User errors (a missing path,
a folder that is not an SAE, mismatched ``d_in``, bad numbers) print one line
``error: ...`` to stderr and exit with code 2, never a traceback. Heavy submodules are
imported inside the commands that need them.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from tl_mdl.mdl import DLReport
    from tl_mdl.sae import SAE

# Optional[...] rather than `X | None` in signatures: typer reads the annotations at runtime.
# ruff: noqa: UP007, UP045

app = typer.Typer(
    name="tl-mdl",
    help=(
        "MDL-scored sparse autoencoders and bilinear MLPs for TransformerLens. "
        "Description lengths are in bits per input (one activation vector); FVU is the "
        "fraction of variance unexplained (0 = perfect reconstruction)."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # help texts contain shapes like [N, d_in], not markup
    pretty_exceptions_show_locals=False,
)

#: Exceptions that mean "the user gave bad input": one line on stderr, exit code 2.
USER_ERRORS = (OSError, ValueError, TypeError, KeyError, FloatingPointError)
EXIT_USER_ERROR = 2


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` (one line) to stderr; return the exit to raise."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    return typer.Exit(EXIT_USER_ERROR)


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e) or type(e).__name__


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the user errors raised by a command into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise fail(_message(e)) from None

    return wrapper


# --------------------------------------------------------------------------- inputs


def load_acts(paths: Sequence[Path]) -> Tensor:
    """``[N, d_in]`` activations from safetensors shards / folders of shards."""
    from tl_mdl import load_activations

    return load_activations(list(paths))


def _is_sae_lens_only(cfg: dict[str, Any]) -> bool:
    """True for SAELens cfgs that ``tl_mdl.SAE.load`` cannot read faithfully, but
    ``sae_lens`` + ``tl_mdl.from_sae_lens`` can (other architectures, foldable
    normalisation, TopK rescaled by decoder norm)."""
    if "activation" in cfg:  # a tl_mdl save
        return False
    from tl_mdl.sae.config import ACTIVATION_OF_ARCHITECTURE

    return (
        cfg.get("architecture") not in ACTIVATION_OF_ARCHITECTURE
        or cfg.get("normalize_activations", "none") not in ("none", None)
        or bool(cfg.get("rescale_acts_by_decoder_norm", False))
    )


def load_sae(path: Path, device: str = "cpu") -> SAE:
    """A tl_mdl SAE from a tl_mdl or SAELens save folder."""
    from tl_mdl import SAE
    from tl_mdl.sae.model import CFG_FILENAME

    if not path.exists():
        raise FileNotFoundError(f"SAE folder {path} does not exist")
    if not path.is_dir():
        raise ValueError(
            f"{path} is a file; an SAE is a folder with cfg.json and sae_weights.safetensors"
        )
    cfg: Any = None
    try:
        cfg = json.loads((path / CFG_FILENAME).read_text())
    except (OSError, ValueError):
        pass  # SAE.load reports missing / corrupted files
    if isinstance(cfg, dict) and _is_sae_lens_only(cfg):
        return _load_via_sae_lens(path, device, cfg)
    return SAE.load(path, device=device)


def _load_via_sae_lens(path: Path, device: str, cfg: dict[str, Any]) -> SAE:
    from tl_mdl import from_sae_lens

    try:
        import sae_lens

        sl = sae_lens.SAE.load_from_disk(str(path), device=device)
        return from_sae_lens(sl)
    except Exception as e:  # whatever SAELens raises means "cannot load"
        raise ValueError(
            f"{path} is a SAELens SAE (architecture={cfg.get('architecture')!r}, "
            f"normalize_activations={cfg.get('normalize_activations', 'none')!r}) that tl_mdl "
            f"cannot convert: {_message(e)}"
        ) from e


def parse_list(text: str, kind: type, option: str) -> list:
    """``"16,32,64"`` -> ``[16, 32, 64]`` (``kind`` int or float)."""
    try:
        values = [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(
            f"{option} must be comma-separated {kind.__name__}s (e.g. 16,32,64), got {text!r}"
        ) from None
    if not values:
        raise ValueError(f"{option} is empty; give comma-separated {kind.__name__}s")
    return values


def _positive(value: float | int | None, option: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{option} must be > 0, got {value}")


def _check_tolerance(tolerance: float) -> None:
    if not (math.isfinite(tolerance) and 0 < tolerance < 1):
        raise ValueError(
            f"--tolerance is an absolute FVU increase and must be in (0, 1) "
            f"(e.g. 0.01 = 1% of the variance), got {tolerance}"
        )


def _check_device(device: str) -> None:
    """``device`` must parse as a torch device, and a CUDA one must be available."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, mps)"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device!r} but torch.cuda.is_available() is False; use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device!r} but only {torch.cuda.device_count()} CUDA device(s) "
                "are visible; use --device cuda:0 or --device cpu"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(
            f"--device {device!r} but torch.backends.mps.is_available() is False; use --device cpu"
        )


# --------------------------------------------------------------------------- output


class Format(str, Enum):
    table = "table"
    json = "json"


class Objective(str, Enum):
    mdl = "mdl"
    l1 = "l1"
    topk = "topk"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def emit_json(obj: Any) -> None:
    typer.echo(json.dumps(_jsonable(obj), indent=2))


#: (summary key, label, unit) for the DL report table, in order.
REPORT_ROWS = (
    ("bits_per_input", "description length", "bits / input"),
    ("bin_width", "bin width", "latent units"),
    ("tolerance", "tolerance", "loss increase"),
    ("loss", "loss", ""),
    ("l0", "L0 (quantised)", "active latents / input"),
    ("l0_unquantized", "L0 (unquantised)", "nonzero latents / input"),
    ("fvu", "FVU", "fraction of variance"),
    ("fvu_quantized", "FVU quantised", "fraction of variance"),
    ("explained_variance", "explained variance", "fraction of variance"),
    ("bits_per_value", "bits per value", "bits"),
    ("naive_bits", "naive bound L0·(bits/value + log2 F)", "bits / input"),
    ("raw_bits", "raw cost of activations", "bits / input"),
    ("raw_bits_per_float", "raw cost per float", "bits / float"),
    ("raw_bin_width", "raw bin width", "activation units"),
    ("n_inputs", "inputs N", ""),
    ("d_in", "d_in", ""),
    ("d_sae", "d_sae (F)", ""),
)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def report_table(summary: dict[str, Any]) -> str:
    rows = [(label, _fmt(summary.get(key)), unit) for key, label, unit in REPORT_ROWS]
    if summary.get("loss") not in (None, "fvu") and summary.get("tolerance") is not None:
        rows[2] = (rows[2][0], rows[2][1], "nats")
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    return "\n".join(f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows)


def print_report(report: DLReport, fmt: Format, extra: dict[str, Any] | None = None) -> None:
    summary = report.summary()
    if fmt is Format.json:
        emit_json({**summary, **(extra or {})})
    else:
        for k, v in (extra or {}).items():
            typer.echo(f"{k}: {v}")
        typer.echo(report_table(summary))


# --------------------------------------------------------------------------- options

TOLERANCE_HELP = (
    "Precision tolerance: the largest allowed increase of FVU (absolute, a fraction of the "
    "variance; 0.01 = 1%) when latents are quantised. The coarsest bin width within it is "
    "used."
)
FORMAT_HELP = "Output: 'table' (human readable) or 'json' (DLReport.summary(), one object)."
DEVICE_HELP = "Torch device for the SAE and the computation, e.g. cpu or cuda."
ACTS_HELP = (
    "Activations: safetensors files with one tensor 'activations' [N, d_in] "
    "(tl_mdl.save_activations), or folders of such shards; concatenated along N."
)
PROGRESS_HELP = "Show progress bars (on stderr)."


# --------------------------------------------------------------------------- score


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


def _check_d_in(x: Tensor, d_in: int, what: Path | str) -> None:
    if x.shape[-1] != d_in:
        raise ValueError(
            f"activations have d_in={x.shape[-1]} (shape {tuple(x.shape)}) but the SAE in "
            f"{what} has d_in={d_in}; use activations from the SAE's hook point"
        )


# --------------------------------------------------------------------------- train


def _sae_cfg(d_in: int, width: int, objective: Objective, k: Optional[int], hook: Optional[str]):
    from tl_mdl import SAEConfig

    if objective is Objective.topk:
        if k is None:
            raise ValueError("--objective topk needs --k (active latents per input)")
        return SAEConfig(d_in=d_in, d_sae=width, activation="topk", k=k, hook_name=hook)
    if k is not None:
        raise ValueError(f"--k is only for --objective topk (got --objective {objective.value})")
    return SAEConfig(d_in=d_in, d_sae=width, hook_name=hook)


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
    sparsity: Optional[float] = typer.Option(
        None,
        "--sparsity",
        "--lambda",
        help="λ, the penalty weight (FVU per bit for mdl, per unit of L1 for l1); "
        "default 1e-3 (mdl) / 0.1 (l1).",
    ),
    epochs: int = typer.Option(1, help="Passes over the activations (ignored with --steps)."),
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
    epochs: int = typer.Option(1, help="Passes over the activations per SAE."),
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
    )
    if not len(table):
        raise ValueError("the grid is empty (every k exceeds its width); check --sparsities")
    table.to_csv(out / "sweep.csv")
    rows = [{k: v for k, v in r.items() if k != "sae"} for r in table]
    selected, why = None, None
    try:
        selected = {k: v for k, v in table.select(fvu_threshold).items() if k != "sae"}
    except ValueError as e:
        why = str(e)
        if "no SAE meets" in why:
            best = min(
                (r["fvu_quantized"] for r in rows if r.get("fvu_quantized") is not None),
                default=None,
            )
            best_txt = f" (the best quantised FVU is {best:.4g})" if best is not None else ""
            why = (
                f"no SAE meets fvu_quantized <= --fvu-threshold {fvu_threshold:g}{best_txt}; "
                "raise --fvu-threshold, or train longer (--epochs / --steps) or wider (--widths)"
            )
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


# --------------------------------------------------------------------------- decompose


def _indices(index: Optional[str], n: int, k: int, what: str) -> list[int]:
    if index is None:
        return list(range(min(k, n)))
    idx = parse_list(index, int, "--index")
    bad = [i for i in idx if not 0 <= i < n]
    if bad:
        raise ValueError(f"--index {bad} out of range for {n} {what} (0..{n - 1})")
    return idx


@app.command()
@user_errors
def decompose(
    model_dir: Path = typer.Argument(
        ...,
        metavar="MODEL_DIR",
        help="Model folder written by tl_mdl.models.save_model (model_cfg.json + "
        "model.safetensors) whose MLP at --layer is bilinear.",
        show_default=False,
    ),
    layer: int = typer.Option(
        ..., "--layer", "-l", help="Block index of the bilinear MLP (0-based).", show_default=False
    ),
    directions: str = typer.Option(
        "unembed",
        help="Output directions u (vectors in the residual stream, d_model): 'unembed' = "
        "columns of W_U (direct logit directions, ln_final ignored); 'svd' = the top --k "
        "singular output directions of the layer's bilinear tensor; or a path to an SAE folder "
        "trained on the residual stream / MLP output (its encoder directions W_enc.T).",
    ),
    k: int = typer.Option(
        32,
        help="How many output directions: the top K singular directions (svd), else the first "
        "K token ids / SAE features unless --index picks them.",
    ),
    index: Optional[str] = typer.Option(
        None, help="Comma-separated token ids (unembed) or SAE feature ids to decompose."
    ),
    top: int = typer.Option(
        10,
        help="Eigenpairs kept per direction, largest |λ| first (λ in units of u·out per "
        "squared unit of v·x̃; for unembed directions, logits).",
    ),
    bias: bool = typer.Option(
        True,
        help="Fold the MLP biases in: eigenvectors act on x̃ = [x; 1] (d_model + 1 entries, "
        "the last one the constant); --no-bias drops the biases.",
    ),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        "-o",
        help="Save 'values' [n, top], 'vectors' [n, top, d] (rows), 'directions' [n, d_model] "
        "and 'index' [n] to this .safetensors file.",
    ),
    format: Format = typer.Option(Format.table, "--format", "-f", help="'table' or 'json'."),
    device: str = typer.Option("cpu", help=DEVICE_HELP),
) -> None:
    """Eigendecompose the bilinear MLP at --layer for a set of output directions u.

    For each u, u·out(x) − u·b_out = Σ_j λ_j (v_j·x̃)² with x the MLP's input (the residual
    stream after ln2). Prints the top eigenvalues λ per direction.
    """
    import torch

    from tl_mdl.bilinear import BilinearMLP, eigendecompose, output_svd
    from tl_mdl.models import load_model

    for value, name in ((k, "--k"), (top, "--top")):
        _positive(value, name)
    _check_device(device)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints "Moving model"
        model = load_model(model_dir, device=device)
    n_layers = model.cfg.n_layers
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"--layer {layer} out of range: the model has n_layers={n_layers}")
    mlp = getattr(model.blocks[layer], "mlp", None)
    if not isinstance(mlp, BilinearMLP):
        raise TypeError(
            f"the MLP of layer {layer} is {type(mlp).__name__}, not bilinear; convert it with "
            f"tl_mdl.to_bilinear(model, layers=[{layer}]) (and fine-tune with "
            "tl_mdl.anneal_to_bilinear), then save it with tl_mdl.models.save_model"
        )
    d_model = model.cfg.d_model
    if directions == "svd":
        if index is not None:
            raise ValueError(
                "--index picks token ids or SAE features; with --directions svd the top --k "
                "singular directions are used; drop --index"
            )
        svd = output_svd(mlp, min(k, d_model))
        U, idx = svd.out_dirs, list(range(svd.out_dirs.shape[0]))
        labels = [f"svd {i} (σ={float(s):.4g})" for i, s in enumerate(svd.values)]
    elif directions == "unembed":
        W_U = model.W_U.detach()  # [d_model, d_vocab]: column t is token t's logit direction
        idx = _indices(index, W_U.shape[1], k, "tokens")
        U = W_U.T[idx]
        labels = [f"token {t}" for t in idx]
    else:
        sae_path = Path(directions)
        if not sae_path.exists():
            raise FileNotFoundError(
                f"--directions {directions!r} is neither 'unembed', 'svd' nor an existing SAE "
                "folder"
            )
        sae = load_sae(sae_path, device)
        if sae.cfg.d_in != d_model:
            raise ValueError(
                f"the SAE in {sae_path} has d_in={sae.cfg.d_in} but the model has "
                f"d_model={d_model}; use an SAE trained on the residual stream or MLP output"
            )
        idx = _indices(index, sae.cfg.d_sae, k, "SAE features")
        U = sae.W_enc.detach().T[idx]
        labels = [f"feature {i}" for i in idx]
    d = d_model + (1 if bias else 0)
    eig = eigendecompose(mlp, U, bias=bias, k=None if top >= d else top)
    values, vectors = eig.values[:, :top], eig.vectors[:, :top]
    if out is not None:
        _save_eigen(out, values, vectors, U, idx, layer=layer, directions=directions, bias=bias)
    if format is Format.json:
        emit_json(
            {
                "layer": layer % n_layers,
                "directions": directions,
                "bias": bias,
                "rows": [
                    {"label": lab, "index": i, "eigenvalues": v.tolist()}
                    for lab, i, v in zip(labels, idx, values.double(), strict=True)
                ],
                "out": str(out) if out is not None else None,
            }
        )
        return
    typer.echo(
        f"layer {layer % n_layers} bilinear MLP: top {values.shape[1]} eigenvalues λ by |λ| "
        f"per output direction ({directions}); u·out(x) − u·b_out = Σ λ_j (v_j·x̃)²"
    )
    width = max(len(s) for s in labels)
    for lab, v in zip(labels, values.to(torch.float64), strict=True):
        typer.echo(f"{lab:<{width}}  " + " ".join(f"{float(x):+.4g}" for x in v))
    if out is not None:
        typer.echo(f"wrote {out}")


def _save_eigen(out: Path, values, vectors, U, idx, **meta: Any) -> None:
    import torch
    from safetensors.torch import save_file

    from tl_mdl._io import atomic_write

    tensors = {
        "values": values.detach().cpu().contiguous(),
        "vectors": vectors.detach().cpu().contiguous(),
        "directions": U.detach().cpu().contiguous(),
        "index": torch.tensor(idx, dtype=torch.int64),
    }
    metadata = {k: str(v) for k, v in meta.items()}
    atomic_write(out, lambda p: save_file(tensors, str(p), metadata=metadata))


# --------------------------------------------------------------------------- demo


class Demo(str, Enum):
    mnist = "mnist"
    bilinear_mnist = "bilinear-mnist"
    lm = "lm"


DEMO_SCRIPTS = {
    Demo.mnist: "mnist_mdl.py",
    Demo.bilinear_mnist: "bilinear_mnist.py",
    Demo.lm: "lm_study.py",
}
#: Arguments --quick adds (before the user's own, which win on conflicts); quick runs write
#: to their own folder so a later full run never resumes from the small models.
QUICK_ARGS = {
    Demo.mnist: [
        "--widths",
        "16,32,64,128",
        "--train-size",
        "6000",
        # 1 epoch on 6000 images leaves every SAE above the demo's default threshold 0.3;
        # 5 epochs reach ~0.25-0.27 at widths 64/128, and 0.5 lets the small widths show too.
        "--epochs",
        "5",
        "--fvu-threshold",
        "0.5",
        "--out",
        "out/mnist_mdl_quick",
    ],
    Demo.bilinear_mnist: ["--epochs", "1", "--d-mlp", "64", "--out", "out/bilinear_mnist_quick"],
    Demo.lm: ["--quick", "--out", "out/lm_study_quick"],
}


def demos_dir() -> Path:
    """The repository's ``demos/`` folder (``$TL_MDL_DEMOS`` overrides)."""
    env = os.environ.get("TL_MDL_DEMOS")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "demos"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def demo(
    ctx: typer.Context,
    name: Demo = typer.Argument(
        ...,
        metavar="NAME",
        help="mnist: MDL-SAE sweep on MNIST pixels (bits per image vs width); bilinear-mnist: "
        "bilinear classifier read off its eigenvectors; lm: SAE + bilinear study on a small LM.",
        show_default=False,
    ),
    quick: bool = typer.Option(
        False, help="A small, fast configuration (minutes on a laptop CPU), in its own out/ folder."
    ),
) -> None:
    """Run a demo script from the repository's demos/ folder; extra arguments go to it.

    Example: tl-mdl demo mnist --quick --objective mdl. Results go to out/<demo>/ (CSV tables
    beside PNG plots). `tl-mdl demo mnist -- --help` shows the demo's own options.
    """
    folder = demos_dir()
    script = folder / DEMO_SCRIPTS[name]
    if not script.is_file():
        raise FileNotFoundError(
            f"demo script {script} not found; the demos ship with the source repository, not "
            "the wheel: run from a git checkout (pip install -e .) or set TL_MDL_DEMOS to its "
            "demos/ folder"
        )
    args = [*(QUICK_ARGS[name] if quick else []), *ctx.args]
    typer.echo(f"running {script.name} {' '.join(args)}".rstrip(), err=True)
    rc = subprocess.call([sys.executable, str(script), *args])
    if rc:
        raise typer.Exit(rc)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
