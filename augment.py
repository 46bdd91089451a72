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
    `apply` (B, D) is set; kernels truncated at 4 sigma and edges mirrored as scipy does.
    On the CPU only the slices to blur are convolved."""
    b, d, h, w = x.shape
    flat = x.reshape(b * d, h, w)
    s = sigma.reshape(-1).to(x.dtype)
    on = apply.reshape(-1)
    index = None
    if x.device.type == "cpu":
        index = on.nonzero().flatten()
        if index.numel() == 0:
            return x
        flat_sel, s = flat.index_select(0, index), s.index_select(0, index)
    else:
        flat_sel = flat
    n = flat_sel.shape[0]
    r = int(BLUR_TRUNCATE * BLUR_SIGMA[1] + 0.5)
    offsets = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)  # (2r + 1,)
    s = s.view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / s) ** 2) * (offsets.abs() <= (BLUR_TRUNCATE * s + 0.5).floor())
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    if index is None:  # every slice is convolved; an identity kernel where none is asked for
        kernel = torch.where(on.view(-1, 1), kernel, (offsets == 0).to(x.dtype).expand_as(kernel))  # (B * D, 2r + 1)
    y = flat_sel.view(1, n, h, w)
    # channels-last makes the depthwise convolutions about twice as fast on the CPU
    y = _symmetric_pad(y, r, 3).contiguous(memory_format=torch.channels_last)
    y = F.conv2d(y, kernel.view(n, 1, 1, -1), groups=n)
    y = _symmetric_pad(y, r, 2).contiguous(memory_format=torch.channels_last)
    y = F.conv2d(y, kernel.view(n, 1, -1, 1), groups=n)
    y = y.contiguous().view(n, h, w)
    if index is None:
        return y.view(b, d, h, w)
    return flat.index_copy(0, index, y).view(b, d, h, w)


_PROB_TABLES: dict[tuple, torch.Tensor] = {}


def _prob_rows(probs: IntensityProbs | list[IntensityProbs], b: int, device) -> dict[str, torch.Tensor]:
    """Each probability as a (B, 1) tensor: one IntensityProbs for all rows, or one per row.
    Tables are cached per device, so a training step copies nothing to the GPU for them."""
    rows = tuple(probs) if isinstance(probs, list) else (probs,) * b
    if len(rows) != b:
        raise ValueError(f"{len(rows)} probability sets for a batch of {b} views")
    names = IntensityProbs.__dataclass_fields__
    key = (rows, str(device))
    if key not in _PROB_TABLES:
        _PROB_TABLES[key] = torch.tensor([[getattr(p, n) for n in names] for p in rows], dtype=torch.float32, device=device)
    table = _PROB_TABLES[key]
    return {n: table[:, i : i + 1] for i, n in enumerate(names)}


def _chance_rows(p: torch.Tensor, shape, g: torch.Generator) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=p.device) < p


def augment_intensity(
    x: torch.Tensor, probs: IntensityProbs | list[IntensityProbs], g: torch.Generator, per_slice: bool = True
) -> torch.Tensor:
    """Apply SPEC section 3's intensity chain to a batch of views x (B, D, H, W); `probs` is
    one set for every view or one per view. Returns a new tensor.

    Brightness and contrast are affine in each slice, so they are applied as one fused affine
    map whose statistics follow from those taken after the blur; the result is the same as
    applying them one after the other.
    """
    b, d, h, w = x.shape
    dev = x.device
    units = d if per_slice else 1
    ushape = (b, units)
    p = _prob_rows(probs, b, dev)

    def per_unit(t: torch.Tensor) -> torch.Tensor:  # (B, units) -> broadcastable over (B, units, N)
        return t.unsqueeze(-1)

    # Gaussian noise: one std ~ U(0, 0.1) per view
    std = _uniform((b, 1), 0.0, 0.1, g, dev) * _chance_rows(p["noise"], (b, 1), g)
    x = torch.randn(x.shape, generator=g, device=dev).mul_(std.view(b, 1, 1, 1)).add_(x)

    # Gaussian blur, in-plane; sigma and the per-slice draw per unit
    unit_on = _chance_rows(p["blur"], (b, 1), g) & _chance_rows(p["blur_slice"], ushape, g)
    sigma = _uniform(ushape, *BLUR_SIGMA, g, dev)
    x = gaussian_blur_slices(x, sigma.expand(b, d), unit_on.expand(b, d))

    flat = x.view(b, units, -1)
    mean, lo, hi = flat.mean(-1), flat.amin(-1), flat.amax(-1)

    # brightness x f, brightness + o, contrast c around the mean, clipped to the range
    f = _uniform(ushape, 0.75, 1.25, g, dev)
    f = torch.where(_chance_rows(p["brightness_mul"], (b, 1), g), f, 1.0)
    o = torch.randn(ushape, generator=g, device=dev) * 0.4
    o = o * (_chance_rows(p["brightness_add"], (b, 1), g) & _chance_rows(p["brightness_add_slice"], ushape, g))
    c = _two_sided_factor(ushape, 0.75, 1.25, g, dev)
    c = torch.where(_chance_rows(p["contrast"], (b, 1), g), c, 1.0)
    m1, lo1, hi1 = mean * f + o, lo * f + o, hi * f + o  # statistics after the brightness steps (f > 0)
    scale, shift = f * c, (o - m1) * c + m1  # (x * f + o - m1) * c + m1
    y = torch.addcmul(per_unit(shift), flat, per_unit(scale))
    y = torch.maximum(torch.minimum(y, per_unit(hi1)), per_unit(lo1))

    # gamma, then the unit's mean and std restored
    gamma = _two_sided_factor(ushape, 0.7, 1.5, g, dev)
    gamma_on = _chance_rows(p["gamma"], (b, 1), g).expand(ushape)
    y_lo, y_hi = y.amin(-1), y.amax(-1)
    y_mean = y.mean(-1)
    y_std = (y - per_unit(y_mean)).square_().mean(-1).sqrt_()
    span = per_unit(y_hi - y_lo)
    z = ((y - per_unit(y_lo)) / (span + 1e-7)).clamp_(0, 1)
    z = z.log_().mul_(per_unit(gamma)).exp_().mul_(span).add_(per_unit(y_lo))  # ((y - lo) / span) ** gamma * span + lo
    z_mean = z.mean(-1)
    z_std = (z - per_unit(z_mean)).square_().mean(-1).sqrt_()
    a = y_std / (z_std + 1e-8)
    z = torch.addcmul(per_unit(y_mean - z_mean * a), z, per_unit(a))
    out = torch.where(per_unit(gamma_on), z, y)
    return out.view(b, d, h, w)


def augment_views(views: list[torch.Tensor], g: torch.Generator, per_slice: bool = True) -> list[torch.Tensor]:
    """Augment each view position of a batch, views[k] being (B, 1, D, H, W): the two global
    positions in one call, the local ones in another."""
    b = views[0].shape[0]
    out = augment_intensity(torch.cat(views[:2])[:, 0], [GLOBAL_1] * b + [GLOBAL_2] * b, g, per_slice).unsqueeze(1)
    result = list(out.split(b))
    if len(views) > 2:
        result += list(augment_intensity(torch.cat(views[2:])[:, 0], LOCAL, g, per_slice).unsqueeze(1).split(b))
    return result
