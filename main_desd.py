"""Pretraining from a checkout: `python main_desd.py ...` runs `desd.main_desd` (installed, the command is `desd-pretrain`)."""

import sys

from desd.main_desd import cli

if __name__ == "__main__":
    sys.exit(cli())
