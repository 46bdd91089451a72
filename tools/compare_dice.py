"""Print the per-class Dice of several fine-tuning runs side by side.

python tools/compare_dice.py pretrained=out/ft_desd/dice.json scratch=out/ft_scratch/dice.json

A result that is missing, unreadable or empty is reported by name (and the exit status is 1);
the others are still printed.
"""

from __future__ import annotations

import json
import os
import sys

from downstream.metrics import dice_table
from preprocessing.runner import command_parser, entry, run_command


def main(argv: list[str] | None = None) -> int:
    parser = command_parser("Print the per-class Dice of several fine-tuning runs side by side.")
    parser.add_argument("results", nargs="+", metavar="LABEL=DICE_JSON", help="A run's dice.json, with a column label before '='.")
    args = parser.parse_args(argv)
    columns, names, status = {}, None, 0
    for arg in args.results:
        label, _, path = arg.partition("=")
        path = path or label
        problem = None
        if not os.path.isfile(path):
            problem = "does not exist (did that run finish?)"
        else:
            try:
                with open(path) as f:
                    result = json.load(f)
            except (OSError, ValueError) as err:
                problem = f"is not a readable result ({err})"
            else:
                if not result.get("dice") or not result.get("classes"):
                    problem = "holds no result (an empty Dice list)"
                elif names is not None and result["classes"] != names:
                    problem = f"has other classes {result['classes']} than {names}"
        if problem:
            print(f"{label}: {path} {problem}", file=sys.stderr)
            status = 1
            continue
        names = names or result["classes"]
        columns[label] = result["dice"]
    if columns:
        print(dice_table(columns, names))
    return status


cli = entry(main)  # the installed command

if __name__ == "__main__":
    sys.exit(run_command(main))
