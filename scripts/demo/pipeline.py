"""The embedded default: one command runs the whole pipeline on the shapes world and writes a report.

    python -m scripts.demo [--smoke] [--force] [--out DIR] [--config YAML] [key.sub=value ...]
    scripts/demo.sh --smoke                  # the same, after creating/reusing .venv and installing the project

Stages, in order; each runs the documented command line of its package in a subprocess (docs/demo.md):

    shapes       python -m selftok.shapes prompts / export    the held-out prompt list, scenes to look at
    tokenizer    python -m selftok.pretrained install         the shipped tokenizer (default), or with
                 python -m selftok.train                      --retrain-tokenizer: stages 0-2 of tokenizer.config
    pretokenize  python -m selftok.pretokenize                uint16 token shards of the training scenes
    vlm          python -m vlm.train                          text→image and image→text
    vlm_eval     python -m vlm.generate evaluate              held-out prompts → images → evaluator; captions
    rl           python -m rl.train                           GRPO with the program evaluator as reward
    rl_eval      python -m vlm.generate evaluate              the same prompts and seeds again
    report       (here)                                       report.md, report.json, PNG grids

Re-running: a stage that finished left ``stages/<name>.done.json`` (fingerprint of its settings and inputs, and
size + sha256 of every output file); it is reused when the fingerprint matches and every output is intact. A
stage that was interrupted (``stages/<name>.started.json`` with the same fingerprint, no done record) is run
again in place, and its command resumes from its own checkpoints. A stage whose output is missing or broken,
whose settings or inputs changed, or that comes after a stage that ran, is redone from scratch (its folder is
emptied first) with a message saying why. ``--force`` redoes every stage.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scripts.demo.config import DemoConfig, StageSettings, TokenizerSettings
from scripts.demo.report import write_report
from scripts.demo.runner import (
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    REPO,
    Command,
    Stage,
    StageFailed,
    decide,
    fingerprint,
    fmt_seconds,
    run_stage,
    unavailable,
    write_configs,
    write_json,
)
from rl.config import RLConfig
from selftok.pretrained import MANIFEST, ROOT as PRETRAINED, manifest_digest, shipped_config
from selftok.runtime.config import ConfigError, apply_overrides, from_dict, load_config, read_config_file, to_dict
from selftok.runtime.io import read_json
from vlm.generate import POLICY_FLAGS, policy_args

log = logging.getLogger("demo")

DEFAULT_CONFIG = "configs/demo.yaml"
SMOKE_CONFIG = "configs/demo_smoke.yaml"
DEFAULT_OUT = "runs/demo"
SMOKE_OUT = "runs/demo-smoke"


# ------------------------------------------------------------------------------------------------ stages
def merged_config(settings: StageSettings, wiring: list[str]) -> dict[str, Any]:
    """The stage's YAML with its overrides, then the demo's wiring (which always wins)."""
    return apply_overrides(read_config_file(REPO / settings.config), list(settings.overrides) + wiring)


def image_size(cfg: DemoConfig) -> int:
    """The tokenizer's image side (its config's ``model.image_size``; 64 if the config does not say)."""
    t = cfg.tokenizer
    if t.pretrained:
        return shipped_config(t.pretrained, PRETRAINED).image_size
    data = merged_config(t, []) if (REPO / t.config).is_file() else {}
    return int((data.get("model") or {}).get("image_size", 64))


def wiring(out: Path, size: int) -> dict[str, list[str]]:
    """The keys by which the demo chains the stages: each stage reads the previous stages' outputs, and the
    training scenes are rendered at the tokenizer's image size."""
    tok = out / "tokenizer" / "model"
    return {
        "tokenizer": [f"run.out_dir={out / 'tokenizer'}"],
        "pretokenize": [f"tokenizer.path={tok}", f"output.dir={out / 'tokens'}", "data.kind=shapes",
                        f"data.shapes.size={size}", f"data.transform.image_size={size}"],
        "vlm": [f"run.out_dir={out / 'vlm'}", f"data.shards={out / 'tokens'}"],
        "rl": [f"run.out_dir={out / 'rl'}", f"policy.vlm_path={out / 'vlm' / 'final'}",
               f"policy.tokenizer_path={tok}"],
    }


def shapes_stage(cfg: DemoConfig, out: Path, size: int) -> Stage:
    s, root = cfg.shapes, out / "shapes"
    common = ["--seed", str(s.seed), "--size", str(size)]
    return Stage(
        "shapes", "export the shapes world", "shapes", ["shapes"],
        ["shapes/heldout_prompts.jsonl", "shapes/train_preview/metadata.jsonl", "shapes/heldout/metadata.jsonl"],
        commands=[
            Command("selftok.shapes", ["prompts", "--split", "heldout", "--out", str(root / "heldout_prompts.jsonl")]),
            Command("selftok.shapes", ["prompts", "--split", "heldout", "--format", "txt",
                                       "--out", str(root / "heldout_prompts.txt")]),
            Command("selftok.shapes", ["export", "--split", "train", "--n", str(s.preview),
                                       "--out", str(root / "train_preview"), *common]),
            Command("selftok.shapes", ["export", "--split", "heldout", "--n", str(s.heldout),
                                       "--out", str(root / "heldout"), *common])])


