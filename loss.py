"""Deep self-distillation loss (docs/method.md, section 5)."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.res3d import STAGE_NAMES


class DeSDLoss(nn.Module):
    """DINO's cross-entropy between the centred, sharpened teacher output and each student
    head, summed over stages with `stage_weights` (stage 1 first).

    With weights (0, 0, 0, 1) it is exactly DINO's loss. The centre is updated by an explicit
    call to `update_center` once per optimiser step, so gradient accumulation does not move it
    more often than DINO does.
    """

    def __init__(
        self,
        out_dim: int,
        ncrops: int,
        warmup_teacher_temp: float,
        teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        nepochs: int,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        stage_weights: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25),
    ):
        super().__init__()
        if len(stage_weights) != 4:
            raise ValueError(f"stage_weights needs 4 values (stage 1 to 4), got {stage_weights}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.stage_weights = tuple(float(w) for w in stage_weights)
        self.register_buffer("center", torch.zeros(1, out_dim))
        warmup_teacher_temp_epochs = min(warmup_teacher_temp_epochs, nepochs)
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
            )
        )

    def teacher_temp(self, epoch: int) -> float:
        return float(self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)])

    def teacher_probs(self, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Centred, sharpened teacher distribution, (nglobal * B, out_dim)."""
        return F.softmax((teacher_output.float() - self.center) / self.teacher_temp(epoch), dim=-1)

    def forward(self, student_outputs: list[torch.Tensor], teacher_output: torch.Tensor, epoch: int) -> dict[str, torch.Tensor]:
        """student_outputs: one (ncrops * B, out_dim) tensor per stage; teacher_output:
        (nglobal * B, out_dim). Returns `loss` (weighted total) and one term per stage."""
        targets = self.teacher_probs(teacher_output, epoch).detach()
        nglobal = targets.shape[0] // (student_outputs[0].shape[0] // self.ncrops)
        targets = targets.chunk(nglobal)
        terms = {}
        for name, out in zip(STAGE_NAMES, student_outputs):
            log_probs = F.log_softmax(out.float() / self.student_temp, dim=-1).chunk(self.ncrops)
            total, pairs = 0.0, 0
            for iq, q in enumerate(targets):
                for v, lp in enumerate(log_probs):
                    if v == iq:
                        continue  # never compare a view with itself
                    total = total + torch.sum(-q * lp, dim=-1).mean()
                    pairs += 1
            terms[name] = total / pairs
        loss = sum(w * terms[n] for w, n in zip(self.stage_weights, STAGE_NAMES))
        return {"loss": loss, **terms}

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the batch mean of the raw teacher output, averaged over all processes."""
        batch_center = teacher_output.float().sum(dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (teacher_output.shape[0] * world)  # every process has the same batch size
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


@torch.no_grad()
def view_retrieval(embeddings: torch.Tensor, nviews: int = 2) -> torch.Tensor:
    """Top-1 accuracy of finding each sample's other view among the batch by cosine
    similarity: embeddings (nviews * B, dim), view-major as the teacher returns them. Averaged
    over both directions of the first two views; chance is 1 / B, identical views give 1. A
    cheap pretext score that rises while a run learns."""
    a, b = F.normalize(embeddings.float(), dim=-1).chunk(nviews)[:2]
    sim = a @ b.T  # (B, B)
    target = torch.arange(sim.shape[0], device=sim.device)
    return ((sim.argmax(1) == target).float().mean() + (sim.argmax(0) == target).float().mean()) / 2
