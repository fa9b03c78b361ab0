"""The cosine-similarity vector quantizer (official EMA ``VectorQuantize`` with a ``CosineSimCodebook``).

Eval path (implemented here): ``project_in`` (Linear q→d), l2-normalise (eps 1e-12), dot product with the
stored unit-norm codebook ``embed`` (not renormalised), argmax (first maximum wins) → ids; the code vector is
the raw codebook row → ``project_out`` (Identity when d equals the output width) → ``post_norm``
(LayerNorm with affine, eps 1e-6; the official ``encoder.final_layer_norm3``). The whole lookup runs in an
explicit float32 island with autocast disabled, so bf16 autocast does not change token ids; the similarity
matrix is built in row chunks and no one-hot over the codebook is ever formed.

Training path (train mode; official TRN ``VectorQuantize`` with ``ema_update``, ``kmeans_init``,
``smart_react``; docs/tokenizer.md):
* straight-through ``q_st = u + mix·sg(q − u)`` — `mix` ramps from 0 (continuous: codes bypassed, nothing
  changes) to 1 (fully quantized); commitment ``mean (sg(q) − u)²``;
* k-means initialisation (10 spherical iterations) on the first quantized batch, gathered from all ranks;
* EMA codebook: counts and sums with decay 0.99 (all-reduced), Laplace-smoothed counts, unit-normalised means;
  the step's output uses the codebook from before the update;
* per-position code statistics ``timestep_p_over_c`` (first update with decay 0.3);
* dead-code re-seeding ("smart react"): a code whose EMA count falls below ``dead_code_threshold`` × uniform
  usage is replaced by an encoder output of this step, drawn preferably from collapsed (low-perplexity)
  positions, with count ``reset_cluster_size`` × uniform usage;
* diversity loss (TRN): ``−w_div·H(mean_tokens softmax(10·sim))`` while the codebook perplexity is below 60 %
  of C.
Every random draw comes from a generator seeded by (`seed`, the ``steps`` buffer), and every statistic is
all-reduced (or gathered) over ranks first, so all ranks hold the same codebook without broadcasting it.
The state lives in the buffers below, under the official names, so official checkpoints load into it and can
continue training: ``codebook.{initted, cluster_size, cluster_size_wo_react, embed_avg, timestep_p_over_c,
tpc_initted, embed}`` and ``{continuous, steps, count}``. Eval mode never changes any of them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from selftok.model.layers import LN_EPS


def fp32_island(device: torch.device):
    """A context with autocast disabled on `device` (no-op for devices without autocast, e.g. meta)."""
    if device.type in ("cpu", "cuda", "xpu", "mps", "hpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


#: Upper bound on the elements of one similarity chunk (rows × codebook size) in the lookup.
_SIM_CHUNK_ELEMENTS = 1 << 24


@dataclass
class QuantizerConfig:
    """Cosine-similarity VQ. Defaults: the released 256-px tokenizer (``quantizer_config``)."""

    codebook_size: int = 32768
    """Number of codes C."""
    code_dim: int = 16
    """Width d of the unit-norm codes."""
    output_dim: int | None = None
    """Width of the code vectors handed to the decoder (official ``encoder_hidden_size``); None = code_dim,
    in which case ``project_out`` is the identity."""
    post_norm: bool = True
    """Apply the affine LayerNorm to the code vectors (official ``post_norm``; False only for FSQ configs)."""
    smart_react: bool = True
    """Keep per-position code statistics (``timestep_p_over_c``) for position-aware dead-code re-seeding."""
    decay: float = 0.99
    """Training: EMA decay of the codebook, counts and per-position statistics."""
    w_commit: float = 1.0
    """Training: commitment-loss weight."""
    w_diversity: float = 1.0
    """Training: diversity (entropy) loss weight."""
    dead_code_threshold: float = 0.2
    """Training: a code is dead below this fraction of uniform usage."""
    reset_cluster_size: float = 0.2
    """Training: relative count given to a re-seeded code."""
    ema_entropy_ratio: float = 0.8
    """Training: EMA mix of the per-position statistics in the diversity loss."""
    reg: tuple[float, float] = (0.1, 0.3)
    """Training: perplexity-fraction band of the diversity weight."""
    kmeans_iters: int = 10
    """Training: spherical k-means iterations of the codebook initialisation."""
    react_every: int = 1
    """Training: look for dead codes every this many quantized steps (official: every step)."""

    def __post_init__(self) -> None:
        if self.codebook_size < 1 or self.code_dim < 1:
            raise ValueError(f"quantizer.codebook_size and code_dim must be positive, got "
                             f"{self.codebook_size}, {self.code_dim}")
        if self.output_dim is not None and self.output_dim < 1:
            raise ValueError(f"quantizer.output_dim must be positive or null, got {self.output_dim}")
        if self.react_every < 1 or not 0 < self.decay < 1:
            raise ValueError(f"quantizer.react_every must be >= 1 and decay in (0, 1), got "
                             f"{self.react_every}, {self.decay}")

    @property
    def vector_dim(self) -> int:
        """Width of the code vectors the decoder receives."""
        return self.output_dim or self.code_dim


class QuantizerOutput(NamedTuple):
    vectors: Tensor   # (B, K, D) post-normed code vectors (decoder context), float32
    indices: Tensor   # (B, K) int64 codebook ids, encoder order
    loss: Tensor      # () quantizer loss (zero in eval)
    metrics: dict     # str -> float, logged statistics (empty in eval)


# ------------------------------------------------------------------------------------------------ training math
def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) of probability vectors along `dim` (0·log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(1e-12))).sum(dim)


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of a count histogram (C,): 1 for one code, C for uniform use."""
    return torch.exp(entropy(counts / counts.sum().clamp_min(1e-12)))


