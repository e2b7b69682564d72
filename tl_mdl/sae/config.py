"""SAE configuration: one dataclass, serialised in SAELens's ``cfg.json`` layout."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

#: tl_mdl activation name -> SAELens architecture name written to ``cfg.json``.
ARCHITECTURE_OF_ACTIVATION = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}
ACTIVATION_OF_ARCHITECTURE = {v: k for k, v in ARCHITECTURE_OF_ACTIVATION.items()}

#: The SAELens cfg.json layout version our saves follow.
SAELENS_FORMAT_VERSION = "6.0.0"

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def dtype_from_str(name: str | torch.dtype) -> torch.dtype:
    """``"float32"`` / ``"torch.float32"`` / ``torch.float32`` -> ``torch.float32``."""
    if isinstance(name, torch.dtype):
        return name
    key = name.removeprefix("torch.")
    if key not in _DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def _default_reshape(hook_name: str | None) -> str:
    return "hook_z" if (hook_name or "").endswith("hook_z") else "none"


def sae_lens_reshape(cfg: Any) -> str:
    """SAELens' ``reshape_activations`` for a tl_mdl config: ``"hook_z"`` (flatten the heads)
    for an SAE at a ``hook_z`` hook, ``"none"`` elsewhere, unless the config recorded
    another value (``metadata["reshape_activations"]``, e.g. a per-head SAE read from a
    SAELens file)."""
    return cfg.metadata.get("reshape_activations") or _default_reshape(cfg.hook_name)


def dtype_to_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def normalise_dtype_device(cfg: Any) -> None:
    """A config's ``dtype`` as a validated name (a ``torch.dtype`` is converted) and its
    ``device`` as a string."""
    if isinstance(cfg.dtype, torch.dtype):
        cfg.dtype = dtype_to_str(cfg.dtype)
    dtype_from_str(cfg.dtype)  # validates
    cfg.device = str(cfg.device)


@dataclass
class SAEConfig:
    """Configuration of a sparse autoencoder.

    ``encode(x) = act((x - b_dec·[apply_b_dec_to_input]) @ W_enc + b_enc)``,
    ``decode(f) = f @ W_dec + b_dec``.

    Args:
        d_in: input (activation) dimension.
        d_sae: number of dictionary features F.
        activation: ``"relu"``, ``"topk"`` (keep the ``k`` largest pre-activations, then
            ReLU) or ``"jumprelu"`` (``pre · [pre > threshold]``, one threshold per feature).
        k: number of active features for ``"topk"`` (required there, forbidden elsewhere).
        jumprelu_init_threshold: initial threshold for ``"jumprelu"``.
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding (SAELens
            default).
        hook_name: the TransformerLens hook the SAE was trained on (metadata, optional).
        dtype, device: where the parameters live.
        metadata: free-form JSON-serialisable dict kept through save/load.
    """

    d_in: int
    d_sae: int
    activation: str = "relu"
    k: int | None = None
    jumprelu_init_threshold: float = 1e-3
    apply_b_dec_to_input: bool = True
    hook_name: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SAEConfig.{name} must be a positive int, got {value!r}")
        if self.activation not in ARCHITECTURE_OF_ACTIVATION:
            raise ValueError(
                f"SAEConfig.activation={self.activation!r} is unknown; "
                f"use one of {sorted(ARCHITECTURE_OF_ACTIVATION)}"
            )
        if self.activation == "topk":
            k = self.k
            if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= self.d_sae:
                raise ValueError(
                    f"activation='topk' needs an int k with 0 < k <= d_sae={self.d_sae}, "
                    f"got k={self.k!r}"
                )
        elif self.k is not None:
            raise ValueError(
                f"k={self.k} is only meaningful for activation='topk' "
                f"(got activation={self.activation!r}); drop k or set activation='topk'"
            )
        normalise_dtype_device(self)

    @property
    def architecture(self) -> str:
        """SAELens architecture name (``standard`` / ``topk`` / ``jumprelu``)."""
        return ARCHITECTURE_OF_ACTIVATION[self.activation]

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_str(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """A ``cfg.json`` dict readable by both tl_mdl and ``sae_lens.SAE.load_from_disk``."""
        d = asdict(self)
        metadata = dict(d.pop("metadata"))
        if self.hook_name is not None:
            metadata.setdefault("hook_name", self.hook_name)
        # Marks the file as SAELens >= 6 layout (else SAELens rewrites it as a legacy cfg).
        metadata.setdefault("sae_lens_version", SAELENS_FORMAT_VERSION)
        d["metadata"] = metadata
        d["architecture"] = self.architecture
        # SAELens config fields with their neutral values.
        d["normalize_activations"] = "none"
        d["reshape_activations"] = metadata.pop("reshape_activations", None) or (
            sae_lens_reshape(self))
        if self.activation != "topk":
            d.pop("k")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        """Inverse of :meth:`to_dict`; also accepts SAELens ``cfg.json`` dicts."""
        d = dict(d)
        arch = d.pop("architecture", None)
        # an unknown architecture is refused even when the dict names an activation (a
        # hierarchical SAE's cfg.json has both)
        if ("activation" not in d or arch is not None) and arch not in (
                ACTIVATION_OF_ARCHITECTURE):
            raise ValueError(
                f"cfg architecture {arch!r} is not supported by tl_mdl; supported: "
                f"{sorted(ACTIVATION_OF_ARCHITECTURE)}"
            )
        if "activation" not in d:
            d["activation"] = ACTIVATION_OF_ARCHITECTURE[arch]
        value = d.pop("normalize_activations", "none")
        if value not in ("none", None):
            raise ValueError(
                f"cfg normalize_activations={value!r} is not supported by tl_mdl.SAE (only "
                "'none'); fold the normalisation into the weights first (tl_mdl.from_sae_lens "
                "does that for a loaded sae_lens.SAE)"
            )
        reshape = d.pop("reshape_activations", "none") or "none"
        if reshape not in ("none", "hook_z"):
            raise ValueError(
                f"cfg reshape_activations={reshape!r} is not supported by tl_mdl.SAE; "
                "supported: 'none', 'hook_z' (heads flattened, which attach_sae does itself)"
            )
        metadata = dict(d.get("metadata") or {})
        if d.get("hook_name") is None and metadata.get("hook_name") is not None:
            d["hook_name"] = metadata["hook_name"]
        # Drop what to_dict added, so from_dict(to_dict(cfg)) == cfg.
        if metadata.get("hook_name") == d.get("hook_name"):
            metadata.pop("hook_name", None)
        if metadata.get("sae_lens_version") == SAELENS_FORMAT_VERSION:
            metadata.pop("sae_lens_version")
        if reshape != _default_reshape(d.get("hook_name")):
            metadata["reshape_activations"] = reshape  # e.g. a per-head SAE at hook_z
        d["metadata"] = metadata
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
