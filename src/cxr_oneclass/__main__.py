"""`python -m cxr_oneclass ...`: the CLI without the installed entry point (e.g. with only PYTHONPATH=src)."""

import sys

from .cli import main

sys.exit(main())
