"""Shared harness of every ``benchmarks/bench_*.py``: thread choice, interleaved A/B rounds,
paired ratios, and the sanity checks that mark a figure ``UNRELIABLE``.

A busy machine shifts every variant's time, but not alike: a stall in one call can make a
spliced forward look faster than the bare model. So each round times every variant once, in
turn (A B A B ...), each figure is the median of the per-round ratios ours/baseline, and the
spread of those ratios (max/min) is printed beside it. A figure is flagged, with a line
starting ``UNRELIABLE:``, when

* an ordering is impossible (a call that contains another is faster than it: a spliced
  forward below the bare model, an SAE splice below the bare model plus its encoder GEMM),
* the paired ratios spread wider than ``SPREAD_LIMIT`` (max/min),
* the load average during the run exceeds the machine's cores, so the benchmark's threads
  were waiting for a core (our own threads count towards the load; load above the cores
  means more runnable threads than cores).

The pure logic (``summarize``, ``*_problem``, ``problems_in``) takes plain numbers, so tests
feed it hand-made samples; ``Bench`` wires it to the clock, the threads and the output.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SPREAD_LIMIT = 1.3
MARK = "UNRELIABLE:"


# ------------------------------------------------------------------------ pure logic
@dataclass(frozen=True)
class Ratio:
    """Medians of each side's samples, the median of the per-round ratios, and their range."""

    ours: float
    base: float
    ratio: float
    lo: float
    hi: float
    rounds: int

    @property
    def spread(self) -> float:
        """max/min of the paired ratios (1.0 = every round agreed)."""
        return self.hi / self.lo if self.lo > 0 else float("inf")


def paired_ratios(ours: Sequence[float], base: Sequence[float]) -> list[float]:
    """``ours[i] / base[i]`` per round; the two sides must have been timed in the same rounds."""
    if len(ours) != len(base) or not ours:
        raise ValueError(
            f"paired samples need the same non-zero number of rounds, got {len(ours)} and "
            f"{len(base)}"
        )
    return [o / b if b > 0 else float("inf") for o, b in zip(ours, base, strict=True)]


def summarize(ours: Sequence[float], base: Sequence[float]) -> Ratio:
    r = paired_ratios(ours, base)
    return Ratio(statistics.median(ours), statistics.median(base), statistics.median(r),
                 min(r), max(r), len(r))


def spread_problem(name: str, ratio: Ratio, limit: float = SPREAD_LIMIT) -> str | None:
    """Wide spread of paired ratios: the rounds disagree, so the median is not a measurement."""
    if ratio.rounds >= 2 and ratio.spread > limit:
        return (f"{MARK} {name}: paired ratios spread {ratio.lo:.3g}–{ratio.hi:.3g} "
                f"(max/min {ratio.spread:.2f} > {limit}); rerun on a quieter machine")
    return None


def order_problem(name: str, containing: Sequence[float], contained: Sequence[float],
                  what: str) -> str | None:
    """``containing`` does all the work of ``contained`` and more (a spliced forward vs the
    bare model; vs bare model + encoder GEMM), so it cannot be faster. Judged on the median
    of the paired ratios; ``what`` names the impossible ordering for the message."""
    r = summarize(containing, contained)
    if r.ratio < 1.0:
        return (f"{MARK} {name}: impossible ordering, {what} (median paired ratio "
                f"{r.ratio:.3g} < 1); the timings were disturbed")
    return None


def load_problem(load: float, cores: int, threads: int) -> str | None:
    """More runnable threads than cores: the benchmark's threads waited for a core."""
    if load > cores:
        return (f"{MARK} load average reached {load:.2f} on {cores} cores while timing with "
                f"{threads} thread(s): other jobs competed for the cores")
    return None


def problems_in(text: str) -> list[str]:
    """The ``UNRELIABLE:`` lines of a benchmark's output."""
    return [ln.strip() for ln in text.splitlines() if ln.strip().startswith(MARK)]


