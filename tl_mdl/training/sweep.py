"""Train and score a grid of SAEs (widths × sparsities); the table feeds ``select_mdl``."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_mdl._io import atomic_write
from tl_mdl.mdl import (
    DEFAULT_TOLERANCE,
    description_length,
    pareto_frontier,
    plot_frontiers,
    select_mdl,
    select_mdl_row,
)
from tl_mdl.mdl.select import resolve_fvu_threshold
from tl_mdl.sae import SAE, SAEConfig
from tl_mdl.training import distributed as ddp
from tl_mdl.training.config import LEGACY_OBJECTIVE_SETTINGS, OBJECTIVE_SETTINGS
from tl_mdl.training.objectives import get_objective
from tl_mdl.training.trainer import NEW_FIELDS, TrainConfig, train_sae

#: the scalar columns of a sweep table (CSV order)
COLUMNS = (
    "width",
    "sparsity",
    "objective",
    "bits_per_input",
    "bin_width",
    "l0",
    "fvu",
    "fvu_quantized",
    "explained_variance",
    "naive_bits",
    "raw_bits",
    "train_seconds",
    "path",
    "target_fvu",
)


@dataclass
class SweepTable:
    """Rows of a sweep: one dict per SAE with the :data:`COLUMNS` plus the ``"sae"`` itself."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    #: the scalar columns written by :meth:`to_csv`
    columns: ClassVar[tuple[str, ...]] = COLUMNS

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]

    def select(
        self, fvu_threshold: float | None = None, *, tolerance: float | None = None
    ) -> dict[str, Any]:
        """The minimum-DL row with ``fvu_quantized <= fvu_threshold`` (``tolerance=`` is
        its deprecated name)."""
        fvu_threshold = resolve_fvu_threshold(fvu_threshold, tolerance, "SweepTable.select")
        return dict(select_mdl_row(self.rows, fvu_threshold))

    def select_sae(
        self, fvu_threshold: float | None = None, *, tolerance: float | None = None
    ) -> SAE:
        """The SAE of :meth:`select`'s row."""
        fvu_threshold = resolve_fvu_threshold(fvu_threshold, tolerance, "SweepTable.select_sae")
        return select_mdl(self.rows, fvu_threshold)

    def frontier(self) -> SweepTable:
        """The Pareto set of description length against quantised FVU: the rows no other
        row beats on both (sorted by ``fvu_quantized``; see
        :func:`tl_mdl.mdl.pareto_frontier`). Filter the rows first for one objective's."""
        return SweepTable([dict(r) for r in pareto_frontier(self.rows)])

    def plot_frontier(self, path: str | os.PathLike, **kw: Any) -> Path:
        """Every row and one frontier per objective, bits/input (log) vs quantised FVU,
        saved as a PNG (:func:`tl_mdl.mdl.plot_frontiers`). Combine tables of several
        objectives with ``SweepTable(a.rows + b.rows)``."""
        return Path(plot_frontiers(self.rows, path, **kw))

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the scalar columns (atomically)."""

        def write(p: Path) -> None:
            with open(p, "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=list(self.columns), extrasaction="ignore")
                w.writeheader()
                for r in self.rows:
                    w.writerow({k: r.get(k, "") for k in self.columns})

        atomic_write(path, write)
        return Path(path)


def report_columns(rep: Any) -> dict[str, float]:
    """The scalar sweep columns taken from a ``DLReport`` (flat or hierarchical)."""
    return {
        "bits_per_input": rep.bits_per_input,
        "bin_width": rep.bin_width,
        "l0": rep.l0,
        "fvu": rep.fvu,
        "fvu_quantized": rep.fvu_quantized,
        "explained_variance": rep.explained_variance,
        "naive_bits": rep.naive_bits,
        "raw_bits": rep.raw_bits,
    }


#: ``train_sae`` arguments that do not change the trained SAE (left out of a row's settings)
_NOT_SETTINGS = ("checkpoint_dir", "checkpoint_every", "resume", "log_every", "progress")
#: the key of a row's settings in ``scores.json`` (and in the rows of a table)
SETTINGS_KEY = "settings"


def data_fingerprint(x: Tensor | Iterable[Tensor]) -> str | None:
    """sha256 of a tensor's shape, dtype and bytes (None for an iterable of batches, which
    cannot be read twice for free: a rerun does not check it)."""
    if not isinstance(x, Tensor):
        return None
    h = hashlib.sha256(f"{tuple(x.shape)}|{x.dtype}|".encode())
    flat = x.detach().reshape(-1)
    for chunk in flat.split(1 << 24):  # 16M elements at a time
        h.update(chunk.cpu().contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def row_settings(
    cfg: Any,
    objective: str,
    sparsity: float,
    seed: int,
    train_kwargs: dict[str, Any],
    tolerance: float,
    train_data: str | None,
    eval_data: str | None,
) -> dict[str, Any]:
    """What determines a sweep row, as JSON: ``"train"`` (the SAE config, objective,
    sparsity, seed, the other training settings with their defaults filled in, and the
    training data's fingerprint) and ``"score"`` (the tolerance and the evaluation data's
    fingerprint). A rerun reuses a stored row only when both match, and re-scores the
    stored SAE when only ``"score"`` differs."""
    tc = asdict(TrainConfig())
    tc.update({k: v for k, v in train_kwargs.items() if k not in _NOT_SETTINGS})
    tc.update(objective=objective, sparsity=float(sparsity), seed=seed)
    # train_sae trains until converged when given neither steps nor epochs
    tc["until_converged"] = (train_kwargs.get("steps") is None
                             and train_kwargs.get("epochs") is None)
    for k in _NOT_SETTINGS:
        tc.pop(k, None)
    entry = get_objective(objective)
    for k in OBJECTIVE_SETTINGS:  # None: the objective's default, which may have changed
        default = getattr(entry, k, None)
        if tc.get(k) is None and isinstance(default, str) and default != (
                LEGACY_OBJECTIVE_SETTINGS[k]):  # rows stored without it were trained so
            tc[k] = default
    defaults = asdict(TrainConfig())
    keep = {"warm_start_max_steps"} if _warm_cap_binds(tc, entry) else set()
    for k in NEW_FIELDS:  # absent in rows stored before they existed: same training
        if k in tc and tc[k] == defaults[k] and k not in keep:
            tc.pop(k)
    settings = {
        "train": {"sae_cfg": asdict(cfg), **tc, "data": train_data},
        "score": {"tolerance": tolerance, "data": eval_data},
    }
    return json.loads(json.dumps(settings, default=repr))  # as read back from scores.json


def _warm_cap_binds(tc: dict[str, Any], entry: Any) -> bool:
    """Whether ``warm_start_max_steps`` shortens this run's warm start: until converged,
    with a warm-starting objective, ``warm_start_frac · max_steps`` above it. Rows stored
    before the field existed warmed up for ``warm_start_frac · max_steps`` steps, so then
    they are not rows of today's training (elsewhere the field changes nothing)."""
    return (bool(tc.get("until_converged"))
            and getattr(entry, "warm_start", None) is not None
            and tc["warm_start_frac"] * tc["max_steps"] > tc["warm_start_max_steps"])


