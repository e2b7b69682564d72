"""``tl-mdl ddp-train``: data-parallel SAE training on activation shards, one process per
rank under ``torchrun``::

    torchrun --nproc_per_node 2 -m tl_mdl.cli ddp-train acts/ --d-sae 512 --steps 2000 \\
        --out out/ddp_sae

Every rank streams the same shuffled batches (:class:`~tl_mdl.ShardedActivations`) and
``train_sae`` splits each global batch across ranks (see :mod:`tl_mdl.training.distributed`);
rank 0 writes checkpoints and the SAE. Without ``torchrun`` it trains in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tl_mdl.cli.common import ACTS_HELP, Objective, _positive, app, user_errors

# Optional[...] rather than `X | None` in signatures: typer reads the annotations at runtime.
# ruff: noqa: UP007, UP045


@app.command("ddp-train")
@user_errors
def ddp_train(
    shards: list[Path] = typer.Argument(..., help=ACTS_HELP, show_default=False,
                                        metavar="SHARDS"),
    d_sae: int = typer.Option(..., help="Dictionary size F (number of latents).",
                              show_default=False),
    steps: int = typer.Option(..., help="Optimiser steps in total.", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", show_default=False,
                             help="Folder to save the trained SAE in (written by rank 0)."),
    objective: Objective = typer.Option(Objective.mdl, help="Training loss: mdl, l1 or topk."),
    activation: str = typer.Option("relu", help="SAE activation: relu, topk or jumprelu."),
    k: Optional[int] = typer.Option(None, help="Active latents per input (topk)."),
    sparsity: Optional[float] = typer.Option(
        None, help="λ, the penalty weight (default 1e-3 for mdl, 0.1 for l1)."),
    batch_size: int = typer.Option(4096, help="Rows per global batch (split across ranks)."),
    buffer_size: int = typer.Option(1 << 18, help="Rows in the shuffle buffer."),
    lr: float = typer.Option(1e-3, help="Adam learning rate (per step)."),
    seed: int = typer.Option(0, help="Random seed (initialisation and batch order)."),
    checkpoint_dir: Optional[Path] = typer.Option(
        None, help="Write the training state here (rank 0); a rerun resumes from it."),
    checkpoint_every: int = typer.Option(500, help="Steps between checkpoints."),
) -> None:
    """Data-parallel SAE training on safetensors activation shards (run under torchrun)."""
    from tl_mdl.activations.shards import ShardedActivations
    from tl_mdl.sae import SAEConfig
    from tl_mdl.training import distributed as ddp
    from tl_mdl.training.trainer import train_sae

    for value, name in ((d_sae, "--d-sae"), (steps, "--steps"), (lr, "--lr"),
                        (checkpoint_every, "--checkpoint-every")):
        _positive(value, name)
    with ddp.process_group():
        acts = ShardedActivations(shards, batch_size=batch_size, buffer_size=buffer_size,
                                  seed=seed)
        cfg = SAEConfig(d_in=acts.d_in, d_sae=d_sae, activation=activation, k=k)
        sae = train_sae(
            acts, cfg, objective.value, sparsity=sparsity, steps=steps, batch_size=batch_size,
            lr=lr, seed=seed, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
            progress=ddp.is_main_process(),
        )
        if ddp.is_main_process():
            sae.save(out)
            typer.echo(f"saved {sae} to {out} (world size {ddp.world_size()})")
