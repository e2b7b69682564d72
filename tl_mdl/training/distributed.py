"""Data-parallel SAE training and sweeps with ``torch.distributed`` (run under ``torchrun``).

``train_sae`` becomes data-parallel by itself once a process group is initialised: every
rank draws the same global batch of ``B`` rows from ``(seed, step)``, keeps its slice of
``B / world_size`` rows, encodes and decodes it, and the loss is evaluated on the *global*
batch (latents and reconstructions gathered), so batch statistics (the FVU denominator, the
MDL surrogate's ``p̂`` and bin width) are those of the whole batch. Gradients are summed over
ranks (see :func:`reduce_gradients`); DDP training therefore equals single-process training
on the same data and seed up to the order of float reductions.

``sweep`` splits its grid over ranks and gathers the rows on rank 0.

Launch with the command line (``acts/`` a folder of safetensors shards with one
``activations`` tensor each; ``tl-mdl ddp-train --help`` lists the options)::

    torchrun --nproc_per_node 2 -m tl_mdl.cli ddp-train acts/ --d-sae 512 --steps 2000 \\
        --out out/ddp_sae
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

#: environment variables ``torchrun`` sets for each worker
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the process that writes checkpoints and tables."""
    return rank() == 0


def default_backend(device: str | torch.device | None = None) -> str:
    """``"nccl"`` when training on CUDA (and NCCL exists), else ``"gloo"``."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    return "nccl" if cuda and dist.is_nccl_available() else "gloo"


def init_distributed(
    backend: str | None = None, *, timeout_s: float = 1800.0
) -> tuple[int, int]:
    """Initialise the default process group from ``torchrun``'s environment variables
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) and return ``(rank,
    world_size)``. Without them (a plain ``python`` run) nothing is initialised and
    ``(0, 1)`` is returned. On NCCL each process is pinned to ``cuda:LOCAL_RANK``."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    missing = [k for k in TORCHRUN_ENV if k not in os.environ]
    if missing:
        return 0, 1
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group(backend: str | None = None) -> Iterator[tuple[int, int]]:
    """``with process_group() as (rank, world):`` init from torchrun's env, destroy on exit."""
    owned = not dist.is_initialized()
    try:
        yield init_distributed(backend)
    finally:
        if owned:
            destroy_distributed()


# --------------------------------------------------------------------- trainer helpers
def shard_rows(n: int, world: int, r: int) -> slice:
    """Rows ``[start, stop)`` of a global batch of ``n`` rows that rank ``r`` of ``world``
    processes: contiguous, sizes differ by at most one."""
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def all_gather_rows(t: Tensor) -> Tensor:
    """Concatenate every rank's ``[n_r, ...]`` tensor along rows, in rank order (no
    gradient). Rows may differ by rank (sizes are exchanged first)."""
    world = world_size()
    n = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    rows = [int(s) for s in sizes]
    big = max(rows)
    padded = t.new_zeros((big, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:k] for p, k in zip(parts, rows, strict=True)])


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any rank (one small all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum each parameter's ``.grad`` over ranks (flattened into one buffer per dtype).
    Parameters without a gradient are skipped (the same ones on every rank)."""
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            k = p.grad.numel()
            p.grad.copy_(flat[offset : offset + k].view_as(p.grad))
            offset += k


def broadcast_parameters(module: torch.nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every rank."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)


def gather_to_main(obj: object) -> list[object] | None:
    """``gather_object`` onto rank 0: the list of every rank's ``obj`` there, None elsewhere."""
    out: list[object] | None = [None] * world_size() if is_main_process() else None
    dist.gather_object(obj, out, dst=0)
    return out


def sum_over_ranks(t: Tensor) -> Tensor:
    """A copy of ``t`` summed over ranks (one all-reduce; no gradient)."""
    out = t.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
