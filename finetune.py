"""Fine-tuning from a checkout: `python finetune.py ...` runs `desd.finetune` (installed, the command is `desd-finetune`)."""

import sys

from desd.finetune import cli

if __name__ == "__main__":
    sys.exit(cli())
