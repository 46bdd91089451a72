"""3D segmentation network on a res3d encoder (docs/method.md, section 7): the encoder without pooling,
an ASPP module on its last stage, a decoder with skip connections from every earlier stage and
the stem back to full resolution, and a 1x1x1 head.

Input (N, 1, D, H, W) in the pretraining orientation (see dataset.py); output (N, classes,
D, H, W). Inputs whose sides are not multiples of the encoder's total stride (16 in depth, 32
in-plane) are padded at the end and the logits cropped back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.blocks import SimpleASPP
from torch import nn

from .res3d import STAGE_REDUCTIONS, Res3D

STRIDE = STAGE_REDUCTIONS[-1]  # total reduction of the encoder's last stage (depth, rows, cols): (16, 32, 32)


def conv_block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3x3 convolutions with instance norm and leaky ReLU, as in the encoder."""
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.01, inplace=True),
    )


class Res3DSegmentation(nn.Module):
    """`encoder` keeps the res3d parameter names (`encoder.conv1.weight`, ...), so a DeSD
    teacher's backbone loads into it directly."""

    def __init__(self, encoder: Res3D, num_classes: int, aspp_channels: int = 64, decoder_channels: tuple[int, ...] = (256, 128, 64, 32)):
        super().__init__()
        self.stride = STRIDE  # inputs are padded up to a multiple of it
        self.encoder = encoder
        chs = encoder.stage_channels  # e.g. 256/512/1024/2048 for res3d50
        self.aspp = SimpleASPP(3, chs[3], aspp_channels, kernel_sizes=(1, 3, 3, 3), dilations=(1, 2, 4, 6), norm_type="instance")
        skips = [chs[2], chs[1], chs[0], 64]  # stage 3, 2, 1 and the stem
        self.decoder = nn.ModuleList()
        cin = aspp_channels * 4
        for skip, cout in zip(skips, decoder_channels):
            self.decoder.append(conv_block(cin + skip, cout))
            cin = cout
        self.head = nn.Conv3d(cin, num_classes, 1)

    def decode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's maps for a padded input, coarsest first: at the resolution of stage 3,
        2, 1 and the stem (before the head)."""
        stem, s1, s2, s3, s4 = self.encoder(x, return_stem=True)
        y = self.aspp(s4)  # (N, 4 * aspp, D/16, H/32, W/32)
        maps = []
        for block, skip in zip(self.decoder, (s3, s2, s1, stem)):
            y = F.interpolate(y, size=skip.shape[2:], mode="trilinear", align_corners=False)
            y = block(torch.cat([y, skip], dim=1))  # at the skip's resolution
            maps.append(y)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        x = pad_to_stride(x, self.stride)
        y = self.decode(x)[-1]  # at the stem's resolution
        y = F.interpolate(self.head(y), size=x.shape[2:], mode="trilinear", align_corners=False)  # (N, classes, D', H', W')
        return y[:, :, : size[0], : size[1], : size[2]]


def pad_to_stride(x: torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:
    """x (N, C, D, H, W) padded at the end of each side up to a multiple of `stride`."""
    size = x.shape[2:]
    pad = [(-size[0]) % stride[0], (-size[1]) % stride[1], (-size[2]) % stride[2]]
    if pad[0] > 0 or pad[1] > 0 or pad[2] > 0:
        x = F.pad(x, [0, pad[2], 0, pad[1], 0, pad[0]])
    return x
