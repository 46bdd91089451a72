"""Prediction from a checkout: `python predict.py ...` runs `desd.predict` (installed, the command is `desd-predict`)."""

import sys

from desd.predict import main

if __name__ == "__main__":
    sys.exit(main())
