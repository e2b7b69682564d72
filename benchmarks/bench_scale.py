"""Benchmark: how time and memory grow with size (streaming store, DL scoring, bilinear).

Each variant runs in its own subprocess (clean peak memory; one thread on machines with
<= 2 cores, ``--threads`` to change), ours and baseline in interleaved rounds
(``--rounds``, default 2; see ``_harness.py``). Memory is the rise
of the resident set during the measured call: VmHWM after it minus VmRSS before it (the
high-water mark is reset via /proc/self/clear_refs), so imports and inputs built beforehand
are not counted.

* ``stream``: one pass over activation shards holding 4× (``--full``: 16×) the shuffle
  buffer. ours = ``tl_mdl.ShardedActivations`` (row blocks read from disk, bounded buffer);
  baseline = ``tl_mdl.load_activations`` of everything, then shuffled batches.
* ``dl``: ``description_length`` at a fixed bin width over growing N. ours = the library
  call (chunked encode, sparse code); baseline = the dense recipe
  ``latent_description_length(quantize(sae.encode(x), w))`` + a dense decode for the FVU.
  ``dl_*_chunked64MB``: ours = the call with ``max_memory_mb=64`` (inputs streamed in
  chunks), baseline = the in-memory library call.
* ``eig``: every output direction's eigendecomposition of a bilinear layer (``n = d_model``
  directions, ``d_mlp = 4 d_model``, top-8 pairs kept). ours = ``iter_eigendecompose`` in
  chunks of 32 directions; baseline = materialise the tensor ``B [d_out, d, d]`` and
  ``eigh`` every ``Q(u)`` at once.

Prints ``name: ours X, baseline Y, ratio Z`` lines (ratio = ours / baseline, as in every
benchmark here: below 1 is better) and, per benchmark, the growth exponent of ours
(``cost ∝ size^e`` between the smallest and largest size). Default run about 2 minutes;
``--full`` adds larger sizes. ``--real`` (not in ``make bench``): a SAELens-sized SAE
(d_in 768, d_sae 24,576) scored and trained from 200,000 rows in shards on disk, see
``_scale_real.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _scale_real
from _harness import Bench, add_args

BENCH: Bench  # set in main()

def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(fn) -> dict[str, float]:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_mb": max(0, _status_kb("VmHWM") - before) / 1024}


# ------------------------------------------------------------------------------ workers
def _stream(variant: str, folder: str, batch: int, buffer: int) -> dict[str, float]:
    import torch

    import tl_mdl

    def ours() -> None:
        acts = tl_mdl.ShardedActivations(folder, batch_size=batch, buffer_size=buffer,
                                         seed=0, repeat=False)
        for b in acts:
            b.sum()

    def baseline() -> None:
        x = tl_mdl.load_activations(folder)
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
        for i in range(0, x.shape[0] - batch + 1, batch):
            x[perm[i : i + batch]].sum()

    return _measure(ours if variant == "ours" else baseline)


def _dl(variant: str, n: int, d_in: int, d_sae: int) -> dict[str, float]:
    import torch

    from tl_mdl import SAE, SAEConfig, description_length
    from tl_mdl.mdl import latent_description_length, quantize

    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae), seed=0)
    with torch.no_grad():
        # pre-activations ~ N(b_enc, 0.1²) (unit-variance inputs, encoder columns of norm
        # 0.1): b_enc = -1.645 σ leaves about 5% active, as a trained SAE has
        sae.b_enc.fill_(-0.1645)
    x = torch.randn(n, d_in, generator=g)
    w = 0.05

    def ours() -> None:
        description_length(sae, x, bin_width=w, raw_cost=False)

    def chunked() -> None:
        description_length(sae, x, bin_width=w, raw_cost=False, max_memory_mb=64)

    if variant == "chunked":
        return _measure(chunked)

    @torch.no_grad()
    def baseline() -> None:
        f = sae.encode(x)
        q = quantize(f, w)
        latent_description_length(q)
        x_hat = sae.decode(q.to(f.dtype) * w)
        float(((x - x_hat) ** 2).sum())

    return _measure(ours if variant == "ours" else baseline)


def _eig(variant: str, d_model: int) -> dict[str, float]:
    import torch
    from transformer_lens import HookedTransformerConfig

    from tl_mdl import BilinearMLP, iter_eigendecompose

    d_mlp = 4 * d_model
    cfg = HookedTransformerConfig(n_layers=1, d_model=d_model, n_heads=1, d_head=d_model,
                                  d_mlp=d_mlp, d_vocab=8, n_ctx=8, act_fn="relu")
    mlp = BilinearMLP(cfg, seed=0)
    U = torch.randn(d_model, d_model, generator=torch.Generator().manual_seed(1))
    k = 8

    @torch.no_grad()
    def ours() -> None:
        for _, eig in iter_eigendecompose(mlp, U, k=k, chunk_size=32):
            eig.values.sum()

    @torch.no_grad()
    def baseline() -> None:
        ones = torch.ones(1)
        L = torch.cat([mlp.W_in, mlp.b_in[None]]).detach()
        R = torch.cat([mlp.W_gate, mlp.b_gate[None]]).detach()
        B = torch.einsum("ho,ih,jh->oij", mlp.W_out.detach(), L, R)
        B = 0.5 * (B + B.transpose(1, 2))
        Q = torch.einsum("no,oij->nij", U, B)
        values, vectors = torch.linalg.eigh(Q)
        order = values.abs().argsort(-1, descending=True)[:, :k]
        (values.gather(-1, order) * ones).sum()

    return _measure(ours if variant == "ours" else baseline)


def _real(variant: str, **args) -> dict[str, float]:
    return _scale_real.worker(variant, measure=_measure, **args)


WORKERS = {"stream": _stream, "dl": _dl, "eig": _eig, "real": _real}


def _worker(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    kind, variant, args = argv[0], argv[1], json.loads(argv[2])
    print(json.dumps(WORKERS[kind](variant, **args)))


# ------------------------------------------------------------------------------ driver
def _run(kind: str, variant: str, timeout: float = 900, **args) -> dict[str, float] | None:
    # the thread count reaches the worker through OMP_NUM_THREADS etc., set by Bench
    cmd = [sys.executable, __file__, "--worker", kind, variant, json.dumps(args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        tail = res.stderr.strip().splitlines()[-1:] or ["?"]
        print(f"  ({kind} {variant} {args} failed: {tail[0]})", flush=True)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def _rounds(kind: str, variants: tuple[str, ...], **args) -> dict[str, list[dict]]:
    """Each variant once per round, in turn; a failed run drops that variant's figures."""
    out: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(BENCH.rounds):
        BENCH.sample_load()
        for v in variants:
            r = _run(kind, v, **args)
            if r is not None:
                out[v].append(r)
    return out


