"""Training sequences from token shards: text->image, image->text and text-only samples, mixed and batched.

Sequences (ids from `vlm.vocab`; labels are HF-style, unshifted, -100 = no loss)::

    t2i   <bos> caption <boi> v_1 .. v_K <eoi> <eos>      loss on v_1 .. v_K <eoi> <eos>
    t2i   <bos> <uncond> <boi> v_1 .. v_K <eoi> <eos>     (condition dropout; also for images without caption)
    i2t   <bos> <boi> v_1 .. v_K <eoi> caption <eos>      loss on caption <eos>
    text  <bos> caption <eos>                             loss on caption <eos>

Too long for `max_len`: the caption is truncated (an i2t caption cut short loses its <eos> target), image
tokens never are; a context that cannot hold the K image tokens plus one caption token is an error.

Order and mixing are a pure function of (seed, global sample position): epoch e = position // N draws a
permutation of the N images and, per slot, a task (by the mixing weights), a condition-dropout coin and a
caption choice. A run's data state is therefore one integer, the next global position, saved in every
checkpoint. Every rank builds the whole global micro-batch (cheap next to a model step) and keeps its own rows,
so all ranks agree on positions, on packing and on the global count of loss tokens used to normalise the loss.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from selftok.data.shards import read_tokens
from vlm.vocab import Vocabulary, VocabularyError, encode_caption

log = logging.getLogger(__name__)

IGNORE = -100
TASKS: tuple[str, ...] = ("t2i", "i2t", "text")
T2I, I2T, TEXT = 0, 1, 2


class SampleTooLong(ValueError):
    """The image tokens (plus one caption token) do not fit into the context."""


@dataclasses.dataclass
class DataConfig:
    shards: str = ""
    """Token-shard directory written by `selftok.pretokenize` (manifest.json + parquet)."""
    max_len: int = 128
    """Context length L of a training row."""
    t2i_weight: float = 1.0
    i2t_weight: float = 1.0
    text_weight: float = 0.0
    """Mixing weights of the three tasks (normalised; a zero weight disables the task)."""
    cond_dropout: float = 0.1
    """Fraction of t2i samples whose caption becomes <uncond> (classifier-free guidance)."""
    packing: bool = False
    """Pack several samples per row (block-diagonal attention via reset position ids) instead of padding."""
    caption_choice: Literal["random", "first"] = "random"
    pad_multiple: int = 8
    """Padded rows are rounded up to a multiple of this (fewer distinct shapes for GPU kernels/allocators)."""
    seed: int = 0

    def __post_init__(self) -> None:
        w = (self.t2i_weight, self.i2t_weight, self.text_weight)
        if min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"task weights must be >= 0 with a positive sum, got {w}")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {self.cond_dropout}")
        if self.max_len < 8:
            raise ValueError(f"max_len must be >= 8, got {self.max_len}")
        if self.pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {self.pad_multiple}")


@dataclasses.dataclass(frozen=True)
class Sample:
    input_ids: list[int]
    labels: list[int]
    """Same length as input_ids; the target id where the loss applies, IGNORE elsewhere."""
    task: int


class Batch(dict):
    """A collated micro-batch (a dict, so `model(**batch.model_inputs())` works).

    input_ids (B, L); labels (B, L) with IGNORE; task (B, L) task of each token's sample, -1 on padding;
    position_ids (B, L); attention_mask (B, L) or absent when packed (HF then infers a block-diagonal mask)."""

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {k: self[k] for k in ("input_ids", "position_ids", "attention_mask") if k in self}


# ---------------------------------------------------------------------------------------------------- samples
def t2i_sample(vocab: Vocabulary, caption_ids: Sequence[int] | None, codes: Any, max_len: int) -> Sample:
    """Text->image sample; `caption_ids=None` gives the unconditional prompt. Captions are truncated to fit."""
    budget = max_len - (vocab.K + 4)  # <bos> <boi> ... <eoi> <eos>
    if budget < 1:
        raise SampleTooLong(f"K={vocab.K} image tokens need a context of at least {vocab.K + 5}, got {max_len}")
    if caption_ids is not None and len(caption_ids) == 0:
        caption_ids = None  # an empty caption is no condition: train it as the unconditional prompt
    prompt = vocab.uncond_prompt() if caption_ids is None else vocab.t2i_prompt(list(caption_ids)[:budget])
    target = [*vocab.codes_to_ids(np.asarray(codes)).tolist(), vocab.eoi_id, vocab.eos_id]
    if len(target) != vocab.K + 2:
        raise VocabularyError(f"expected K={vocab.K} codes, got {len(target) - 2}")
    return Sample(prompt + target, [IGNORE] * len(prompt) + target, T2I)


def i2t_sample(vocab: Vocabulary, codes: Any, caption_ids: Sequence[int], max_len: int) -> Sample:
    """Image->text sample; a caption too long for the context is cut and then has no <eos> target."""
    prompt = vocab.i2t_prompt(codes)
    budget = max_len - len(prompt)
    if budget < 1:
        raise SampleTooLong(f"K={vocab.K} image tokens need a context of at least {vocab.K + 4}, got {max_len}")
    if len(caption_ids) == 0:
        raise ValueError("an image->text sample needs a non-empty caption")
    target = [*caption_ids, vocab.eos_id][:budget]
    return Sample(prompt + target, [IGNORE] * len(prompt) + target, I2T)


def text_sample(vocab: Vocabulary, caption_ids: Sequence[int], max_len: int) -> Sample:
    if len(caption_ids) == 0:
        raise ValueError("a text-only sample needs a non-empty caption")
    target = [*caption_ids, vocab.eos_id][:max_len - 1]
    return Sample([vocab.bos_id, *target], [IGNORE, *target], TEXT)


# -------------------------------------------------------------------------------------------------- collation
def collate_padded(samples: Sequence[Sample], pad_id: int, multiple: int = 1) -> Batch:
    """One sample per row, right-padded to the longest rounded up to a multiple of `multiple`."""
    length = -(-max(len(s.input_ids) for s in samples) // multiple) * multiple
    n = len(samples)
    ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    task = torch.full((n, length), -1, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for r, s in enumerate(samples):
        m = len(s.input_ids)
        ids[r, :m] = torch.tensor(s.input_ids)
        labels[r, :m] = torch.tensor(s.labels)
        task[r, :m] = s.task
        mask[r, :m] = 1
    pos = torch.arange(length).expand(n, length).clone()
    return Batch(input_ids=ids, labels=labels, task=task, attention_mask=mask, position_ids=pos)


def pack_rows(lengths: Sequence[int], n_rows: int, max_len: int) -> list[list[int]]:
    """Greedy in-order packing: sample j goes into the current row if it fits, else the next row.

    Returns the sample indices per row for the longest prefix of `lengths` that fits into `n_rows` rows."""
    rows: list[list[int]] = [[]]
    used = 0
    for j, n in enumerate(lengths):
        if n > max_len:
            raise SampleTooLong(f"sample of length {n} exceeds max_len {max_len}")
        if used + n > max_len:
            if len(rows) == n_rows:
                break
            rows.append([])
            used = 0
        rows[-1].append(j)
        used += n
    return rows


def collate_packed(rows: Sequence[Sequence[Sample]], pad_id: int, max_len: int) -> Batch:
    """Several samples per row; position ids restart at 0 for each sample (and for the padding tail)."""
    n = len(rows)
    ids = torch.full((n, max_len), pad_id, dtype=torch.long)
    labels = torch.full((n, max_len), IGNORE, dtype=torch.long)
    task = torch.full((n, max_len), -1, dtype=torch.long)
    pos = torch.zeros((n, max_len), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            m = len(s.input_ids)
            ids[r, at:at + m] = torch.tensor(s.input_ids)
            labels[r, at:at + m] = torch.tensor(s.labels)
            task[r, at:at + m] = s.task
            pos[r, at:at + m] = torch.arange(m)
            at += m
        pos[r, at:] = torch.arange(max_len - at)
    return Batch(input_ids=ids, labels=labels, task=task, position_ids=pos)


def loss_token_count(batch: Batch) -> int:
    """Number of predicted tokens with a loss (labels shifted by one, as the LM predicts the next token)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


