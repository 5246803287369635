"""`python -m koff ...` (and so `accelerate launch -m koff ...`, `torchrun -m koff ...`)."""

import sys

from koff.cli import main

sys.exit(main())
