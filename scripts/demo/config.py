"""The demo's config (configs/demo.yaml, configs/demo_smoke.yaml): each stage's run config and overrides, the
shapes scenes it exports, the evaluation flags and the report's settings."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class StageSettings:
    """One stage's own run config: its YAML (under configs/) plus dotted overrides. The demo adds the keys
    that wire stages together (output folders, input paths); see `wiring`."""

    config: str = ""
    """Base YAML of the stage's command, relative to the repository root."""
    overrides: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class TokenizerSettings(StageSettings):
    """The tokenizer stage: a shipped tokenizer (configs/demo.yaml's default, as users of the paper start from
    the released one) or a training run with `config` (`--retrain-tokenizer` empties `pretrained`)."""

    pretrained: str = ""
    """Name of a tokenizer shipped in ``selftok/pretrained/`` that the stage installs instead of training one;
    "" trains one with `config` + `overrides`."""


@dataclasses.dataclass
class ShapesSettings:
    preview: int = 64
    """Training scenes exported for the report's look at the world."""
    heldout: int = 96
    """Held-out scenes exported (the same scenes `vlm.generate evaluate` captions)."""
    seed: int = 0
    """Seed of the exported scene streams (`vlm.generate evaluate` captions the held-out stream of seed 0)."""

    def __post_init__(self) -> None:
        if self.preview < 1 or self.heldout < 1:
            raise ValueError("shapes.preview and shapes.heldout must be >= 1")


@dataclasses.dataclass
class EvaluateSettings:
    """`python -m vlm.generate evaluate` flags, identical before and after RL (same prompts and seeds)."""

    n_per_prompt: int = 4
    """Images per held-out prompt (96 prompts)."""
    n_captions: int = 96
    """Held-out scenes captioned (0 = skip)."""
    batch_size: int = 32
    extra_args: list[str] = dataclasses.field(default_factory=list)
    """Further flags, e.g. ["--attn", "eager"] (see docs/generation.md). Not the sampling policy: the evaluations
    sample with the RL config's ``rollout.sampling``, the policy RL trains, so before and after compare alike."""

    def __post_init__(self) -> None:
        if self.n_per_prompt < 1 or self.n_captions < 0 or self.batch_size < 1:
            raise ValueError("evaluate.n_per_prompt and batch_size must be >= 1, n_captions >= 0")


@dataclasses.dataclass
class ReportSettings:
    grid_prompts: int = 12
    """Held-out prompts shown before/after RL (an even spread over the 96, so every category appears)."""
    caption_examples: int = 12
    """Captioned held-out scenes shown beside their images."""
    scale: int = 2
    """Nearest-neighbour upscaling of the 64-px images in the grids."""


@dataclasses.dataclass
class DemoConfig:
    """The whole demo (configs/demo.yaml, configs/demo_smoke.yaml)."""

    name: str = "demo"
    threads: int | None = None
    """CPU threads of every stage (OMP_NUM_THREADS / MKL_NUM_THREADS of its process); None = torch's default
    (all cores). 1 is much faster for tiny models on a busy machine: oversubscribed OpenMP threads make small
    ops up to ~40× slower (measured with the smoke VLM at load 12 on 2 cores)."""
    shapes: ShapesSettings = dataclasses.field(default_factory=ShapesSettings)
    tokenizer: TokenizerSettings = dataclasses.field(default_factory=TokenizerSettings)
    pretokenize: StageSettings = dataclasses.field(default_factory=StageSettings)
    vlm: StageSettings = dataclasses.field(default_factory=StageSettings)
    evaluate: EvaluateSettings = dataclasses.field(default_factory=EvaluateSettings)
    rl: StageSettings = dataclasses.field(default_factory=StageSettings)
    report: ReportSettings = dataclasses.field(default_factory=ReportSettings)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or null), got {self.threads}")
