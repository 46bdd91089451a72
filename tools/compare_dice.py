"""Print the per-class Dice of several fine-tuning runs side by side.

python tools/compare_dice.py pretrained=out/ft_desd/dice.json scratch=out/ft_scratch/dice.json
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from finetune import dice_table  # noqa: E402


def main(argv: list[str]) -> None:
    columns, names = {}, None
    for arg in argv:
        label, _, path = arg.partition("=")
        with open(path) as f:
            result = json.load(f)
        names = names or result["classes"]
        columns[label] = result["dice"]
    print(dice_table(columns, names))


if __name__ == "__main__":
    main(sys.argv[1:])
