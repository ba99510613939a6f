"""`python3 -m console ...` is `atc ...` (for machines where pip's script dir is not on PATH)."""

import sys

from .cli import main

sys.exit(main())