# ------------------------------------------------------------------------------------------------- the source
class TokenSource:
    """Batched random access to (codes, captions, ids) of a token-shard `datasets.Dataset` (selftok.data.shards)."""

    def __init__(self, dataset: Any) -> None:
        if getattr(dataset, "_indices", None) is not None:
            dataset = dataset.flatten_indices()  # once, not per batch
        self.dataset = dataset
        self._table = dataset.data.table

    def __len__(self) -> int:
        return self._table.num_rows

    def rows(self, indices: Sequence[int]) -> tuple[np.ndarray, list[list[str]], list[str]]:
        """(n, K) int64 codes (AR order), the non-empty captions and the ids of the given rows."""
        take = pa.array(np.asarray(indices, dtype=np.int64))
        captions = [[c for c in (row or []) if c and c.strip()]
                    for row in self._table.column("captions").take(take).to_pylist()]
        ids = self._table.column("id").take(take).to_pylist()
        return read_tokens(self.dataset, indices).astype(np.int64), captions, ids


# ------------------------------------------------------------------------------------------------- the stream
@dataclasses.dataclass(frozen=True)
class EpochPlan:
    perm: np.ndarray     # (N,) image index per slot
    task: np.ndarray     # (N,) task per slot
    drop: np.ndarray     # (N,) bool, condition dropout for t2i
    pick: np.ndarray     # (N,) float in [0, 1), which caption


