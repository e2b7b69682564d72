"""``benchmarks/bench_auxk.py`` end to end on a tiny size: one ratio line per window, the
counts it prints are the SAE's alive latents on the test images."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import bench_auxk  # noqa: E402


def test_bench_auxk_prints_a_ratio_line_per_window(capsys):
    assert bench_auxk.main(["--widths", "32", "--dead-steps", "5", "--train", "600",
                            "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    ratio = [ln for ln in lines if ln.startswith("auxk w32 dead_steps 5:")]
    assert len(ratio) == 1
    ours = int(ratio[0].split("ours ")[1].split()[0])
    base = int(ratio[0].split("baseline ")[1].split()[0])
    assert 0 < base <= 32 and 0 < ours <= 32
    assert f"ratio {ours / base:.3f}" in ratio[0]