def training_stage(name: str, title: str, module: str, settings: StageSettings, wires: list[str],
                   workdir: str, outputs: list[str], required: list[str], out: Path) -> Stage:
    """A `python -m module --config configs/<name>.yaml` stage (the merged config is written at run time)."""
    path = out / "configs" / f"{name}.yaml"
    have = (REPO / settings.config).is_file()
    return Stage(name, title, workdir, outputs, required, commands=[Command(module, ["--config", str(path)])],
                 configs={name: merged_config(settings, wires)} if have else {}, needs=[settings.config])


def tokenizer_stage(settings: TokenizerSettings, wires: list[str], out: Path) -> Stage:
    """Install the shipped tokenizer (its manifest digest in the command, so a changed one redoes the stage
    and every stage after it), or train one with the stage's config."""
    outputs = ["tokenizer/model", "tokenizer/eval"]
    required = ["tokenizer/model/model.safetensors", "tokenizer/model/config.yaml"]
    if not settings.pretrained:
        return training_stage("tokenizer", "train the tokenizer (stages 0-2: autoencoder, tokenizer, renderer)",
                              "selftok.train", settings, wires, "tokenizer", outputs, required, out)
    name = settings.pretrained
    manifest = PRETRAINED / name / MANIFEST
    digest = manifest_digest(name, PRETRAINED) if manifest.is_file() else "missing"
    return Stage("tokenizer", f"install the shipped tokenizer {name!r}", "tokenizer", outputs, required,
                 commands=[Command("selftok.pretrained", ["install", name, str(out / "tokenizer"),
                                                          "--sha256", digest])],
                 needs=[str(manifest)])


def rl_sampling(cfg: DemoConfig, wires: list[str]) -> list[str]:
    """The RL rollouts' sampling policy (its config's ``rollout.sampling``) as `vlm.generate` flags: the held-out
    evaluations before and after RL sample as the policy that RL trained does."""
    if not (REPO / cfg.rl.config).is_file():
        return []  # the missing config fails the rl stage, which names it
    rl = from_dict(RLConfig, merged_config(cfg.rl, wires))
    return policy_args(rl.rollout.sampling)


def evaluate_stage(name: str, title: str, model: str, cfg: DemoConfig, out: Path, sampling: list[str]) -> Stage:
    e = cfg.evaluate
    clash = sorted(set(e.extra_args) & set(POLICY_FLAGS.values()))
    if clash:
        raise ConfigError(f"evaluate.extra_args sets {', '.join(clash)}: the evaluations sample with the RL "
                          f"config's rollout.sampling ({cfg.rl.config}); change it there")
    argv = ["evaluate", "--model", str(out / model), "--tokenizer", str(out / "tokenizer" / "model"),
            "--out", str(out / name), "--n-per-prompt", str(e.n_per_prompt), "--n-captions", str(e.n_captions),
            "--batch-size", str(e.batch_size), *sampling, *e.extra_args]
    return Stage(name, title, name, [name], [f"{name}/summary.json", f"{name}/t2i_report.json"],
                 commands=[Command("vlm.generate", argv)])


def build_stages(cfg: DemoConfig, out: Path) -> list[Stage]:
    size = image_size(cfg)
    w = wiring(out, size)
    sampling = rl_sampling(cfg, w["rl"])
    return [
        shapes_stage(cfg, out, size),
        tokenizer_stage(cfg.tokenizer, w["tokenizer"], out),
        training_stage("pretokenize", "pre-tokenize the training scenes", "selftok.pretokenize", cfg.pretokenize,
                       w["pretokenize"], "tokens", ["tokens/manifest.json", "tokens/*.parquet"],
                       ["tokens/manifest.json"], out),
        training_stage("vlm", "train the VLM (text→image + image→text)", "vlm.train", cfg.vlm, w["vlm"], "vlm",
                       ["vlm/final", "vlm/metrics.jsonl"], ["vlm/final/vocab.json", "vlm/final/config.json"], out),
        evaluate_stage("vlm_eval", "generate for the held-out prompts, caption held-out scenes, evaluate",
                       "vlm/final", cfg, out, sampling),
        training_stage("rl", "GRPO on the train prompts (reward: the program evaluator)", "rl.train", cfg.rl,
                       w["rl"], "rl", ["rl/final", "rl/metrics.jsonl"], ["rl/final/vocab.json", "rl/final/config.json"],
                       out),
        evaluate_stage("rl_eval", "generate and evaluate again (same prompts and seeds)", "rl/final", cfg, out,
                       sampling),
    ]


