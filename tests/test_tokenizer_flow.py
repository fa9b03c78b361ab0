"""Rectified-flow core math (analytic expectations)."""
import torch
from tokenizer_testutil import single_thread  # noqa: F401

from selftok.model.flow import (
    euler_sample,
    euler_step,
    flow_loss,
    interpolate,
    sample_time,
    shift_time,
    velocity_target,
)
from selftok.model.schedule import ScheduleConfig, TokenSchedule


def test_interpolation_endpoints_and_velocity():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)
    # x_t is linear in t with slope noise − x0 (the velocity target)
    t1, t2 = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0.3, 0.1, 0.95])
    slope = (interpolate(x0, noise, t2) - interpolate(x0, noise, t1)) / (t2 - t1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(slope, velocity_target(x0, noise), atol=1e-5, rtol=1e-5)
    assert flow_loss(velocity_target(x0, noise), x0, noise).abs().max() == 0
    assert flow_loss(torch.zeros_like(x0), x0, noise).shape == (3,)


def test_shift_time():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(shift_time(t, 1.0), t)
    s = shift_time(t, 3.0)
    assert s[0] == 0 and s[-1] == 1 and (s[1:-1] > t[1:-1]).all()  # more time near noise
    torch.testing.assert_close(shift_time(torch.tensor(0.5), 3.0), torch.tensor(0.75))


def test_euler_on_a_straight_path_is_exact_and_sees_the_schedule():
    """With the true (constant) velocity the Euler sampler lands on x0 for any grid; the velocity function is
    told the number of visible tokens the schedule gives at each step."""
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    grid = TokenSchedule(ScheduleConfig()).sampler_grid(7)
    seen = []

    def velocity(x, t, num_visible):
        seen.append((float(t[0]), num_visible))
        return velocity_target(x0, noise)

    out = euler_sample(velocity, noise, grid)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert [n for _, n in seen] == (grid.last_visible + 1).tolist()
    assert [t for t, _ in seen] == grid.t.tolist()
    assert torch.equal(euler_step(noise, noise, torch.tensor(1.0), torch.tensor(0.0)), torch.zeros_like(noise))


def test_sample_time_is_uniform_and_seeded():
    a = sample_time(10000, torch.Generator().manual_seed(0))
    assert torch.equal(a, sample_time(10000, torch.Generator().manual_seed(0)))
    assert 0 <= a.min() and a.max() < 1 and abs(a.mean() - 0.5) < 0.02
