"""Analytic tests of the GRPO core math (rl/grpo.py)."""
import math

import pytest
import torch

from rl.grpo import clipped_surrogate, entropy_estimate, group_advantages, grpo_loss, k3_kl, valid_rewards


def test_advantages_hand_made_groups():
    # group 1: {0, 1}: mean 0.5, population std 0.5 -> {-1, +1}
    # group 2: {1, 2, 3, 6}: mean 3, deviations {-2, -1, 0, 3}, var (4+1+0+9)/4 = 3.5
    r = torch.tensor([0.0, 1.0, 1.0, 2.0, 3.0, 6.0])
    a = group_advantages(r[:2], 2, eps=0.0)
    assert torch.allclose(a, torch.tensor([-1.0, 1.0]))
    b = group_advantages(r[2:], 4, eps=0.0)
    s = math.sqrt(3.5)
    assert torch.allclose(b, torch.tensor([-2 / s, -1 / s, 0.0, 3 / s]))
    # a group's advantages are centred with unit (population) variance
    assert abs(float(b.mean())) < 1e-6 and abs(float(b.pow(2).mean()) - 1.0) < 1e-5


def test_advantages_scale_none_and_batch():
    r = torch.tensor([0.0, 1.0, 2.0, 4.0])
    assert torch.allclose(group_advantages(r, 2, scale="none"), torch.tensor([-0.5, 0.5, -1.0, 1.0]))
    batch_std = r.std(unbiased=False)  # of all rewards: values {0,1,2,4}, mean 1.75
    got = group_advantages(r, 2, scale="batch", eps=0.0)
    assert torch.allclose(got, torch.tensor([-0.5, 0.5, -1.0, 1.0]) / batch_std)


def test_identical_rewards_zero_advantage_no_nan():
    r = torch.tensor([0.7, 0.7, 0.7, 0.7, 0.0, 0.0])
    for scale in ("group", "batch", "none"):
        a = group_advantages(r, 2, scale=scale)
        assert torch.equal(a, torch.zeros(6)), scale
    # the whole batch identical: batch std 0
    a = group_advantages(torch.ones(4), 4, scale="batch")
    assert torch.equal(a, torch.zeros(4))


def test_nonfinite_rewards_dropped_from_group_stats():
    r = torch.tensor([0.0, float("nan"), 1.0, float("inf"), 5.0, 5.0])
    valid = valid_rewards(r)
    assert valid.tolist() == [True, False, True, False, True, True]
    a = group_advantages(r, 3, eps=0.0)
    # group 1: valid {0, 1} -> {-1, +1}, NaN sample 0; group 2: inf dropped, {5, 5} identical -> 0
    assert torch.allclose(a, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    assert torch.isfinite(a).all()
    # fewer than two valid samples in a group: no signal, advantage 0
    a = group_advantages(torch.tensor([float("nan"), 3.0, 1.0, 2.0]), 2)
    assert a[:2].tolist() == [0.0, 0.0] and a[2] < 0 < a[3]


def test_group_size_and_shape_errors():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="divisible"):
        group_advantages(torch.zeros(5), 2)


def test_clipped_surrogate_hand_made_ratios():
    # ratios 0.5, 1.0, 1.5 with eps 0.2: clip range [0.8, 1.2]
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[0.5, 1.0, 1.5]]))
    # positive advantage: min(r A, clip(r) A) = {0.5, 1.0, 1.2} * A
    loss, ratio, clipped = clipped_surrogate(logp, old, torch.tensor([2.0]), 0.2, 0.2)
    assert torch.allclose(ratio, torch.tensor([[0.5, 1.0, 1.5]]))
    assert torch.allclose(loss, -2.0 * torch.tensor([[0.5, 1.0, 1.2]]))
    assert clipped.tolist() == [[False, False, True]]
    # negative advantage: min(r A, clip(r) A) = max(r, clip r) * A = {0.8, 1.0, 1.5} * A
    loss, _, clipped = clipped_surrogate(logp, old, torch.tensor([-1.0]), 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[0.8, 1.0, 1.5]]))
    assert clipped.tolist() == [[True, False, False]]
    # asymmetric clip (eps_high 0.6): ratio 1.5 is inside [0.8, 1.6]
    loss, _, clipped = clipped_surrogate(logp, old, torch.tensor([1.0]), 0.2, 0.6)
    assert torch.allclose(loss, -torch.tensor([[0.5, 1.0, 1.5]])) and not clipped.any()


