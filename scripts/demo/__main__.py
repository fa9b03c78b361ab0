"""``python -m scripts.demo``: the end-to-end demo (`scripts.demo.pipeline`)."""
import sys

from scripts.demo.pipeline import main

sys.exit(main())