def epoch_plan(seed: int, epoch: int, n: int, weights: Sequence[float], cond_dropout: float) -> EpochPlan:
    """The deterministic draws of one epoch."""
    rng = np.random.default_rng([seed, epoch])
    p = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return EpochPlan(perm=rng.permutation(n), task=rng.choice(len(p), size=n, p=p),
                     drop=rng.random(n) < cond_dropout, pick=rng.random(n))


class MixedStream:
    """Deterministic, resumable stream of micro-batches for one rank; `position` is its whole state."""

    def __init__(self, source: TokenSource, vocab: Vocabulary, tokenizer: Any, cfg: DataConfig,
                 micro_batch: int, rank: int = 0, world_size: int = 1) -> None:
        if vocab.K + 5 > cfg.max_len:
            raise SampleTooLong(f"max_len {cfg.max_len} cannot hold K={vocab.K} image tokens plus one caption "
                                f"token and the 4 special tokens (needs >= {vocab.K + 5})")
        if len(source) == 0:
            raise ValueError("the token shards hold no samples")
        self.source, self.vocab, self.tokenizer, self.cfg = source, vocab, tokenizer, cfg
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        self.position = 0
        self._plan: tuple[int, EpochPlan] | None = None
        self._encode = functools.lru_cache(maxsize=1 << 16)(lambda text: tuple(encode_caption(tokenizer, text)))

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])

    def samples(self, positions: Sequence[int]) -> list[Sample]:
        """The samples at global positions (a pure function of the config, the shards and the positions)."""
        n = len(self.source)
        slots = []
        for position in positions:
            epoch, slot = divmod(position, n)
            if self._plan is None or self._plan[0] != epoch:
                weights = (self.cfg.t2i_weight, self.cfg.i2t_weight, self.cfg.text_weight)
                self._plan = (epoch, epoch_plan(self.cfg.seed, epoch, n, weights, self.cfg.cond_dropout))
            plan = self._plan[1]
            slots.append((int(plan.perm[slot]), int(plan.task[slot]), bool(plan.drop[slot]), float(plan.pick[slot])))
        codes, captions, ids = self.source.rows([s[0] for s in slots])
        return [self._build(task, drop, pick, codes[j], captions[j], ids[j])
                for j, (_, task, drop, pick) in enumerate(slots)]

    def _build(self, task: int, drop: bool, pick: float, codes: np.ndarray, captions: list[str],
               sample_id: str) -> Sample:
        caption = None
        if captions:
            k = 0 if self.cfg.caption_choice == "first" else int(pick * len(captions))
            caption = list(self._encode(captions[k])) or None
        try:
            if task == I2T and caption is not None:
                return i2t_sample(self.vocab, codes, caption, self.cfg.max_len)
            if task == TEXT and caption is not None:
                return text_sample(self.vocab, caption, self.cfg.max_len)
            # t2i, or a task that needs a caption on an image without one: unconditional t2i
            return t2i_sample(self.vocab, None if (task == T2I and drop) else caption, codes, self.cfg.max_len)
        except VocabularyError as e:
            raise VocabularyError(f"sample {sample_id!r}: {e}") from e

    def next_batch(self) -> tuple[Batch, int]:
        """This rank's rows of the next global micro-batch, and the global number of loss tokens in it."""
        rows_total = self.micro_batch * self.world_size
        mine = slice(self.rank * self.micro_batch, (self.rank + 1) * self.micro_batch)
        if not self.cfg.packing:
            samples = self.samples(range(self.position, self.position + rows_total))
            self.position += rows_total
            full = collate_padded(samples, self.vocab.pad_id, self.cfg.pad_multiple)
            return _rows(full, mine), loss_token_count(full)
        pending: list[Sample] = []
        while True:  # grow the look-ahead until the rows are full (or a sample does not fit any more)
            start = self.position + len(pending)
            pending += self.samples(range(start, start + rows_total))
            rows = pack_rows([len(s.input_ids) for s in pending], rows_total, self.cfg.max_len)
            if sum(len(r) for r in rows) < len(pending):
                break
        rows += [[] for _ in range(rows_total - len(rows))]
        self.position += sum(len(r) for r in rows)
        full = collate_packed([[pending[j] for j in r] for r in rows], self.vocab.pad_id, self.cfg.max_len)
        return _rows(full, mine), loss_token_count(full)


def _rows(batch: Batch, rows: slice) -> Batch:
    return Batch({k: v[rows] for k, v in batch.items()})