def default_threads(requested: int | None, cores: int) -> int | None:
    """``--threads`` if given; 1 on machines with <= 2 cores (two threads stall when anything
    else runs); otherwise None (torch's default)."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads {requested}: pass a positive number of threads")
        return requested
    return 1 if cores <= 2 else None


# ------------------------------------------------------------------------ the harness
def add_args(ap: argparse.ArgumentParser, rounds: int) -> argparse.ArgumentParser:
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: 1 on machines with <= 2 cores)")
    ap.add_argument("--rounds", type=int, default=rounds,
                    help=f"interleaved A/B rounds (default {rounds})")
    ap.add_argument("--repeats", type=int, default=1,
                    help="calls of each variant per round, back to back; a round keeps the "
                    "fastest, so a stall inside one call does not become the round's figure "
                    "(default 1)")
    ap.add_argument("--strict", action="store_true",
                    help="exit non-zero if any figure is UNRELIABLE")
    return ap


class Bench:
    """One benchmark run: sets threads (also for child processes, through the OpenMP/MKL
    environment variables), prints the header, times interleaved rounds, prints lines and
    collects the sanity problems; ``finish`` repeats them and returns the exit code."""

    def __init__(self, title: str, args: argparse.Namespace):
        import torch

        self.cores = os.cpu_count() or 1
        chosen = default_threads(args.threads, self.cores)
        if chosen is not None:
            torch.set_num_threads(chosen)
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                os.environ[var] = str(chosen)
        self.threads = torch.get_num_threads()
        how = ("--threads" if args.threads is not None else
               "default on <= 2 cores" if chosen is not None else "torch default")
        self.rounds = max(1, args.rounds)
        self.repeats = max(1, getattr(args, "repeats", 1))
        self.strict = args.strict
        self.problems: list[str] = []
        self.max_load = 0.0
        print(f"# {title}; {self.threads} thread(s) ({how}), {self.cores} cores, "
              f"{self.rounds} interleaved round(s) of the fastest of {self.repeats} call(s), "
              f"ratio = median of paired ratios "
              f"[min–max], torch {torch.__version__}", flush=True)

    def sample_load(self) -> None:
        self.max_load = max(self.max_load, os.getloadavg()[0])

    def interleaved(self, fns: dict[str, Callable[[], object]], rounds: int | None = None,
                    warmup: bool = True) -> dict[str, list[float]]:
        """Seconds per call of each function, in turn within each round: the fastest of
        ``--repeats`` back-to-back calls (one call by default)."""
        times: dict[str, list[float]] = {n: [] for n in fns}
        if warmup:
            for f in fns.values():
                f()
        for _ in range(rounds or self.rounds):
            self.sample_load()
            for n, f in fns.items():
                best = math.inf
                for _ in range(self.repeats):
                    t0 = time.perf_counter()
                    f()
                    best = min(best, time.perf_counter() - t0)
                times[n].append(best)
        self.sample_load()
        return times

    def flag(self, problem: str | None) -> None:
        if problem:
            self.problems.append(problem)
            print(problem, flush=True)

    def line(self, name: str, ours: Sequence[float], base: Sequence[float], unit: str = "",
             fmt: str = ".4g", note: str = "", check_spread: bool = True) -> Ratio:
        """Print ``name: ours X, baseline Y, ratio Z [min–max, n rounds]`` and flag a wide
        spread. Use ``check_spread=False`` for deterministic quantities (memory, bits)."""
        r = summarize(ours, base)
        u = f" {unit}" if unit else ""
        rng = f" [{r.lo:.3g}–{r.hi:.3g}, {r.rounds} rounds]" if r.rounds > 1 else ""
        tail = f"  ({note})" if note else ""
        print(f"{name}: ours {r.ours:{fmt}}{u}, baseline {r.base:{fmt}}{u}, "
              f"ratio {r.ratio:.3g}{rng}{tail}", flush=True)
        if check_spread:
            self.flag(spread_problem(name, r))
        return r

    def finish(self) -> int:
        self.sample_load()
        self.flag(load_problem(self.max_load, self.cores, self.threads))
        if self.problems:
            print(f"# {len(self.problems)} figure(s) above are UNRELIABLE", flush=True)
        return 1 if (self.strict and self.problems) else 0


def exit_with(code: int) -> None:
    sys.stdout.flush()
    raise SystemExit(code)
