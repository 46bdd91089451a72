"""Load a DeSD teacher's backbone into an encoder (docs/method.md, section 7).

Works on this project's checkpoints and on the released DeSD format (key `teacher`, backbone
keys `module.backbone.<name>`, `args` stored as an `argparse.Namespace`). The file is read in
torch.load's safe mode with only `argparse.Namespace` allowed, never with the safety off.

A load is all or nothing unless a partial one is asked for: the checkpoint's arch (from its
`args`) must be the encoder's, and every encoder tensor must be in the checkpoint with its
shape.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

PREFIX = "module.backbone."
LAYER1_SHORTCUT = ("layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight", "layer1.0.downsample.1.bias")


def load_checkpoint(path: str, needs: tuple[str, ...] = (), expected: str = "a checkpoint", mmap: bool = False) -> dict:
    """Any checkpoint of the project, or the released DeSD file, in torch.load's safe mode
    (argparse.Namespace allowed for the released format; never with the safety off). Names the
    file when it is unreadable or truncated, holds no dict, or lacks one of the `needs` keys
    (then saying that it is not `expected`)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} {'is a folder' if os.path.isdir(path) else 'does not exist'}; expected {expected}")
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # torch's zip format (since 1.6; the released file too), or a pickle before it
        raise RuntimeError(f"{path!r} is not a torch checkpoint (neither torch's zip format nor a pickle); expected {expected}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:
        # torch's own message suggests turning the safe mode off: never do that for a file of unknown origin
        reason = next((line.strip() for line in str(err).splitlines() if line.strip().startswith("WeightsUnpickler error")), "")
        reason = reason or f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if "weights_only" in reason:
            reason = "it holds objects other than tensors and plain values"
        raise RuntimeError(f"checkpoint {path!r} is unreadable or truncated (read in safe mode, which stays on): {reason}") from None
    if not isinstance(ckpt, dict):
        raise KeyError(f"{path!r} holds a {type(ckpt).__name__}, not a checkpoint dictionary; expected {expected}")
    missing = [k for k in needs if k not in ckpt]
    if missing:
        raise KeyError(f"{path!r} holds no {' or '.join(map(repr, missing))} entry (found {sorted(ckpt)[:8]}); expected {expected}")
    return ckpt


def read_checkpoint(path: str) -> dict:
    """A DeSD pretraining checkpoint (ours or the released format)."""
    return load_checkpoint(path, needs=("teacher",), expected="a DeSD pretraining checkpoint")


def checkpoint_arch(ckpt: dict) -> str | None:
    """The arch named by a checkpoint's `args` (a dict here, a Namespace in the released file)."""
    args = ckpt.get("args")
    arch = args.get("arch") if isinstance(args, dict) else getattr(args, "arch", None)
    return arch if isinstance(arch, str) else None


def teacher_backbone(ckpt: dict, path: str, part: str = "teacher") -> dict[str, torch.Tensor]:
    """The teacher's (or, with part="student", the student's) backbone tensors with the prefix
    stripped."""
    if part not in ckpt:
        raise KeyError(f"{path!r} holds no {part!r} network (found {sorted(ckpt)[:8]})")
    state = {k[len(PREFIX) :]: v for k, v in ckpt[part].items() if k.startswith(PREFIX)}
    if not state:
        raise KeyError(f"{path!r}: the {part} has no '{PREFIX}*' keys; is this a DeSD checkpoint?")
    return state


def check_layer1_shortcut(state: dict, expected: dict, path: str) -> None:
    """Refuse a BasicBlock state that lacks the first stage's projection shortcut, which every
    reference network has at every depth: such weights compute another function."""
    missing = [k for k in LAYER1_SHORTCUT if k in expected and k not in state]
    if missing and "layer1.0.conv1.weight" in state and "layer1.0.conv3.weight" not in state:
        raise ValueError(
            f"{path!r} lacks {', '.join(missing)}: it holds a BasicBlock net (res3d10/18/34) whose first stage has no projection "
            "shortcut. The reference's networks, and this project's, have one at every depth (docs/method.md, section 4), so these "
            "weights compute another function; pretrain again with this code."
        )


def load_pretrained_encoder(
    encoder: nn.Module, path: str, arch: str | None = None, partial: bool = False, part: str = "teacher"
) -> tuple[int, int]:
    """Copy the teacher backbone's tensors (the student's with part="student") into `encoder`;
    returns (loaded, encoder total).

    `arch` (default: the encoder's `arch` attribute, which `create_model` sets) must equal the
    arch that the checkpoint's args name. Any shared name whose shape differs is refused. With
    `partial=False` (the default) every encoder tensor must be in the checkpoint; with
    `partial=True` the shared ones load, the arch check is skipped, and the counts are printed.
    """
    ckpt = read_checkpoint(path)
    state = teacher_backbone(ckpt, path, part)
    own = encoder.state_dict()
    arch = arch or getattr(encoder, "arch", None)
    stored = checkpoint_arch(ckpt)
    if not partial and arch and stored and stored != arch:
        raise ValueError(f"{path!r} holds a {stored} teacher, but the encoder is {arch}: use --arch {stored} (or ask for a partial load)")
    check_layer1_shortcut(state, own, path)
    shared = {k: v for k, v in state.items() if k in own}
    if not shared:
        raise ValueError(f"{path!r} shares no tensor with the encoder (checkpoint has e.g. {sorted(state)[:3]}, encoder {sorted(own)[:3]})")
    wrong = [f"{k}: checkpoint {tuple(v.shape)} vs encoder {tuple(own[k].shape)}" for k, v in shared.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{path!r} does not fit this encoder (another arch?): " + "; ".join(wrong[:3]))
    missing = [k for k in own if k not in shared]
    if missing and not partial:
        raise ValueError(
            f"{path!r} lacks {len(missing)} of the encoder's {len(own)} tensors (e.g. {missing[:3]}); "
            f"refusing a partial load (ask for one explicitly to load the {len(shared)} shared tensors)"
        )
    own.update(shared)
    encoder.load_state_dict(own)
    if partial:
        print(f"partial load from {path!r}: {len(shared)} of the encoder's {len(own)} tensors loaded, {len(missing)} left as initialised")
    return len(shared), len(own)
