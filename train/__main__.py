"""`python -m plateau.train ...` (also under torchrun) runs the same code as `plateau train`."""

import sys

from .cli import _entry

sys.exit(_entry())
