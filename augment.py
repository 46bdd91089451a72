"""Intensity augmentation of the DeSD views (SPEC section 3, step 5), vectorised in torch.

The reference hands each (1, 16, 96, 96) view to a 2D augmentation library that reads it as
one image of 16 channels, so every depth slice draws its own blur, brightness, contrast and
gamma. `per_slice=True` reproduces that (the published weights were trained so);
`per_slice=False` draws once per view.

Every function takes a batch of views of one kind, (B, D, H, W) float32, and a
`torch.Generator` on the same device. The same code runs per sample in a data-loader worker
(B = 1, CPU) or batched on the training device, which moves the bulk of the loader's work to
the GPU. Order: noise, blur, brightness x, brightness +, contrast, gamma.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLUR_SIGMA = (0.1, 2.0)
BLUR_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default


@dataclass(frozen=True)
class IntensityProbs:
    """Probabilities that a view gets each transform ("p") and, once it does, that each slice
    does ("slice p")."""

    blur: float
    blur_slice: float
    brightness_mul: float
    brightness_add: float
    brightness_add_slice: float
    gamma: float
    noise: float = 1.0
    contrast: float = 1.0


GLOBAL_1 = IntensityProbs(blur=0.8, blur_slice=0.8, brightness_mul=0.8, brightness_add=0.8, brightness_add_slice=0.8, gamma=0.8)
GLOBAL_2 = IntensityProbs(blur=0.8, blur_slice=0.5, brightness_mul=1.0, brightness_add=0.5, brightness_add_slice=0.8, gamma=1.0)
LOCAL = IntensityProbs(blur=0.5, blur_slice=0.8, brightness_mul=1.0, brightness_add=0.8, brightness_add_slice=0.8, gamma=0.8)


def probs_for_view(view_index: int) -> IntensityProbs:
    """View 0 and 1 are the two global views, the rest local."""
    return (GLOBAL_1, GLOBAL_2)[view_index] if view_index < 2 else LOCAL


def _uniform(shape, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=device) * (high - low) + low


def _chance(shape, p: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=device) < p


def _two_sided_factor(shape, low: float, high: float, g: torch.Generator, device) -> torch.Tensor:
    """Half the time U(low, 1), otherwise U(1, high): equally likely to darken or brighten."""
    below = _uniform(shape, low, 1.0, g, device)
    above = _uniform(shape, 1.0, high, g, device)
    return torch.where(_chance(shape, 0.5, g, device), below, above)


def _symmetric_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Pad by mirroring with the edge sample repeated (scipy's 'reflect' mode)."""
    n = x.shape[dim]
    if r > n:
        raise ValueError(f"blur radius {r} exceeds image side {n}")
    head = x.narrow(dim, 0, r).flip(dim)
    tail = x.narrow(dim, n - r, r).flip(dim)
    return torch.cat([head, x, tail], dim=dim)


def gaussian_blur_slices(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """In-plane Gaussian blur of each slice of x (B, D, H, W) with its own sigma (B, D), where
    `apply` (B, D) is set; kernels truncated at 4 sigma as scipy does."""
    b, d, h, w = x.shape
    r = int(BLUR_TRUNCATE * BLUR_SIGMA[1] + 0.5)
    offsets = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)  # (2r + 1,)
    s = sigma.reshape(-1, 1).to(x.dtype)
    radius = (BLUR_TRUNCATE * s + 0.5).floor()
    kernel = torch.exp(-0.5 * (offsets / s) ** 2) * (offsets.abs() <= radius)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    identity = (offsets == 0).to(x.dtype).expand_as(kernel)
    kernel = torch.where(apply.reshape(-1, 1), kernel, identity)  # (B * D, 2r + 1)
    y = x.reshape(1, b * d, h, w)
    y = F.conv2d(_symmetric_pad(y, r, 3), kernel.view(b * d, 1, 1, -1), groups=b * d)
    y = F.conv2d(_symmetric_pad(y, r, 2), kernel.view(b * d, 1, -1, 1), groups=b * d)
    return y.view(b, d, h, w)


def augment_intensity(x: torch.Tensor, probs: IntensityProbs, g: torch.Generator, per_slice: bool = True) -> torch.Tensor:
    """Apply SPEC section 3's intensity chain to a batch of views x (B, D, H, W)."""
    b, d, h, w = x.shape
    dev = x.device
    units = d if per_slice else 1
    ushape = (b, units)

    def per_unit(t: torch.Tensor) -> torch.Tensor:  # (B, units) -> broadcastable over (B, D, H, W)
        return t.view(b, units, 1, 1)

    def unit_stats(t: torch.Tensor):  # statistics over each slice, or over the whole view
        flat = t.reshape(b, units, -1)
        return flat.mean(-1), flat.std(-1, unbiased=False), flat.amin(-1), flat.amax(-1)

    # Gaussian noise: one std ~ U(0, 0.1) per view
    std = _uniform((b,), 0.0, 0.1, g, dev) * _chance((b,), probs.noise, g, dev)
    x = x + torch.randn(x.shape, generator=g, device=dev) * std.view(b, 1, 1, 1)

    # Gaussian blur, in-plane
    view_on = _chance((b, 1), probs.blur, g, dev)
    unit_on = _chance(ushape, probs.blur_slice, g, dev) & view_on
    sigma = _uniform(ushape, *BLUR_SIGMA, g, dev)
    if units == 1:
        unit_on, sigma = unit_on.expand(b, d), sigma.expand(b, d)
    x = gaussian_blur_slices(x, sigma, unit_on)

    # multiplicative brightness
    factor = _uniform(ushape, 0.75, 1.25, g, dev)
    factor = torch.where(_chance((b, 1), probs.brightness_mul, g, dev), factor, torch.ones_like(factor))
    x = x * per_unit(factor)

    # additive brightness
    offset = torch.randn(ushape, generator=g, device=dev) * 0.4
    on = _chance((b, 1), probs.brightness_add, g, dev) & _chance(ushape, probs.brightness_add_slice, g, dev)
    x = x + per_unit(offset * on)

    # contrast, range preserved
    factor = _two_sided_factor(ushape, 0.75, 1.25, g, dev)
    on = _chance((b, 1), probs.contrast, g, dev).expand(ushape)
    mean, _, lo, hi = unit_stats(x)
    contrasted = (x - per_unit(mean)) * per_unit(factor) + per_unit(mean)
    contrasted = torch.minimum(torch.maximum(contrasted, per_unit(lo)), per_unit(hi))
    x = torch.where(per_unit(on), contrasted, x)

    # gamma, mean and std restored
    gamma = _two_sided_factor(ushape, 0.7, 1.5, g, dev)
    on = _chance((b, 1), probs.gamma, g, dev).expand(ushape)
    mean, sd, lo, hi = unit_stats(x)
    span = per_unit(hi - lo)
    y = ((x - per_unit(lo)) / (span + 1e-7)).pow(per_unit(gamma)) * span + per_unit(lo)
    y_mean, y_sd, _, _ = unit_stats(y)
    y = (y - per_unit(y_mean)) / (per_unit(y_sd) + 1e-8) * per_unit(sd) + per_unit(mean)
    return torch.where(per_unit(on), y, x)


def augment_views(views: list[torch.Tensor], g: torch.Generator, per_slice: bool = True) -> list[torch.Tensor]:
    """Augment each view position of a batch: views[k] is (B, 1, D, H, W)."""
    return [augment_intensity(v[:, 0], probs_for_view(k), g, per_slice).unsqueeze(1) for k, v in enumerate(views)]
