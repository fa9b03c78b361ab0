"""A browser playground for a VLM + Selftok tokenizer pair (Gradio: ``pip install -e ".[playground]"``).

    python -m vlm.playground --model runs/demo/rl/final --tokenizer runs/demo/tokenizer/model

Tabs: text → image with coarse-to-fine previews (`vlm.playground.previews`), image → text, and
image → tokens → reconstruction. See docs/generation.md ("The playground").
"""
