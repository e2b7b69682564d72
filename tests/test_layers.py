"""A loss named by string is built by the layer that knows models, on first use, without
hiding a broken install; mdl alone names the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from builders import require_hooked_transformer

import tl_mdl
import tl_mdl.mdl
from tl_mdl import SAE, SAEConfig
from tl_mdl.mdl.losses import MODEL_LOSSES

FRESH = """
import sys
import torch, tl_mdl
from transformer_lens import HookedTransformer, HookedTransformerConfig
cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_heads=2, d_head=4, d_vocab=20, n_ctx=6,
                              act_fn="relu", seed=0)
model = HookedTransformer(cfg)
tokens = torch.randint(0, 20, (3, 6), generator=torch.Generator().manual_seed(0))
sae = tl_mdl.SAE(tl_mdl.SAEConfig(d_in=8, d_sae=16), seed=0)
x = model.run_with_cache(tokens)[1]["blocks.0.hook_resid_pre"].reshape(-1, 8)
assert "tl_mdl.hooks" not in sys.modules
r = tl_mdl.description_length(sae, x, loss="kl", model=model,
                              hook_name="blocks.0.hook_resid_pre", tokens=tokens)
print(r.loss, r.bits_per_input > 0)
"""


def test_kl_by_name_is_built_on_first_use():
    """In a fresh process (tl_mdl.hooks not imported), tl_mdl.description_length(loss="kl")
    builds the loss through tl_mdl.hooks. (That the codec imports no SAE and mdl no model is
    checked statically by the import-linter contracts in pyproject.toml.)"""
    require_hooked_transformer()  # the fresh process builds a HookedTransformer
    out = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["kl", "True"]


@pytest.fixture
def no_model_losses(monkeypatch):
    """As if tl_mdl.hooks had never been imported, and importing it failed (a broken
    TransformerLens install)."""
    for name in list(MODEL_LOSSES):
        monkeypatch.delitem(MODEL_LOSSES, name)
    monkeypatch.setitem(sys.modules, "tl_mdl.hooks", None)  # `import tl_mdl.hooks` fails


def test_a_broken_install_is_not_reported_as_an_unknown_loss(no_model_losses):
    sae, x = SAE(SAEConfig(d_in=4, d_sae=8)), torch.randn(32, 4)
    with pytest.raises(ImportError):
        tl_mdl.description_length(sae, x, loss="kl", model=None, hook_name="h", tokens=None)
    # mdl itself never imports a model: it names the fix
    with pytest.raises(ValueError, match=r"loss='kl' is unknown.*tl_mdl\.hooks"):
        tl_mdl.mdl.description_length(sae, x, loss="kl")