def run_pipeline(cfg: DemoConfig, out: Path, force: bool = False, until: str | None = None, dry_run: bool = False,
                 verbose: bool = False, report: Callable[[DemoConfig, Path, list[Stage]], None] | None = None) -> int:
    """Run (or reuse) every stage in order, then write the report; returns the exit status."""
    stages = build_stages(cfg, out)
    names = [s.name for s in stages]
    if until is not None and until not in names:
        raise ValueError(f"--until {until!r}: not a stage; stages: {', '.join(names)}")
    status, upstream, ran_before = 0, [], None
    for i, stage in enumerate(stages):
        label = f"{i + 1}/{len(stages)} {stage.name}"
        why = unavailable(stage)
        if why is not None:
            log.error("%s: not available — %s. Stopping here (the stages before it are complete).", label, why)
            status = EXIT_UNAVAILABLE
            break
        fp = fingerprint(stage, upstream)
        decision = decide(stage, fp, out / "stages", out, force, ran_before)
        if decision.action == "reuse":
            log.info("%s: reused (%s)", label, decision.reason)
            write_configs(stage, out)
            record = read_json(out / "stages" / f"{stage.name}.done.json") or {}
        elif dry_run:
            log.info("%s: would %s%s", label, decision.action, f" — {decision.reason}" if decision.reason else "")
            ran_before, record = ran_before or stage.name, {}
        else:
            verb = {"run": "start", "resume": "resume", "redo": "redo"}[decision.action]
            log.info("%s: %s — %s%s", label, verb, stage.title, f" ({decision.reason})" if decision.reason else "")
            try:
                record = run_stage(stage, decision, fp, out, stages[i + 1:], verbose, label, cfg.threads)
            except StageFailed as e:
                log.error("%s", e)
                log.error("fix the problem and re-run the same command: finished stages are reused")
                status = EXIT_FAILED
                break
            log.info("%s: done in %s", label, fmt_seconds(record["seconds"]))
            ran_before = ran_before or stage.name
        upstream.append(hashlib.sha256(json.dumps(record.get("outputs", {}), sort_keys=True).encode()).hexdigest())
        if stage.name == until:
            log.info("stopping after %s (--until)", stage.name)
            break
    if not dry_run and report is not None:
        start = time.monotonic()
        report(cfg, out, stages)
        log.info("report: written in %s — open %s", fmt_seconds(time.monotonic() - start), out / "report.md")
    return status


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help=f"every stage with minimal sizes (about 3 minutes): {SMOKE_CONFIG}, output {SMOKE_OUT}")
    p.add_argument("--force", action="store_true", help="redo every stage instead of reusing finished ones")
    p.add_argument("--retrain-tokenizer", action="store_true",
                   help="train the tokenizer with tokenizer.config (the quick recipe) instead of installing the "
                        "shipped one (tokenizer.pretrained)")
    p.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT}; {SMOKE_OUT} with --smoke)")
    p.add_argument("--config", default=None, help=f"demo config (default {DEFAULT_CONFIG})")
    p.add_argument("--until", default=None, help="stop after this stage (then write the report of what exists)")
    p.add_argument("--dry-run", action="store_true", help="only say which stages would be reused, resumed or redone")
    p.add_argument("--verbose", action="store_true", help="echo every stage's own output (always in logs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="dotted overrides of the demo config, e.g. vlm.overrides=[optim.max_steps=100]")
    return p


def load_demo_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> DemoConfig:
    path = args.config or (SMOKE_CONFIG if args.smoke else DEFAULT_CONFIG)
    path = path if Path(path).is_absolute() or Path(path).exists() else str(REPO / path)
    try:
        overrides = list(args.overrides) + (["tokenizer.pretrained="] if args.retrain_tokenizer else [])
        return load_config(DemoConfig, path, overrides)
    except (ConfigError, FileNotFoundError) as e:
        parser.error(str(e))
        raise  # unreachable


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[demo %(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout, force=True)
    cfg = load_demo_config(args, parser)
    out = Path(args.out or (SMOKE_OUT if args.smoke else DEFAULT_OUT)).resolve()
    names = [s.name for s in build_stages(cfg, out)]
    if args.until is not None and args.until not in names:
        parser.error(f"--until {args.until!r}: not a stage; stages: {', '.join(names)}")
    out.mkdir(parents=True, exist_ok=True)
    log.info("%s → %s (log of every stage in %s)", cfg.name, out, out / "logs")
    write_json(out / "configs" / "demo.json", {"config": to_dict(cfg), "argv": sys.argv[1:] if argv is None
                                               else list(argv)})
    signal.signal(signal.SIGTERM, _interrupt)  # `kill`: stop the running stage cleanly, like Ctrl-C
    try:
        return run_pipeline(cfg, out, args.force, args.until, args.dry_run, args.verbose, write_report)
    except KeyboardInterrupt:
        log.error("interrupted; re-run the same command to resume (finished stages are reused)")
        return 130

