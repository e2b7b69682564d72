"""Forward pass with one SAE spliced in: tl_mdl ``attach_sae`` vs SAELens
``HookedSAETransformer.add_sae``, same model, SAE weights and tokens, in one run.

    python benchmarks/bench_hooks.py          # small config (~1 min on 2 cores)
    python benchmarks/bench_hooks.py --full   # issue size: 4 layers, d_model 256,
                                              # SAE 256 -> 4096, 16 x 128 tokens

Three SAEs: ReLU with dense latents, TopK (k = 64 of 4096), and ReLU with biases set so
L0 ≈ 48 of 4096. Timings are the minimum over interleaved repeats (robust to other load on
the machine), under ``torch.no_grad()``. Prints ``name: ours X, baseline Y, ratio Z``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

warnings.filterwarnings("ignore")

from sae_lens import HookedSAETransformer  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402

from tl_mdl import SAE, SAEConfig, attach_sae, to_sae_lens  # noqa: E402


def build(full: bool):
    if full:
        n_layers, d_model, d_sae, k, batch, seq, vocab = 4, 256, 4096, 64, 16, 128, 4096
    else:
        n_layers, d_model, d_sae, k, batch, seq, vocab = 2, 128, 2048, 32, 8, 128, 2048
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=d_model, n_heads=d_model // 32, d_head=32,
        d_mlp=4 * d_model, d_vocab=vocab, n_ctx=seq, act_fn="gelu", seed=0,
    )
    model = HookedSAETransformer(cfg).eval()
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    hook = f"blocks.{n_layers // 2}.hook_resid_pre"
    return model, tokens, hook, d_model, d_sae, k


def make_saes(model, tokens, hook, d_in, d_sae, k):
    dense = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=hook), seed=1)
    topk = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, activation="topk", k=k, hook_name=hook),
               seed=1)
    sparse = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, hook_name=hook), seed=1)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
        x = cache[hook].reshape(-1, d_in)
        pre = (x - sparse.b_dec) @ sparse.W_enc
        target = 48 / d_sae  # each feature fires on ~1.2% of tokens -> L0 ≈ 48
        sparse.b_enc.copy_(-torch.quantile(pre, 1 - target, dim=0))
        l0 = float((sparse.encode(x) != 0).sum(-1).float().mean())
    return {"relu dense": dense, f"topk k={k}/{d_sae}": topk,
            f"relu sparse L0={l0:.0f}/{d_sae}": sparse}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="issue-size configuration")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokens, hook, d_in, d_sae, k = build(args.full)
    repeats = args.repeats or (7 if args.full else 9)
    saes = make_saes(model, tokens, hook, d_in, d_sae, k)

    runs = {"bare": lambda: model(tokens)}
    for name, sae in saes.items():
        sl = to_sae_lens(sae)

        def ours(sae=sae):
            with attach_sae(model, hook, sae):
                return model(tokens)

        def theirs(sl=sl):
            model.add_sae(sl)
            try:
                return model(tokens)
            finally:
                model.reset_saes()

        with torch.no_grad():
            a, b = ours(), theirs()
        err = float((a - b).abs().max())
        if err > 1e-3:
            raise SystemExit(f"{name}: logits differ from SAELens by {err}")
        runs[f"ours {name}"] = ours
        runs[f"sl {name}"] = theirs

    # The floor of any exact sparse splice: the model plus the encoder GEMM alone (an exact
    # TopK or ReLU code needs every pre-activation), timed on the hook's activation.
    enc = saes[f"topk k={k}/{d_sae}"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
    x = cache[hook].reshape(-1, d_in)
    W, b_enc, b_dec = enc.W_enc.detach(), enc.b_enc.detach(), enc.b_dec.detach()
    runs["encoder gemm"] = lambda: torch.addmm(b_enc, x - b_dec, W)

    best = {n: float("inf") for n in runs}
    with torch.no_grad():
        for f in runs.values():
            f()  # warm-up
        for _ in range(repeats):  # interleaved, so load changes hit every variant alike
            for n, f in runs.items():
                t0 = time.perf_counter()
                f()
                best[n] = min(best[n], time.perf_counter() - t0)

    size = "full" if args.full else "small"
    print(f"# bench_hooks ({size}): hook {hook}, tokens {tuple(tokens.shape)}, "
          f"d_in {d_in} -> d_sae {d_sae}, {torch.get_num_threads()} threads, "
          f"min of {repeats}; bare model {best['bare'] * 1e3:.1f} ms")
    for name in saes:
        o, s = best[f"ours {name}"], best[f"sl {name}"]
        print(f"forward {name} [ms]: ours {o * 1e3:.1f}, baseline {s * 1e3:.1f}, "
              f"ratio {o / s:.2f}")
    for name in saes:
        o, s = best[f"ours {name}"], best[f"sl {name}"]
        bare = best["bare"]
        print(f"cost vs bare model, {name}: ours {o / bare:.2f}x, baseline {s / bare:.2f}x, "
              f"ratio {o / s:.2f}")
    # The best ratio any exact implementation could print for the sparse SAEs.
    floor = best["bare"] + best["encoder gemm"]
    for name in list(saes)[1:]:
        s = best[f"sl {name}"]
        print(f"floor of an exact splice, {name} (model + encoder GEMM alone) [ms]: "
              f"ours {floor * 1e3:.1f}, baseline {s * 1e3:.1f}, ratio {floor / s:.2f}")

if __name__ == "__main__":
    main()
