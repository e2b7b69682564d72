"""Data-parallel SAE training on activation shards, e.g. on 2 CPU processes::

    torchrun --nproc_per_node 2 benchmarks/ddp_train.py acts/ --d-sae 512 --steps 2000 \\
        --out out/ddp_sae

(the arguments of ``tl-mdl ddp-train --help``; gloo on CPU, NCCL on CUDA). Prints the wall
time of training on rank 0.
"""

from __future__ import annotations

import sys
import time

from tl_mdl.cli import app

if __name__ == "__main__":
    t0 = time.perf_counter()
    rc = app(["ddp-train", *sys.argv[1:]], standalone_mode=False)
    print(f"ddp_train: {time.perf_counter() - t0:.2f} s", flush=True)
    raise SystemExit(rc or 0)
