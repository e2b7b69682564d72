"""Benchmark: eigendecompose every output direction's interaction matrix of one bilinear layer.

Variants, each run in its own subprocess (clean peak memory, fixed thread count):

* ``ours``   tl_mdl.iter_eigendecompose: chunked implicit Q(u) + batched eigh (full spectrum)
* ``topk``   the same with k=32 (exact largest-|λ| pairs via LAPACK sytrd + stemr + ormqr)
* ``naive``  the reference bilinear-decomposition recipe: materialise B (d_out, d, d) with one
             einsum, symmetrise, contract with all directions, one batched eigh
* ``floor``  a bare batched eigh of n random symmetric d_model×d_model matrices (the floor)
* ``topk_eig`` the top-k solver alone on the same random matrices as ``floor``
* ``gemm``   only the Q(u)-forming GEMMs of ``ours`` (floor + gemm = the attainable limit)

Peak memory is the rise of the resident set (VmHWM after the run minus VmRSS before it,
with the high-water mark reset via /proc/self/clear_refs) over the already-built weights.
Every variant streams its result to the same consumer (eigenvalues kept, vectors reduced to
a checksum), except ``naive``, which holds everything as the reference code does.

Default: d_model=256, d_mlp=1024, 256 directions (about a minute). ``--full``: the issue's
d_model=512, d_mlp=2048, 512 directions (several minutes). One thread unless ``--threads``.
Prints ``name: ours X, baseline Y, ratio Z`` lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("floor", "topk_eig", "gemm", "ours", "topk", "naive")
TOPK = 32


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def child(variant: str, d_model: int, d_mlp: int, n: int, chunk: int, seed: int) -> dict:
    import einops
    import torch

    from tl_mdl.bilinear import iter_eigendecompose
    from tl_mdl.bilinear.decompose import _eigh_chunk, _form_q, folded_weights

    torch.manual_seed(seed)

    class Layer:  # the weights of one bilinear MLP, TransformerLens shapes
        W_in = torch.randn(d_model, d_mlp) / d_model**0.5
        W_gate = torch.randn(d_model, d_mlp) / d_model**0.5
        W_out = torch.randn(d_mlp, d_model) / d_mlp**0.5
        b_in = torch.randn(d_mlp) * 0.1
        b_gate = torch.randn(d_mlp) * 0.1
        b_out = torch.zeros(d_model)

    mlp = Layer()
    U = torch.randn(n, d_model)
    U = U / U.norm(dim=-1, keepdim=True)
    if variant in ("floor", "topk_eig"):
        A = torch.randn(n, d_model, d_model)
        A = (A + A.mT) / 2
    values = []
    checksum = 0.0

    rss0 = _status_kb("VmRSS")
    _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    if variant == "floor":
        w, _ = torch.linalg.eigh(A)
        values.append(w)
    elif variant == "topk_eig":
        for s in range(0, n, chunk):
            values.append(_eigh_chunk(A[s : s + chunk], TOPK).values)
    elif variant == "gemm":
        L, R, W_out = folded_weights(mlp)
        scratch = L.new_empty(L.shape)
        for s in range(0, n, chunk):
            Q = _form_q(L, R, U[s : s + chunk] @ W_out.T, scratch)
            checksum += Q[:, 0, 0].sum().item()
            del Q
    elif variant in ("ours", "topk"):
        k = TOPK if variant == "topk" else None
        for _, eig in iter_eigendecompose(mlp, U, k=k, chunk_size=chunk):
            values.append(eig.values)
            checksum += eig.vectors[..., 0].abs().sum().item()
    elif variant == "naive":
        L, R, _ = folded_weights(mlp)  # [d, h] with the bias row, as ours
        b = einops.einsum(mlp.W_out, L, R, "hid out, in1 hid, in2 hid -> out in1 in2")
        b = 0.5 * (b + b.mT)
        q = einops.einsum(U, b, "n out, out in1 in2 -> n in1 in2")
        vals, vecs = torch.linalg.eigh(q)
        order = vals.abs().argsort(-1, descending=True)
        values.append(vals.gather(-1, order))
        checksum += vecs[:, 0].abs().sum().item()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_mb = (_status_kb("VmHWM") - rss0) / 1024
    out = {"variant": variant, "wall": wall, "cpu": cpu, "peak_mb": peak_mb}
    if values and variant not in ("floor", "topk_eig"):
        v = torch.cat(values)
        out["abs_values_head"] = v[:, :TOPK].abs().double().sum(-1).tolist()
    return out


def run_variant(variant: str, args) -> dict:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    cmd = [
        sys.executable, __file__, "--child", variant, "--d-model", str(args.d_model),
        "--d-mlp", str(args.d_mlp), "--n", str(args.n), "--chunk", str(args.chunk),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description="bilinear decomposition benchmark")
    ap.add_argument("--full", action="store_true", help="d_model=512, d_mlp=2048, n=512")
    ap.add_argument("--d-model", type=int, default=None)
    ap.add_argument("--d-mlp", type=int, default=None)
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    size = (512, 2048, 512) if args.full else (256, 1024, 256)
    args.d_model = args.d_model or size[0]
    args.d_mlp = args.d_mlp or size[1]
    args.n = args.n or size[2]
    if args.child:
        res = child(args.child, args.d_model, args.d_mlp, args.n, args.chunk, seed=0)
        print(json.dumps(res))
        return

    print(
        f"# bilinear decomposition: d_model={args.d_model}, d_mlp={args.d_mlp}, "
        f"{args.n} directions, {args.threads} thread(s), chunk={args.chunk}",
        flush=True,
    )
    # Times are CPU seconds of the (single-threaded) child: robust to other load on the
    # machine; wall seconds are printed alongside and match when the machine is idle.
    clock = "cpu" if args.threads == 1 else "wall"
    res = {}
    for v in args.variants.split(","):
        r = res[v] = run_variant(v, args)
        r["seconds"] = r[clock]
        print(
            f"#   {v:6s} cpu {r['cpu']:8.2f} s  wall {r['wall']:8.2f} s  "
            f"peak +{r['peak_mb']:8.1f} MB",
            flush=True,
        )

    def line(name, ours, base, unit, target=None):
        tgt = f"  (target {target})" if target else ""
        print(
            f"{name}: ours {ours:.2f} {unit}, baseline {base:.2f} {unit}, "
            f"ratio {ours / base:.3f}{tgt}"
        )

    if "ours" in res and "naive" in res:
        a, b = res["ours"].get("abs_values_head"), res["naive"].get("abs_values_head")
        rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))
        print(f"# ours vs naive: top-{TOPK} |λ| sums agree to rel {rel:.1e}")
        line("bilinear_full_vs_naive_time", res["ours"]["seconds"], res["naive"]["seconds"], "s",
             "<= 0.75")
        line("bilinear_full_vs_naive_peak_mem", max(res["ours"]["peak_mb"], 0.1),
             res["naive"]["peak_mb"], "MB", "<= 0.15")
    if {"ours", "floor", "gemm"} <= res.keys():
        limit = res["floor"]["seconds"] + res["gemm"]["seconds"]
        line("bilinear_full_vs_floor_plus_gemm_time", res["ours"]["seconds"], limit, "s",
             "<= 1.15")
    if {"topk_eig", "floor"} <= res.keys():
        line(f"bilinear_top{TOPK}_solver_vs_full_eigh_floor_time", res["topk_eig"]["seconds"],
             res["floor"]["seconds"], "s", "<= 0.5")
    if {"topk", "ours"} <= res.keys():
        line(f"bilinear_top{TOPK}_vs_full_decomposition_time", res["topk"]["seconds"],
             res["ours"]["seconds"], "s")
    if {"topk", "ours"} <= res.keys():
        a, b = res["topk"].get("abs_values_head"), res["ours"].get("abs_values_head")
        rel = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))
        print(f"# topk vs full: top-{TOPK} |λ| sums agree to rel {rel:.1e}")


if __name__ == "__main__":
    main()
