"""The sampling policy's pure math: validation, CFG mix and schedule, masks, top-k/top-p, the sampler draw."""
from __future__ import annotations

import math

import pytest
import torch

from selftok.runtime.config import ConfigError, from_dict
from vlm.sampling import (
    SamplingPolicy,
    cfg_mix,
    cfg_scales,
    gather_logprobs,
    mask_logits,
    policy_logprobs,
    sample_from_logprobs,
    top_k_filter,
    top_p_filter,
)


@pytest.mark.parametrize("kwargs, setting", [
    ({"cfg_scale": -0.5}, "cfg_scale"),
    ({"cfg_scale": float("nan")}, "cfg_scale"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"cfg_schedule": "linear"}, "cfg_scale_end"),
    ({"cfg_schedule": "cosine", "cfg_scale_end": -2.0}, "cfg_scale_end"),
    ({"vocabulary": "pixels"}, "vocabulary"),
])
def test_invalid_settings_name_the_setting(kwargs, setting):
    with pytest.raises(ValueError, match=setting):
        SamplingPolicy(**kwargs)


def test_policy_loads_from_a_config_mapping_and_errors_name_the_key():
    policy = from_dict(SamplingPolicy, {"cfg_scale": 2, "top_p": 0.9, "cfg_schedule": "linear", "cfg_scale_end": 1})
    assert policy.cfg_scale == 2.0 and policy.top_p == 0.9 and policy.guided
    with pytest.raises(ConfigError, match="top_p"):
        from_dict(SamplingPolicy, {"top_p": 2.0})
    assert SamplingPolicy(top_p=1.0, cfg_scale=0.0).guided  # the edges of the valid ranges are accepted
    assert not SamplingPolicy(cfg_scale=1.0).guided


def test_cfg_mix_is_linear_extrapolation():
    cond, uncond = torch.tensor([[1.0, 3.0, -2.0]]), torch.tensor([[0.5, -1.0, 2.0]])
    assert torch.equal(cfg_mix(cond, uncond, 0.0), uncond)
    assert torch.allclose(cfg_mix(cond, uncond, 1.0), cond)
    # scale 2: u + 2 (c - u) = 2c - u
    assert torch.allclose(cfg_mix(cond, uncond, 2.0), 2 * cond - uncond)
    per_row = cfg_mix(cond.repeat(2, 1), uncond.repeat(2, 1), torch.tensor([0.0, 2.0]))
    assert torch.allclose(per_row, torch.cat([uncond, 2 * cond - uncond]))


def test_cfg_scale_one_equals_conditional_log_softmax_exactly():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(4, 50, generator=g), torch.randn(4, 50, generator=g) * 5
    logp = policy_logprobs(cond, uncond, SamplingPolicy(cfg_scale=1.0), 0, 1, None)
    assert torch.equal(logp, cond.log_softmax(-1))
    # and guidance does change the distribution (the comparison above can fail)
    guided = policy_logprobs(cond, uncond, SamplingPolicy(cfg_scale=3.0), 0, 1, None)
    assert not torch.allclose(guided, logp, atol=1e-3)
    assert torch.allclose(guided, (uncond + 3 * (cond - uncond)).log_softmax(-1), atol=1e-5)


def test_guided_policy_without_uncond_logits_is_refused():
    with pytest.raises(ValueError, match="unconditional"):
        policy_logprobs(torch.zeros(1, 4), None, SamplingPolicy(cfg_scale=2.0), 0, 1, None)


def test_cfg_schedules():
    pos = torch.arange(5)
    lin = cfg_scales(SamplingPolicy(cfg_scale=3.0, cfg_schedule="linear", cfg_scale_end=1.0), pos, 5)
    assert torch.allclose(lin, torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0]))
    cos = cfg_scales(SamplingPolicy(cfg_scale=1.0, cfg_schedule="cosine", cfg_scale_end=5.0), pos, 5)
    # 1 + 4 * (1 - cos(pi * i / 4)) / 2
    expected = torch.tensor([1 + 4 * (1 - math.cos(math.pi * i / 4)) / 2 for i in range(5)])
    assert torch.allclose(cos, expected, atol=1e-6)
    const = cfg_scales(SamplingPolicy(cfg_scale=2.0, cfg_scale_end=9.0), pos, 5)
    assert torch.equal(const, torch.full((5,), 2.0))


