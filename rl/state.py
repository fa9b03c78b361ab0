"""The live state of a GRPO run: what `rl.train.setup` builds and every step, rollout and evaluation reads."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from rl.config import RLConfig
from rl.prompts import PromptSets
from rl.rewards import Reward
from vlm.vocab import Vocabulary


class Progress:
    """Steps done and samples dropped so far; checkpointed with the accelerate state."""

    def __init__(self) -> None:
        self.step = 0
        self.dropped = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "dropped": self.dropped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.dropped = int(state["step"]), int(state["dropped"])


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
