"""Builders shared by several test files: a tiny random TransformerLens model, random SAEs,
small synthetic activations and a bitwise module comparison. Fixtures built from them live
in ``conftest.py``; test files import these functions directly (pytest puts ``tests/`` on
``sys.path``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tl_mdl import SAE, SAEConfig

#: Why a test is skipped on TransformerLens 4 (``make test-tl4``).
NO_HOOKED_TRANSFORMER = "needs HookedTransformer, which TransformerLens 4 removed (TL 3.9 only)"
#: Why a test is skipped without the optional ``sae-lens`` extra.
NO_SAE_LENS = "needs the optional sae-lens extra (SAELens requires transformer-lens<4)"


def require_hooked_transformer(module: bool = False) -> tuple[Any, Any]:
    """``(HookedTransformer, HookedTransformerConfig)``; on TransformerLens 4 the calling test
    (or, with ``module=True``, the whole test module) is skipped with the reason."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        pytest.skip(NO_HOOKED_TRANSFORMER, allow_module_level=module)
    return HookedTransformer, HookedTransformerConfig


class _Missing:
    """Stands for a TransformerLens class this line lacks: using it skips the test."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        pytest.skip(NO_HOOKED_TRANSFORMER)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        pytest.skip(NO_HOOKED_TRANSFORMER)


def hooked_transformer_classes() -> tuple[Any, Any]:
    """``(HookedTransformer, HookedTransformerConfig)``; on TransformerLens 4, stand-ins that
    skip whichever test uses them (the module's other tests still run)."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        return _Missing("HookedTransformer"), _Missing("HookedTransformerConfig")
    return HookedTransformer, HookedTransformerConfig


def require_sae_lens() -> Any:
    """``sae_lens``, or skip the calling test module (the extra is not installed)."""
    return pytest.importorskip("sae_lens", reason=NO_SAE_LENS)


#: Rounding steps bounding the tiny model's float32 logits computed in two op orders: dot
#: products up to d_mlp = 32 long, a few per layer, 2 layers (see :func:`f32_tolerance`).
LOGIT_TERMS = 4 * 32


def f32_tolerance(expected: torch.Tensor, terms: int, scale: float | None = None,
                  dtype: torch.dtype = torch.float32) -> float:
    """``terms · eps(dtype) · scale``: how far two evaluations of the same math in different
    summation orders (other CPU kernels, another library's op order) may differ, where
    ``terms`` bounds the number of rounding steps a value goes through (e.g. the length of a
    dot product times the layers it passes) and ``scale`` (default: ``max |expected|``) the
    magnitudes involved."""
    if scale is None:
        scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    return terms * torch.finfo(dtype).eps * max(scale, torch.finfo(dtype).tiny)


def dot_scale(a: torch.Tensor, w: torch.Tensor) -> float:
    """``max (|a| @ |w|)``: the largest sum of magnitudes a product ``a @ w`` adds up, which
    bounds its rounding error (``len · eps · dot_scale``) even when terms cancel."""
    return float((a.detach().abs().double() @ w.detach().abs().double()).max())


def assert_close_f32(actual: torch.Tensor, expected: torch.Tensor, *, terms: int,
                     scale: float | None = None) -> None:
    """``|actual − expected| ≤`` :func:`f32_tolerance` elementwise (no relative part), for
    float32 results of the same math computed two ways; holds on any x86-64 CPU's kernels."""
    tol = f32_tolerance(expected, terms, scale)
    torch.testing.assert_close(actual, expected, atol=tol, rtol=0)


def tiny_model(act_fn: str = "gelu", gated: bool = False, seed: int = 0, **kw) -> Any:
    """2 layers, d_model 16, 2 heads of 8, d_mlp 32, vocab 50, n_ctx 16; ``kw`` overrides.
    A TL 3.9 ``HookedTransformer``; on TransformerLens 4 the same architecture as a native
    ``TransformerBridge`` (``boot_native``), so the tests run on the bridge there."""
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        return tiny_bridge(act_fn, gated, seed, **kw)
    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=50, n_ctx=16,
               act_fn=act_fn, gated_mlp=gated, seed=seed)
    model = HookedTransformer(HookedTransformerConfig(**{**cfg, **kw}))
    model.eval()
    return model


def tiny_bridge(act_fn: str = "gelu", gated: bool = False, seed: int = 0, **kw) -> Any:
    """:func:`tiny_model`'s architecture as a native ``TransformerBridge`` (``boot_native``)."""
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = dict(n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=50, n_ctx=16,
               act_fn=act_fn, gated_mlp=gated, seed=seed)
    model = TransformerBridge.boot_native(TransformerBridgeConfig(**{**cfg, **kw}))
    model.eval()
    return model


def random_sae(d_in: int, activation: str = "relu", d_sae: int = 48, seed: int = 1,
               k: int = 5, **kw) -> SAE:
    """An SAE whose latents fire on random inputs (scaled encoder, nonzero biases)."""
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation,
                    k=k if activation == "topk" else None, **kw)
    sae = SAE(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.mul_(5)
        sae.b_enc.copy_(0.05 * torch.randn(d_sae, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen))
        if activation == "jumprelu":
            sae.threshold.fill_(0.05)
    return sae


def exact_identity_sae(d_in: int) -> SAE:
    """``relu(x) − relu(−x) = x``: reconstructs every input exactly (``d_sae = 2 d_in``)."""
    sae = SAE(SAEConfig(d_in=d_in, d_sae=2 * d_in))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


def sparse_sums(n: int = 256, d: int = 8, seed: int = 0) -> torch.Tensor:
    """Rows that are sums of a random ~20% of 16 random directions, magnitudes in [0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(16, d, generator=g)
    active = torch.rand(n, 16, generator=g) < 0.2
    return (active * (torch.rand(n, 16, generator=g) + 0.5)) @ dirs


def bitwise_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same state-dict keys, dtypes and bits."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def edit_model_cfg(src: Path, dst: Path, edit) -> Path:
    """A copy of the saved model folder ``src`` at ``dst`` whose model_cfg.json is ``edit(cfg)``."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "model_cfg.json").read_text())
    (dst / "model_cfg.json").write_text(json.dumps(edit(cfg)))
    return dst


#: SAE activations with the config each needs (ids for parametrize in SAE_ACT_IDS)
SAE_ACTS = [("relu", {}), ("topk", {"k": 3}), ("jumprelu", {})]
SAE_ACT_IDS = [a for a, _ in SAE_ACTS]


def float64_sae(activation: str, d_in: int = 6, d_sae: int = 10, seed: int = 0, **kw) -> SAE:
    """A float64 SAE with every parameter random (nonzero biases, random thresholds)."""
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, activation=activation, dtype="float64", **kw)
    sae = SAE(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
            if name == "threshold":
                p.copy_(p.abs() * 0.5)
    return sae


def float64_inputs(n: int = 7, d_in: int = 6, seed: int = 0) -> torch.Tensor:
    """``[n, d_in]`` standard normal float64 inputs."""
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# the training settings of the small regression runs (8 steps on ``sparse_sums()``)
SHORT_TRAIN = dict(steps=8, batch_size=64, lr=3e-3, progress=False)
