"""The one accelerator factory, LR schedule and checkpointed step counter (selftok.runtime), used by the three
training recipes."""
from __future__ import annotations

import pytest
import torch

import rl.train
import selftok.train
import vlm.train
from selftok.runtime import launch


class Recorder:
    """Stands in for accelerate's Accelerator and records what it was asked for."""

    calls: list[dict] = []

    def __init__(self, **kwargs):
        Recorder.calls.append(kwargs)
        self.distributed_type = launch.DistributedType.DEEPSPEED


@pytest.fixture
def recorder(monkeypatch):
    Recorder.calls = []
    monkeypatch.setattr(launch, "Accelerator", Recorder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return Recorder


def test_the_recipes_share_one_factory():
    assert rl.train.make_accelerator is vlm.train.make_accelerator is selftok.train.make_accelerator \
        is launch.make_accelerator


@pytest.mark.parametrize("force_cpu", [False, True])
def test_deepspeed_launches_on_cpu_are_not_turned_off(recorder, monkeypatch, tmp_path, force_cpu):
    # rl.train used to pass cpu=not cuda, which silently turns DeepSpeed off on a CPU machine
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("WORLD_SIZE", "2")
    launch.make_accelerator(tmp_path, "no", force_cpu=force_cpu)
    (call,) = recorder.calls
    assert call["cpu"] is False
    assert any(getattr(h, "backend", None) == "gloo" for h in call["kwargs_handlers"])


def test_plain_cpu_runs_ask_for_the_cpu(recorder, monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    launch.make_accelerator(tmp_path, "bf16", 4)
    (call,) = recorder.calls
    assert call["cpu"] is True and call["mixed_precision"] == "bf16" and call["gradient_accumulation_steps"] == 4
    assert call["kwargs_handlers"] == []


def test_fsdp_needs_cuda(recorder, monkeypatch, tmp_path):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match="FSDP"):
        launch.make_accelerator(tmp_path)


def test_bf16_on_a_cpu_without_native_bf16_is_warned(monkeypatch, caplog):
    import torch

    from selftok.runtime.launch import warn_emulated_bf16
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with caplog.at_level("WARNING", logger="selftok.runtime.launch"):
        assert warn_emulated_bf16("bf16", torch.device("cpu"))
    assert "without native bf16" in caplog.text
    assert not warn_emulated_bf16("no", torch.device("cpu"))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert not warn_emulated_bf16("bf16", torch.device("cpu"))


def test_one_lr_schedule_serves_the_three_recipes():
    s = launch.scheduled_lr
    assert [s(2.0, k, 4, 10) for k in range(5)] == [0.5, 1.0, 1.5, 2.0, 2.0]  # warm-up, then constant
    assert s(2.0, 4, 4, 10, "cosine", 0.1) == 2.0 and s(2.0, 14, 4, 10, "cosine", 0.1) == pytest.approx(0.2)
    assert s(2.0, 9, 4, 10, "cosine", 0.1) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # halfway: cos = 0
    assert s(1.0, 9, 4, 10, "linear", 0.0) == pytest.approx(0.5) and s(1.0, 99, 4, 10, "linear", 0.0) == 0.0
    assert s(1.0, 7, 0, 0, "cosine", 0.1) == 1.0  # nothing to decay over
    # the recipes' own schedules are this one
    o = selftok.train.OptimConfig(warmup_steps=2, decay="cosine", final_lr_fraction=0.1)
    assert [selftok.train.lr_factor(k, 12, o) for k in range(12)] == [s(1.0, k, 2, 9, "cosine", 0.1)
                                                                      for k in range(12)]
    assert [vlm.train.cosine_lr(k, 3e-3, 2, 12, 0.1) for k in range(14)] == [s(3e-3, k, 2, 10, "cosine", 0.1)
                                                                            for k in range(14)]


def test_one_progress_counter_for_the_checkpoints_of_vlm_and_rl():
    from selftok.runtime.runs import Progress

    assert rl.train.runs.Progress is vlm.train.runs.Progress is Progress
    p = Progress()
    p.step, p.dropped = 7, 2
    q = Progress()
    q.load_state_dict(p.state_dict())
    assert (q.step, q.dropped) == (7, 2)
    q.load_state_dict({"step": 3})  # a vlm.train checkpoint written before the merge
    assert (q.step, q.dropped) == (3, 0)