def _line(name: str, ours: list[dict], base: list[dict], key: str, unit: str) -> None:
    if not ours or len(ours) != len(base):
        print(f"{name}: not measured (a run failed)", flush=True)
        return
    BENCH.line(name, [r[key] for r in ours], [r[key] for r in base], unit, ".3g",
               check_spread=key == "seconds")


def _medians(runs: list[dict]) -> dict[str, float] | None:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]} if runs else None


def _growth(name: str, sizes: list[int], results: list[dict | None], key: str) -> None:
    pts = [(s, r[key]) for s, r in zip(sizes, results, strict=True) if r and r[key] > 0]
    if len(pts) >= 2:
        (s0, v0), (s1, v1) = pts[0], pts[-1]
        e = math.log(v1 / v0) / math.log(s1 / s0)
        print(f"  growth {name}: ∝ size^{e:.2f} ({key}, size {s0} → {s1})", flush=True)


def bench_stream(full: bool) -> None:
    import torch

    import tl_mdl

    d_in, batch, buffer = 256, 4096, 1 << 16
    factors = [4, 16] if full else [4]
    for factor in factors:
        n_rows, n_shards = factor * buffer, 8
        with tempfile.TemporaryDirectory() as tmp:
            g = torch.Generator().manual_seed(0)
            per = n_rows // n_shards
            for i in range(n_shards):
                tl_mdl.save_activations(torch.randn(per, d_in, generator=g),
                                        Path(tmp) / f"shard_{i:03d}.safetensors")
            mb = n_rows * d_in * 4 / 2**20
            print(f"stream {factor}x buffer: {n_rows} rows x {d_in} f32 = {mb:.0f} MB on disk, "
                  f"buffer {buffer} rows = {buffer * d_in * 4 / 2**20:.0f} MB", flush=True)
            r = _rounds("stream", ("ours", "baseline"), folder=tmp, batch=batch, buffer=buffer)
            ours, base = r["ours"], r["baseline"]
            _line(f"stream_{factor}x_peak_rss", ours, base, "peak_mb", "MB")
            _line(f"stream_{factor}x_time", ours, base, "seconds", "s")


