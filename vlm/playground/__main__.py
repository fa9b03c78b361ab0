"""``python -m vlm.playground [--model DIR] [--tokenizer DIR] [--host 127.0.0.1] [--port 7860]``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from selftok.runtime.cli import entry_point, setup_logging

log = logging.getLogger("vlm.playground")
DEMO = Path("runs/demo")
DEMO_MODELS = (DEMO / "rl" / "final", DEMO / "vlm" / "final")  # after RL, else before
DEMO_TOKENIZER = DEMO / "tokenizer" / "model"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlm.playground",
                                description="Serve the browser playground for a VLM + tokenizer pair.")
    p.add_argument("--model", default=None,
                   help=f"VLM folder (default: the demo's, {DEMO_MODELS[0]} or else {DEMO_MODELS[1]})")
    p.add_argument("--tokenizer", default=None, help=f"Selftok tokenizer folder (default: {DEMO_TOKENIZER})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="autocast dtype (never fp16)")
    p.add_argument("--vae", default=None, help="local SD3 VAE folder, for tokenizers in VAE latent space")
    p.add_argument("--attn", default=None, choices=["eager", "sdpa"], help="attention implementation")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is fastest for small models, busy machines)")
    p.add_argument("--out", default=None, help="folder for each generation's outputs (default: a temp one)")
    return p


def default_pair(model: str | None, tokenizer: str | None) -> tuple[Path, Path] | str:
    """The folders to serve, or why there are none (naming what to run)."""
    model_dir = Path(model) if model else next((m for m in DEMO_MODELS if m.is_dir()), DEMO_MODELS[0])
    tokenizer_dir = Path(tokenizer) if tokenizer else DEMO_TOKENIZER
    missing = [str(d) for d in (model_dir, tokenizer_dir) if not d.is_dir()]
    if not missing:
        return model_dir, tokenizer_dir
    if model and tokenizer:
        return f"no such folder: {', '.join(missing)}"
    return (f"no trained model to serve: {', '.join(missing)} not found. Run the demo first "
            "(`scripts/demo.sh`, about 40 minutes on a 2-core CPU; `scripts/demo.sh --smoke` trains a tiny "
            "one in ~3 minutes under runs/demo-smoke) from the repository root, or pass --model and "
            "--tokenizer.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    pair = default_pair(args.model, args.tokenizer)
    if isinstance(pair, str):
        print(f"python -m vlm.playground: {pair}", file=sys.stderr)
        return 2
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('python -m vlm.playground: needs gradio: pip install -e ".[playground]"', file=sys.stderr)
        return 2
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from vlm.playground.app import Playground, ServerSettings, build_app
    from vlm.vocab import VocabularyError
    try:
        pg = Playground(*pair, ServerSettings(args.device, args.dtype, args.vae, args.attn, args.out))
    except (VocabularyError, FileNotFoundError, OSError) as e:
        print(f"python -m vlm.playground: cannot serve this pair: {e}", file=sys.stderr)
        return 2
    log.info("serving %s on http://%s:%d", pg.describe(), args.host, args.port)
    build_app(pg).launch(server_name=args.host, server_port=args.port, show_error=True)
    return 0


cli = entry_point(main)
if __name__ == "__main__":
    cli()