def test_position_tensor_matches_per_position_calls():
    """What RL computes over a whole (B, K, V) block equals what the sampler computed step by step."""
    g = torch.Generator().manual_seed(1)
    B, K, V = 2, 6, 40
    cond, uncond = torch.randn(B, K, V, generator=g), torch.randn(B, K, V, generator=g)
    allowed = torch.arange(V) >= 10
    policy = SamplingPolicy(cfg_scale=4.0, cfg_schedule="linear", cfg_scale_end=1.0, temperature=0.7,
                            top_k=12, top_p=0.8)
    block = policy_logprobs(cond, uncond, policy, torch.arange(K), K, allowed)
    for k in range(K):
        step = policy_logprobs(cond[:, k], uncond[:, k], policy, k, K, allowed)
        assert torch.equal(block[:, k], step)
    # the last position has scale exactly 1: conditional only
    last = policy_logprobs(cond[:, -1], None, SamplingPolicy(temperature=0.7, top_k=12, top_p=0.8, cfg_scale=1.0),
                           0, 1, allowed)
    assert torch.equal(block[:, -1], last)


def test_mask_renormalises_over_allowed_ids():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    allowed = torch.tensor([False, True, True, False])
    assert torch.isinf(mask_logits(logits, allowed)[0, [0, 3]]).all()
    logp = policy_logprobs(logits, None, SamplingPolicy(cfg_scale=1.0), 0, 1, allowed)
    expected = torch.tensor([1.0, 0.0]).log_softmax(-1)
    assert torch.allclose(logp[0, 1:3], expected) and torch.isneginf(logp[0, [0, 3]]).all()


def test_temperature_divides_logits():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    logp = policy_logprobs(logits, None, SamplingPolicy(cfg_scale=1.0, temperature=0.5), 0, 1, None)
    assert torch.allclose(logp, (logits / 0.5).log_softmax(-1))


def test_top_k_keeps_k_largest():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 100, generator=g)
    kept = top_k_filter(logits, 7)
    assert (torch.isfinite(kept).sum(-1) == 7).all()
    assert torch.equal(torch.isfinite(kept), logits >= logits.topk(7, -1).values[:, -1:])
    assert torch.equal(top_k_filter(logits, 0), logits)
    greedy = policy_logprobs(logits, None, SamplingPolicy(cfg_scale=1.0, top_k=1), 0, 1, None)
    assert torch.equal(greedy.argmax(-1), logits.argmax(-1)) and torch.allclose(greedy.max(-1).values, torch.zeros(3))


@pytest.mark.parametrize("p, kept", [(0.4, 1), (0.75, 2), (0.79, 2), (0.81, 3), (0.96, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_nucleus(p, kept):
    probs = torch.tensor([0.15, 0.5, 0.05, 0.3])  # sorted: 0.5, 0.3, 0.15, 0.05 (cumulative 0.5 0.8 0.95 1.0)
    logits = probs.log().unsqueeze(0)
    out = top_p_filter(logits, p)
    assert int(torch.isfinite(out).sum()) == kept
    order = probs.argsort(descending=True)
    assert torch.isfinite(out[0, order[:kept]]).all()
    logp = policy_logprobs(logits, None, SamplingPolicy(cfg_scale=1.0, top_p=p), 0, 1, None)
    top = probs[order[:kept]]
    assert torch.allclose(logp[0, order[:kept]].exp(), top / top.sum(), atol=1e-6)


def test_sampler_respects_support_and_distribution():
    logp = torch.tensor([0.6, 0.3, 0.1, 0.0]).log().unsqueeze(0)
    gen = torch.Generator().manual_seed(3)
    draws = torch.stack([sample_from_logprobs(logp, [gen]) for _ in range(6000)]).flatten()
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert freq[3] == 0  # zero-probability id never drawn
    assert torch.allclose(freq[:3], torch.tensor([0.6, 0.3, 0.1]), atol=0.025)


def test_sampler_rows_are_independent_of_batch_composition():
    g = torch.Generator().manual_seed(4)
    logp = torch.randn(5, 30, generator=g).log_softmax(-1)
    seeds = [11, 12, 13, 14, 15]
    together = sample_from_logprobs(logp, [torch.Generator().manual_seed(s) for s in seeds])
    for b, s in enumerate(seeds):
        alone = sample_from_logprobs(logp[b:b + 1], [torch.Generator().manual_seed(s)])
        assert alone.item() == together[b].item()
    with pytest.raises(ValueError, match="generator"):
        sample_from_logprobs(logp, [torch.Generator()])


def test_gather_logprobs():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    assert torch.equal(gather_logprobs(logp, torch.tensor([1, 0])), torch.tensor([-2.0, -3.0]))
