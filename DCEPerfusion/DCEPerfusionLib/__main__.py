"""``python -m DCEPerfusionLib ...`` runs the ``dceperfusion`` command line."""

import sys

from .apps.cli import main

sys.exit(main())
