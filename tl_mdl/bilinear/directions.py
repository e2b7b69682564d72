"""What to decompose: the bilinear MLP of a layer, and output directions ``u`` to read it
along (unembedding columns, the layer's top singular output directions, or an SAE's encoder
directions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jaxtyping import Float
from torch import Tensor

from tl_mdl._tl import gated_mlp_parts
from tl_mdl.bilinear.decompose import output_svd
from tl_mdl.bilinear.mlp import BilinearMLP


@dataclass
class OutputDirections:
    """``vectors [n, d_model]`` (one output direction per row), the ``index`` each came from
    (token id, singular index, SAE feature) and a printable label for each."""

    vectors: Float[Tensor, "n d_model"]
    index: list[int]
    labels: list[str]


def bilinear_mlp_at(model: Any, layer: int) -> BilinearMLP:
    """The bilinear MLP of block ``layer`` (negative counts from the end; a
    :class:`BilinearMLP`, or any gated MLP whose activation is the identity, e.g. a bridge's);
    raises
    ``ValueError`` for a layer out of range and ``TypeError``, naming the conversion, when
    that MLP is not bilinear."""
    n_layers = model.cfg.n_layers
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: the model has n_layers={n_layers}")
    mlp = getattr(model.blocks[layer], "mlp", None)
    parts = None if mlp is None else gated_mlp_parts(mlp)
    if not isinstance(mlp, BilinearMLP) and (parts is None or not parts.bilinear):
        raise TypeError(
            f"the MLP of layer {layer} is {type(mlp).__name__}, not bilinear; convert it with "
            f"tl_mdl.to_bilinear(model, layers=[{layer}]) (and fine-tune with "
            "tl_mdl.anneal_to_bilinear), then save it with tl_mdl.models.save_model"
        )
    return mlp


def pick_indices(index: list[int] | None, n: int, k: int, what: str) -> list[int]:
    """``index`` checked against ``range(n)``, or the first ``k`` of ``n`` when ``None``."""
    if index is None:
        return list(range(min(k, n)))
    bad = [i for i in index if not 0 <= i < n]
    if bad:
        raise ValueError(f"index {bad} out of range for {n} {what} (0..{n - 1})")
    return list(index)


def unembed_directions(model: Any, index: list[int] | None, k: int) -> OutputDirections:
    """Token ``t``'s direct logit direction, column ``t`` of ``W_U`` (``ln_final`` ignored)."""
    W_U = model.W_U.detach()  # [d_model, d_vocab]
    idx = pick_indices(index, W_U.shape[1], k, "tokens")
    return OutputDirections(W_U.T[idx], idx, [f"token {t}" for t in idx])


def svd_directions(mlp: BilinearMLP, k: int) -> OutputDirections:
    """The top ``k`` singular output directions of the layer's bilinear tensor."""
    svd = output_svd(mlp, min(k, mlp.W_out.shape[-1]))
    n = svd.out_dirs.shape[0]
    return OutputDirections(svd.out_dirs, list(range(n)),
                            [f"svd {i} (σ={float(s):.4g})" for i, s in enumerate(svd.values)])


def sae_directions(sae: Any, d_model: int, index: list[int] | None, k: int,
                   where: str = "the SAE") -> OutputDirections:
    """Encoder directions ``W_enc[:, i]`` of an SAE trained on the residual stream or the MLP
    output (its ``d_in`` must be ``d_model``)."""
    if sae.cfg.d_in != d_model:
        raise ValueError(
            f"{where} has d_in={sae.cfg.d_in} but the model has d_model={d_model}; use an SAE "
            "trained on the residual stream or MLP output"
        )
    idx = pick_indices(index, sae.cfg.d_sae, k, "SAE features")
    return OutputDirections(sae.W_enc.detach().T[idx], idx, [f"feature {i}" for i in idx])
