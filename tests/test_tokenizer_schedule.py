"""The DiTi token schedule equals the official one for every integer t and for the sampler steps."""
import json

import pytest
import torch
from tokenizer_testutil import FIXTURES, REFERENCE, single_thread  # noqa: F401

from selftok.model.schedule import ScheduleConfig, TokenSchedule, visible_mask


def _cfg(c):
    return ScheduleConfig(K=c["K"], stages=tuple(int(s) for s in c["stages"].split(",")),
                          k_per_stage=tuple(int(k) for k in c["k_per_stage"].split(",")))


OFFICIAL = json.loads((FIXTURES / "diti_mappings.json").read_text())["configs"]
FIXTURE = json.loads((REFERENCE / "token_schedule.json").read_text())["configs"]


@pytest.mark.parametrize("c", OFFICIAL, ids=[c["name"] for c in OFFICIAL])
def test_schedule_matches_diti_mappings(c):
    s = TokenSchedule(_cfg(c))
    t = torch.tensor(c["t"])
    assert s.last_visible(t).tolist() == c["index_int64_input"]
    assert s.last_visible(t.float()).tolist() == c["index_float32_input"]
    assert visible_mask(s.last_visible(t), c["K"]).sum(1).tolist() == c["num_visible"]
    for steps, key in ((50, "sampler_50_steps"), (4, "sampler_4_steps")):
        grid = s.sampler_grid(steps)
        ref = c[key]
        assert grid.t.tolist() == ref["scheduled_t_float32"]
        assert (grid.t * 1000).tolist() == ref["timestep_map_float32"]
        assert grid.t_mapped.tolist() == ref["t_mapped_int64"]
        assert grid.last_visible.tolist() == ref["index"]


@pytest.mark.parametrize("c", FIXTURE, ids=[c["name"] for c in FIXTURE])
def test_schedule_matches_reference_fixture(c):
    s = TokenSchedule(_cfg(c))
    assert s.last_visible(torch.tensor(c["t"])).tolist() == c["index"]
    for steps in (6, 50):
        ref = c[f"sampler_{steps}_steps"]
        grid = s.sampler_grid(steps)
        assert grid.t_mapped.tolist() == ref["t_mapped_int64"]
        assert grid.last_visible.tolist() == ref["index"]


def test_float32_quirk_and_invariants():
    s = TokenSchedule(ScheduleConfig())
    grid = s.sampler_grid(50)
    # float32 linspace: step 30 lands on τ = 399 (exact arithmetic: 400), one token fewer (375, not 376)
    assert grid.t_mapped[30].item() == 399
    assert grid.last_visible[30].item() == 375 and s.last_visible(torch.tensor([400])).item() == 376
    # token 0 is always visible, all tokens at t = 1, and the prefix never grows as t decreases
    assert s.last_visible(torch.tensor([0])).item() == 0
    assert s.last_visible(torch.tensor([1000])).item() == 511
    assert (grid.last_visible[1:] <= grid.last_visible[:-1]).all()
    # training form (float t): stage boundaries
    assert s.last_visible_at(torch.tensor([0.2, 0.4])).tolist() == [192, 376]


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="disagrees with the schedule"):
        ScheduleConfig(K=500)
    with pytest.raises(ValueError, match="strictly increasing"):
        ScheduleConfig(K=3, stages=(500, 400), k_per_stage=(1, 2))
    with pytest.raises(ValueError, match="equal length"):
        ScheduleConfig(K=3, stages=(1000,), k_per_stage=(1, 2))
