"""The project's scripts: `scripts.demo` (the end-to-end demo), ``demo.sh`` and ``test.sh``."""
