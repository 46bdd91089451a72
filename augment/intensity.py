"""Intensity augmentation of the DeSD views (docs/method.md, section 3, step 5), vectorised in torch.

The reference hands each (1, 16, 96, 96) view to a 2D augmentation library that reads it as
one image of 16 channels, so every depth slice draws its own blur, brightness, contrast and
gamma. `per_slice=True` reproduces that (the published weights were trained so);
`per_slice=False` draws once per view.

`draw_intensity_params` makes every random choice for a batch of views (B, D, H, W) from a
`torch.Generator` on their device; `apply_intensity` applies them; `augment_intensity` does
both. The same code runs per sample in a data-loader worker (the two global views of one
patch, CPU) or batched on the training device, which moves the bulk of the loader's work to
the GPU. Order: noise, blur, brightness x, brightness +, contrast, gamma.

On the CPU, `apply_intensity` runs the same arithmetic compiled (augment/native_chain.py,
augment/intensity.c) where a C compiler could build it, and `augment_intensity` then lets the
compiled chain draw the Gaussian noise itself (xoshiro128+ and Box-Muller, keyed from the
generator), which is most of what a loader worker spends; the torch code below remains the
code of every other device and the fallback.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from augment import native_chain

BLUR_SIGMA = (0.1, 2.0)
BLUR_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default
BRIGHTNESS_ADD_SD = 0.4  # sd of the additive brightness offset, in normalised units (about 410 HU)
# gamma's base is floored here instead of at 0: the CPU's vector log and exp take a slow path
# for 0 and -inf (much slower on views with much air clipped to the minimum), and
# POWER_FLOOR ** gamma (below 1e-14 for gamma >= 0.7) vanishes next to the values it joins
POWER_FLOOR = 1e-20


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


def takes_cpu_path(device: torch.device) -> bool:
    """Whether the chain takes its CPU code path on `device`, which may read values back to
    decide what to skip (which slices to blur, whether any gamma applies). The accelerator path
    never does, so that a training step queues without waiting; tests make this return False to
    run the accelerator path on the CPU."""
    return device.type == "cpu"


_BANDS: dict[tuple, tuple] = {}


def _blur_bands(size: int, r: int, dtype: torch.dtype, device) -> tuple[list[tuple[int, int, int, int]], torch.Tensor]:
    """The blur matrix M of a signal of `size` samples (M @ v = v convolved with a kernel of
    radius r, edges mirrored with the edge sample repeated, as often as the kernel needs:
    scipy's 'reflect' mode, any size) in row blocks of 2r rows, each with only the columns
    its taps reach. Returns the blocks (first row, end row, first column, end column) and a
    (2r + 1, sum of block areas) 0/1 matrix: a kernel (n, 2r + 1) times it gives every
    block of every row's matrix at once. Cached per size, radius, dtype and device."""
    key = (size, r, dtype, str(device))
    if key not in _BANDS:
        taps = torch.arange(size).view(-1, 1) + torch.arange(-r, r + 1)
        taps = taps.remainder(2 * size)  # the mirrored signal repeats every 2 * size samples
        taps = torch.where(taps >= size, 2 * size - 1 - taps, taps)  # (size, 2r + 1): the sample each tap reads
        reads = torch.nn.functional.one_hot(taps, size).to(dtype)  # (row, tap, column)
        blocks, parts = [], []
        for a in range(0, size, max(2 * r, 1)):
            b = min(size, a + max(2 * r, 1))
            c0, c1 = int(taps[a:b].min()), int(taps[a:b].max()) + 1
            blocks.append((a, b, c0, c1))
            parts.append(reads[a:b, :, c0:c1].permute(1, 0, 2).reshape(2 * r + 1, -1))
        _BANDS[key] = blocks, torch.cat(parts, 1).to(device)
    return _BANDS[key]


def _blur_rows(kernel: torch.Tensor, size: int, r: int) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """Each block of the blur matrices of kernel (n, 2r + 1): (rows a:b, columns c0:c1, the
    (n, b - a, c1 - c0) block)."""
    blocks, reads = _blur_bands(size, r, kernel.dtype, kernel.device)
    mats = (kernel @ reads).split([(b - a) * (c1 - c0) for a, b, c0, c1 in blocks], 1)
    return [(a, b, c0, c1, m.view(-1, b - a, c1 - c0)) for (a, b, c0, c1), m in zip(blocks, mats)]


def gaussian_blur_slices_(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """In-plane Gaussian blur, in place, of each slice of x (B, D, H, W) with its own sigma
    (B, D), where `apply` (B, D) is set; kernels truncated at 4 sigma and edges mirrored as
    scipy.ndimage.gaussian_filter does. On the CPU only the slices to blur are filtered; on
    other devices every slice is, with an identity kernel where no blur is asked for (no
    host synchronisation).

    Each slice X becomes M_H X M_W^T, M being the banded matrix of the 1-D filter with its
    mirrored edges: batched matrix products, one per block of 2r rows of M with only the
    columns its band reaches (a third of the full products' work for 96 x 96), which is faster
    on the CPU than depthwise convolutions of padded copies (figures in
    benchmarks/results/history.md)."""
    b, d, h, w = x.shape
    flat = x.view(b * d, h, w)
    s = sigma.reshape(-1).to(x.dtype)
    on = apply.reshape(-1)
    r = int(BLUR_TRUNCATE * BLUR_SIGMA[1] + 0.5)
    offsets = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)  # (2r + 1,)
    if takes_cpu_path(x.device):
        index = on.nonzero().flatten()
        if index.numel() == 0:
            return x
        s = s.index_select(0, index)
        src = flat.index_select(0, index)
    else:
        index = None
        src = flat
    sd = s.view(-1, 1)
    kernel = torch.exp(-0.5 * (offsets / sd) ** 2) * (offsets.abs() <= (BLUR_TRUNCATE * sd + 0.5).floor())
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    if index is None:  # an identity kernel where no blur is asked for
        kernel = torch.where(on.view(-1, 1), kernel, (offsets == 0).to(x.dtype).expand_as(kernel))
    rows_h = _blur_rows(kernel, h, r)
    rows_w = rows_h if w == h else _blur_rows(kernel, w, r)
    y = torch.cat([torch.bmm(m, src[:, c0:c1]) for _, _, c0, c1, m in rows_h], 1)  # M_H X
    y = torch.cat([torch.bmm(y[:, :, c0:c1], m.transpose(1, 2)) for _, _, c0, c1, m in rows_w], 2)  # (M_H X) M_W^T
    if index is None:
        flat.copy_(y)
    else:
        flat.index_copy_(0, index, y)
    return x


_PROB_TABLES: dict[tuple, torch.Tensor] = {}
_PROB_NAMES = tuple(IntensityProbs.__dataclass_fields__)


def _prob_table(probs: IntensityProbs | list[IntensityProbs], b: int, device) -> torch.Tensor:
    """(B, fields) probabilities: one IntensityProbs for all rows, or one per row. Cached per
    device, so a training step copies nothing to the GPU for them."""
    rows = tuple(probs) if isinstance(probs, list) else (probs,) * b
    if len(rows) != b:
        raise ValueError(f"{len(rows)} probability sets for a batch of {b} views")
    key = (rows, str(device))
    if key not in _PROB_TABLES:
        _PROB_TABLES[key] = torch.tensor([[getattr(p, n) for n in _PROB_NAMES] for p in rows], dtype=torch.float32, device=device)
    return _PROB_TABLES[key]


def draw_intensity_params(
    b: int,
    d: int,
    probs: IntensityProbs | list[IntensityProbs],
    g: torch.Generator,
    per_slice: bool = True,
    device="cpu",
    offset_sd: float = BRIGHTNESS_ADD_SD,
) -> dict[str, torch.Tensor]:
    """Every random choice of the intensity chain for B views of D slices: per view (B, 1) or
    per unit (B, units), units being the slices (per_slice) or the whole view. A factor of 1,
    an offset of 0 or a false flag stands for a transform that was not drawn.

    All uniforms come from one call per shape (a handful of small operations in all, which
    is what this costs on the CPU). Two-sided factors: half the time U(low, 1), otherwise
    U(1, high), equally likely to darken or brighten."""
    units = d if per_slice else 1
    table = _prob_table(probs, b, device)
    per_view = torch.rand((b, len(_PROB_NAMES) + 1), generator=g, device=device)
    drawn = per_view[:, :-1] < table  # (B, fields): does the view get each transform (or its slice p, unused here)

    def view_on(name: str) -> torch.Tensor:  # (B, 1)
        i = _PROB_NAMES.index(name)
        return drawn[:, i : i + 1]

    u = torch.rand((8, b, units), generator=g, device=device)
    blur_slice, sigma, mul, add_slice, contrast_side, contrast, gamma_side, gamma = u
    i_blur, i_add = _PROB_NAMES.index("blur_slice"), _PROB_NAMES.index("brightness_add_slice")
    ones = torch.ones((), device=device)

    def two_sided(side: torch.Tensor, v: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return torch.where(side < 0.5, v * (1.0 - low) + low, v * (high - 1.0) + 1.0)

    offset = torch.randn((b, units), generator=g, device=device).mul_(offset_sd)
    return {
        "noise_std": (per_view[:, -1:] * 0.1).mul_(view_on("noise")),
        "blur_on": view_on("blur") & (blur_slice < table[:, i_blur : i_blur + 1]),
        "blur_sigma": sigma.mul_(BLUR_SIGMA[1] - BLUR_SIGMA[0]).add_(BLUR_SIGMA[0]),
        "brightness_mul": torch.where(view_on("brightness_mul"), mul.mul_(0.5).add_(0.75), ones),
        "brightness_add": offset.mul_(view_on("brightness_add") & (add_slice < table[:, i_add : i_add + 1])),
        "contrast": torch.where(view_on("contrast"), two_sided(contrast_side, contrast, 0.75, 1.25), ones),
        "gamma": two_sided(gamma_side, gamma, 0.7, 1.5),
        "gamma_on": view_on("gamma").expand(b, units),
    }


def _mean_std(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std over the last axis, from the sum and the sum of squares, one
    pass each (torch.var_mean is several times slower on the CPU)."""
    n = flat.shape[-1]
    mean = flat.sum(-1) / n
    squares = torch.linalg.vector_norm(flat, dim=-1).square() / n
    return mean, (squares - mean.square()).clamp_min_(0).sqrt_()


def apply_intensity(
    x: torch.Tensor, params: dict[str, torch.Tensor], noise: torch.Tensor, swap_hw: bool = False, native: bool | None = None
) -> torch.Tensor:
    """docs/method.md section 3's intensity chain on x (B, D, H, W) with the draws of
    `draw_intensity_params` and standard normal `noise` of x's shape. x is left as it was;
    the result may reuse noise's memory. With swap_hw the result has its in-plane axes
    swapped, (B, D, W, H), contiguous (every step treats the two alike).

    On the CPU the compiled chain (augment/native_chain.py, the same arithmetic fused per slice) runs
    where it is available: `native` None uses it then, True requires it, False runs the torch
    code (`apply_intensity_torch`), which is also the code of every other device."""
    if native or (native is None and compiled_chain_runs(x)):
        return native_chain.apply_intensity(x, params, noise, swap_hw)
    out = apply_intensity_torch(x, params, noise)
    return swap_in_plane(out) if swap_hw else out


def compiled_chain_runs(x: torch.Tensor) -> bool:
    """Whether views x go through the compiled chain: float32 on the CPU, where it was built."""
    return takes_cpu_path(x.device) and x.dtype == torch.float32 and native_chain.library() is not None


def swap_in_plane(t: torch.Tensor) -> torch.Tensor:
    """t (..., H, W) as a new contiguous (..., W, H) tensor; numpy's transposing copy is the
    faster on the CPU."""
    if t.device.type != "cpu":
        return t.transpose(-1, -2).contiguous()
    out = torch.empty((*t.shape[:-2], t.shape[-1], t.shape[-2]), dtype=t.dtype)
    np.copyto(out.numpy(), t.numpy().swapaxes(-1, -2))
    return out


def apply_intensity_torch(x: torch.Tensor, params: dict[str, torch.Tensor], noise: torch.Tensor) -> torch.Tensor:
    """`apply_intensity` in torch operations, for every device.

    Each step is affine in a unit or monotone, so the chain needs few passes over the voxels:
    brightness x f, brightness + o and contrast c collapse into one affine map whose
    statistics follow from those taken after the blur; the range of the clipped unit follows
    from the map (f, c > 0) without a pass; and restoring the mean and std after gamma is one
    more affine map of ((y - lo) / range) ** gamma, whose range and offset cancel. The result
    equals the steps applied one after the other, up to float rounding (see
    tests/test_dataset.py). Per-unit factors are applied by in-place operations on the full
    tensor, the form that torch vectorises on the CPU."""
    b, d, h, w = x.shape
    units = params["blur_sigma"].shape[1]
    cpu = takes_cpu_path(x.device)

    def col(t: torch.Tensor) -> torch.Tensor:  # (B, units) -> broadcastable over (B, units, N)
        return t.unsqueeze(-1)

    # Gaussian noise, one std per view; in-plane Gaussian blur per unit
    if cpu:  # one pass a view: x + std * noise, the std read back as a scalar
        for i, std in enumerate(params["noise_std"].view(-1).tolist()):
            torch.add(x[i], noise[i], alpha=std, out=noise[i])
        x = noise
    else:
        x = noise.mul_(params["noise_std"].view(b, 1, 1, 1)).add_(x)
    reps = d // units
    gaussian_blur_slices_(x, params["blur_sigma"].repeat_interleave(reps, 1), params["blur_on"].repeat_interleave(reps, 1))

    y = x.view(b, units, -1)
    mean, lo, hi = y.mean(-1), y.amin(-1), y.amax(-1)

    # brightness x f, brightness + o, contrast c around the mean, clipped to the range
    f, o, c = params["brightness_mul"], params["brightness_add"], params["contrast"]
    m1, lo1, hi1 = mean * f + o, lo * f + o, hi * f + o  # statistics after the brightness steps (f > 0)
    scale, shift = f * c, (o - m1) * c + m1  # (x * f + o - m1) * c + m1
    y.mul_(col(scale)).add_(col(shift))
    torch.minimum(torch.maximum(y, col(lo1), out=y), col(hi1), out=y)
    gamma_on = params["gamma_on"]  # one flag per view, the same for all its units
    y_lo = (lo * scale + shift).clamp_(min=lo1).clamp_(max=hi1)  # the map is increasing: no pass needed
    y_hi = (hi * scale + shift).clamp_(min=lo1).clamp_(max=hi1)
    if not cpu:
        z = _gamma_restoring_mean_std(y, y_lo, y_hi, params["gamma"], in_place=False)
        return torch.where(col(gamma_on), z, y).view(b, d, h, w)
    # on the CPU, in place on each run of consecutive views that get gamma (a host read is free)
    start = 0
    for on, run in itertools.groupby(gamma_on[:, 0].tolist()):
        stop = start + len(list(run))
        if on:
            rows = slice(start, stop)
            _gamma_restoring_mean_std(y[rows], y_lo[rows], y_hi[rows], params["gamma"][rows], in_place=True)
        start = stop
    return x


def _gamma_restoring_mean_std(y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, gamma: torch.Tensor, in_place: bool) -> torch.Tensor:
    """docs/method.md's gamma step (section 3) on y (B, units, N) whose units span [lo, hi] (B, units):
    ((y - lo) / range) ** gamma * range + lo, then each unit's mean and std restored. The
    range and lo cancel in the restore, so it is one affine map of ((y - lo) / range) ** gamma."""
    y_mean, y_std = _mean_std(y)
    span = hi - lo
    inv = (1.0 / (span + 1e-7)).unsqueeze(-1)
    u = y.mul_(inv) if in_place else torch.mul(y, inv)
    u.sub_(lo.unsqueeze(-1) * inv).clamp_(POWER_FLOOR, 1)  # (y - lo) / range
    u.log_().mul_(gamma.unsqueeze(-1)).exp_()  # ** gamma
    u_mean, u_std = _mean_std(u)
    # z = u * span + lo has mean u_mean * span + lo and std u_std * span; its mean and std
    # are mapped to y's: (z - z_mean) * y_std / (z_std + 1e-8) + y_mean
    a = y_std * span / (u_std * span + 1e-8)
    return u.mul_(a.unsqueeze(-1)).add_((y_mean - u_mean * a).unsqueeze(-1))


def augment_intensity(
    x: torch.Tensor,
    probs: IntensityProbs | list[IntensityProbs],
    g: torch.Generator,
    per_slice: bool = True,
    swap_hw: bool = False,
    offset_sd: float = BRIGHTNESS_ADD_SD,
) -> torch.Tensor:
    """Apply docs/method.md section 3's intensity chain to a batch of views x (B, D, H, W); `probs` is
    one set for every view or one per view. Returns a new tensor, (B, D, W, H) with swap_hw."""
    b, d = x.shape[:2]
    params = draw_intensity_params(b, d, probs, g, per_slice, x.device, offset_sd)
    if compiled_chain_runs(x):  # it draws the noise itself, under a key drawn from g (augment/intensity.c)
        key = int(torch.randint(0, 2**62, (), generator=g))
        return native_chain.apply_intensity(x, params, None, swap_hw, key)
    return apply_intensity(x, params, torch.randn(x.shape, generator=g, device=x.device), swap_hw)


def augment_views(
    views: list[torch.Tensor], g: torch.Generator, per_slice: bool = True, offset_sd: float = BRIGHTNESS_ADD_SD
) -> list[torch.Tensor]:
    """Augment each view position of a batch, views[k] being (B, 1, D, H, W): the two global
    positions in one call, the local ones in another."""
    b = views[0].shape[0]
    out = augment_intensity(torch.cat(views[:2])[:, 0], [GLOBAL_1] * b + [GLOBAL_2] * b, g, per_slice, offset_sd=offset_sd).unsqueeze(1)
    result = list(out.split(b))
    if len(views) > 2:
        result += list(augment_intensity(torch.cat(views[2:])[:, 0], LOCAL, g, per_slice, offset_sd=offset_sd).unsqueeze(1).split(b))
    return result
