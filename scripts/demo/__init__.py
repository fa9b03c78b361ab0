"""The end-to-end demo: a resumable stage runner (`runner`), the demo's stages and command line (`pipeline`)
and its report (`report`). Run it with ``scripts/demo.sh`` or ``python -m scripts.demo``."""
