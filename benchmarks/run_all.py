"""Run every ``benchmarks/bench_*.py`` in its own process (``make bench``).

Each script prints one line per figure, ``name: ours X, baseline Y, ratio Z``, and a line
starting ``UNRELIABLE:`` for every figure its sanity checks reject (see ``_harness.py``).
All ``UNRELIABLE`` lines are repeated at the end; ``--strict`` exits non-zero if there are
any. Other arguments (``--full``, ``--threads N``, ``--rounds N``) go to every script.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from _harness import problems_in


def main(argv: list[str]) -> int:
    strict = "--strict" in argv
    passed = [a for a in argv if a != "--strict"]
    here = Path(__file__).parent
    failed, problems = [], []
    for script in sorted(here.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        proc = subprocess.Popen([sys.executable, str(script), *passed],
                                stdout=subprocess.PIPE, text=True, bufsize=1)
        out = []
        for line in proc.stdout:  # type: ignore[union-attr]
            print(line, end="", flush=True)
            out.append(line)
        if proc.wait() != 0:
            failed.append(script.name)
        problems += [f"{script.name}: {p}" for p in problems_in("".join(out))]
    print("== summary", flush=True)
    if failed:
        print(f"benchmarks failed: {', '.join(failed)}")
    if problems:
        print(f"{len(problems)} UNRELIABLE figure(s); rerun those on a quieter machine:")
        print("\n".join(problems))
    else:
        print("no UNRELIABLE figures")
    return 1 if failed or (strict and problems) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