def bench_dl(full: bool) -> None:
    d_in, d_sae = 64, 1024
    sizes = [8192, 32768, 131072] + ([524288] if full else [])
    ours_all = []
    for n in sizes:
        r = _rounds("dl", ("ours", "baseline", "chunked"), n=n, d_in=d_in, d_sae=d_sae)
        ours, base, chunked = r["ours"], r["baseline"], r["chunked"]
        ours_all.append(_medians(ours))
        _line(f"dl_N{n}_d{d_in}_F{d_sae}_time", ours, base, "seconds", "s")
        _line(f"dl_N{n}_d{d_in}_F{d_sae}_peak", ours, base, "peak_mb", "MB")
        # ours = max_memory_mb=64 (streamed chunks), baseline = the in-memory library call
        _line(f"dl_N{n}_d{d_in}_F{d_sae}_chunked64MB_time", chunked, ours, "seconds", "s")
        _line(f"dl_N{n}_d{d_in}_F{d_sae}_chunked64MB_peak", chunked, ours, "peak_mb", "MB")
    _growth("dl time", sizes, ours_all, "seconds")
    _growth("dl peak", sizes, ours_all, "peak_mb")


def bench_eig(full: bool) -> None:
    sizes = [64, 128, 256] + ([512] if full else [])
    ours_all = []
    for d in sizes:
        r = _rounds("eig", ("ours", "baseline"), d_model=d)
        ours, base = r["ours"], r["baseline"]
        ours_all.append(_medians(ours))
        _line(f"eig_d{d}_mlp{4 * d}_n{d}_time", ours, base, "seconds", "s")
        _line(f"eig_d{d}_mlp{4 * d}_n{d}_peak", ours, base, "peak_mb", "MB")
    _growth("eig time", sizes, ours_all, "seconds")
    _growth("eig peak", sizes, ours_all, "peak_mb")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="larger sizes (several minutes)")
    ap.add_argument("--only", choices=sorted(WORKERS), default=None)
    ap.add_argument("--real", action="store_true", help="SAELens-sized SAE on shards on disk "
                    "(hours on one core; see _scale_real.py for its own options)")
    args, rest = add_args(ap, rounds=2).parse_known_args()
    global BENCH
    BENCH = Bench("bench_scale: time and peak RSS against size", args)
    if args.real:
        _scale_real.bench_real(rest, lambda *a, **k: _run(*a, timeout=None, **k), BENCH)
        return BENCH.finish()
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    for name, fn in (("stream", bench_stream), ("dl", bench_dl), ("eig", bench_eig)):
        if args.only in (None, name):
            fn(args.full)
    return BENCH.finish()


if __name__ == "__main__":
    raise SystemExit(main())
