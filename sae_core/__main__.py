"""`python -m sae_core [MODEL] [DATASET] [--flags]`: see sae_core/run.py."""

from .run import main

main()
