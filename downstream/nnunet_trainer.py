"""nnU-Net's own trainer with its length taken from the environment, so that a run through
nnU-Net's commands can be cut short anywhere (a CPU check, a smoke test) without editing code:

    DESD_NNUNET_EPOCHS=1 DESD_NNUNET_ITERATIONS=2 DESD_NNUNET_VAL_ITERATIONS=1 \
      nnUNetv2_train 3 3d_fullres 0 -p nnUNetPlans_DeSD -tr nnUNetTrainer_DeSD -device cpu

Unset, each keeps nnU-Net's value (1000 epochs of 250 iterations, 50 validation iterations).
`DESD_NNUNET_VAL_MIRRORING=0` also leaves out the mirrored passes of the final validation
(8 per window; most of a short CPU run's time), as `nnUNetv2_predict --disable_tta` does; the
checkpoint keeps nnU-Net's mirroring axes for later predictions.
nnU-Net looks for trainers inside its own package only, and its search stops at the first module
it cannot import (its Primus trainers need timm): `desd-nnunet-trainer` (run by `make
install-nnunet`) writes a one-line module there that imports this class.
"""

from __future__ import annotations

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

LENGTH = {"num_epochs": "DESD_NNUNET_EPOCHS", "num_iterations_per_epoch": "DESD_NNUNET_ITERATIONS"}
LENGTH["num_val_iterations_per_epoch"] = "DESD_NNUNET_VAL_ITERATIONS"


class nnUNetTrainer_DeSD(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming, by which -tr finds it
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict, device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for attribute, variable in LENGTH.items():
            value = os.environ.get(variable, "")
            if value:
                if not value.isdigit() or int(value) < 1:
                    raise ValueError(f"${variable}={value!r}: expected a whole number of at least 1")
                setattr(self, attribute, int(value))

    def perform_actual_validation(self, save_probabilities: bool = False):
        mirroring = os.environ.get("DESD_NNUNET_VAL_MIRRORING", "1")
        if mirroring not in ("0", "1"):
            raise ValueError(f"$DESD_NNUNET_VAL_MIRRORING={mirroring!r}: expected 0 or 1")
        axes = self.inference_allowed_mirroring_axes
        if mirroring == "0":
            self.inference_allowed_mirroring_axes = None  # read by the validation's predictor only
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = axes
