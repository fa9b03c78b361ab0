"""Prompts for RL: the training set, the held-out evaluation set, and the deterministic prompt schedule.

A prompt item is a dict in GenEval's metadata schema: ``"prompt"`` (the text the VLM is conditioned on),
``"tag"`` (its category; "text" for a bare text prompt) and, when known, ``"include"``/``"exclude"`` clauses.

Sources:
- ``shapes`` (default): the shapes world's training specs (`selftok.shapes.split_specs("train", tag)`) and its
  fixed held-out evaluation list (`heldout_prompts()`: 96 entries with fixed seeds);
- ``file``: a text file (one prompt per line) or GenEval-style JSONL for training, and either a second file
  for evaluation or a deterministic hash split of the one file (`heldout_fraction`).

**Held-out prompts are never used in training**: any training prompt whose text or spec equals a held-out
one is removed from the training set (the shapes world's four single_object specs are in both of its
splits by design, so RL does not train on them). The schedule (`schedule_prompts`) is a pure function of
(seed, step) — with `balance: adaptive`, of (seed, step, `CategoryCurriculum` state), which every checkpoint
holds: a resumed run sees exactly the prompts an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from selftok.shapes import (
    CATEGORIES,
    PromptParseError,
    SpecError,
    heldout_prompts,
    load_prompts,
    parse_prompt,
    spec_signature,
    split_specs,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PromptsConfig:
    source: Literal["shapes", "file"] = "shapes"
    """shapes: the built-in train / held-out split; file: `train_file` (+ `heldout_file`)."""
    categories: tuple[str, ...] = ()
    """Only these categories (tags) are used for training and evaluation; empty = all."""
    train_file: str | None = None
    """file: training prompts, plain text (one per line) or GenEval-style JSONL."""
    heldout_file: str | None = None
    """file: evaluation prompts; None splits `train_file` by a hash of each prompt (`heldout_fraction`)."""
    heldout_fraction: float = 0.2
    """file without `heldout_file`: fraction of prompts held out for evaluation."""
    balance: Literal["category", "uniform", "adaptive"] = "category"
    """category: every step cycles through the categories equally (GenEval's overall score is the mean of
    the category scores); uniform: every training prompt equally often; adaptive: categories drawn in
    proportion to how often their groups carried a learning signal lately (`CategoryCurriculum`), so steps
    are not spent on categories the policy already gets right every time."""
    adaptive_floor: float = 0.25
    """adaptive: the share of each step spread equally over all categories, whatever their signal (so no
    category is dropped from training)."""
    adaptive_decay: float = 0.98
    """adaptive: per-step decay of each category's moving average of informative groups."""
    max_heldout: int | None = None
    """Evaluate on at most this many held-out prompts (an even spread through the list); None = all."""

    def __post_init__(self) -> None:
        if self.source not in ("shapes", "file"):
            raise ValueError(f"source must be shapes or file, got {self.source!r}")
        if self.source == "file" and not self.train_file:
            raise ValueError("prompts.source=file needs prompts.train_file")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        if self.balance not in ("category", "uniform", "adaptive"):
            raise ValueError(f"balance must be category, uniform or adaptive, got {self.balance!r}")
        if not 0.0 <= self.adaptive_floor <= 1.0:
            raise ValueError(f"adaptive_floor must be in [0, 1], got {self.adaptive_floor}")
        if not 0.0 <= self.adaptive_decay < 1.0:
            raise ValueError(f"adaptive_decay must be in [0, 1), got {self.adaptive_decay}")


@dataclasses.dataclass(frozen=True)
class PromptSets:
    train: list[dict[str, Any]]     # training prompt items
    heldout: list[dict[str, Any]]   # evaluation items, each with a fixed integer "seed"


def prompt_key(item: dict[str, Any]) -> str:
    """Identity of a prompt for the held-out check: its spec's canonical signature when it has clauses
    (so two phrasings of one spec are the same prompt), else its normalised text."""
    if item.get("include"):

        return "spec:" + spec_signature(item)
    return "text:" + " ".join(str(item["prompt"]).lower().split()).rstrip(".")


def load_prompt_file(path: str | Path) -> list[dict[str, Any]]:
    """Prompt items from GenEval-style JSONL (specs used as they are) or plain text (one prompt per line;
    '#' comments and blank lines skipped). A text line the shapes grammar can parse gets its spec (the
    line stays the prompt text); any other line is a bare text prompt with tag "text"."""

    path = Path(path)
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if path.suffix == ".jsonl" or (lines and lines[0].startswith("{")):
        items = load_prompts(path, shapes_only=False)
        bad = [i for i, it in enumerate(items) if not isinstance(it.get("prompt"), str) or not it["prompt"].strip()]
        if bad:
            raise SpecError(f"{path}: entries {bad[:10]} have no 'prompt' text")
        return [{**it, "tag": it.get("tag", "text")} for it in items]
    items = []
    for line in lines:
        try:
            items.append({**parse_prompt(line), "prompt": line})
        except (PromptParseError, SpecError):
            items.append({"prompt": line, "tag": "text"})
    return items