def test_clipped_tokens_have_zero_gradient():
    logp = torch.log(torch.tensor([[0.5, 1.0, 1.5]])).requires_grad_(True)
    loss, _, _ = clipped_surrogate(logp, torch.zeros(1, 3), torch.tensor([1.0]), 0.2, 0.2)
    loss.sum().backward()
    # d(-r A)/dlogp = -r A for unclipped tokens; 0 for the clipped one
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, -1.0, 0.0]]))


def test_kl_zero_and_ratio_one_when_policy_equals_reference():
    torch.manual_seed(0)
    logp = torch.randn(4, 5).log_softmax(-1).requires_grad_(True)
    assert torch.equal(k3_kl(logp, logp.detach()), torch.zeros(4, 5))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    mask = torch.ones(4, 5, dtype=torch.bool)
    out = grpo_loss(logp, logp.detach(), adv, mask, torch.ones(4, dtype=torch.bool), ref_logp=logp.detach(),
                    beta=0.1)
    assert float(out.kl) == 0.0 and float(out.ratio) == 1.0 and float(out.clip_fraction) == 0.0
    # at ratio 1 the loss is -mean(A) and its gradient per token is -A / (T * N)
    assert torch.allclose(out.loss, -adv.mean())
    out.loss.backward()
    assert torch.allclose(logp.grad, (-adv / (5 * 4)).unsqueeze(-1).expand(4, 5))


def test_k3_kl_values():
    # k3 = e^d - d - 1 with d = ref - logp; d = log 2 -> 2 - log 2 - 1
    kl = k3_kl(torch.tensor([0.0]), torch.tensor([math.log(2.0)]))
    assert torch.allclose(kl, torch.tensor([1.0 - math.log(2.0)]))
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()
    # unbiased: E_{x~p}[k3] = KL(p||q) for categorical p, q
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    exact = (p * (p / q).log()).sum()
    est = (p * k3_kl(p.log(), q.log())).sum()
    assert torch.allclose(est, exact, atol=1e-6)


def test_grpo_loss_drops_invalid_and_accumulates():
    torch.manual_seed(1)
    logp = torch.randn(4, 3).requires_grad_(True)
    old = logp.detach() + 0.05 * torch.randn(4, 3)
    adv = torch.tensor([1.0, -1.0, float("nan"), 0.3])
    valid = torch.tensor([True, True, False, True])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    out = grpo_loss(logp, old, torch.where(valid, adv, 0.0), mask, valid)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.equal(logp.grad[2], torch.zeros(3))            # dropped sample: no gradient
    assert torch.equal(logp.grad[1, 2], torch.tensor(0.0))       # masked token: no gradient
    full_grad = logp.grad.clone()
    # two micro-batches normalised by the whole mini-batch's valid count give the same gradient
    logp.grad = None
    a0 = torch.where(valid, adv, 0.0)
    for sl in (slice(0, 2), slice(2, 4)):
        grpo_loss(logp[sl], old[sl], a0[sl], mask[sl], valid[sl], num_sequences=3).loss.backward()
    assert torch.allclose(logp.grad, full_grad, atol=1e-7)


def test_entropy_estimate_is_unbiased():
    # E_x[-log p(x)] over the exact distribution equals the entropy
    p = torch.tensor([0.5, 0.25, 0.25])
    torch.manual_seed(0)
    x = torch.multinomial(p, 200_000, replacement=True)
    est = entropy_estimate(p.log()[x].view(1, -1), torch.ones(1, x.numel(), dtype=torch.bool))
    assert abs(float(est) - 1.5 * math.log(2.0)) < 0.01
