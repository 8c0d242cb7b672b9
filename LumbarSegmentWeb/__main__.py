"""``python -m LumbarSegmentWeb``: the same as ``lumbarseg web``."""
import sys

from .serve import main

sys.exit(main())
