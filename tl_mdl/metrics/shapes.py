"""What a direction looks like when it is an image: feature shapes and smoothness.

**Feature shape** (SAE decoder rows as images, e.g. MNIST pixels): for each row ``w``

* ``memorisation = max_n cos(w, x_n)`` over a set of images ``x_n`` (training images): 1 for
  a row that *is* an image; a whole-digit prototype scores high, a stroke shared by many
  digits scores low (its cosine with any one digit is at most ``√(stroke area / digit area)``
  for binary images).
* the **positive mass** ``m = w · [w ≥ floor · max(w)]`` (an SAE adds ``f_i · w`` with
  ``f_i ≥ 0``, so the positive part is what the feature draws; the floor, default 0.25,
  keeps faint positive noise spread over the whole image from counting as shape):

  - ``area = (Σ m)² / Σ m²``: the participation ratio, exactly ``n`` for ``n`` equal pixels;
  - ``elongation = √((λ₁ + 1/12) / (λ₂ + 1/12))`` with ``λ₁ ≥ λ₂`` the eigenvalues of the
    ``m``-weighted covariance of pixel coordinates. The ``1/12`` is the second moment of a
    unit pixel (a uniform unit square), so a one-pixel-wide segment of ``L`` pixels along an
    axis has elongation exactly ``L`` and a single pixel has 1;
  - ``positive_fraction = Σ max(w, 0)² / Σ w²``: how much of the row is positive.

  :func:`feature_shapes` labels each row (thresholds are arguments): ``"digit"`` when
  ``memorisation ≥ memorised`` (without images: when ``area ≥ digit_area``); else ``"blob"``
  when ``area < blob_area``; else ``"diffuse"`` when ``area ≥ digit_area`` (digit-sized but
  no training image's copy, e.g. a blurred average); else ``"stroke"`` when ``elongation ≥
  stroke_elongation``; else ``"fragment"`` (compact, mid-sized, e.g. part of a loop).

**Smoothness** (e.g. eigenvectors of a bilinear classifier, as images):

* ``high_frequency_fraction``: the fraction of an image's energy ``Σ |FFT|²`` at spatial
  frequencies with ``√(f_x² + f_y²) > cutoff · 0.5`` cycles/pixel (0.5 is Nyquist). White
  noise puts the same expected energy at every frequency, so its expected value is the
  fraction of frequencies above the cutoff (:func:`noise_high_frequency_fraction`, 0.80 for
  28×28 at ``cutoff = 0.5``); a smooth image scores near 0. The FFT is periodic, so an
  image with large values on its border pays for the wrap-around edge.
* ``total_variation_ratio = TV(x) / E_π[TV(π x)]``: the total variation (sum of absolute
  differences of horizontal and vertical neighbours) against its exact expectation over
  uniformly random permutations ``π`` of the same pixel values. The expectation is
  ``#edges · mean_{i<j} |x_i − x_j|`` (every edge is a uniformly random pair of distinct
  pixels), computed exactly from the sorted values. Noise scores 1 in expectation, a
  smooth image far below 1; the ratio does not change when the image is scaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

__all__ = [
    "FeatureShapes",
    "feature_shapes",
    "memorisation",
    "positive_mass_shape",
    "high_frequency_fraction",
    "noise_high_frequency_fraction",
    "total_variation_ratio",
]

#: second moment of a uniform unit square about its centre, per axis
_PIXEL_MOMENT = 1.0 / 12.0


def _as_images(
    x: Tensor, image_shape: tuple[int, int], name: str
) -> Float[Tensor, "n h w"]:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if len(image_shape) != 2 or min(image_shape) < 1:
        raise ValueError(f"image_shape={image_shape!r} must be (height, width), both >= 1")
    h, w = (int(s) for s in image_shape)
    if x.ndim == 1:
        x = x[None]
    if x.ndim == 2 and x.shape[1] == h * w:
        x = x.reshape(-1, h, w)
    if x.ndim != 3 or tuple(x.shape[1:]) != (h, w):
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}; expected [n, {h * w}] or [n, {h}, {w}] for "
            f"image_shape={(h, w)} (pass image_shape= for other image sizes)"
        )
    if not x.is_floating_point():
        x = x.double()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has NaN or infinite values")
    return x


# ----------------------------------------------------------------------------------- shapes


@torch.no_grad()
def memorisation(
    rows: Float[Tensor, "f d"], images: Float[Tensor, "n d"], *, chunk_size: int = 8192
) -> Float[Tensor, " f"]:
    """``max_n cos(rows_i, images_n)`` for each row (float64), over images in chunks of
    ``chunk_size`` (memory ``f × chunk_size``). A zero row or image has cosine 0."""
    if rows.ndim != 2 or images.ndim != 2 or rows.shape[1] != images.shape[1]:
        raise ValueError(
            f"rows {tuple(rows.shape)} and images {tuple(images.shape)} must be [f, d] and "
            "[n, d] with the same d (flatten images to one row each)"
        )
    if images.shape[0] == 0:
        raise ValueError("images is empty (N = 0); pass the training images")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    r = torch.nn.functional.normalize(rows.detach().double(), dim=1)
    best = torch.full((rows.shape[0],), -1.0, dtype=torch.float64)
    for s in range(0, images.shape[0], chunk_size):
        x = torch.nn.functional.normalize(images[s : s + chunk_size].double(), dim=1)
        best = torch.maximum(best, (r @ x.T).max(1).values)
    return best


@torch.no_grad()
def positive_mass_shape(
    rows: Float[Tensor, "f d"], image_shape: tuple[int, int] = (28, 28), floor: float = 0.25
) -> tuple[Float[Tensor, " f"], Float[Tensor, " f"], Float[Tensor, " f"]]:
    """``(area, elongation, positive_fraction)`` of each row's positive mass, the pixels at
    or above ``floor × max`` (float64; see the module docstring). A row with no positive
    pixel gets area 0, elongation NaN."""
    if not (isinstance(floor, (int, float)) and 0 <= floor < 1):
        raise ValueError(f"floor={floor!r} must be in [0, 1): a fraction of the row's maximum")
    w = _as_images(rows.detach(), image_shape, "rows").double()
    top = w.amax((1, 2), keepdim=True).clamp_min(0)
    m = torch.where((w > 0) & (w >= floor * top), w, torch.zeros_like(w))
    mass = m.sum((1, 2))
    sq = m.square().sum((1, 2))
    area = torch.where(sq > 0, mass.square() / sq.clamp_min(1e-300), torch.zeros_like(sq))
    h, wd = image_shape
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(wd, dtype=torch.float64), indexing="ij"
    )
    p = m / mass.clamp_min(1e-300)[:, None, None]
    my, mx = (p * yy).sum((1, 2)), (p * xx).sum((1, 2))
    dy, dx = yy - my[:, None, None], xx - mx[:, None, None]
    cyy, cxx, cxy = (p * dy * dy).sum((1, 2)), (p * dx * dx).sum((1, 2)), (p * dx * dy).sum((1, 2))
    half_tr, det_part = (cyy + cxx) / 2, torch.sqrt(((cyy - cxx) / 2).square() + cxy.square())
    lam1, lam2 = half_tr + det_part, (half_tr - det_part).clamp_min(0)
    elong = torch.sqrt((lam1 + _PIXEL_MOMENT) / (lam2 + _PIXEL_MOMENT))
    elong = torch.where(mass > 0, elong, torch.full_like(elong, math.nan))
    total = w.square().sum((1, 2))
    pos_sq = w.clamp_min(0).square().sum((1, 2))
    pos_frac = torch.where(total > 0, pos_sq / total.clamp_min(1e-300), torch.zeros_like(total))
    return area, elong, pos_frac


LABELS = ("digit", "diffuse", "stroke", "fragment", "blob")


@dataclass
class FeatureShapes:
    """Per-row shape measures (all ``[f]``, float64) and labels; see the module docstring.
    ``memorisation`` is NaN when no images were given."""

    memorisation: Float[Tensor, " f"]
    area: Float[Tensor, " f"]
    elongation: Float[Tensor, " f"]
    positive_fraction: Float[Tensor, " f"]
    labels: list[str]

    def summary(self) -> dict[str, float]:
        """Medians of the measures and the fraction of rows with each label."""
        n = len(self.labels)
        out = {
            f"median_{k}": float(torch.nanmedian(getattr(self, k)))
            for k in ("memorisation", "area", "elongation", "positive_fraction")
        }
        out |= {f"frac_{lab}": self.labels.count(lab) / n for lab in LABELS}
        out["majority"] = max(LABELS, key=self.labels.count)
        return out

    def rows(self) -> list[dict]:
        """One dict per row (for CSV)."""
        return [
            {
                "row": i,
                "label": self.labels[i],
                "memorisation": float(self.memorisation[i]),
                "area": float(self.area[i]),
                "elongation": float(self.elongation[i]),
                "positive_fraction": float(self.positive_fraction[i]),
            }
            for i in range(len(self.labels))
        ]


def feature_shapes(
    rows: Float[Tensor, "f d"],
    images: Float[Tensor, "n d"] | None = None,
    *,
    image_shape: tuple[int, int] = (28, 28),
    memorised: float = 0.6,
    digit_area: float = 60.0,
    blob_area: float = 8.0,
    stroke_elongation: float = 2.0,
    floor: float = 0.25,
) -> FeatureShapes:
    """Shape measures and a label (``"digit" | "diffuse" | "stroke" | "fragment" | "blob"``)
    for each row
    of ``rows`` (e.g. ``sae.W_dec``) read as an image of ``image_shape``; ``images`` (e.g.
    training images, flattened) give the memorisation score. Thresholds and ``floor``: see
    the module docstring; the defaults suit 28×28 MNIST digits (a digit's ink covers ~100
    pixels)."""
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"rows has shape {tuple(rows.shape)}; expected [f >= 1, d]")
    for name, v in (("memorised", memorised), ("digit_area", digit_area),
                    ("blob_area", blob_area), ("stroke_elongation", stroke_elongation)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name}={v!r} must be a positive number")
    area, elong, pos = positive_mass_shape(rows, image_shape, floor)
    if images is None:
        mem = torch.full_like(area, math.nan)
    else:
        mem = memorisation(rows, _as_images(images, image_shape, "images").flatten(1))
    labels = []
    for i in range(rows.shape[0]):
        if (mem[i] >= memorised) if images is not None else (area[i] >= digit_area):
            labels.append("digit")
        elif area[i] < blob_area:
            labels.append("blob")
        elif area[i] >= digit_area:
            labels.append("diffuse")
        elif elong[i] >= stroke_elongation:
            labels.append("stroke")
        else:
            labels.append("fragment")
    return FeatureShapes(mem, area, elong, pos, labels)


# ------------------------------------------------------------------------------- smoothness


def _high_mask(image_shape: tuple[int, int], cutoff: float) -> Tensor:
    if not (isinstance(cutoff, (int, float)) and 0 < cutoff < math.sqrt(2)):
        raise ValueError(f"cutoff={cutoff!r} must be in (0, √2): a fraction of Nyquist")
    fy = torch.fft.fftfreq(image_shape[0], dtype=torch.float64)
    fx = torch.fft.fftfreq(image_shape[1], dtype=torch.float64)
    radius = torch.sqrt(fy[:, None].square() + fx[None, :].square()) / 0.5
    return radius > cutoff


def high_frequency_fraction(
    images: Float[Tensor, "n d"], image_shape: tuple[int, int] = (28, 28), cutoff: float = 0.5
) -> Float[Tensor, " n"]:
    """Fraction of each image's energy ``Σ|FFT|²`` at radial frequency above ``cutoff ×``
    Nyquist (float64; NaN for an all-zero image). Images ``[n, h·w]`` or ``[n, h, w]``."""
    x = _as_images(images, image_shape, "images").double()
    power = torch.fft.fft2(x).abs().square()
    high = (power * _high_mask(image_shape, cutoff)).sum((1, 2))
    total = power.sum((1, 2))
    return torch.where(total > 0, high / total.clamp_min(1e-300), torch.full_like(total, math.nan))


def noise_high_frequency_fraction(
    image_shape: tuple[int, int] = (28, 28), cutoff: float = 0.5
) -> float:
    """Expected :func:`high_frequency_fraction` of white noise: the fraction of DFT
    frequencies above the cutoff."""
    return float(_high_mask(image_shape, cutoff).double().mean())


def total_variation_ratio(
    images: Float[Tensor, "n d"], image_shape: tuple[int, int] = (28, 28)
) -> Float[Tensor, " n"]:
    """``TV(x) / E_π[TV(π x)]`` per image (float64; NaN for a constant image): total
    variation against its exact expectation under random permutations of the pixels."""
    x = _as_images(images, image_shape, "images").double()
    h, w = image_shape
    if h * w < 2:
        raise ValueError(f"image_shape={image_shape} has fewer than 2 pixels")
    tv = (x[:, :, 1:] - x[:, :, :-1]).abs().sum((1, 2)) + (x[:, 1:] - x[:, :-1]).abs().sum((1, 2))
    n = h * w
    s = x.flatten(1).sort(1).values
    k = torch.arange(1, n + 1, dtype=torch.float64)
    pair_sum = (s * (2 * k - n - 1)).sum(1)  # Σ_{i<j} |x_i − x_j| from the sorted values
    n_edges = h * (w - 1) + (h - 1) * w
    expected = n_edges * pair_sum * 2 / (n * (n - 1))
    return torch.where(expected > 0, tv / expected.clamp_min(1e-300),
                       torch.full_like(tv, math.nan))
