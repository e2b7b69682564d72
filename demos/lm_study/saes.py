"""Stage 3: activations of three hooks of one layer, a TopK SAE sweep per hook and the
MDL-optimal SAE of each."""

from __future__ import annotations

import json
from pathlib import Path

from transformer_lens import HookedTransformer

from tl_mdl import ActivationStore, sweep


def study_hooks(model: HookedTransformer, layer: int) -> dict[str, str]:
    return {
        "resid": f"blocks.{layer}.hook_resid_pre",
        "mlp_in": f"blocks.{layer}.ln2.hook_normalized",
        "mlp_out": f"blocks.{layer}.hook_mlp_out",
    }


def harvest(args, out: Path, model, hooks: dict[str, str], train_w, eval_w):
    names = list(hooks.values())
    kw = dict(batch_size=256, model_batch_size=16, progress=not args.no_progress)
    tr = ActivationStore(model, names, train_w, cache_dir=out / "activations" / "train", **kw)
    ev = ActivationStore(model, names, eval_w, cache_dir=out / "activations" / "eval",
                         shuffle=False, **kw)
    tr.harvest()
    ev.harvest()
    return ({k: tr.activations(h) for k, h in hooks.items()},
            {k: ev.activations(h) for k, h in hooks.items()})


def parse_widths(spec: str, d_in: int) -> list[int]:
    """``"64,128"`` or multiples of the activation width ``"d1,d4"`` (``d4`` = 4·d_in)."""
    return [int(w[1:]) * d_in if w.startswith("d") else int(w) for w in spec.split(",")]


def sweep_hook(args, out: Path, key: str, hook: str, acts, eval_acts) -> tuple[list, dict]:
    widths = parse_widths(args.widths, acts.shape[1])
    ks = [int(k) for k in args.ks.split(",")]
    folder = out / "sweeps" / key
    table = sweep(acts, widths=widths, sparsities=ks, objective="topk",
                  eval_activations=eval_acts, tolerance=args.tolerance, out_dir=folder,
                  progress=not args.no_progress, seed=args.seed, epochs=args.sae_epochs,
                  lr=args.sae_lr)
    table.to_csv(out / f"sweep_{key}.csv")
    rows = list(table)
    try:
        best = table.select(args.fvu_threshold)
        best["meets_threshold"] = True
    except ValueError:
        best = dict(min(rows, key=lambda r: r["fvu_quantized"]))
        best["meets_threshold"] = False
        print(f"   {key}: no SAE reaches FVU <= {args.fvu_threshold}; using the lowest-FVU one")
    sae = best["sae"]
    sae.cfg.hook_name = hook
    sae.save(out / "saes" / key)
    meta = {k: v for k, v in best.items() if k != "sae"}
    (out / "saes" / key / "selection.json").write_text(json.dumps(meta, indent=2))
    return rows, best
