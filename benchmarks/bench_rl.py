"""Benchmark: wall time of one GRPO step split into rollout (KV-cached CFG sampling), render (one-step
renderer), reward and update (log-prob recomputation + backward + optimizer), on the CPU config.

    python benchmarks/bench_rl.py                                   # configs/rl_shapes.yaml, trained artifacts
    python benchmarks/bench_rl.py --random                          # random weights of the demo sizes
    python benchmarks/bench_rl.py --steps 6 --threads 2 rollout.batch_size=16 --out bench_rl.json

The first step is a warm-up and is not counted. With ``--random`` the VLM (Llama sized by
configs/vlm_shapes.yaml's ``model.llama`` when present) and the shapes-64 tokenizer are random: sampling,
rendering and update cost do not depend on the weights, but the reward does a little (the evaluator's time
grows with the number of blobs in an image).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

from rl.train import RLConfig, setup, train_step
from selftok.runtime.cli import setup_logging
from selftok.runtime.config import from_dict, load_config

log = logging.getLogger("bench_rl")
PHASES = ("rollout_s", "render_s", "reward_s", "update_s")
ROOT = Path(__file__).resolve().parents[1]


def random_artifacts(root: Path) -> tuple[Path, Path]:
    """A random VLM of the demo size and a random shapes-64 tokenizer with its renderer, saved to `root`."""
    from selftok.model.presets import get_preset
    from selftok.model.tokenizer import SelftokTokenizer
    from selftok.shapes import CATEGORIES, all_specs, caption_variants
    from vlm.model import LlamaSpec, ModelConfig, build_model, export_model
    from vlm.text_tokenizer import train_text_tokenizer
    from vlm.vocab import Vocabulary

    tok_cfg = get_preset("shapes-64")
    tok_cfg.decoder = None
    SelftokTokenizer(tok_cfg).save_pretrained(root / "tokenizer")
    captions = [c for tag in CATEGORIES for s in all_specs(tag) for c in caption_variants(s)]
    text_tok = train_text_tokenizer(captions, root / "text_tokenizer", vocab_size=512)
    vocab = Vocabulary.extend_tokenizer(text_tok, codebook_size=tok_cfg.quantizer.codebook_size, K=tok_cfg.schedule.K)
    spec = LlamaSpec()
    vlm_cfg = ROOT / "configs" / "vlm_shapes.yaml"
    if vlm_cfg.exists():
        llama = ((yaml.safe_load(vlm_cfg.read_text()) or {}).get("model") or {}).get("llama") or {}
        spec = from_dict(LlamaSpec, llama)
    model = export_model(build_model(ModelConfig(llama=spec, new_rows_init="normal"), vocab))
    model.save_pretrained(root / "vlm")
    text_tok.save_pretrained(root / "vlm")
    vocab.save(root / "vlm")
    log.info("random artifacts: Llama %s, %.2f M parameters", spec, sum(p.numel() for p in model.parameters()) / 1e6)
    return root / "vlm", root / "tokenizer"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "rl_shapes.yaml"))
    p.add_argument("--random", action="store_true", help="random weights of the demo sizes (no trained artifacts)")
    p.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. rollout.batch_size=16")
    args = p.parse_args(argv)
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        overrides = list(args.overrides) + [f"run.out_dir={tmp / 'run'}", "log_rollouts=false"]
        if args.random:
            vlm_dir, tok_dir = random_artifacts(tmp)
            # random weights render near-constant images, so every group is flat: time the full update anyway
            overrides += [f"policy.vlm_path={vlm_dir}", f"policy.tokenizer_path={tok_dir}",
                          "update.skip_zero_advantage=false"]
        cfg = load_config(RLConfig, args.config, overrides)
        state = setup(cfg)
        rows = []
        for i in range(args.steps + 1):
            t0 = time.perf_counter()
            m = train_step(state)
            total = time.perf_counter() - t0
            if i > 0:
                rows.append({k: m[k] for k in PHASES} | {"total_s": total, "reward_mean": m["reward_mean"]})
            log.info("step %d: %s total %.2f s", i, " ".join(f"{k}={m[k]:.2f}" for k in PHASES), total)
        state.accelerator.end_training()
    med = {k: statistics.median(r[k] for r in rows) for k in (*PHASES, "total_s")}
    result = {"config": args.config, "random_weights": args.random, "threads": torch.get_num_threads(),
              "batch_size": cfg.rollout.batch_size, "group_size": cfg.rollout.group_size,
              "cfg_scale": cfg.rollout.sampling.cfg_scale, "micro_batch_size": cfg.update.micro_batch_size,
              "steps": rows, "median": med}
    print(f"\nGRPO step on {cfg.rollout.batch_size} samples (G={cfg.rollout.group_size}, "
          f"cfg_scale={cfg.rollout.sampling.cfg_scale}, {torch.get_num_threads()} threads), median of {len(rows)}:")
    for k in (*PHASES, "total_s"):
        print(f"  {k[:-2]:<8} {med[k]:7.2f} s  ({100 * med[k] / med['total_s']:4.1f} %)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
