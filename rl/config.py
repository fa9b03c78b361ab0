"""The config tree of a GRPO run (`rl.train`): the policy, the prompts, the rewards, the rollout, the update
and the held-out evaluation; one YAML file (configs/rl_*.yaml)."""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from rl.grpo import AdvantageScale
from rl.prompts import PromptsConfig
from rl.rewards import RewardConfig
from vlm.model import LoraSpec
from vlm.sampling import SamplingPolicy


@dataclasses.dataclass
class PolicyConfig:
    vlm_path: str = ""
    """Folder of the VLM to fine-tune: `vlm.train`'s final/ (HF model + text tokenizer + vocab.json)."""
    tokenizer_path: str = ""
    """Folder of the Selftok tokenizer with a renderer (`SelftokTokenizer.save_pretrained`)."""
    vae_path: str | None = None
    """Local SD3-VAE folder for tokenizers in the sd3_vae latent space."""
    mode: Literal["full", "lora"] = "full"
    """full: every weight trains and the reference is a frozen copy; lora: adapters (plus trainable visual
    rows) and the reference is the same model with the adapters disabled."""
    lora: LoraSpec = dataclasses.field(default_factory=LoraSpec)
    render_batch_size: int = 64
    """Images per renderer forward."""
    attn_implementation: str | None = None
    """transformers attention of the policy: None = transformers' default (sdpa); "eager" makes the CPU update
    faster (torch's CPU flash-attention backward is slow on short rows)."""


@dataclasses.dataclass
class RolloutConfig:
    batch_size: int = 16
    """Images sampled per process per step (= prompts per step × group_size)."""
    group_size: int = 4
    """G: samples per prompt; advantages are relative to the group."""
    sampling: SamplingPolicy = dataclasses.field(default_factory=SamplingPolicy)
    """The sampling policy (CFG, temperature, top-k/p, vocabulary); log-probs are computed under it."""
    gen_batch_size: int = 64
    """Images per sampler call (rows of the KV-cached loop; twice as many with CFG)."""

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (group-relative advantages), got {self.group_size}")
        if self.batch_size < 1 or self.batch_size % self.group_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a positive multiple of group_size "
                             f"({self.group_size})")
        if self.sampling.vocabulary == "text":
            raise ValueError("rollout.sampling.vocabulary must be visual (or all) to sample images")

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.group_size


@dataclasses.dataclass
class UpdateConfig:
    lr: float = 1e-5
    warmup_steps: int = 0
    """Linear warm-up of the learning rate; constant afterwards."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float = 1.0
    epochs: int = 1
    """Policy epochs per rollout batch (> 1 reuses the batch with the clipped ratio)."""
    minibatch_size: int | None = None
    """Samples per optimizer step per process; None = the whole batch."""
    micro_batch_size: int = 16
    """Samples per forward/backward (gradient accumulation inside a mini-batch)."""
    beta: float = 0.0
    """KL weight (k3 estimator against the frozen reference); 0 skips the reference entirely."""
    eps_low: float = 0.2
    eps_high: float = 0.2
    advantage_scale: AdvantageScale = "group"
    skip_zero_advantage: bool = True
    """Skip the forward/backward of samples with advantage 0 (flat groups, dropped samples) when beta = 0 on
    a single process: their gradient is exactly 0, so this changes nothing but the time."""
    max_steps: int = 100
    time_budget_s: float | None = None
    """Stop (checkpoint, evaluate, save) once this many seconds of RL steps (rollout, render, reward, update;
    not evaluations or checkpoints) have run in this process; None = no limit."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {"mixed_precision": "run.mixed_precision", "seed": "run.seed"}

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.epochs < 1 or self.micro_batch_size < 1 or self.max_steps < 1:
            raise ValueError("lr, epochs, micro_batch_size and max_steps must be positive")
        if self.beta < 0 or self.eps_low < 0 or self.eps_high < 0:
            raise ValueError("beta, eps_low and eps_high must be >= 0")
        if self.advantage_scale not in ("group", "batch", "none"):
            raise ValueError(f"advantage_scale must be group, batch or none, got {self.advantage_scale!r}")


@dataclasses.dataclass
class RLEvalConfig:
    """The held-out evaluation during GRPO (section ``eval``)."""

    every: int = 20
    """Evaluate on the held-out prompts every this many steps (and at the start and the end); 0 = only
    at the start and the end."""
    samples_per_prompt: int = 1
    """Images per held-out prompt (seeds: the prompt's seed, then + 1_000_003 per extra sample)."""
    metric: Literal["program", "reward"] = "program"
    """program: the shapes evaluator's GenEval-style accuracy (strict, no partial credit); reward: the mean
    training reward (for prompts the program cannot judge)."""
    grid_prompts: int = 12
    """Held-out prompts shown in the sample grids (an even spread through the list, first sample each)."""
    at_start: bool = True


@dataclasses.dataclass
class RLRunConfig:
    """The run-level keys (the same names as `selftok.train`'s and `vlm.train`'s section ``run``)."""

    out_dir: str = "runs/rl"
    """The run directory."""
    seed: int = 0
    """Seeds the prompt sets, their schedule, the rollout seeds and the model-side RNG."""
    mixed_precision: Literal["bf16", "no"] = "bf16"
    """bf16 autocast of rollout, scoring and update (fp32 master weights), or none (fp32)."""
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    log_every: int = 1
    num_threads: int | None = None
    """torch CPU threads per process (None: torch's default). On a busy shared CPU, 1 thread per process
    avoids OpenMP oversubscription, which can slow small matmuls by 10x."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("run.checkpoint_every and run.log_every must be >= 1")


@dataclasses.dataclass
class RLConfig:
    run: RLRunConfig = dataclasses.field(default_factory=RLRunConfig)
    policy: PolicyConfig = dataclasses.field(default_factory=PolicyConfig)
    prompts: PromptsConfig = dataclasses.field(default_factory=PromptsConfig)
    rewards: list[RewardConfig] = dataclasses.field(default_factory=lambda: [RewardConfig()])
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    update: UpdateConfig = dataclasses.field(default_factory=UpdateConfig)
    eval: RLEvalConfig = dataclasses.field(default_factory=RLEvalConfig)
    log_rollouts: bool = True
    """Append every step's prompts, seeds and rewards to rollouts.jsonl."""

    RENAMED_KEYS: ClassVar[dict[str, str]] = {
        "output_dir": "run.out_dir", "checkpoint_every": "run.checkpoint_every",
        "keep_checkpoints": "run.keep_checkpoints", "log_every": "run.log_every",
        "threads": "run.num_threads"}

    def __post_init__(self) -> None:
        if not self.rewards:
            raise ValueError("rewards must list at least one reward term")
        u, B = self.update, self.rollout.batch_size
        mb = u.minibatch_size or B
        if B % mb or mb % min(u.micro_batch_size, mb):
            raise ValueError(f"rollout.batch_size ({B}) must be a multiple of update.minibatch_size ({mb}), "
                             f"which must be a multiple of update.micro_batch_size ({u.micro_batch_size})")


RESUME_MAY_DIFFER = ("run.checkpoint_every", "run.keep_checkpoints", "run.log_every", "update.max_steps",
                     "update.time_budget_s", "eval.every", "run.num_threads")

