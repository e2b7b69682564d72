"""Training hierarchical SAEs with the conditional MDL objective, and sweeps over
(parents × children per parent).

``hierarchical_mdl`` (also what ``"mdl"`` means here) — for a hierarchical JumpReLU SAE,
straight-through estimates of the exact conditional code length with a TopK warm start
(:mod:`tl_mdl.training.conditional_code`, docs/math.md §6). :func:`train_hierarchical_sae`
gives a ReLU config thresholds (``activation="jumprelu"``) for it, as
:func:`~tl_mdl.train_sae` does for flat SAEs.

For a ReLU hierarchical SAE trained through :func:`~tl_mdl.train_sae` directly, the older
smooth surrogate :func:`hierarchical_mdl_penalty`: the ``mdl`` surrogate of
:mod:`tl_mdl.training.objectives` with the presence term coded conditionally. With the
same bin width ``w`` and soft presence ``s_{n,i} = σ((f_{n,i} − w/2)/(w/4)) · [f_{n,i} > 0]``
(``p̂_i = mean_n s_{n,i}``):

* roots: ``H_b(p̂_i)``;
* child ``i`` of parent ``a``: ``p̂_a · H_b(p̂_{i|a})`` with
  ``p̂_{i|a} = Σ_n s_{n,i} / Σ_n s_{n,a}`` (``<= 1``: the gate keeps ``f_i <= f_a``);
* value bits ``(1/B) Σ_{n,i} s_{n,i} · log2(1 + f_{n,i}/w)``, as in the flat surrogate.

``loss = FVU + λ · DL_surrogate``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from tl_mdl.mdl import DEFAULT_TOLERANCE
from tl_mdl.mdl.hierarchical import hierarchical_dl_report
from tl_mdl.mdl.select import resolve_fvu_threshold
from tl_mdl.sae.hierarchical import HierarchicalSAE, HierarchicalSAEConfig
from tl_mdl.training.conditional_code import ConditionalCodeLengthObjective
from tl_mdl.training.objectives import (
    _LN2,
    batch_fvu,
    register_objective,
    surrogate_bin_width,
)
from tl_mdl.training.sweep import (
    SETTINGS_KEY,
    SweepTable,
    checkpoint_subfolder,
    data_fingerprint,
    report_columns,
    reuse_or_train,
    row_settings,
    store_row,
)
from tl_mdl.training.trainer import TrainResult, train_sae


def _h2(p: Tensor) -> Tensor:
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


def hierarchical_mdl_penalty(
    latents: Float[Tensor, "batch d_sae"],
    sae: Any,
    x: Float[Tensor, "batch d_in"] | None = None,
    *,
    parent_index: Int[Tensor, " d_sae"] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    bin_width: float | Tensor | None = None,
) -> Tensor:
    """Differentiable conditional description-length surrogate in bits per input (module
    docstring). ``parent_index`` defaults to ``sae.parent_index``; needs ``x`` unless
    ``bin_width`` is given."""
    if parent_index is None:
        parent_index = sae.parent_index
    if bin_width is None:
        if x is None:
            raise ValueError("hierarchical_mdl_penalty needs the batch x (or a bin_width)")
        bin_width = surrogate_bin_width(sae, x, latents, tolerance)
    w = torch.as_tensor(bin_width, dtype=latents.dtype, device=latents.device)
    s = torch.sigmoid((latents - w / 2) / (w / 4)) * (latents > 0)
    mass = s.sum(0)  # Σ_n s_{n,i}
    n = latents.shape[0]
    pi = parent_index.to(latents.device)
    is_child = pi >= 0
    parent_mass = torch.where(is_child, mass[pi.clamp_min(0)], torch.full_like(mass, n))
    p_cond = (mass / parent_mass.clamp_min(1e-6)).clamp(1e-6, 1 - 1e-6)
    presence = (parent_mass / n * _h2(p_cond)).sum()
    values = (s * torch.log1p(latents.clamp_min(0) / w)).sum(-1).mean() / _LN2
    return presence + values


def smooth_hierarchical_mdl(sae, x, latents, x_hat, sparsity, tolerance):
    """``FVU + λ · hierarchical_mdl_penalty`` (the smooth surrogate, module docstring)."""
    rec = batch_fvu(x, x_hat)
    dl = hierarchical_mdl_penalty(latents, sae, x, tolerance=tolerance)
    return rec + sparsity * dl, {"fvu": float(rec.detach()), "dl_bits": float(dl.detach())}


register_objective("hierarchical_mdl", ConditionalCodeLengthObjective)

#: objectives that train a hierarchical SAE with the conditional code length (JumpReLU)
_CODE_LENGTH = ("mdl", "hierarchical_mdl")


def _for_objective(cfg: HierarchicalSAEConfig, objective: str) -> HierarchicalSAEConfig:
    """The config the objective trains: thresholds for the code length."""
    if objective in _CODE_LENGTH and cfg.activation == "relu":
        return replace(cfg, activation="jumprelu")
    return cfg


def train_hierarchical_sae(
    activations: Tensor | Iterable[Tensor],
    cfg: HierarchicalSAEConfig,
    objective: str = "hierarchical_mdl",
    *,
    sparsity: float = 1e-3,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 256,
    lr: float = 1e-3,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
    progress: bool = True,
    return_history: bool = False,
    **train_kwargs: Any,
) -> HierarchicalSAE | TrainResult:
    """Train a :class:`~tl_mdl.HierarchicalSAE` with Adam on ``activations`` (``[N, d_in]``
    or an iterable of batches), minimising ``FVU + λ · DL`` with DL the conditional code
    length (``objective="hierarchical_mdl"`` or ``"mdl"``, the same objective here: see
    :mod:`tl_mdl.training.conditional_code`; a ReLU ``cfg`` is trained as
    ``activation="jumprelu"``, with a TopK warm start over the parents, settings
    ``warm_start_frac`` / ``warm_start_k``). Any other registered objective works too.
    Same batches, learning-rate schedule, ``b_dec`` initialisation, checkpoints/resume and
    Ctrl-C handling as :func:`tl_mdl.train_sae` (it *is* ``train_sae`` with the conditional
    objective): without ``steps`` or ``epochs`` it trains until the convergence rule stops
    it, and ``target_fvu=`` adapts λ by the same dual ascent. Returns the SAE, or a
    ``TrainResult`` with the loss history."""
    if objective == "mdl":
        objective = "hierarchical_mdl"
    cfg = _for_objective(cfg, objective)
    return train_sae(
        activations, cfg, objective, sparsity=sparsity, steps=steps, epochs=epochs,
        batch_size=batch_size, lr=lr, tolerance=tolerance, seed=seed, progress=progress,
        return_history=return_history, **train_kwargs,
    )


# ------------------------------------------------------------------------ sweep
#: the scalar columns of a hierarchical sweep table (CSV order)
HIERARCHICAL_COLUMNS = (
    "n_parents",
    "children_per_parent",
    "child_topk",
    "width",
    "sparsity",
    "objective",
    "bits_per_input",
    "flat_bits_per_input",
    "bin_width",
    "l0",
    "l0_parents",
    "fvu",
    "fvu_quantized",
    "explained_variance",
    "naive_bits",
    "raw_bits",
    "train_seconds",
    "path",
)


class HierarchicalSweepTable(SweepTable):
    """Rows of :func:`sweep_hierarchical` (``bits_per_input`` is the conditional DL)."""

    columns: ClassVar[tuple[str, ...]] = HIERARCHICAL_COLUMNS

    def select_sae(
        self, fvu_threshold: float | None = None, *, tolerance: float | None = None
    ) -> HierarchicalSAE:
        """The SAE of :meth:`select`'s row (``tolerance=`` is the deprecated name of
        ``fvu_threshold``)."""
        fvu_threshold = resolve_fvu_threshold(
            fvu_threshold, tolerance, "HierarchicalSweepTable.select_sae"
        )
        row = self.select(fvu_threshold)
        return row["sae"] if row.get("sae") is not None else HierarchicalSAE.load(row["path"])


def sweep_hierarchical(
    activations: Tensor | Iterable[Tensor],
    parents: Sequence[int] = (8, 16, 32),
    children: Sequence[int] = (2, 4, 8),
    sparsities: Sequence[float] = (1e-3,),
    objective: str = "hierarchical_mdl",
    *,
    eval_activations: Tensor | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    seed: int = 0,
    child_topk: int | None = None,
    **train_kwargs: Any,
) -> HierarchicalSweepTable:
    """Train one hierarchical SAE per (parents, children per parent, sparsity) and score
    its conditional description length at ``tolerance`` on ``eval_activations`` (default:
    the training tensor); the MDL objectives train their surrogate at that ``tolerance``
    too; ``child_topk`` is passed to every config. With ``out_dir`` each
    SAE is saved to ``out_dir/p{P}_c{C}[_k{child_topk}]_s{λ}/`` with ``scores.json``, the
    table to ``out_dir/sweep.csv``, and a rerun reuses what is there when it was made with
    the same settings (as :func:`tl_mdl.sweep`: re-scored when only the evaluation data
    changed, trained again otherwise). Extra keyword arguments go to
    :func:`train_hierarchical_sae`; a ``checkpoint_dir`` among them gets one subfolder per
    grid point (named like the ``out_dir`` ones)."""
    if eval_activations is None:
        if not isinstance(activations, Tensor):
            raise ValueError("eval_activations= is required when activations are an iterable")
        eval_activations = activations
    if not parents or not children or not sparsities:
        raise ValueError("parents, children and sparsities must be non-empty")
    d_in = int(eval_activations.shape[-1])
    grid = [(int(p), int(c), float(s)) for p in parents for c in children for s in sparsities]
    out = Path(out_dir) if out_dir is not None else None
    train_data = data_fingerprint(activations)
    eval_data = (
        train_data if eval_activations is activations else data_fingerprint(eval_activations)
    )
    table = HierarchicalSweepTable()
    if objective in ("mdl", "hierarchical_mdl"):  # trained at the precision it is scored at
        train_kwargs = {**train_kwargs, "tolerance": tolerance}
    for p, c, sp in tqdm(grid, desc="sweep hierarchical", disable=not progress):
        tag = f"p{p}_c{c}" + (f"_k{child_topk}" if child_topk is not None else "")
        name = f"{tag}_s{sp:g}"
        folder = out / name if out is not None else None
        cfg = _for_objective(HierarchicalSAEConfig(
            d_in=d_in, n_parents=p, children_per_parent=c, child_topk=child_topk
        ), objective)
        settings = row_settings(
            cfg, objective, sp, seed, train_kwargs, tolerance, train_data, eval_data
        )
        stored, sae, seconds, trained = reuse_or_train(
            folder, HierarchicalSAE, settings, partial(
                train_hierarchical_sae, activations, cfg, objective, sparsity=sp, seed=seed,
                progress=progress, **checkpoint_subfolder(train_kwargs, name),
            ))
        if stored is not None:
            table.rows.append(stored)
            continue
        rep = hierarchical_dl_report(sae, eval_activations, tolerance=tolerance)
        p_active = rep.features["p_active"]
        row = {
            "n_parents": p,
            "children_per_parent": c,
            "child_topk": child_topk,
            "width": cfg.d_sae,
            "sparsity": sp,
            "objective": objective,
            **report_columns(rep),
            "flat_bits_per_input": rep.flat_bits_per_input,
            "l0_parents": float(p_active[:p].sum()),
            "train_seconds": seconds,
            "path": str(folder) if folder is not None else "",
            SETTINGS_KEY: settings,
        }
        store_row(folder, sae, row, trained)
        row["sae"] = sae
        table.rows.append(row)
        if out is not None:
            table.to_csv(out / "sweep.csv")
    return table


__all__ = [
    "hierarchical_mdl_penalty",
    "smooth_hierarchical_mdl",
    "train_hierarchical_sae",
    "sweep_hierarchical",
    "HierarchicalSweepTable",
    "HIERARCHICAL_COLUMNS",
]
