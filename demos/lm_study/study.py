"""``main``: the stages in order (data, LM and bilinear conversion, SAEs, evaluate, eigen),
each skipped when its artefacts are found; then ``summary.json`` and ``report.md``."""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from lm_study import corpus
from lm_study.eigen import eigen_study
from lm_study.lm import convert_bilinear, decode_fn, lm_loss, prepare_tokens, train_lm
from lm_study.plots import plot_dl, plot_training
from lm_study.report import write_report
from lm_study.saes import harvest, study_hooks, sweep_hook
from lm_study.settings import DOWNSTREAM, parse_args
from lm_study.stages import Stages, mark_done, stage_done, stage_key, write_csv
from tl_mdl import SAE, BilinearMLP, evaluate
from tl_mdl.models import load_model


@dataclass
class Data:
    """The token stream and its windows of ``n_ctx`` tokens: ``train`` (LM, anneal, SAE
    harvest), ``eval`` (SAE scoring, evaluate, truncation) and ``loss`` (LM / bilinear loss),
    the last two from the held-out tail ``held``."""

    stream: torch.Tensor
    tok: Any
    source: str
    train: torch.Tensor
    held: torch.Tensor
    eval: torch.Tensor
    loss: torch.Tensor
    d_vocab: int


def open_out(args) -> Path:
    """The output folder, checked against the settings of the run that is already there."""
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg_path = out / "config.json"
    key_cfg = {k: v for k, v in vars(args).items()
               if k not in ("out", "fresh", "no_progress", "threads") + DOWNSTREAM}
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text())
        diff = {k: (old.get(k), v) for k, v in key_cfg.items() if old.get(k) != v}
        if diff:
            raise SystemExit(f"{out} holds a run with other settings {diff}; "
                             "use another --out or --fresh")
    cfg_path.write_text(json.dumps(key_cfg, indent=2))
    return out


