"""Tests and nbval always run the smoke profile: tiny sizes, every code path.

Set here, before any test or notebook kernel starts: nbval kernels inherit pytest's environment.
Smoke runs write figures to a scratch folder (see ``pkm_ref.figures``), never into ``figures/``.
"""

import os

os.environ["PKM_REF_PROFILE"] = "smoke"