def laplace_smoothed_counts(counts: Tensor, eps: float = 1e-5) -> Tensor:
    """``(N_c + eps) / (ΣN + C·eps) · ΣN``: the total is kept and no count is zero (official smoothing)."""
    total = counts.sum(-1, keepdim=True)
    return (counts + eps) / (total + counts.shape[-1] * eps) * total


def spherical_kmeans(x: Tensor, num_clusters: int, iters: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Spherical k-means on unit vectors x (M, d). Initial means are data points (drawn without replacement,
    with replacement when M < C); assignment by the largest dot product; empty clusters keep their mean.
    Returns (means (C, d) unit vectors, counts (C,) of the last assignment)."""
    M = x.shape[0]
    if M >= num_clusters:
        idx = torch.randperm(M, generator=generator)[:num_clusters]
    else:
        idx = torch.randint(0, M, (num_clusters,), generator=generator)
    means = x[idx.to(x.device)].clone()
    counts = torch.zeros(num_clusters, device=x.device)
    for _ in range(iters):
        assign = (x @ means.T).argmax(-1)
        counts = torch.bincount(assign, minlength=num_clusters).float()
        sums = torch.zeros_like(means).index_add_(0, assign, x)
        means = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), means)
    return means, counts


def position_weights(position_probs: Tensor) -> Tensor:
    """Smart re-activation weights of the K token positions: ``softmax_k(10·(1/ppl_k) / max_j(1/ppl_j))``
    with ``ppl_k = exp(H(P[k]))``; collapsed (low-perplexity) positions get most weight. (K, C) → (K,)."""
    inv = torch.exp(-entropy(position_probs))
    return torch.softmax(10.0 * inv / inv.max(), dim=0)


def feature_spread(unit: Tensor) -> float:
    """``1 − mean_k ‖mean_b u[b, k]‖`` of unit inputs (B, K, d): 0 when every image gives the same vector at
    each position (an encoder that ignores the image — a collapse codebook statistics do not show)."""
    return float(1 - unit.mean(0).norm(dim=-1).mean())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_all(x: Tensor) -> Tensor:
    """Concatenate `x` over ranks along dim 0, in rank order (identity on a single process)."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum `x` over ranks in place (identity on a single process)."""
    if _distributed():
        dist.all_reduce(x)
    return x


class Codebook(nn.Module):
    """Codebook state (official ``_codebook``): unit-norm codes plus the training statistics."""

    def __init__(self, codebook_size: int, code_dim: int, num_tokens: int, smart_react: bool):
        super().__init__()
        C, d = codebook_size, code_dim
        self.register_buffer("initted", torch.zeros(1))  # 0: the training path runs k-means first
        self.register_buffer("cluster_size", torch.zeros(1, C))
        self.register_buffer("cluster_size_wo_react", torch.zeros(1, C))
        self.register_buffer("embed_avg", torch.zeros(1, C, d))
        if smart_react:
            self.register_buffer("timestep_p_over_c", torch.full((1, num_tokens, C), 1.0 / C))
            self.register_buffer("tpc_initted", torch.zeros(1))
        # random unit codes so that an untrained model is usable; k-means replaces them in training
        self.register_buffer("embed", F.normalize(torch.randn(1, C, d), dim=-1))


class CosineQuantizer(nn.Module):
    """Query features (B, K, q) → code ids (B, K) and code vectors (B, K, D)."""

    def __init__(self, cfg: QuantizerConfig, input_dim: int, num_tokens: int):
        super().__init__()
        self.cfg = cfg
        self.codebook_size = cfg.codebook_size
        self.register_buffer("continuous", torch.zeros(1))
        self.register_buffer("steps", torch.zeros(1))
        self.register_buffer("count", torch.zeros(1, cfg.codebook_size))
        self.project_in = nn.Linear(input_dim, cfg.code_dim)
        nn.init.xavier_uniform_(self.project_in.weight)
        nn.init.zeros_(self.project_in.bias)
        out = cfg.vector_dim
        self.project_out = nn.Linear(cfg.code_dim, out) if out != cfg.code_dim else nn.Identity()
        self.post_norm = nn.LayerNorm(out, eps=LN_EPS) if cfg.post_norm else nn.Identity()
        self.codebook = Codebook(cfg.codebook_size, cfg.code_dim, num_tokens, cfg.smart_react)

    def normalized_inputs(self, features: Tensor) -> Tensor:
        """``l2norm(project_in(features))`` in float32: (B, K, q) → (B, K, d)."""
        with fp32_island(features.device):
            z = F.linear(features.float(), self.project_in.weight.float(), self.project_in.bias.float())
            return F.normalize(z, p=2, dim=-1)

    def lookup(self, unit: Tensor) -> Tensor:
        """Nearest code by cosine similarity: (B, K, d) float32 unit vectors → (B, K) int64 ids.

        Row-chunked so that no (B·K, C) similarity matrix is held at once."""
        embed = self.codebook.embed[0].float()  # (C, d)
        flat = unit.reshape(-1, unit.shape[-1])
        chunk = max(1, _SIM_CHUNK_ELEMENTS // embed.shape[0])
        with fp32_island(unit.device):
            ids = [(rows @ embed.T).argmax(dim=-1) for rows in flat.split(chunk)]
        return torch.cat(ids).reshape(unit.shape[:-1])

    def check_indices(self, indices: Tensor) -> None:
        """Raise a ValueError naming the problem for ids that are not integers in [0, C)."""
        if indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.is_complex():
            raise ValueError(f"code ids must be an integer tensor, got {indices.dtype}")
        if indices.numel():
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(f"code ids must lie in [0, {self.codebook_size}) (the codebook size); "
                                 f"got values from {lo} to {hi}")

    def codes_to_vectors(self, indices: Tensor) -> Tensor:
        """Code ids (B, K) → post-normed code vectors (B, K, D), float32 (official decode path)."""
        self.check_indices(indices)
        with fp32_island(indices.device):
            codes = self.codebook.embed[0].float()[indices.long()]
            return self.vectors_from_codes(codes)

    def vectors_from_codes(self, codes: Tensor) -> Tensor:
        """Raw (unit) codebook rows (B, K, d) → decoder vectors (B, K, D) via project_out and post_norm, fp32."""
        with fp32_island(codes.device):
            out = self.project_out
            if isinstance(out, nn.Linear):
                codes = F.linear(codes, out.weight.float(), out.bias.float())
            norm = self.post_norm
            if isinstance(norm, nn.LayerNorm):
                codes = F.layer_norm(codes, norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)
            return codes

    def forward(self, features: Tensor, mix: float = 1.0, seed: int = 0) -> QuantizerOutput:
        """features: (B, K, q) encoder output → QuantizerOutput.

        Eval mode: nearest codes, no buffer touched (`mix`, `seed` ignored). Train mode: the training path
        (module docstring); `mix` ∈ [0, 1] scales the straight-through offset (0 = continuous, nothing
        changes), `seed` keys the random draws of k-means and re-seeding (with the ``steps`` buffer)."""
        if self.training:
            return self._train_forward(features, mix, seed)
        indices = self.lookup(self.normalized_inputs(features))
        vectors = self.vectors_from_codes(self.codebook.embed[0].float()[indices])
        return QuantizerOutput(vectors, indices, features.new_zeros(()), {})

    # ------------------------------------------------------------------------------------------ training
    def _train_forward(self, features: Tensor, mix: float, seed: int) -> QuantizerOutput:
        cfg, cb = self.cfg, self.codebook
        u = self.normalized_inputs(features)  # (B, K, d) float32
        B, K, d = u.shape
        spread = feature_spread(u.detach())
        if mix <= 0:
            return QuantizerOutput(self.vectors_from_codes(u), self.lookup(u.detach()), u.new_zeros(()),
                                   {"mix": 0.0, "feature_spread": spread})
        gen = torch.Generator().manual_seed(seed * 1_000_003 + int(self.steps.item()))
        with torch.no_grad():
            gathered = gather_all(u.detach())  # (W·B, K, d), the same on every rank
        if not bool(cb.initted.item()):
            self._init_codebook(gathered.reshape(-1, d), gen)
        with fp32_island(u.device):
            embed = cb.embed[0].clone()  # the EMA update below changes the buffer in place
            flat = u.reshape(-1, d)
            sim = flat @ embed.T  # (B·K, C)
            idx = sim.argmax(-1)
            codes = embed[idx]
            out = flat + mix * (codes - flat).detach()
            commit = (codes.detach() - flat).pow(2).mean()
            h_batch = entropy(torch.softmax(10.0 * sim, dim=-1).mean(0))
            diversity_on = float(perplexity(cb.cluster_size_wo_react[0]) < 0.6 * cfg.codebook_size)
            loss = cfg.w_commit * commit - cfg.w_diversity * diversity_on * h_batch
        metrics = self._ema_update(flat.detach(), idx.view(B, K), gathered, gen)
        metrics.update(mix=mix, feature_spread=spread, commit_loss=commit.item(),
                       diversity_entropy=h_batch.item(), cosine_sim=(codes * flat).sum(-1).mean().item())
        self.steps += 1
        return QuantizerOutput(self.vectors_from_codes(out.view(B, K, d)), idx.view(B, K), loss, metrics)

    @torch.no_grad()
    def _init_codebook(self, x: Tensor, gen: torch.Generator) -> None:
        cb = self.codebook
        means, counts = spherical_kmeans(x, self.cfg.codebook_size, self.cfg.kmeans_iters, gen)
        cb.embed[0].copy_(means)
        cb.embed_avg[0].copy_(means * counts[:, None])
        cb.cluster_size[0].copy_(counts)
        cb.cluster_size_wo_react[0].copy_(counts)
        cb.initted.fill_(1)

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, idx: Tensor, gathered: Tensor, gen: torch.Generator) -> dict[str, float]:
        """EMA counts/sums (all-reduced), new unit codes, per-position statistics, dead-code re-seeding."""
        cfg, cb = self.cfg, self.codebook
        C, decay = cfg.codebook_size, cfg.decay
        B, K = idx.shape
        world = dist.get_world_size() if _distributed() else 1
        bins = all_reduce_sum(torch.bincount(idx.reshape(-1), minlength=C).float())
        sums = all_reduce_sum(torch.zeros(C, flat.shape[-1], device=flat.device).index_add_(0, idx.reshape(-1), flat))
        old = cb.embed[0].clone()
        cb.cluster_size[0].mul_(decay).add_(bins, alpha=1 - decay)
        cb.cluster_size_wo_react[0].mul_(decay).add_(bins, alpha=1 - decay)
        cb.embed_avg[0].mul_(decay).add_(sums, alpha=1 - decay)
        cb.embed[0].copy_(F.normalize(cb.embed_avg[0] / laplace_smoothed_counts(cb.cluster_size[0])[:, None], dim=-1))
        self.count[0].add_(bins)
        if cfg.smart_react:
            hits = torch.zeros(K, C, device=flat.device).scatter_add_(1, idx.T, torch.ones(K, B, device=flat.device))
            hits = all_reduce_sum(hits) / (B * world)
            d = 0.3 if not bool(cb.tpc_initted.item()) else decay
            cb.timestep_p_over_c[0].mul_(d).add_(hits, alpha=1 - d)
            cb.tpc_initted.fill_(1)
        uniform = B * K * world / C  # EMA count of a code under uniform use
        n_react = self._reactivate(gathered, uniform, gen) if int(self.steps.item()) % cfg.react_every == 0 else 0
        wo = cb.cluster_size_wo_react[0]
        return {"perplexity": perplexity(wo).item(),
                "n_active": int((wo / uniform > cfg.dead_code_threshold).sum()), "n_reactive": n_react,
                "position_perplexity": (torch.exp(entropy(cb.timestep_p_over_c[0])).mean().item()
                                        if cfg.smart_react else float("nan")),
                "delta_embed": (cb.embed[0] - old).pow(2).sum().item()}

    @torch.no_grad()
    def _reactivate(self, gathered: Tensor, uniform: float, gen: torch.Generator) -> int:
        """Replace dead codes by this step's encoder outputs (all ranks), preferring collapsed positions."""
        cfg, cb = self.cfg, self.codebook
        dead = (cb.cluster_size[0] < cfg.dead_code_threshold * uniform).nonzero().squeeze(1)
        n = dead.numel()
        if n == 0:
            return 0
        rows, K = gathered.shape[:2]
        if cfg.smart_react:
            weights = position_weights(cb.timestep_p_over_c[0].float()).cpu()
            pos = torch.multinomial(weights, n, replacement=True, generator=gen)
        else:
            pos = torch.randint(0, K, (n,), generator=gen)
        row = torch.randint(0, rows, (n,), generator=gen)
        samples = F.normalize(gathered[row.to(gathered.device), pos.to(gathered.device)], dim=-1)
        reset = cfg.reset_cluster_size * uniform
        cb.embed[0, dead] = samples
        cb.embed_avg[0, dead] = samples * reset
        cb.cluster_size[0, dead] = reset
        return n