def data_stage(args, out: Path, st: Stages, pretrained) -> Data:
    with st.stage("tokens", (out / "tokens.safetensors").is_file()):
        stream, tok, source = prepare_tokens(args, out, pretrained)
        all_w = corpus.windows(stream, args.n_ctx)
        n_held = max(2 * args.eval_windows, all_w.shape[0] // 20)
        if all_w.shape[0] < n_held + 2 * args.eval_windows:
            raise SystemExit(f"only {all_w.shape[0]} windows of {args.n_ctx} tokens; need "
                             f"more text or a smaller --eval-windows")
        train_w, held_w = all_w[:-n_held], all_w[-n_held:]
        eval_w = held_w[: args.eval_windows]
        loss_w = held_w[args.eval_windows :][: 2 * args.eval_windows]
        d_vocab = pretrained.cfg.d_vocab if pretrained is not None else tok.get_vocab_size()
        print(f"   {stream.numel():,} tokens from {source}, vocab {d_vocab}; "
              f"{train_w.shape[0]} train / {held_w.shape[0]} held-out windows of {args.n_ctx}")
    return Data(stream, tok, source, train_w, held_w, eval_w, loss_w, d_vocab)


def model_stages(args, out: Path, st: Stages, data: Data, pretrained):
    """The model to study (bilinear when the LM has gated MLPs), the conversion's numbers
    (None when skipped) and a note saying why it was skipped."""
    bil_info: dict | None = None
    bil_note = ""
    if pretrained is None:
        with st.stage("lm", (out / "model_silu" / "model.safetensors").is_file()):
            if (out / "model_silu" / "model.safetensors").is_file():
                silu = load_model(out / "model_silu")
            else:
                silu = train_lm(args, out, data.train, data.loss, data.d_vocab)
            print(f"   SiLU LM held-out loss {lm_loss(silu, data.loss):.4f} nats/token")
    else:
        silu = pretrained
    gated = bool(getattr(silu.cfg, "gated_mlp", False))
    if gated:
        with st.stage("bilinear", (out / "bilinear.json").is_file()):
            if (out / "bilinear.json").is_file():
                bil_info = json.loads((out / "bilinear.json").read_text())
                model = load_model(out / "model_bilinear")
            else:
                bil_info = convert_bilinear(args, out, silu, data.train, data.loss)
                model = load_model(out / "model_bilinear")
            print(f"   loss SiLU {bil_info['loss_silu']:.4f} → bilinear "
                  f"{bil_info['loss_bilinear']:.4f} ({bil_info['delta_nats']:+.4f} nats, "
                  f"{100 * bil_info['relative']:+.2f}%); SiLU control fine-tuned as long "
                  f"{bil_info.get('loss_silu_finetuned', math.nan):.4f}; "
                  f"plain swap without fine-tune {bil_info['loss_swap_no_finetune']:.4f}")
    else:
        model = silu
        bil_note = (f"{args.model} has a non-gated MLP (act {silu.cfg.act_fn}); "
                    "anneal_to_bilinear needs a GatedMLP, so stages 2 and 5 are skipped.")
        print("   " + bil_note)
    return model, bil_info, bil_note


def sae_stages(args, out: Path, st: Stages, model, hooks: dict[str, str], data: Data):
    """Harvest, sweep and select per hook: the chosen SAEs, one selection row per hook and
    the held-out activations."""
    sweeps_done = all((out / "saes" / k / "selection.json").is_file() for k in hooks)
    with st.stage("harvest", (out / "activations" / "eval").is_dir()):
        acts, eval_acts = harvest(args, out, model, hooks, data.train[: args.harvest_windows],
                                  data.eval)
        print(f"   {next(iter(acts.values())).shape[0]:,} train / "
              f"{next(iter(eval_acts.values())).shape[0]:,} held-out activations per hook")
    all_rows: dict[str, list] = {}
    best: dict[str, dict] = {}
    with st.stage("sae_sweep", sweeps_done):
        for key, hook in hooks.items():
            all_rows[key], best[key] = sweep_hook(args, out, key, hook, acts[key],
                                                  eval_acts[key])
    plot_dl(all_rows, best, args.fvu_threshold, out / "dl_vs_width.png")
    saes = {k: SAE.load(out / "saes" / k) for k in hooks}
    selection = []
    for key, hook in hooks.items():
        b = best[key]
        selection.append({"key": key, "hook": hook, "width": b["width"],
                          "k": int(b["sparsity"]), **{c: b[c] for c in (
                              "bits_per_input", "raw_bits", "naive_bits", "l0", "fvu",
                              "fvu_quantized", "bin_width")},
                          "meets_threshold": b["meets_threshold"]})
    write_csv(out / "selection.csv", selection)
    for r in selection:
        print(f"   {r['key']:>7}: F={r['width']:<5} k={r['k']:<3} DL {r['bits_per_input']:8.1f}"
              f" bits/token  raw {r['raw_bits']:8.1f}  naive {r['naive_bits']:8.1f}  "
              f"FVU_q {r['fvu_quantized']:.3f}")
    return saes, selection, eval_acts


def evaluate_stage(args, out: Path, st: Stages, model, hooks: dict[str, str],
                   saes: dict[str, SAE], selection: list[dict], eval_w) -> list[dict]:
    eval_path = out / "evaluate.json"
    ev_key = stage_key(args, selection, ("kl_tolerance",))
    ev_done = stage_done(out, "evaluate", ev_key, [eval_path])
    with st.stage("evaluate", ev_done):
        if ev_done:
            ev = json.loads(eval_path.read_text())
        else:
            ev = evaluate(model, {hooks[k]: saes[k] for k in hooks}, eval_w,
                          dl_kwargs={"tolerance": args.kl_tolerance})
            eval_path.write_text(json.dumps(ev, indent=2))
            mark_done(out, "evaluate", ev_key)
    ev_rows = [{"key": k, "hook": h, **ev[h]} for k, h in hooks.items()]
    write_csv(out / "evaluate.csv", ev_rows)
    for r in ev_rows:
        print(f"   {r['key']:>7}: CE recovered {r['ce_loss_recovered']:.3f}, KL "
              f"{r['kl_clean_spliced']:.4f}, L0 {r['l0']:.1f}, dead {r['dead_fraction']:.2f}, "
              f"DL(KL) {r['dl_bits_per_token']:.1f} bits/token")
    return ev_rows


def eigen_stage(args, out: Path, st: Stages, model, layer: int, saes: dict[str, SAE],
                selection: list[dict], eval_acts, data: Data) -> dict | None:
    if not isinstance(model.blocks[layer].mlp, BilinearMLP):
        return None
    eig_key = stage_key(args, selection, ("n_out_features", "n_pairs", "truncation_ks"))
    eig_done = stage_done(out, "eigen", eig_key,
                          [out / "truncation.json", out / "interactions.csv"])
    with st.stage("eigen", eig_done):
        if eig_done:
            eig_info = json.loads((out / "truncation.json").read_text())
        else:
            eig_info = eigen_study(args, out, model, layer, saes, eval_acts, data.eval,
                                   decode_fn(data.tok))
            mark_done(out, "eigen", eig_key)
        print("   truncation: " + ", ".join(
            f"k={k}: {lo:.3f}" for k, lo in zip(eig_info["ks"], eig_info["loss"],
                                                strict=True))
              + f" (full {eig_info['base_loss']:.3f})")
    return eig_info


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = open_out(args)
    st = Stages(out)
    pretrained = None
    if args.model:
        pretrained = HookedTransformer.from_pretrained(args.model)
        pretrained.eval()
        args.n_ctx = min(args.n_ctx, pretrained.cfg.n_ctx)
    data = data_stage(args, out, st, pretrained)
    model, bil_info, bil_note = model_stages(args, out, st, data, pretrained)
    del pretrained
    plot_training(out)
    layer = args.layer if args.layer is not None else model.cfg.n_layers - 1
    hooks = study_hooks(model, layer)
    saes, selection, eval_acts = sae_stages(args, out, st, model, hooks, data)
    ev_rows = evaluate_stage(args, out, st, model, hooks, saes, selection, data.eval)
    eig_info = eigen_stage(args, out, st, model, layer, saes, selection, eval_acts, data)

    summary = {
        "model_name": args.model or (f"a {model.cfg.n_layers}-layer d_model={model.cfg.d_model}"
                                     f" bilinear LM"),
        "source": data.source, "n_tokens": int(data.stream.numel()), "n_ctx": args.n_ctx,
        "n_train_windows": int(data.train.shape[0]),
        "n_held_windows": int(data.held.shape[0]),
        "layer": layer, "command": "python demos/lm_study.py " + " ".join(
            sys.argv[1:] if argv is None else [str(a) for a in argv]),
        "bilinear": bil_info, "bilinear_note": bil_note, "widths": args.widths, "ks": args.ks,
        "tolerance": args.tolerance, "fvu_threshold": args.fvu_threshold,
        "kl_tolerance": args.kl_tolerance, "selection": selection, "evaluate": ev_rows,
        "eigen": eig_info, "timings": st.timings,
        "total_seconds": time.perf_counter() - st.t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_report(out, summary)
    print(f"\nwrote {out}/report.md (+ csv, png) in {summary['total_seconds']:.0f} s")
    return summary