def reuse_or_train(
    folder: Path | None, sae_cls: Any, settings: dict[str, Any], train: Callable[[], Any]
) -> tuple[dict[str, Any] | None, Any, float, bool]:
    """One grid point of a sweep: ``(row, sae, train_seconds, trained)``. ``row`` is the
    stored row when it was made with ``settings`` (reuse it as is); otherwise ``row`` is None
    and ``sae`` is the stored SAE when only its scores are stale (``trained`` False), or a
    fresh one from ``train()``. Store the new scores with :func:`store_row`."""
    row = load_scored(folder, sae_cls, settings)
    if row is not None and not row.pop("rescore"):
        return row, row["sae"], row["train_seconds"], False
    if row is not None:  # the SAE is still right; only its scores are stale
        return None, row["sae"], row["train_seconds"], False
    start = time.perf_counter()
    sae = train()
    return None, sae, time.perf_counter() - start, True


def store_row(folder: Path | None, sae: Any, row: dict[str, Any], trained: bool) -> None:
    """Save a grid point's scores (and, when it was ``trained``, its SAE) into ``folder``."""
    if folder is None:
        return
    if trained:
        save_scored(folder, sae, row)
    else:
        save_scores(folder, row)


def save_scored(folder: Path | None, sae: Any, row: dict[str, Any]) -> None:
    """Save a trained sweep SAE and its scalar row (``scores.json``) into ``folder``."""
    if folder is None:
        return
    sae.save(folder)
    save_scores(folder, row)


