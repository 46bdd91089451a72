"""The pretraining-pays experiment from a checkout: `python evaluate.py ...` runs `desd.evaluate` (installed, the command is `desd-evaluate`)."""

import sys

from desd.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