def _hash_unit(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / float(1 << 48)


def build_prompt_sets(cfg: PromptsConfig, seed: int = 0) -> PromptSets:
    """The run's training and held-out prompts (disjoint by `prompt_key`)."""
    if cfg.source == "shapes":

        train = [s for tag in CATEGORIES for s in split_specs("train", tag)]
        heldout = heldout_prompts()
    else:
        train = load_prompt_file(cfg.train_file)
        if cfg.heldout_file:
            heldout = load_prompt_file(cfg.heldout_file)
        else:
            is_held = [_hash_unit(prompt_key(it)) < cfg.heldout_fraction for it in train]
            heldout = [it for it, h in zip(train, is_held) if h]
            train = [it for it, h in zip(train, is_held) if not h]
        heldout = [{**it, "seed": int(it.get("seed", seed * 100_003 + 1000 + i))} for i, it in enumerate(heldout)]
    if cfg.categories:
        train = [it for it in train if it.get("tag") in cfg.categories]
        heldout = [it for it in heldout if it.get("tag") in cfg.categories]
    held_keys = {prompt_key(it) for it in heldout}
    n_before = len(train)
    train = [it for it in train if prompt_key(it) not in held_keys]
    if len(train) < n_before:
        log.info("removed %d training prompts that are also held-out prompts", n_before - len(train))
    if cfg.max_heldout is not None and len(heldout) > cfg.max_heldout:
        heldout = [heldout[(i * len(heldout)) // cfg.max_heldout] for i in range(cfg.max_heldout)]
    if not train:
        raise ValueError("no training prompts left after removing the held-out ones")
    if not heldout:
        raise ValueError("no held-out prompts to evaluate on")
    return PromptSets(train=train, heldout=heldout)


def by_category(train: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Training prompts grouped by tag, categories in first-appearance order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for it in train:
        groups.setdefault(str(it.get("tag", "text")), []).append(it)
    return groups


def _nth_draw(items: Sequence[dict[str, Any]], name: str, k: int, seed: int) -> dict[str, Any]:
    """Draw `k` (0-based) of a category: element k % P of the category's epoch-(k // P) permutation."""
    epoch, pos = divmod(k, len(items))
    order = list(range(len(items)))
    random.Random(json.dumps([seed, name, epoch])).shuffle(order)
    return items[order[pos]]


def schedule_prompts(train: Sequence[dict[str, Any]], step: int, n: int, seed: int,
                     balance: str = "category") -> list[dict[str, Any]]:
    """The `n` training prompts of optimizer step `step` (0-based), over all processes.

    Slots are numbered globally (slot i = step * n + j). uniform: slot i is element i % P of the epoch
    permutation of the P prompts (a new permutation each epoch). category: slot i takes category
    i % C (categories in first-appearance order) and the next element of that category's own epoch
    permutations. Pure in (train, step, n, seed). (adaptive: `CategoryCurriculum.schedule`.)"""
    groups = {"": list(train)} if balance == "uniform" else by_category(train)
    names = list(groups)
    out = []
    for j in range(n):
        i = step * n + j
        name = names[i % len(names)]
        out.append(_nth_draw(groups[name], name, i // len(names), seed))
    return out


class CategoryCurriculum:
    """`balance: adaptive`: each category's share of a step follows how often its groups carried a learning
    signal lately. A group whose G rewards are all equal (all right, or all wrong) has zero advantage and
    teaches nothing; a category the policy always gets right fills the batch with such groups.

    State (saved in every checkpoint through `state_dict`): per category the moving average `signal` of the
    fraction of its groups with unequal rewards (starting at 1: equal shares until measured), and `drawn`,
    how many prompts it has had (the position in its epoch permutations). The share of category c is
    ``floor / C + (1 − floor) · signal_c / Σ signal``. Categories are drawn per slot with an RNG seeded by
    (seed, step); the prompt within a category is its next epoch-permutation element, as in `category`."""

    def __init__(self, train: Sequence[dict[str, Any]], floor: float = 0.25, decay: float = 0.98) -> None:
        self.groups = by_category(train)
        self.floor, self.decay = floor, decay
        self.signal = dict.fromkeys(self.groups, 1.0)
        self.drawn = dict.fromkeys(self.groups, 0)

    def shares(self) -> dict[str, float]:
        total, C = sum(self.signal.values()), len(self.signal)
        if total <= 0:
            return {c: 1.0 / C for c in self.signal}
        return {c: self.floor / C + (1.0 - self.floor) * s / total for c, s in self.signal.items()}

    def schedule(self, step: int, n: int, seed: int) -> list[dict[str, Any]]:
        """The `n` prompts of step `step` (pure in the state, `step` and `seed`; does not change the state)."""
        shares = self.shares()
        names = random.Random(json.dumps([seed, "adaptive", step])).choices(list(shares), list(shares.values()), k=n)
        seen = dict.fromkeys(self.groups, 0)
        out = []
        for name in names:
            out.append(_nth_draw(self.groups[name], name, self.drawn[name] + seen[name], seed))
            seen[name] += 1
        return out

    def update(self, prompts: Sequence[dict[str, Any]], rewards: Sequence[float], group_size: int) -> None:
        """Record a step: its prompts (groups of `group_size` consecutive items, as scheduled) and rewards
        (NaN = unscorable; a group with fewer than two finite rewards counts as carrying no signal)."""
        informative: dict[str, list[bool]] = {}
        for g in range(0, len(prompts), group_size):
            name = str(prompts[g].get("tag", "text"))
            finite = [r for r in rewards[g:g + group_size] if math.isfinite(r)]
            informative.setdefault(name, []).append(len(finite) >= 2 and max(finite) > min(finite))
            self.drawn[name] += 1
        for name, flags in informative.items():
            self.signal[name] = self.decay * self.signal[name] + (1.0 - self.decay) * sum(flags) / len(flags)

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {"signal": dict(self.signal), "drawn": dict(self.drawn)}

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        if set(state["signal"]) != set(self.groups):
            raise ValueError(f"the checkpoint's curriculum has categories {sorted(state['signal'])}, this run "
                             f"{sorted(self.groups)}")
        self.signal = {c: float(state["signal"][c]) for c in self.groups}
        self.drawn = {c: int(state["drawn"][c]) for c in self.groups}