def save_scores(folder: Path, row: dict[str, Any]) -> None:
    """Write a row's scalars (and settings) to ``folder/scores.json``, atomically."""
    text = json.dumps({k: v for k, v in row.items() if k != "sae"}, indent=2)
    atomic_write(folder / "scores.json", lambda p: p.write_text(text))


def load_scored(
    folder: Path | None, sae_cls: Any, settings: dict[str, Any]
) -> dict[str, Any] | None:
    """The row saved by :func:`save_scored` with its SAE loaded (resume), or None.

    The row is returned only when it was trained with the same ``settings["train"]`` (see
    :func:`row_settings`); ``row["rescore"]`` is then True when it was scored with other
    ``settings["score"]`` (keep the SAE, score it again). A row without recorded settings
    (an older tl_mdl), unreadable, or whose SAE does not load, is not reused."""
    if folder is None or not (folder / "scores.json").is_file():
        return None
    try:
        row = json.loads((folder / "scores.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # unreadable: train again
    stored = row.get(SETTINGS_KEY) if isinstance(row, dict) else None
    if not isinstance(stored, dict) or stored.get("train") != settings["train"]:
        return None
    row["rescore"] = stored.get("score") != settings["score"]
    try:
        row["sae"] = sae_cls.load(folder)
    except (OSError, ValueError):  # e.g. a save interrupted by a crash: train again
        return None
    return row


def checkpoint_subfolder(train_kwargs: dict[str, Any], name: str) -> dict[str, Any]:
    """``train_kwargs`` with ``checkpoint_dir`` (if given) made ``checkpoint_dir/name``: each
    grid point resumes its own checkpoint, never another's."""
    if train_kwargs.get("checkpoint_dir") is None:
        return train_kwargs
    return {**train_kwargs, "checkpoint_dir": Path(train_kwargs["checkpoint_dir"]) / name}


def _key(width: int, sparsity: float, target: float | None = None) -> str:
    return f"w{width}_s{sparsity:g}" if target is None else f"w{width}_t{target:g}"


def sweep(
    activations: Tensor | Iterable[Tensor],
    widths: Sequence[int] = (16, 32, 64, 128, 256, 512),
    sparsities: Sequence[float] = (1e-3,),
    objective: str = "mdl",
    *,
    target_fvus: Sequence[float] | None = None,
    eval_activations: Tensor | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    out_dir: str | os.PathLike | None = None,
    progress: bool = True,
    seed: int = 0,
    distributed: bool | None = None,
    **train_kwargs: Any,
) -> SweepTable:
    """Train one SAE per (width, sparsity) and score its description length.

    ``sparsity`` is λ for ``"mdl"`` / ``"l1"`` and ``k`` for ``"topk"`` (pairs with
    ``k > width`` are skipped). With ``target_fvus`` the grid is widths × targets instead:
    each SAE is trained with ``train_sae(..., target_fvu=t)`` (λ adapted, starting from
    ``sparsities[0]``); its row's ``target_fvu`` is ``t`` and ``sparsity`` the final λ,
    and its folder is ``w{width}_t{t}/``. Each SAE is scored with ``description_length`` on
    ``eval_activations`` (default: the training activations when they are a Tensor) at
    precision ``tolerance``; the ``"mdl"`` objective trains its DL surrogate at that same
    ``tolerance``. With ``out_dir`` every SAE is saved to
    ``out_dir/w{width}_s{sparsity}/`` with its scores and settings in ``scores.json``, the
    table to ``out_dir/sweep.csv``, and a rerun reuses what is already there (resume) when
    it was made with the same settings (:func:`row_settings`: objective, seed, training
    arguments, training data; the SAE is re-scored when only the evaluation data, or the
    tolerance of an objective that does not train on it, changed) and trains it again
    otherwise. Extra keyword arguments go to
    :func:`tl_mdl.train_sae`; a ``checkpoint_dir`` among them gets one subfolder per grid
    point (``checkpoint_dir/w{width}_s{sparsity}/``).

    Under ``torch.distributed`` (``distributed=None``: whenever a process group with several
    ranks is initialised) the grid is split across ranks (rank ``r`` trains and scores grid
    points ``r, r + world, …``, each SAE on one process) and the rows are gathered on rank 0
    with ``gather_object``: rank 0 returns the whole table (and writes ``sweep.csv``), the
    other ranks return only their own rows.
    """
    if eval_activations is None:
        if not isinstance(activations, Tensor):
            raise ValueError("eval_activations= is required when activations are an iterable")
        eval_activations = activations
    if not widths or not sparsities:
        raise ValueError(f"widths={widths!r} and sparsities={sparsities!r} must be non-empty")
    if target_fvus is not None and not list(target_fvus):
        raise ValueError("target_fvus=[] is empty; pass fidelity targets, e.g. [0.15, 0.25]")
    d_in = int(eval_activations.shape[-1])
    grid: list[tuple[int, float, float | None]] = (
        [(int(w), s, None) for w in widths for s in sparsities
         if not (objective == "topk" and int(s) > int(w))]
        if target_fvus is None
        else [(int(w), sparsities[0], float(t)) for w in widths for t in target_fvus]
    )
    out = Path(out_dir) if out_dir is not None else None
    split = ddp.is_distributed() if distributed is None else bool(distributed)
    world, rank = (ddp.world_size(), ddp.rank()) if split else (1, 0)
    mine = list(enumerate(grid))[rank::world]
    train_data = data_fingerprint(activations)
    eval_data = (
        train_data if eval_activations is activations else data_fingerprint(eval_activations)
    )
    if objective == "mdl":  # the surrogate trains at the precision it is scored at
        train_kwargs = {**train_kwargs, "tolerance": tolerance}
    table = SweepTable()
    for index, (width, sp, target) in tqdm(mine, desc=f"sweep {objective}",
                                           disable=not progress):
        key = _key(width, sp, target)
        folder = out / key if out is not None else None
        kw = checkpoint_subfolder(train_kwargs, key)
        if target is not None:
            kw["target_fvu"] = target
        if objective == "topk":
            cfg = SAEConfig(d_in=d_in, d_sae=width, activation="topk", k=int(sp))
        else:
            cfg = SAEConfig(d_in=d_in, d_sae=width)
        settings = row_settings(
            cfg, objective, sp, seed, kw, tolerance, train_data, eval_data
        )
        stored, sae, seconds, trained = reuse_or_train(folder, SAE, settings, partial(
            train_sae, activations, cfg, objective, sparsity=float(sp), seed=seed,
            progress=progress, distributed=False, **kw,
        ))
        if stored is not None:
            stored["grid_index"] = index
            table.rows.append(stored)
            continue
        rep = description_length(sae, eval_activations, tolerance=tolerance)
        final = sae.cfg.metadata.get("training", {}).get("final_sparsity", sp)
        row = {
            "width": width,
            "sparsity": sp if target is None else final,
            "objective": objective,
            **report_columns(rep),
            "train_seconds": seconds,
            "path": str(folder) if folder is not None else "",
            "target_fvu": target,
            SETTINGS_KEY: settings,
        }
        store_row(folder, sae, row, trained)
        row["sae"] = sae
        row["grid_index"] = index
        table.rows.append(row)
        if out is not None and world == 1:
            table.to_csv(out / "sweep.csv")
    if world > 1:
        gathered = ddp.gather_to_main(table.rows)
        if gathered is None:  # not rank 0: keep this rank's share
            return table
        table = SweepTable(sorted((r for part in gathered for r in part),
                                  key=lambda r: r["grid_index"]))
        if out is not None:
            table.to_csv(out / "sweep.csv")
    return table
