"""3D ResNets with instance norm and leaky ReLU: the DeSD encoders (docs/method.md, section 4).

Input (N, 1, D, H, W). The stem strides (1, 2, 2) then max-pools by 2, so stage k's feature
map is (N, C_k, D/s_d, H/s, W/s) with in-plane strides 4, 8, 16, 32 and depth strides
2, 4, 8, 16. Parameter names equal those of the released DeSD weights (`conv1`, `norm1`,
`layer{1-4}.{i}.conv{1,2,3}`, `.norm{1,2,3}`, `.downsample.{0,1}`).

The first block of every stage has a projection shortcut (1x1x1 conv + norm), layer1
included, at every depth, as in the reference: res3d10/18/34 have `layer1.0.downsample` too.

Pooling and projection heads are not part of the backbone: `forward` returns the four stage
feature maps so that the same network feeds the self-supervised heads and a segmentation
decoder.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["Res3D", "BasicBlock", "Bottleneck", "DEPTHS"]


def _norm(channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels, affine=True)


def _act() -> nn.Module:
    return nn.LeakyReLU(0.01, inplace=True)


class BasicBlock(nn.Module):
    """Two 3x3x3 convolutions; the stride sits on the first."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, padding=1, bias=False)
        self.norm2 = _norm(planes)
        self.act = _act()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act(out + identity)


class Bottleneck(nn.Module):
    """1x1x1 -> 3x3x3 (strided) -> 1x1x1 convolutions, widening by 4."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv3d(in_planes, planes, 1, bias=False)
        self.norm1 = _norm(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.norm2 = _norm(planes)
        self.conv3 = nn.Conv3d(planes, planes * self.expansion, 1, bias=False)
        self.norm3 = _norm(planes * self.expansion)
        self.act = _act()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act(self.norm1(self.conv1(x)))
        out = self.act(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.act(out + identity)


# depth: (block type, blocks in stages 1-4)
DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    10: (BasicBlock, (1, 1, 1, 1)),
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
    200: (Bottleneck, (3, 24, 36, 3)),
}

STAGE_NAMES = ("stage1", "stage2", "stage3", "stage4")  # the names of the four stages in logs, losses and probes
STAGE_PLANES = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
STEM_REDUCTION = (2, 4, 4)  # (depth, rows, cols) before stage 1: conv1's stride (1, 2, 2), then the max-pool's 2
# the one vocabulary for stage grids: the reduction of each stage's map, (2, 4, 4) ... (16, 32, 32)
STAGE_REDUCTIONS = tuple(
    tuple(r * math.prod(STAGE_STRIDES[: k + 1]) for r in STEM_REDUCTION) for k in range(len(STAGE_STRIDES))
)  # fmt: skip


class Res3D(nn.Module):
    """3D ResNet, shortcut type B, returning the feature map of each of its four stages.

    `feature_info[k]` gives the channels and the (depth, in-plane) reduction of stage k+1.
    PyTorch's default initialisation is kept, as in the reference (its init is never called).
    """

    # Python-side descriptions, left out when the network is compiled by torch.jit.script
    __jit_ignored_attributes__ = ["feature_info"]
    __jit_unused_properties__ = ["stage_channels"]

    def __init__(self, block: type[nn.Module], layers: tuple[int, int, int, int], in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, 64, 7, stride=(1, 2, 2), padding=3, bias=False)
        self.norm1 = _norm(64)
        self.act = _act()
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        self.in_planes = 64
        self.feature_info: list[dict] = []
        for i, (planes, blocks, stride) in enumerate(zip(STAGE_PLANES, layers, STAGE_STRIDES)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, planes, blocks, stride))
            self.feature_info.append(
                {"module": f"layer{i + 1}", "name": STAGE_NAMES[i], "num_chs": planes * block.expansion, "reduction": STAGE_REDUCTIONS[i]}
            )

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        # The first block of every stage gets a projection shortcut, layer1 included, at every
        # depth: the reference's test `stride != 1` compares a (1, 1, 1) tuple with 1, which is
        # always true, so its BasicBlock nets carry `layer1.0.downsample` too (docs/method.md, 4).
        out_planes = planes * block.expansion
        downsample = nn.Sequential(nn.Conv3d(self.in_planes, out_planes, 1, stride=stride, bias=False), _norm(out_planes))
        layers = [block(self.in_planes, planes, stride, downsample)]
        self.in_planes = out_planes
        layers += [block(self.in_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    @property
    def stage_channels(self) -> list[int]:
        return [info["num_chs"] for info in self.feature_info]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm1(self.conv1(x)))  # (N, 64, D, H/2, W/2)

    def forward(self, x: torch.Tensor, return_stem: bool = False) -> list[torch.Tensor]:
        """The four stage maps; with `return_stem`, the stem's map (before max-pooling) first."""
        stem = self.forward_stem(x)
        x = self.maxpool(stem)  # (N, 64, D/2, H/4, W/4)
        s1 = self.layer1(x)  # stage k: (N, C_k, D/2^k, H/2^(k+1), W/2^(k+1))
        s2 = self.layer2(s1)
        s3 = self.layer3(s2)
        s4 = self.layer4(s3)
        return [stem, s1, s2, s3, s4] if return_stem else [s1, s2, s3, s4]


def last_stage_shape(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Size of the 4th-stage feature map of any Res3D for a (depth, rows, cols) input."""

    def conv(n: int, k: int, s: int, p: int) -> int:
        return (n + 2 * p - k) // s + 1

    d, h, w = shape
    d, h, w = conv(d, 7, 1, 3), conv(h, 7, 2, 3), conv(w, 7, 2, 3)  # stem
    for _ in range(4):  # max-pool, then the stride-2 stages 2-4
        d, h, w = conv(d, 3, 2, 1), conv(h, 3, 2, 1), conv(w, 3, 2, 1)
    return d, h, w


def _build(depth: int, **kwargs) -> Res3D:
    block, layers = DEPTHS[depth]
    model = Res3D(block, layers, **kwargs)
    model.arch = f"res3d{depth}"  # compared with a checkpoint's arch when weights are loaded
    return model


def res3d10(**kwargs) -> Res3D:
    """3D ResNet-10 (BasicBlock, blocks 1, 1, 1, 1)."""
    return _build(10, **kwargs)


def res3d18(**kwargs) -> Res3D:
    """3D ResNet-18 (BasicBlock, blocks 2, 2, 2, 2)."""
    return _build(18, **kwargs)


def res3d34(**kwargs) -> Res3D:
    """3D ResNet-34 (BasicBlock, blocks 3, 4, 6, 3)."""
    return _build(34, **kwargs)


def res3d50(**kwargs) -> Res3D:
    """3D ResNet-50 (Bottleneck, blocks 3, 4, 6, 3, the paper's)."""
    return _build(50, **kwargs)


def res3d101(**kwargs) -> Res3D:
    """3D ResNet-101 (Bottleneck, blocks 3, 4, 23, 3)."""
    return _build(101, **kwargs)


def res3d152(**kwargs) -> Res3D:
    """3D ResNet-152 (Bottleneck, blocks 3, 8, 36, 3)."""
    return _build(152, **kwargs)


def res3d200(**kwargs) -> Res3D:
    """3D ResNet-200 (Bottleneck, blocks 3, 24, 36, 3)."""
    return _build(200, **kwargs)
