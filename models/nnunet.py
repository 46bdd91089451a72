"""The DeSD segmentation network as nnU-Net v2 builds it from its plans (docs/method.md,
section 7), so that a DeSD teacher can be fine-tuned with `nnUNetv2_train`.

nnU-Net locates the class by the dotted name in its plans (`models.nnunet.DeSDUNet`) and
calls it with `input_channels`, `num_classes`, `deep_supervision` and the plans' `arch_kwargs`.
`downstream.nnunet` writes those plans; what the class adds to `Res3DSegmentation`:

- **Intensity.** nnU-Net's plans say `NoNormalization`: the network clips the raw HU to
  [-1024, 1024] and divides by 1024 itself, as every other path into the encoder does.
- **Orientation.** nnU-Net reads arrays in their stored axis order (then its `transpose_forward`),
  not in the pretraining orientation. `input_axes` and `input_flips`, worked out by the plans
  tool from the images' headers, flip and permute nnU-Net's array to the pretraining layout,
  depth (to inferior) first, then posterior, then the patient's left; the logits go back the
  same way.
- **Deep supervision**, nnU-Net's default training: besides the full-resolution output
  (the DeSD head), 1x1x1 heads on the decoder's maps at stages 1, 2 and 3, used only while
  nnU-Net trains with deep supervision. `strides` in the plans declare those scales to
  nnU-Net; they must be `ds_strides(input_axes)`.
- The output convolutions sit under `output.seg_layers`, the name that nnU-Net's
  `-pretrained_weights` loading leaves out, so one weights file serves any number of classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from preprocessing.network_input import HU_RANGE, HU_SCALE

from . import create_model
from .res3d import STAGE_REDUCTIONS
from .segmentation import Res3DSegmentation, pad_to_stride

# per-stage strides, pretraining order (depth, rows, cols); their running products are the
# scales of the outputs: full resolution, then the stages' STAGE_REDUCTIONS, (2, 4, 4), (4, 8, 8), ...
DS_STRIDES = ((1, 1, 1), STAGE_REDUCTIONS[0]) + tuple(
    tuple(b // a for a, b in zip(finer, coarser)) for finer, coarser in zip(STAGE_REDUCTIONS, STAGE_REDUCTIONS[1:])
)


def ds_strides(input_axes) -> list[list[int]]:
    """DS_STRIDES in nnU-Net's axis order, for the plans' `strides`: nnU-Net axis input_axes[m]
    is the network's axis m."""
    out = []
    for stride in DS_STRIDES:
        row = [0, 0, 0]
        for m, a in enumerate(input_axes):
            row[a] = stride[m]
        out.append(row)
    return out


class DeSDUNet(Res3DSegmentation):
    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        arch: str = "res3d50",
        deep_supervision: bool = False,
        input_axes=(0, 1, 2),
        input_flips=(False, False, False),
        strides=None,
    ):
        if input_channels != 1:
            raise ValueError(f"the DeSD encoder takes one CT channel; the dataset has {input_channels}")
        if sorted(input_axes) != [0, 1, 2] or len(input_flips) != 3:
            raise ValueError(f"input_axes {input_axes} is not a permutation of (0, 1, 2) or input_flips {input_flips} has not 3 entries")
        if strides is not None and [list(s) for s in strides] != ds_strides(input_axes):
            raise ValueError(f"plans strides {strides} are not this network's output scales {ds_strides(input_axes)}; rewrite the plans")
        super().__init__(create_model(arch), num_classes)
        self.input_axes = tuple(int(a) for a in input_axes)
        self.input_flips = tuple(bool(f) for f in input_flips)
        self.back_axes = tuple(self.input_axes.index(a) for a in range(3))
        head = self.head
        del self.head
        block_channels = [block[0].out_channels for block in self.decoder]  # at stage 3, 2, 1 and the stem
        self.output = nn.Module()
        self.output.seg_layers = nn.ModuleList(
            [head] + [nn.Conv3d(c, num_classes, 1) for c in reversed(block_channels[:3])]  # full, stage 1, 2, 3
        )
        self.decoder.deep_supervision = deep_supervision  # nnU-Net's trainer switches it here

    def to_network(self, x: torch.Tensor) -> torch.Tensor:
        flips = [2 + a for a in range(3) if self.input_flips[a]]
        x = x.flip(flips) if flips else x
        return x.permute(0, 1, *(2 + a for a in self.input_axes))

    def from_network(self, y: torch.Tensor) -> torch.Tensor:
        y = y.permute(0, 1, *(2 + m for m in self.back_axes))
        flips = [2 + a for a in range(3) if self.input_flips[a]]
        return y.flip(flips) if flips else y

    def forward(self, x: torch.Tensor):
        x = self.to_network(x.clamp(*HU_RANGE) / HU_SCALE)
        size = x.shape[2:]
        padded = pad_to_stride(x, self.stride)
        maps = self.decode(padded)  # stage 3, 2, 1, stem
        heads = self.output.seg_layers
        full = F.interpolate(heads[0](maps[3]), size=padded.shape[2:], mode="trilinear", align_corners=False)
        outputs = [full[:, :, : size[0], : size[1], : size[2]]]
        if self.decoder.deep_supervision:
            scale = [1, 1, 1]
            for stride, head, y in zip(DS_STRIDES[1:], heads[1:], (maps[2], maps[1], maps[0])):
                scale = [s * t for s, t in zip(scale, stride)]
                keep = [round(n / s) for n, s in zip(size, scale)]  # the shape nnU-Net downsamples the target to
                outputs.append(head(y)[:, :, : keep[0], : keep[1], : keep[2]])
        outputs = [self.from_network(y) for y in outputs]
        return outputs if self.decoder.deep_supervision else outputs[0]
