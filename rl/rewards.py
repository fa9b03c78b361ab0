"""Reward models for RL over generated images: one protocol, three built-ins, weighted combinations.

Protocol (`Reward`): ``reward(images, prompts) -> RewardOutput(scores (B,), details)`` where `images` are B
PIL images (the renderer's output) and `prompts` B prompt items in GenEval's metadata schema — a dict with
at least ``"prompt"`` (the text) and optionally ``"tag"`` (the category) and ``"include"``/``"exclude"``
clauses (a spec). A score that cannot be computed is NaN: the trainer drops that sample from the update and
counts it. ``reward.check_prompts(prompts)`` raises `RewardPromptError` listing every prompt the reward
cannot judge, so a run fails before training starts rather than mid-way.

Built-ins:
- `ShapesReward`: the shapes world's program evaluator (`selftok.shapes`), 1/0 per image or, with
  `partial_credit`, `graded_score` (include-claim fraction × exclude-claim fraction: a denser signal for
  small G that gives a blank image 0).
- `CLIPReward`: cosine similarity of CLIP image and text embeddings (`transformers.CLIPModel` + processor
  from a local folder).
- `VQAReward`: a vision-language model from a local folder (`AutoModelForImageTextToText` + processor)
  answers yes/no questions derived from the prompt; the score is the mean probability of "yes".
- `WeightedReward`: a weighted sum of rewards (NaN if any component is NaN).

Rewards run in the calling (training) process, batched, under ``torch.no_grad``; on multi-process runs
each rank scores its own samples.
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple, Protocol

import torch
from PIL import Image
from torch import Tensor

from selftok.shapes import ImageError, SpecError, evaluate_image, validate_spec

log = logging.getLogger(__name__)

RewardKind = Literal["shapes", "clip", "vqa"]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                9: "nine", 10: "ten"}


class RewardPromptError(ValueError):
    """Prompts a reward cannot judge (the message lists all of them)."""


class RewardOutput(NamedTuple):
    scores: Tensor              # (B,) fp32 on the CPU; NaN where the sample could not be scored
    details: list[dict[str, Any]]  # B per-item records (what was checked, component scores)


class Reward(Protocol):
    name: str

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[dict[str, Any]]) -> RewardOutput: ...

    def check_prompts(self, prompts: Sequence[dict[str, Any]]) -> None: ...


@dataclasses.dataclass
class RewardConfig:
    """One reward term of a run (``rewards:`` is a list of these; the total is the weighted sum)."""

    kind: RewardKind = "shapes"
    """shapes (program evaluator), clip (image-text similarity) or vqa (yes-probability)."""
    weight: float = 1.0
    """Weight of this term in the total reward."""
    partial_credit: bool = True
    """shapes: graded score = include-claim fraction × exclude-claim fraction (else 1/0 per image)."""
    path: str | None = None
    """clip / vqa: local folder with the model and its processor (nothing is downloaded)."""
    batch_size: int = 32
    """clip / vqa: images (or questions) per forward pass."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """clip / vqa: dtype of the reward model's weights."""
    prompt_template: str | None = None
    """vqa: text fed to the model with "{question}" in it, used instead of the processor's chat template
    (it must contain the model's image placeholder, e.g. "USER: <image>\\n{question} ASSISTANT:")."""
    yes_tokens: tuple[str, ...] = ("Yes", "yes")
    """vqa: answer strings whose first token counts as "yes"."""
    no_tokens: tuple[str, ...] = ("No", "no")
    """vqa: answer strings whose first token counts as "no" (used only with `normalize_yes_no`)."""
    normalize_yes_no: bool = False
    """vqa: score P(yes) / (P(yes) + P(no)) instead of P(yes) over the whole vocabulary."""

    def __post_init__(self) -> None:
        if self.kind not in ("shapes", "clip", "vqa"):
            raise ValueError(f"kind must be shapes, clip or vqa, got {self.kind!r}")
        if self.kind in ("clip", "vqa") and not self.path:
            raise ValueError(f"a {self.kind} reward needs `path`: a local folder with the model and processor")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.prompt_template is not None and "{question}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{question}'")
        if not self.yes_tokens:
            raise ValueError("yes_tokens must name at least one answer string")


# ---------------------------------------------------------------------------------------------- shapes
class ShapesReward:
    """The shapes world's program evaluator as a reward (specs must use shapes-world classes and colours)."""

    name = "shapes"

    def __init__(self, partial_credit: bool = True):
        self.partial_credit = partial_credit

    def check_prompts(self, prompts: Sequence[dict[str, Any]]) -> None:

        bad = []
        for i, p in enumerate(prompts):
            try:
                if "include" not in p:
                    raise SpecError("no spec: a text prompt must be parsed by the shapes grammar first")
                validate_spec(p, shapes_only=True)
            except SpecError as e:
                bad.append(f"  [{i}] {p.get('prompt')!r}: {e}")
        if bad:
            raise RewardPromptError(
                f"the shapes program reward cannot judge {len(bad)} of {len(prompts)} prompts:\n" + "\n".join(bad))

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[dict[str, Any]]) -> RewardOutput:

        _check_lengths(images, prompts)
        scores, details = [], []
        for image, spec in zip(images, prompts):
            try:
                judgement = evaluate_image(image, spec)
            except ImageError as e:  # an unusable image cannot be scored: NaN, dropped by the trainer
                scores.append(float("nan"))
                details.append({"correct": False, "error": str(e)})
                continue
            score = graded_score(judgement) if self.partial_credit else float(judgement.correct)
            scores.append(score)
            details.append({"correct": judgement.correct, "score": score})
        return RewardOutput(torch.tensor(scores, dtype=torch.float32), details)


