"""``tl_mdl.description_length`` and ``tl_mdl.hierarchical_dl_report`` as the package exports
them: :mod:`tl_mdl.mdl` scores with a loss callable or a registered loss name and never
imports a model, so a model-based loss named by string (``loss="kl"`` / ``"ce"`` with
``model=, hook_name=, tokens=``) is made available here, by importing :mod:`tl_mdl.hooks` on
first use. A broken TransformerLens install raises its own ``ImportError`` there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from tl_mdl.mdl import description_length as _description_length
from tl_mdl.mdl.hierarchical import hierarchical_dl_report as _hierarchical_dl_report
from tl_mdl.mdl.losses import MODEL_LOSSES

P = ParamSpec("P")
R = TypeVar("R")


def ensure_model_loss(loss: Any) -> None:
    """Import :mod:`tl_mdl.hooks` (which registers ``"ce"`` and ``"kl"``) when ``loss`` names
    a loss that is not registered yet."""
    if isinstance(loss, str) and loss != "fvu" and loss not in MODEL_LOSSES:
        import tl_mdl.hooks  # noqa: F401


def _with_model_losses(fn: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        ensure_model_loss(kwargs.get("loss"))
        return fn(*args, **kwargs)

    return wrapper


description_length = _with_model_losses(_description_length)
hierarchical_dl_report = _with_model_losses(_hierarchical_dl_report)

__all__ = ["description_length", "hierarchical_dl_report", "ensure_model_loss"]
