"""``tl-mdl``: score, train and sweep MDL-SAEs, decompose bilinear MLPs, run the demos, train
data-parallel.

Inputs are tl_mdl saves (``SAE.save``, ``tl_mdl.models.save_model``), SAELens SAE folders
(``cfg.json`` + ``sae_weights.safetensors``) and safetensors activation shards (one tensor
``activations [N, d_in]`` per file, or a folder of such files). User errors (a missing path,
a folder that is not an SAE, mismatched ``d_in``, bad numbers) print one line
``error: ...`` to stderr and exit with code 2, never a traceback. Each command is a thin
module over library functions; heavy submodules are imported inside the commands.
"""

from __future__ import annotations

# importing a command module registers it; help lists the commands in this order
# isort: off
from tl_mdl.cli import score, train, decompose, demo, ddp  # noqa: F401
# isort: on
from tl_mdl.cli.common import (
    EXIT_USER_ERROR,
    USER_ERRORS,
    Format,
    Objective,
    _check_device,
    app,
    fail,
    load_acts,
    load_sae,
    user_errors,
)
from tl_mdl.cli.demo import DEMO_SCRIPTS, QUICK_ARGS, Demo, demos_dir


def main() -> None:  # pragma: no cover - console entry
    app()


__all__ = [
    "app", "main", "fail", "user_errors", "USER_ERRORS", "EXIT_USER_ERROR", "Format",
    "Objective", "load_acts", "load_sae", "_check_device", "Demo", "DEMO_SCRIPTS",
    "QUICK_ARGS", "demos_dir",
]