def graded_score(judgement: Any) -> float:
    """Partial credit of a shapes verdict: (fraction of include claims that hold: counts, colours,
    relations) × (fraction of exclude claims that hold: no extra objects); 1 iff the image is correct.

    Not the plain fraction of all claims: exact shapes-world specs carry one exclude claim per shape, so a
    blank image already holds 4 of a single-object prompt's 6 claims — GRPO with that reward learned to draw
    nothing within 30 steps. With the product a blank image scores 0."""
    include = [c.passed for c in judgement.claims if c.kind != "exclude"]
    exclude = [c.passed for c in judgement.claims if c.kind == "exclude"]
    frac = lambda xs: sum(xs) / len(xs) if xs else 1.0
    return frac(include) * frac(exclude) if include else float(judgement.correct)


# ---------------------------------------------------------------------------------------------- CLIP
class CLIPReward:
    """Cosine similarity between CLIP's image embedding and the prompt's text embedding, in [-1, 1]."""

    name = "clip"

    def __init__(self, path: str, batch_size: int = 32, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        from transformers import AutoProcessor, CLIPModel

        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.max_length = getattr(self.model.config.text_config, "max_position_embeddings", 77)

    def check_prompts(self, prompts: Sequence[dict[str, Any]]) -> None:
        _check_text(self.name, prompts)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[dict[str, Any]]) -> RewardOutput:
        _check_lengths(images, prompts)
        scores = []
        for start in range(0, len(images), self.batch_size):
            sl = slice(start, start + self.batch_size)
            inputs = self.processor(text=[p["prompt"] for p in prompts[sl]], images=[im.convert("RGB") for im in
                                    images[sl]], return_tensors="pt", padding=True, truncation=True,
                                    max_length=self.max_length).to(self.device)
            out = self.model(**inputs)
            img = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
            txt = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
            scores.append((img * txt).sum(-1).cpu())
        s = torch.cat(scores)
        return RewardOutput(s, [{"cosine": float(v)} for v in s])


# ---------------------------------------------------------------------------------------------- VQA
def _plural(name: str) -> str:
    return name + ("es" if name.endswith(("s", "sh", "ch", "x", "z")) else "s")


def _noun(clause: dict[str, Any], definite: bool = False) -> str:
    words = ([clause["color"]] if clause.get("color") else []) + [clause["class"]]
    n = clause.get("count", 1)
    if n > 1:
        return f"{NUMBER_WORDS.get(n, str(n))} {' '.join(words[:-1] + [_plural(words[-1])])}"
    if definite:
        return "the " + " ".join(words)
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def questions_for(prompt: dict[str, Any]) -> list[str]:
    """Yes/no questions whose answers check a prompt: one per include clause ("Is there a red circle?",
    "Are there exactly three squares?") and one per relation ("Is the circle left of the square?"); a
    prompt without a spec gets one question about its whole text."""
    include = prompt.get("include")
    if not include:
        return [f"Does this image show {prompt['prompt'].strip().rstrip('.')}?"]
    qs = []
    for c in include:
        if c.get("count", 1) > 1:
            qs.append(f"Are there exactly {_noun(c)}?")
        else:
            qs.append(f"Is there {_noun(c)}?")
        if "position" in c:
            rel, j = c["position"]
            qs.append(f"Is {_noun({**c, 'count': 1}, True)} {rel} {_noun({**include[j], 'count': 1}, True)}?")
    return qs


