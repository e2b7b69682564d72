"""``python -m tl_mdl.cli`` (also what ``torchrun ... -m tl_mdl.cli ddp-train`` runs)."""

from tl_mdl.cli import app

app()
