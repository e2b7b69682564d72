"""``tl-mdl decompose``: eigendecompose a bilinear MLP along output directions."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Optional

import typer

from tl_mdl.cli.common import (
    DEVICE_HELP,
    Format,
    _check_device,
    _positive,
    app,
    emit_json,
    load_sae,
    parse_list,
    user_errors,
)

# Optional[...] rather than `X | None` in signatures: typer reads the annotations at runtime.
# ruff: noqa: UP007, UP045


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

    from tl_mdl.bilinear import eigendecompose
    from tl_mdl.bilinear.directions import (
        bilinear_mlp_at,
        sae_directions,
        svd_directions,
        unembed_directions,
    )
    from tl_mdl.models import load_model

    for value, name in ((k, "--k"), (top, "--top")):
        _positive(value, name)
    _check_device(device)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder {model_dir} does not exist")
    with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens prints "Moving model"
        model = load_model(model_dir, device=device)
    n_layers = model.cfg.n_layers
    mlp = bilinear_mlp_at(model, layer)
    d_model = model.cfg.d_model
    if directions == "svd":
        if index is not None:
            raise ValueError(
                "--index picks token ids or SAE features; with --directions svd the top --k "
                "singular directions are used; drop --index"
            )
        dirs = svd_directions(mlp, k)
    elif directions == "unembed":
        picked = None if index is None else parse_list(index, int, "--index")
        dirs = unembed_directions(model, picked, k)
    else:
        sae_path = Path(directions)
        if not sae_path.exists():
            raise FileNotFoundError(
                f"--directions {directions!r} is neither 'unembed', 'svd' nor an existing SAE "
                "folder"
            )
        picked = None if index is None else parse_list(index, int, "--index")
        dirs = sae_directions(load_sae(sae_path, device), d_model, picked, k,
                              where=f"the SAE in {sae_path}")
    U, idx, labels = dirs.vectors, dirs.index, dirs.labels
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
