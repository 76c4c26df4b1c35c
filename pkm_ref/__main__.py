"""``python -m pkm_ref``: the same as the ``pkm-ref`` command."""

import sys

from pkm_ref.cli import main

sys.exit(main())
