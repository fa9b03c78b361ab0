"""Invariants of the quantizer's training path (EMA cosine VQ, k-means init, smart re-activation, losses)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selftok.model.quantizer import (
    CosineQuantizer,
    QuantizerConfig,
    entropy,
    laplace_smoothed_counts,
    position_weights,
    spherical_kmeans,
)


def make_quantizer(C: int = 16, d: int = 4, q: int = 8, K: int = 4, **kw) -> CosineQuantizer:
    torch.manual_seed(0)
    return CosineQuantizer(QuantizerConfig(codebook_size=C, code_dim=d, **kw), input_dim=q, num_tokens=K)


def buffers(q: CosineQuantizer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in q.named_buffers()}


def test_entropy_and_laplace_smoothing_analytic():
    # uniform over 4 → ln 4; one-hot → 0
    assert entropy(torch.full((4,), 0.25)).item() == pytest.approx(math.log(4))
    assert entropy(torch.tensor([1.0, 0.0, 0.0])).item() == pytest.approx(0.0)
    # (N + eps)/(ΣN + C·eps)·ΣN keeps the total and lifts empty codes to a tiny positive count
    n = torch.tensor([3.0, 0.0, 1.0])
    s = laplace_smoothed_counts(n, eps=1e-5)
    assert s.sum().item() == pytest.approx(4.0)
    assert s[1].item() == pytest.approx(1e-5 / (4 + 3e-5) * 4)


def test_spherical_kmeans_fits_the_data():
    torch.manual_seed(0)
    # as many points as clusters: every point becomes its own mean
    pts = F.normalize(torch.randn(8, 4), dim=-1)
    means, counts = spherical_kmeans(pts, 8, iters=5, generator=torch.Generator().manual_seed(1))
    assert torch.allclose((pts @ means.T).max(1).values, torch.ones(8), atol=1e-6) and counts.tolist() == [1.0] * 8
    # separated clusters: the mean cosine to the nearest mean beats the initial (data-point) means
    centres = torch.eye(4)
    x = F.normalize(centres.repeat_interleave(50, 0) + 0.05 * torch.randn(200, 4), dim=-1)
    means, counts = spherical_kmeans(x, 4, iters=10, generator=torch.Generator().manual_seed(1))
    init, _ = spherical_kmeans(x, 4, iters=0, generator=torch.Generator().manual_seed(1))
    assert counts.sum().item() == 200
    assert torch.allclose(means.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert (x @ means.T).max(1).values.mean() >= (x @ init.T).max(1).values.mean()
    # fewer points than clusters: means drawn with replacement, still valid unit vectors
    means, counts = spherical_kmeans(pts[:3], 8, iters=3, generator=torch.Generator().manual_seed(0))
    assert means.shape == (8, 4) and counts.sum().item() == 3


def test_kmeans_init_on_first_quantized_step_only():
    q = make_quantizer().train()
    feats = torch.randn(8, 4, 8)
    assert q.codebook.initted.item() == 0
    q(feats, mix=0.0)                       # continuous phase: nothing initialised, nothing changes
    assert q.codebook.initted.item() == 0
    out = q(feats, mix=1.0, seed=3)
    assert q.codebook.initted.item() == 1
    # k-means means are unit vectors and the codes of this batch are close to its inputs
    assert torch.allclose(q.codebook.embed[0].norm(dim=-1), torch.ones(16), atol=1e-5)
    assert out.metrics["cosine_sim"] > 0.8
    # the counts of the initialisation add up to B·K
    assert q.codebook.cluster_size_wo_react.sum().item() == pytest.approx(32 * 0.99 + 32 * 0.01, rel=1e-5)


def test_ema_update_matches_formula():
    q = make_quantizer(C=4, d=2, q=2, K=1, smart_react=False, dead_code_threshold=0.0).train()
    with torch.no_grad():
        q.project_in.weight.copy_(torch.eye(2))
        q.project_in.bias.zero_()
    q.codebook.initted.fill_(1)
    E = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]), dim=-1)
    q.codebook.embed[0].copy_(E)
    q.codebook.embed_avg[0].copy_(E)
    q.codebook.cluster_size.fill_(1.0)
    q.codebook.cluster_size_wo_react.fill_(1.0)
    x = torch.tensor([[[1.0, 0.2]], [[0.9, -0.1]], [[0.1, 1.0]]])  # two hit code 0, one hits code 1
    out = q(x, mix=1.0)
    assert out.indices.flatten().tolist() == [0, 0, 1]
    u = F.normalize(x.reshape(-1, 2), dim=-1)
    N = 0.99 * torch.ones(4) + 0.01 * torch.tensor([2.0, 1.0, 0.0, 0.0])
    S = 0.99 * E + 0.01 * torch.stack([u[0] + u[1], u[2], torch.zeros(2), torch.zeros(2)])
    Nh = (N + 1e-5) / (N.sum() + 4e-5) * N.sum()
    assert torch.allclose(q.codebook.cluster_size[0], N, atol=1e-6)
    assert torch.allclose(q.codebook.embed[0], F.normalize(S / Nh[:, None], dim=-1), atol=1e-6)
    # the output of this step used the codebook from before the update (code 0 exactly)
    assert torch.allclose(out.vectors[0, 0], q.vectors_from_codes(E[0][None, None])[0, 0], atol=1e-5)


def test_straight_through_and_commitment():
    q = make_quantizer().train()
    feats = torch.randn(8, 4, 8, requires_grad=True)
    q(feats.detach(), mix=1.0)  # initialise
    out = q(feats, mix=1.0)
    u = q.normalized_inputs(feats)
    codes = q.codebook.embed[0][out.indices]
    # commitment = mean squared distance between unit inputs and their codes (= 2 − 2·cos)
    assert out.metrics["commit_loss"] == pytest.approx(float((codes - u.detach()).pow(2).mean()), rel=1e-4)
    # straight-through: gradient flows to the features although the forward value is the code
    out.vectors.sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def test_mix_scales_the_straight_through_offset():
    q = make_quantizer(post_norm=False).train()
    feats = torch.randn(8, 4, 8)
    q(feats, mix=1.0)
    before = buffers(q)
    half = q(feats, mix=0.5)
    u = q.normalized_inputs(feats)
    code = before["codebook.embed"][0][half.indices]
    assert torch.allclose(half.vectors, u + 0.5 * (code - u), atol=1e-5)


def test_dead_codes_reseeded_from_collapsed_positions():
    # position 0 always hits code 0 (collapsed), positions 1-3 spread out: the weights prefer position 0
    P = torch.full((4, 16), 1 / 16)
    P[0] = 0
    P[0, 0] = 1
    w = position_weights(P)
    assert w.argmax().item() == 0 and w[0] > 0.9
    q = make_quantizer().train()
    feats = torch.randn(8, 4, 8)
    q(feats, mix=1.0)
    q.codebook.cluster_size[0, :8] = 0.0      # 8 dead codes
    q.codebook.timestep_p_over_c[0].copy_(P)
    q.codebook.tpc_initted.fill_(1)
    out = q(feats, mix=1.0, seed=0)
    assert out.metrics["n_reactive"] >= 8
    u = q.normalized_inputs(feats)  # (8, 4, d)
    # re-seeded codes are (unit) encoder outputs of this batch, mostly from the collapsed position 0
    reseeded = q.codebook.embed[0, :8]
    sims = torch.einsum("cd,bkd->cbk", reseeded, u)
    best = sims.flatten(1).max(1)
    assert torch.allclose(best.values, torch.ones(8), atol=1e-5)
    positions = best.indices % 4
    assert (positions == 0).float().mean() >= 0.75


def test_eval_forward_has_no_side_effects_and_matches_lookup():
    q = make_quantizer().train()
    feats = torch.randn(8, 4, 8)
    q(feats, mix=1.0)
    q.eval()
    before = buffers(q)
    other = torch.randn(8, 4, 8)
    out = q(other)
    for k, v in q.named_buffers():
        assert torch.equal(v, before[k]), k
    assert out.loss.item() == 0 and out.metrics == {}
    assert torch.equal(out.indices, q.lookup(q.normalized_inputs(other)))


def test_diversity_loss_only_while_perplexity_is_low():
    q = make_quantizer(w_commit=0.0).train()
    feats = torch.randn(8, 4, 8)
    q(feats, mix=1.0)
    q.codebook.cluster_size_wo_react.fill_(1.0)      # uniform usage: perplexity = C ≥ 0.6·C → off
    out = q(feats, mix=1.0)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-7)
    q.codebook.cluster_size_wo_react.zero_()
    q.codebook.cluster_size_wo_react[0, 0] = 10.0     # collapsed: perplexity 1 → −w·H_batch
    out = q(feats, mix=1.0)
    assert out.loss.item() == pytest.approx(-out.metrics["diversity_entropy"], rel=1e-4)
    assert out.metrics["diversity_entropy"] > 0


def test_training_metrics_are_reported():
    q = make_quantizer().train()
    out = q(torch.randn(8, 4, 8), mix=1.0)
    for key in ("perplexity", "n_active", "n_reactive", "position_perplexity", "commit_loss",
                "diversity_entropy", "cosine_sim"):
        assert key in out.metrics and math.isfinite(out.metrics[key]), key
    assert 1 <= out.metrics["perplexity"] <= 16
