"""Each stage saves its artefacts under ``--out``; a rerun that finds them (and the same
settings, for the stages after the selection) skips the stage. Timings and CSV helpers."""

from __future__ import annotations

import contextlib
import csv
import json
import time
from pathlib import Path
from typing import Any

import torch


def stage_key(args, selection: list[dict], names: tuple[str, ...]) -> str:
    return json.dumps({"saes": [(r["key"], r["width"], r["k"]) for r in selection],
                       **{n: getattr(args, n) for n in names}}, sort_keys=True)


def stage_done(out: Path, stage: str, key: str, files: list[Path]) -> bool:
    keys = out / "stage_keys.json"
    known = json.loads(keys.read_text()) if keys.is_file() else {}
    return known.get(stage) == key and all(f.is_file() for f in files)


def mark_done(out: Path, stage: str, key: str) -> None:
    keys = out / "stage_keys.json"
    known = json.loads(keys.read_text()) if keys.is_file() else {}
    known[stage] = key
    keys.write_text(json.dumps(known, indent=2))


class Stages:
    """Prints a header per stage, times it, and records it in ``timings.json``."""

    def __init__(self, out: Path):
        self.path = out / "timings.json"
        self.t0 = time.perf_counter()
        # a resumed stage keeps the timing of the run that made its artefacts
        old = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.previous: dict[str, Any] = old if isinstance(old, dict) else {}
        self.timings: dict[str, Any] = {}

    @contextlib.contextmanager
    def stage(self, name: str, done: bool):
        print(f"\n== {name}" + (" (artefacts found: resuming)" if done else ""), flush=True)
        start, cpu = time.perf_counter(), time.process_time()
        yield
        dt, dc = time.perf_counter() - start, time.process_time() - cpu
        prev = self.previous.get(name)
        if done and isinstance(prev, dict) and "seconds" in prev:
            self.timings[name] = {**prev, "resumed": True}
        else:
            self.timings[name] = {"seconds": round(dt, 2), "cpu_seconds": round(dc, 2),
                                  "resumed": done}
        print(f"   {name}: {dt:.1f} s (cpu {dc:.1f} s, {torch.get_num_threads()} threads)",
              flush=True)
        self.path.write_text(json.dumps(self.timings, indent=2))


def write_csv(path: Path, rows: list[dict], cols: list[str] | None = None) -> None:
    cols = cols or list(rows[0]) if rows else (cols or [])
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
