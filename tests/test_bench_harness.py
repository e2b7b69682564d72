"""The benchmarks' sanity logic (benchmarks/_harness.py), fed hand-made timing samples: it
flags exactly the impossible orderings, wide spreads and overloaded runs. No timing here."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from _harness import (  # noqa: E402
    MARK,
    Bench,
    default_threads,
    load_problem,
    order_problem,
    paired_ratios,
    problems_in,
    spread_problem,
    summarize,
)

# A clean run: ours ~0.85x the baseline in every round, the bare model well below both.
CLEAN_BARE = [400.0, 410.0, 405.0, 398.0, 402.0]
CLEAN_GEMM = [60.0, 61.0, 60.0, 59.0, 60.0]
CLEAN_OURS = [510.0, 520.0, 515.0, 505.0, 512.0]
CLEAN_BASE = [600.0, 612.0, 606.0, 594.0, 602.0]


def test_summary_is_median_of_paired_ratios():
    r = summarize([1.0, 2.0, 9.0], [2.0, 2.0, 3.0])  # ratios 0.5, 1.0, 3.0
    assert (r.ours, r.base, r.ratio, r.lo, r.hi, r.rounds) == (2.0, 2.0, 1.0, 0.5, 3.0, 3)
    assert r.spread == 6.0
    assert paired_ratios([3.0], [4.0]) == [0.75]


def test_unpaired_samples_are_refused():
    with pytest.raises(ValueError, match="same non-zero number of rounds"):
        summarize([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="same non-zero number of rounds"):
        summarize([], [])


def test_clean_run_is_not_flagged():
    floor = [b + g for b, g in zip(CLEAN_BARE, CLEAN_GEMM, strict=True)]
    assert spread_problem("fwd", summarize(CLEAN_OURS, CLEAN_BASE)) is None
    assert order_problem("fwd", CLEAN_OURS, CLEAN_BARE, "spliced < bare") is None
    assert order_problem("fwd", CLEAN_OURS, floor, "below gemm") is None
    assert order_problem("fwd", CLEAN_BASE, floor, "below gemm") is None
    assert load_problem(1.9, cores=2, threads=1) is None


def test_impossible_orderings_are_flagged():
    # issue 17's run: SAELens's dense splice 93.7 ms against a 553.5 ms bare model
    msg = order_problem("forward relu dense (SAELens)", [93.7, 95.0, 94.1],
                        [553.5, 550.0, 560.0], "spliced forward faster than the bare model")
    assert msg is not None and msg.startswith(MARK)
    assert "forward relu dense (SAELens)" in msg and "impossible ordering" in msg
    # above the bare model, but below bare + encoder GEMM: the SAE cost less than its GEMM
    floor = [b + g for b, g in zip(CLEAN_BARE, CLEAN_GEMM, strict=True)]
    below_gemm = [b + 20.0 for b in CLEAN_BARE]
    assert order_problem("x", below_gemm, CLEAN_BARE, "spliced < bare") is None
    msg = order_problem("x", below_gemm, floor, "SAE cost below its encoder GEMM")
    assert msg is not None and "SAE cost below its encoder GEMM" in msg


def test_order_judges_the_median_not_one_round():
    # one disturbed round (bare stalled) does not flag; a majority does
    bare = [400.0, 400.0, 900.0, 400.0, 400.0]
    assert order_problem("x", CLEAN_OURS, bare, "spliced < bare") is None
    bare = [400.0, 900.0, 900.0, 900.0, 400.0]
    assert order_problem("x", CLEAN_OURS, bare, "spliced < bare") is not None


def test_wide_spread_is_flagged_and_limit_is_strict():
    wide = summarize([100.0, 100.0, 100.0], [100.0, 140.0, 120.0])  # ratios 1, 0.714, 0.833
    msg = spread_problem("fwd", wide)
    assert msg is not None and msg.startswith(MARK) and "1.40" in msg
    at_limit = summarize([130.0, 100.0], [100.0, 100.0])  # max/min exactly 1.3
    assert spread_problem("fwd", at_limit) is None
    assert spread_problem("fwd", summarize([131.0, 100.0], [100.0, 100.0])) is not None
    # one round has no spread to judge
    assert spread_problem("fwd", summarize([1.0], [9.0])) is None


def test_load_above_cores_is_flagged():
    # issue 17: two threads on two cores while another job ran (load ~3)
    assert load_problem(3.0, cores=2, threads=2) is not None
    assert load_problem(2.0, cores=2, threads=1) is None
    assert load_problem(2.01, cores=2, threads=1) is not None


def test_threads_default_to_one_on_small_machines():
    assert default_threads(None, cores=2) == 1
    assert default_threads(None, cores=1) == 1
    assert default_threads(None, cores=16) is None
    assert default_threads(4, cores=2) == 4
    with pytest.raises(ValueError, match="--threads 0"):
        default_threads(0, cores=2)


def test_problems_in_picks_only_marked_lines():
    text = ("# header\nforward x [ms]: ours 1, baseline 2, ratio 0.5\n"
            f"{MARK} fwd: paired ratios spread\n  {MARK} load average reached 3\n")
    assert problems_in(text) == [f"{MARK} fwd: paired ratios spread",
                                 f"{MARK} load average reached 3"]


def _bench(strict: bool) -> Bench:
    args = argparse.Namespace(threads=1, rounds=3, strict=strict)
    return Bench("test", args)


def test_bench_flags_exactly_the_bad_lines_and_strict_sets_exit_code(capsys, monkeypatch):
    monkeypatch.setattr("os.getloadavg", lambda: (0.5, 0.5, 0.5))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "1")  # Bench sets them for child processes; restored after
    bench = _bench(strict=True)
    bench.line("clean", CLEAN_OURS, CLEAN_BASE)
    bench.line("noisy", [100.0, 100.0, 100.0], [100.0, 200.0, 100.0])
    bench.line("memory", [1.0, 5.0], [1.0, 1.0], check_spread=False)
    out = capsys.readouterr().out
    assert "clean: ours 512, baseline 602, ratio 0.85 [0.85–0.85, 5 rounds]" in out
    assert problems_in(out) == [bench.problems[0]] and "noisy" in bench.problems[0]
    assert bench.finish() == 1
    assert _bench(strict=False).finish() == 0
    ok = _bench(strict=True)
    ok.line("clean", CLEAN_OURS, CLEAN_BASE)
    assert ok.finish() == 0


def test_repeats_keep_the_fastest_call_of_each_round(monkeypatch):
    """With --repeats 3 each round records the fastest of its 3 calls, so one stalled call
    does not become the round's figure. A fake clock gives the calls known durations."""
    import _harness

    monkeypatch.setattr("os.getloadavg", lambda: (0.5, 0.5, 0.5))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    durations = iter([5.0, 1.0, 3.0, 2.0, 9.0, 4.0])  # round 1: 5, 1, 3; round 2: 2, 9, 4
    clock = {"t": 0.0}
    monkeypatch.setattr(_harness.time, "perf_counter", lambda: clock["t"])

    def call():
        clock["t"] += next(durations)

    bench = Bench("test", argparse.Namespace(threads=1, rounds=2, repeats=3, strict=False))
    assert bench.interleaved({"a": call}, warmup=False) == {"a": [1.0, 2.0]}


def test_run_all_summarises_and_strict_exits_nonzero(tmp_path):
    # run_all on a copy of the harness with two fake benchmarks: one clean, one flagged
    (tmp_path / "_harness.py").write_text((BENCH / "_harness.py").read_text())
    (tmp_path / "run_all.py").write_text((BENCH / "run_all.py").read_text())
    (tmp_path / "bench_a.py").write_text("print('a: ours 1, baseline 2, ratio 0.5')\n")
    (tmp_path / "bench_b.py").write_text(f"print('{MARK} b: wide spread')\n")
    run = [sys.executable, str(tmp_path / "run_all.py")]
    lax = subprocess.run(run, capture_output=True, text=True)
    strict = subprocess.run([*run, "--strict"], capture_output=True, text=True)
    assert lax.returncode == 0 and strict.returncode == 1
    summary = strict.stdout.split("== summary")[1]
    assert f"bench_b.py: {MARK} b: wide spread" in summary
    assert "bench_a.py" not in summary
