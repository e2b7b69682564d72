"""``tl-mdl demo``: run a demo script of the repository's demos/ folder."""

from __future__ import annotations

import os
import subprocess
import sys
from enum import Enum
from pathlib import Path

import typer

from tl_mdl.cli.common import app, user_errors


class Demo(str, Enum):
    mnist = "mnist"
    bilinear_mnist = "bilinear-mnist"
    lm = "lm"


DEMO_SCRIPTS = {
    Demo.mnist: "mnist_mdl.py",
    Demo.bilinear_mnist: "bilinear_mnist.py",
    Demo.lm: "lm_study.py",
}
#: Arguments --quick adds (before the user's own, which win on conflicts); quick runs write
#: to their own folder so a later full run never resumes from the small models.
QUICK_ARGS = {
    Demo.mnist: [
        "--widths",
        "16,32,64,128",
        "--train-size",
        "6000",
        # 1 epoch on 6000 images leaves every SAE above the demo's default threshold 0.3;
        # 5 epochs reach ~0.25-0.27 at widths 64/128, and 0.5 lets the small widths show too.
        "--epochs",
        "5",
        "--fvu-threshold",
        "0.5",
        "--out",
        "out/mnist_mdl_quick",
    ],
    Demo.bilinear_mnist: ["--epochs", "1", "--d-mlp", "64", "--out", "out/bilinear_mnist_quick"],
    Demo.lm: ["--quick", "--out", "out/lm_study_quick"],
}


def demos_dir() -> Path:
    """The repository's ``demos/`` folder (``$TL_MDL_DEMOS`` overrides)."""
    env = os.environ.get("TL_MDL_DEMOS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "demos"


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def demo(
    ctx: typer.Context,
    name: Demo = typer.Argument(
        ...,
        metavar="NAME",
        help="mnist: MDL-SAE sweep on MNIST pixels (bits per image vs width); bilinear-mnist: "
        "bilinear classifier read off its eigenvectors; lm: SAE + bilinear study on a small LM.",
        show_default=False,
    ),
    quick: bool = typer.Option(
        False, help="A small, fast configuration (minutes on a laptop CPU), in its own out/ folder."
    ),
) -> None:
    """Run a demo script from the repository's demos/ folder; extra arguments go to it.

    Example: tl-mdl demo mnist --quick --objective mdl. Results go to out/<demo>/ (CSV tables
    beside PNG plots). `tl-mdl demo mnist -- --help` shows the demo's own options.
    """
    folder = demos_dir()
    script = folder / DEMO_SCRIPTS[name]
    if not script.is_file():
        raise FileNotFoundError(
            f"demo script {script} not found; the demos ship with the source repository, not "
            "the wheel: run from a git checkout (pip install -e .) or set TL_MDL_DEMOS to its "
            "demos/ folder"
        )
    args = [*(QUICK_ARGS[name] if quick else []), *ctx.args]
    typer.echo(f"running {script.name} {' '.join(args)}".rstrip(), err=True)
    rc = subprocess.call([sys.executable, str(script), *args])
    if rc:
        raise typer.Exit(rc)
