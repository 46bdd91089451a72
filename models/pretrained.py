"""Load a DeSD teacher's backbone into an encoder (SPEC section 7).

Works on this project's checkpoints and on the released DeSD format (key `teacher`, backbone
keys `module.backbone.<name>`, `args` stored as an `argparse.Namespace`). The file is read in
torch.load's safe mode with only `argparse.Namespace` allowed, never with the safety off.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

PREFIX = "module.backbone."


def read_teacher_backbone(path: str) -> dict[str, torch.Tensor]:
    """The teacher's backbone tensors from a DeSD checkpoint, with the prefix stripped."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(f"cannot read checkpoint {path!r} in safe mode: {err}") from err
    if not isinstance(ckpt, dict) or "teacher" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise KeyError(f"{path!r} holds no 'teacher' entry (found {keys}); expected a DeSD pretraining checkpoint")
    state = {k[len(PREFIX) :]: v for k, v in ckpt["teacher"].items() if k.startswith(PREFIX)}
    if not state:
        raise KeyError(f"{path!r}: the teacher has no '{PREFIX}*' keys; is this a DeSD checkpoint?")
    return state


def load_pretrained_encoder(encoder: nn.Module, path: str) -> tuple[int, int]:
    """Copy the teacher backbone's tensors into `encoder`; returns (shared, encoder total).

    Refuses a file that shares no tensor with the encoder, and any shared name whose shape
    differs (a different depth, say), rather than loading part of it silently.
    """
    state = read_teacher_backbone(path)
    own = encoder.state_dict()
    shared = {k: v for k, v in state.items() if k in own}
    if not shared:
        raise ValueError(f"{path!r} shares no tensor with the encoder (checkpoint has e.g. {sorted(state)[:3]}, encoder {sorted(own)[:3]})")
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs encoder {tuple(own[k].shape)}" for k, v in shared.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{path!r} does not fit this encoder (another arch?): " + "; ".join(wrong[:3]))
    own.update(shared)
    encoder.load_state_dict(own)
    return len(shared), len(own)
