"""`python -m evaluation` is `python -m evaluation.clipscore` (CLIPScore, CLIP-I, per-concept scores)."""

import sys

from evaluation.clipscore import main

sys.exit(main())
