"""Forward pass with one SAE spliced in: tl_mdl ``attach_sae`` vs SAELens
``HookedSAETransformer.add_sae``, same model, SAE weights and tokens, in one run.

    python benchmarks/bench_hooks.py          # small config (~1 min on 2 cores)
    python benchmarks/bench_hooks.py --full   # issue size: 4 layers, d_model 256,
                                              # SAE 256 -> 4096, 16 x 128 tokens

Three SAEs: ReLU with dense latents, TopK (k = 64 of 4096), and ReLU with biases set so
L0 ≈ 48 of 4096. Every variant is timed once per round, in turn (``--rounds``, default 9),
under ``torch.no_grad()``; each figure is the median of the paired per-round ratios (see
``_harness.py``). Prints ``name: ours X, baseline Y, ratio Z`` and ``UNRELIABLE:`` lines for
impossible orderings (a splice faster than the bare model, or than the bare model plus its
encoder GEMM), wide spreads and an overloaded machine.

A ~400 ms forward hides a few ms of SAE work in its noise, so the SAE part is also timed
alone, on the hook's activations (``--micro-rounds`` rounds of the fastest of 5 calls): the
splice's own SAE computation (the row-blocked encode: encoder GEMM of a few hundred rows at
a time into one cache-sized buffer, top-k or ReLU nonzeros of each block, sparse decode)
against the encoder GEMM alone, and the splice-vs-floor ratio that implies with the bare
model's median time added to both sides. Twice: with the kernel's buffer kept from call to
call (forwards inside one ``attach_sae`` block), and with a new kernel per call (an attach
per forward, as timed above). The floor's GEMM writes all ``rows × d_sae`` outputs (32 MiB of
fresh pages here); the blocked encode never holds them.
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch

warnings.filterwarnings("ignore")

from _harness import Bench, add_args, order_problem  # noqa: E402
from sae_lens import HookedSAETransformer  # noqa: E402
from transformer_lens import HookedTransformerConfig  # noqa: E402

from tl_mdl import SAE, SAEConfig, attach_sae, to_sae_lens  # noqa: E402
from tl_mdl._tl import HookPoint  # noqa: E402
from tl_mdl.hooks.kernels import _TlMdlKernel  # noqa: E402
from tl_mdl.hooks.names import SAE_INNER_HOOKS  # noqa: E402


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--full", action="store_true", help="issue-size configuration")
    ap.add_argument("--micro-rounds", type=int, default=15,
                    help="rounds of the SAE-part microbenchmark (0: skip it)")
    args = add_args(ap, rounds=9).parse_args()
    torch.manual_seed(0)
    model, tokens, hook, d_in, d_sae, k = build(args.full)
    size = "full" if args.full else "small"
    bench = Bench(f"bench_hooks ({size}): hook {hook}, tokens {tuple(tokens.shape)}, "
                  f"d_in {d_in} -> d_sae {d_sae}, times in ms", args)
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

    # The floor of any exact splice: the model plus the encoder GEMM alone (an exact TopK or
    # ReLU code needs every pre-activation), timed on the hook's activation. Every SAE here
    # has the same d_in x d_sae encoder.
    enc = saes[f"topk k={k}/{d_sae}"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hook)
    x = cache[hook].reshape(-1, d_in)
    W, b_enc, b_dec = enc.W_enc.detach(), enc.b_enc.detach(), enc.b_dec.detach()
    runs["encoder gemm"] = lambda: torch.addmm(b_enc, x - b_dec, W)

    with torch.no_grad():
        t = bench.interleaved(runs)
    ms = {n: [s * 1e3 for s in v] for n, v in t.items()}
    bare = ms["bare"]
    floor = [b + g for b, g in zip(bare, ms["encoder gemm"], strict=True)]
    print(f"# bare model {statistics.median(bare):.1f} ms, encoder GEMM "
          f"{statistics.median(ms['encoder gemm']):.1f} ms (medians)")
    for name in saes:
        bench.line(f"forward {name} [ms]", ms[f"ours {name}"], ms[f"sl {name}"], fmt=".1f")
    for name in saes:
        o = [a / b for a, b in zip(ms[f"ours {name}"], bare, strict=True)]
        s = [a / b for a, b in zip(ms[f"sl {name}"], bare, strict=True)]
        bench.line(f"cost vs bare model, {name}", o, s, unit="x", fmt=".2f")
    # The best ratio any exact implementation could print, and ours against it.
    for name in saes:
        bench.line(f"floor of an exact splice, {name} (model + encoder GEMM alone) [ms]",
                   floor, ms[f"sl {name}"], fmt=".1f")
    for name in saes:
        bench.line(f"splice vs its floor, {name} [ms]", ms[f"ours {name}"], floor, fmt=".1f",
                   note="target <= 1.05 for the sparse SAEs")
    for name in saes:
        for who, key in (("tl_mdl", "ours"), ("SAELens", "sl")):
            spliced = ms[f"{key} {name}"]
            bench.flag(order_problem(f"forward {name} ({who})", spliced, bare,
                                     "spliced forward faster than the bare model")
                       or order_problem(f"forward {name} ({who})", spliced, floor,
                                        "SAE cost below its encoder GEMM"))
    if args.micro_rounds > 0:
        sae_part(bench, saes, x, enc, statistics.median(bare), args.micro_rounds)
    return bench.finish()


def sae_part(bench: Bench, saes: dict, x: torch.Tensor, enc: SAE, bare_ms: float,
             rounds: int) -> None:
    """The splice's SAE computation alone (the kernel ``attach_sae`` runs at the hook, no
    user hooks) against the encoder GEMM alone, on the same activations."""
    W, b_enc, b_dec = enc.W_enc.detach(), enc.b_enc.detach(), enc.b_dec.detach()
    runs = {"encoder gemm": lambda: torch.addmm(b_enc, x - b_dec, W)}
    for name, sae in saes.items():
        if name.startswith("relu dense"):
            continue
        kernel = _TlMdlKernel(sae, {h: HookPoint() for h in SAE_INNER_HOOKS})
        runs[f"{name}, buffer kept"] = lambda kernel=kernel: kernel.run(x)
        # what the forward above does: attach (new kernel, new buffer) once per forward
        runs[f"{name}, attached per call"] = lambda sae=sae: _TlMdlKernel(
            sae, {h: HookPoint() for h in SAE_INNER_HOOKS}).run(x)
    repeats, bench.repeats = bench.repeats, 5
    with torch.no_grad():
        t = bench.interleaved(runs, rounds=rounds)
    bench.repeats = repeats
    gemm = [s * 1e3 for s in t.pop("encoder gemm")]
    for name, v in t.items():
        ms = [s * 1e3 for s in v]
        bench.line(f"SAE part alone, {name}: splice's kernel vs encoder GEMM [ms]", ms, gemm,
                   fmt=".2f")
        bench.line(f"implied splice vs its floor, {name}: bare {bare_ms:.0f} ms + the above "
                   "[ms]", [bare_ms + a for a in ms], [bare_ms + g for g in gemm], fmt=".1f",
                   note="target <= 1.05")


if __name__ == "__main__":
    raise SystemExit(main())