class VQAReward:
    """Mean probability of "yes" over questions derived from the prompt, answered by a local VLM."""

    name = "vqa"

    def __init__(self, path: str, batch_size: int = 32, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, prompt_template: str | None = None,
                 yes_tokens: Sequence[str] = ("Yes", "yes"), no_tokens: Sequence[str] = ("No", "no"),
                 normalize_yes_no: bool = False):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"  # the answer is predicted at the last position
        self.model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, dtype=dtype)
        self.model.to(device).eval().requires_grad_(False)
        self.batch_size, self.device = batch_size, torch.device(device)
        if prompt_template is None and getattr(self.processor, "chat_template", None) is None:
            raise ValueError(f"{path}: the processor has no chat template; set `prompt_template` (with the "
                             "model's image placeholder and '{question}')")
        self.prompt_template = prompt_template
        self.yes_ids = self._first_ids(yes_tokens)
        self.no_ids = self._first_ids(no_tokens)
        self.normalize_yes_no = normalize_yes_no
        self.takes_position_ids = "position_ids" in inspect.signature(self.model.forward).parameters

    def _first_ids(self, words: Sequence[str]) -> list[int]:
        tok = self.processor.tokenizer
        return sorted({tok.encode(w, add_special_tokens=False)[0] for w in words})

    def check_prompts(self, prompts: Sequence[dict[str, Any]]) -> None:
        _check_text(self.name, prompts)

    def text_for(self, question: str) -> str:
        question = f"{question} Answer yes or no."
        if self.prompt_template is not None:
            return self.prompt_template.format(question=question)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    @torch.no_grad()
    def yes_probability(self, images: Sequence[Image.Image], questions: Sequence[str]) -> Tensor:
        """(N,) P("yes") for each (image, question) pair."""
        out = []
        for start in range(0, len(images), self.batch_size):
            sl = slice(start, start + self.batch_size)
            inputs = self.processor(images=[im.convert("RGB") for im in images[sl]],
                                    text=[self.text_for(q) for q in questions[sl]], return_tensors="pt",
                                    padding=True).to(self.device)
            if self.takes_position_ids:  # left padding must not shift positions (a plain forward counts pads)
                inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            probs = self.model(**inputs).logits[:, -1].float().softmax(-1)
            p_yes = probs[:, self.yes_ids].sum(-1)
            if self.normalize_yes_no:
                p_yes = p_yes / (p_yes + probs[:, self.no_ids].sum(-1)).clamp_min(1e-12)
            out.append(p_yes.cpu())
        return torch.cat(out)

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[dict[str, Any]]) -> RewardOutput:
        _check_lengths(images, prompts)
        per_item = [questions_for(p) for p in prompts]
        flat_images = [im for im, qs in zip(images, per_item) for _ in qs]
        p = self.yes_probability(flat_images, [q for qs in per_item for q in qs])
        scores, details, i = [], [], 0
        for qs in per_item:
            ps = p[i:i + len(qs)]
            i += len(qs)
            scores.append(ps.mean())
            details.append({"questions": qs, "p_yes": [float(v) for v in ps]})
        return RewardOutput(torch.stack(scores), details)


# ---------------------------------------------------------------------------------------------- combination
class WeightedReward:
    """``sum_i w_i * reward_i``; details hold each component's score and details under its name."""

    def __init__(self, terms: Sequence[tuple[Reward, float]]):
        if not terms:
            raise ValueError("a weighted reward needs at least one term")
        names = [r.name for r, _ in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"reward terms must have distinct names, got {names}")
        self.terms = list(terms)
        self.name = "+".join(names)

    def check_prompts(self, prompts: Sequence[dict[str, Any]]) -> None:
        errors = []
        for reward, _ in self.terms:
            try:
                reward.check_prompts(prompts)
            except RewardPromptError as e:
                errors.append(str(e))
        if errors:
            raise RewardPromptError("\n".join(errors))

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[dict[str, Any]]) -> RewardOutput:
        total = torch.zeros(len(images))
        details: list[dict[str, Any]] = [{} for _ in images]
        for reward, weight in self.terms:
            out = reward(images, prompts)
            total = total + weight * out.scores.float()
            for d, s, sub in zip(details, out.scores.tolist(), out.details):
                d[reward.name] = {"score": s, **sub}
        return RewardOutput(total, details)


def build_reward(configs: Sequence[RewardConfig], device: torch.device | str = "cpu") -> Reward:
    """The run's reward: a single term as is when its weight is 1, else a `WeightedReward`."""
    terms: list[tuple[Reward, float]] = []
    for c in configs:
        dtype = getattr(torch, c.dtype)
        if c.kind == "shapes":
            r: Reward = ShapesReward(partial_credit=c.partial_credit)
        elif c.kind == "clip":
            r = CLIPReward(c.path, batch_size=c.batch_size, device=device, dtype=dtype)
        else:
            r = VQAReward(c.path, batch_size=c.batch_size, device=device, dtype=dtype,
                          prompt_template=c.prompt_template, yes_tokens=c.yes_tokens, no_tokens=c.no_tokens,
                          normalize_yes_no=c.normalize_yes_no)
        terms.append((r, c.weight))
    if len(terms) == 1 and terms[0][1] == 1.0:
        return terms[0][0]
    return WeightedReward(terms)


def _check_lengths(images: Sequence[Any], prompts: Sequence[Any]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"need one prompt per image: {len(images)} images, {len(prompts)} prompts")


def _check_text(name: str, prompts: Sequence[dict[str, Any]]) -> None:
    bad = [f"  [{i}] {p!r}" for i, p in enumerate(prompts)
           if not isinstance(p, dict) or not isinstance(p.get("prompt"), str) or not p["prompt"].strip()]
    if bad:
        raise RewardPromptError(f"the {name} reward needs a non-empty 'prompt' text; offending items:\n"
                                + "\n".join(bad))
