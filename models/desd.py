"""Student and teacher of deep self-distillation (docs/method.md, section 4).

The student has one DINO head per backbone stage, each fed by the global average pool of that
stage; the teacher has the same backbone and only the last-stage head. Head names are
`heads.layer{k}` in both, so the teacher's parameters pair with the student's by name.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .heads import DINOHead
from .res3d import Res3D

STAGES = ("layer1", "layer2", "layer3", "layer4")


def _group_by_shape(crops: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive crops of the same shape, so each group goes through the backbone once."""
    groups: list[list[torch.Tensor]] = []
    for crop in crops:
        if groups and groups[-1][0].shape[-3:] == crop.shape[-3:]:
            groups[-1].append(crop)
        else:
            groups.append([crop])
    return groups


def pooled_stage_features(backbone: Res3D, crops: list[torch.Tensor]) -> list[torch.Tensor]:
    """Global-average-pooled features of each stage for all crops: 4 tensors (len(crops) * B, C_k)."""
    pooled: list[list[torch.Tensor]] = [[] for _ in STAGES]
    for group in _group_by_shape(crops):
        maps = backbone(torch.cat(group))  # 4 x (n * B, C_k, d, h, w)
        for k, fmap in enumerate(maps):
            pooled[k].append(F.adaptive_avg_pool3d(fmap, 1).flatten(1))
    return [torch.cat(p) for p in pooled]


class DeSDStudent(nn.Module):
    """Backbone + one projection head per stage; returns the 4 head outputs, stage 1 first."""

    def __init__(self, backbone: Res3D, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True, hidden_dim: int = 2048):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(
            {
                stage: DINOHead(ch, out_dim, use_bn, norm_last_layer, hidden_dim=hidden_dim)
                for stage, ch in zip(STAGES, backbone.stage_channels)
            }
        )

    def forward(self, crops: list[torch.Tensor]) -> list[torch.Tensor]:
        feats = pooled_stage_features(self.backbone, crops)
        return [self.heads[stage](f) for stage, f in zip(STAGES, feats)]  # 4 x (ncrops * B, out_dim)


class DeSDTeacher(nn.Module):
    """Backbone + last-stage head; returns the last-stage head output. Built only as a copy of a
    student (`from_student`), as DeSD's teacher starts."""

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        maps = self.backbone(torch.cat(crops))  # teacher sees global crops only: one shape
        return self.heads[STAGES[-1]](F.adaptive_avg_pool3d(maps[-1], 1).flatten(1))  # (nglobal * B, out_dim)

    @classmethod
    def from_student(cls, student: DeSDStudent) -> DeSDTeacher:
        """A teacher that is an exact copy of the student's backbone and last head."""
        teacher = cls.__new__(cls)
        nn.Module.__init__(teacher)
        teacher.backbone = copy.deepcopy(student.backbone)
        teacher.heads = nn.ModuleDict({STAGES[-1]: copy.deepcopy(student.heads[STAGES[-1]])})
        for p in teacher.parameters():
            p.requires_grad = False
        return teacher
