"""What every ``tl-mdl`` command shares: the typer app, the one-line user errors (exit code
2), reading activation files and SAE folders, option checks and report output."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from tl_mdl._io import error_message

if TYPE_CHECKING:  # pragma: no cover
    from torch import Tensor

    from tl_mdl.mdl import DLReport
    from tl_mdl.sae import SAE

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


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the user errors raised by a command into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            raise fail(error_message(e)) from None

    return wrapper


# --------------------------------------------------------------------------- inputs


def load_acts(paths: Sequence[Path]) -> Tensor:
    """``[N, d_in]`` activations from safetensors shards / folders of shards."""
    from tl_mdl import load_activations

    return load_activations(list(paths))


def load_sae(path: Path, device: str = "cpu") -> SAE:
    """A tl_mdl SAE from a tl_mdl or SAELens save folder."""
    from tl_mdl.interop.folders import load_sae_folder

    return load_sae_folder(path, device)


def _check_d_in(x: Tensor, d_in: int, what: Path | str) -> None:
    if x.shape[-1] != d_in:
        raise ValueError(
            f"activations have d_in={x.shape[-1]} (shape {tuple(x.shape)}) but the SAE in "
            f"{what} has d_in={d_in}; use activations from the SAE's hook point"
        )


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
