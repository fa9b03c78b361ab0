"""The training data stream: a `selftok.data` source, a resumable batch schedule and the bad-input guard.

The batch of global step s is a pure function of (seed, s): epoch e = s // B_e uses the permutation
``randperm(n, seed + e)``, and each rank takes its contiguous slice of the global batch. Resuming at step s
therefore needs no saved sampler state, and the order does not depend on the number of workers.

Unreadable inputs never stop a run: `selftok.data` turns them into rejects, the collate function drops them,
and this module counts them. Only when the rejected fraction exceeds ``max_reject_fraction`` (after at least
``min_inputs_for_check`` inputs) does the run stop, with a message giving the counts by kind and examples.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from selftok.data.sources import DataConfig, ImageBatch, ImageSource, RejectCounter, Sample, make_loader

log = logging.getLogger(__name__)


class TooManyRejectsError(RuntimeError):
    """The fraction of unreadable inputs exceeded the configured threshold."""


@dataclass
class DataStreamConfig:
    """How training batches are drawn from the source."""

    num_workers: int = 0
    """DataLoader worker processes decoding images (0 = in the training process)."""
    cache: bool = False
    """Decode the whole source once into memory (small sources such as the shapes world: every epoch after
    the first costs nothing)."""
    max_reject_fraction: float = 0.05
    """Stop the run when more than this fraction of the inputs seen so far were unreadable."""
    min_inputs_for_check: int = 200
    """Inputs to see before the fraction is checked (a few bad files early on do not stop a run)."""

    def __post_init__(self) -> None:
        if self.num_workers < 0 or self.min_inputs_for_check < 0:
            raise ValueError("stream.num_workers and stream.min_inputs_for_check must be >= 0")
        if not 0 <= self.max_reject_fraction <= 1:
            raise ValueError(f"stream.max_reject_fraction must lie in [0, 1], got {self.max_reject_fraction}")


def batch_indices(step: int, n: int, batch_size: int, rank: int, world_size: int, seed: int) -> list[int]:
    """Source indices of `rank`'s share of global step `step` (epoch-wise seeded permutations, last partial
    global batch of each epoch dropped)."""
    global_batch = batch_size * world_size
    per_epoch = n // global_batch
    if per_epoch < 1:
        raise ValueError(f"the source has {n} items, fewer than one global batch ({batch_size} per process × "
                         f"{world_size} processes = {global_batch}); use a smaller batch or more data")
    epoch, j = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = j * global_batch + rank * batch_size
    return perm[start:start + batch_size].tolist()


class StepBatchSampler(Sampler[list[int]]):
    """Batches of steps [start, stop) for one rank (see `batch_indices`)."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, start: int, stop: int):
        self.args = (n, batch_size, rank, world_size, seed)
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield batch_indices(step, *self.args)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class CachedSource(Dataset):
    """All samples of a source decoded once (in `num_workers` processes) and kept in memory."""

    def __init__(self, source: ImageSource, num_workers: int = 0, batch_size: int = 64):
        self.source = source
        self.samples: list[Sample] = [None] * len(source)  # type: ignore[list-item]
        loader = torch.utils.data.DataLoader(source, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=list)
        for chunk in loader:
            for s in chunk:
                self.samples[s.index] = s
        log.info("cached %d samples of the %s source in memory", len(self.samples), source.cfg.kind)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    @property
    def image_size(self) -> int:
        return self.source.image_size


class RejectGuard:
    """Counts inputs seen and rejected (checkpointed with the run) and enforces the threshold."""

    def __init__(self, max_fraction: float, min_inputs: int):
        self.max_fraction, self.min_inputs = max_fraction, min_inputs
        self.seen = 0
        self.counter = RejectCounter()

    def add(self, batch: ImageBatch) -> None:
        self.seen += len(batch) + len(batch.rejects)
        if batch.rejects:
            self.counter.add(batch.rejects)
            for r in batch.rejects[:3]:
                log.warning("skipped input %s: %s", r.source_id, r.reason)

    @property
    def fraction(self) -> float:
        return self.counter.total / max(self.seen, 1)

    def check(self, seen: int | None = None, rejected: int | None = None) -> None:
        """Raise TooManyRejectsError above the threshold. `seen`/`rejected` override the local counts with
        totals over all ranks (so that every rank stops at the same step)."""
        seen = self.seen if seen is None else seen
        rejected = self.counter.total if rejected is None else rejected
        fraction = rejected / max(seen, 1)
        if seen >= self.min_inputs and fraction > self.max_fraction:
            kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.counter.by_kind.items()))
            examples = "; ".join(f"{r.source_id} ({r.reason})" for r in self.counter.examples[:5])
            raise TooManyRejectsError(
                f"{rejected} of {seen} inputs ({100 * fraction:.1f}%) could not be used, more "
                f"than stream.max_reject_fraction = {100 * self.max_fraction:.1f}%. By kind: {kinds}. Examples: "
                f"{examples}. Fix or remove the bad files, or raise the threshold.")

    def state_dict(self) -> dict:
        return {"seen": self.seen, "by_kind": dict(self.counter.by_kind)}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])
        self.counter.by_kind = {str(k): int(v) for k, v in state["by_kind"].items()}


class DataStream:
    """Training batches of one rank for a range of steps, plus the reject counts (`guard`; the trainer
    calls ``guard.check`` with totals over ranks)."""

    def __init__(self, source: Dataset, cfg: DataStreamConfig, batch_size: int, seed: int, rank: int,
                 world_size: int):
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.source = source
        self.guard = RejectGuard(cfg.max_reject_fraction, cfg.min_inputs_for_check)
        batch_indices(0, len(source), batch_size, rank, world_size, seed)  # fail early on a too-small source

    def batches(self, start: int, stop: int) -> Iterator[ImageBatch]:
        """ImageBatches of steps [start, stop) (rejected inputs dropped, counted, threshold enforced)."""
        sampler = StepBatchSampler(len(self.source), self.batch_size, self.rank, self.world_size, self.seed,
                                   start, stop)
        workers = 0 if isinstance(self.source, CachedSource) else self.cfg.num_workers
        for batch in make_loader(self.source, batch_sampler=sampler, num_workers=workers):
            self.guard.add(batch)
            yield batch


def build_source(data: DataConfig, cfg: DataStreamConfig) -> Dataset:
    """The training source, decoded into memory once when `cfg.cache`."""
    source = ImageSource(data)
    return CachedSource(source, cfg.num_workers) if cfg.cache else source
