"""The live state of a GRPO run: what `rl.train.setup` builds and every step, rollout and evaluation reads."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from rl.config import RLConfig
from rl.prompts import CategoryCurriculum, PromptSets
from rl.rewards import Reward
from selftok.runtime.runs import Progress
from vlm.vocab import Vocabulary


@dataclasses.dataclass
class RLState:
    cfg: RLConfig
    accelerator: Accelerator
    model: Any                 # the trained policy (prepared by accelerate)
    reference: Any | None      # frozen reference (full mode with beta > 0), else None
    optimizer: Any
    vocab: Vocabulary
    text_tokenizer: Any
    image_tokenizer: Any       # SelftokTokenizer with a renderer
    reward: Reward
    eval_reward: Reward
    prompts: PromptSets
    progress: Progress
    run_dir: Path
    curriculum: CategoryCurriculum | None = None  # prompts.balance: adaptive
