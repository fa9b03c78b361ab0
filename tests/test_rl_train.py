"""The RL loop (rl/train.py, rl/prompts.py) on tiny random artifacts: config and prompt errors, held-out
isolation, NaN rewards, the reference model, and SIGKILL + resume."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from rl_testutil import make_artifacts, make_clip
from safetensors.torch import load_file

from rl.prompts import CategoryCurriculum, PromptsConfig, build_prompt_sets, prompt_key, schedule_prompts
from rl.rewards import RewardOutput, RewardPromptError
from rl.train import RLConfig, frozen_logprobs, main, scoring_inputs, setup, train_step
from selftok.runtime.config import ConfigError, load_config
from selftok.shapes import heldout_prompts, parse_prompt

TIMING_KEYS = ("rollout_s", "render_s", "reward_s", "update_s", "rl_seconds")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_art")
    vlm_dir, tok_dir = make_artifacts(root)
    return vlm_dir, tok_dir, make_clip(root / "clip")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)


def tiny_config(artifacts, out: Path, **extra) -> dict:
    """A seconds-long run: shapes reward plus a tiny random CLIP (so groups are never flat)."""
    vlm_dir, tok_dir, clip_dir = artifacts
    cfg = {"run": {"out_dir": str(out), "checkpoint_every": 1, "num_threads": 1},
           "policy": {"vlm_path": str(vlm_dir), "tokenizer_path": str(tok_dir)},
           "prompts": {"max_heldout": 6},
           "rewards": [{"kind": "shapes", "weight": 1.0}, {"kind": "clip", "path": str(clip_dir), "weight": 5.0}],
           "rollout": {"batch_size": 8, "group_size": 4, "sampling": {"cfg_scale": 2.0}},
           "update": {"micro_batch_size": 4, "lr": 3e-3, "max_steps": 6},
           "eval": {"every": 0, "at_start": False, "grid_prompts": 3}}
    for key, value in extra.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def _load(cfg: dict) -> RLConfig:
    from selftok.runtime.config import from_dict

    return from_dict(RLConfig, cfg)


# ---------------------------------------------------------------------------------------------- config errors
def test_group_size_and_divisibility_are_config_errors():
    with pytest.raises(ConfigError, match="group_size must be >= 2"):
        load_config(RLConfig, overrides=["rollout.group_size=1", "rollout.batch_size=4"])
    with pytest.raises(ConfigError, match="multiple of group_size"):
        load_config(RLConfig, overrides=["rollout.group_size=3", "rollout.batch_size=8"])
    with pytest.raises(ConfigError, match="minibatch_size"):
        load_config(RLConfig, overrides=["rollout.batch_size=8", "update.minibatch_size=3"])
    with pytest.raises(SystemExit) as e:  # the CLI reports it as a usage error
        main(["rollout.group_size=1"])
    assert e.value.code == 2


def test_unparseable_prompts_listed_before_training(tmp_path):
    train = tmp_path / "train.txt"
    train.write_text("a photo of a red circle\na photo of a dog\n# comment\ntwo cats and a horse\nthree squares\n")
    held = tmp_path / "held.txt"
    held.write_text("a photo of a blue square\n")
    out = tmp_path / "run"
    with pytest.raises(RewardPromptError) as e:
        main([f"run.out_dir={out}", "prompts.source=file", f"prompts.train_file={train}",
              f"prompts.heldout_file={held}"])
    msg = str(e.value)
    assert "2 of 4" in msg and "a photo of a dog" in msg and "two cats and a horse" in msg
    assert "red circle" not in msg and "three squares" not in msg
    assert not out.exists()  # refused before anything was written or loaded


# ---------------------------------------------------------------------------------------------- prompts
def test_heldout_prompts_never_scheduled_for_training():
    sets = build_prompt_sets(PromptsConfig())
    held = {prompt_key(p) for p in heldout_prompts()}
    assert len(sets.heldout) == 96 and not held & {prompt_key(p) for p in sets.train}
    # the schedule only ever draws training prompts, balanced over the categories
    drawn = [p for step in range(40) for p in schedule_prompts(sets.train, step, 10, seed=0)]
    assert not held & {prompt_key(p) for p in drawn}
    tags = [p["tag"] for p in drawn]
    assert {t: tags.count(t) for t in set(tags)} == {t: 80 for t in set(tags)}
    assert schedule_prompts(sets.train, 7, 10, 0) == schedule_prompts(sets.train, 7, 10, 0)
    assert schedule_prompts(sets.train, 7, 10, 0) != schedule_prompts(sets.train, 7, 10, 1)


def test_adaptive_curriculum_moves_steps_to_categories_with_signal():
    train = build_prompt_sets(PromptsConfig()).train
    cur = CategoryCurriculum(train, floor=0.25, decay=0.5)
    names = list(cur.shares())
    assert names == ["two_object", "counting", "colors", "position", "color_attr"]
    assert all(v == pytest.approx(0.2) for v in cur.shares().values())  # equal until measured
    first = cur.schedule(0, 40, seed=0)
    assert first == cur.schedule(0, 40, seed=0) and first != cur.schedule(0, 40, seed=1)
    assert first != cur.schedule(1, 40, seed=0)
    for step in range(12):  # colours: every group all right (flat); the others: rewards differ in every group
        prompts = cur.schedule(step, 40, seed=0)
        rewards = [1.0 if p["tag"] == "colors" else float(j % 2) for p in prompts for j in range(4)]
        cur.update([p for p in prompts for _ in range(4)], rewards, group_size=4)
    shares = cur.shares()
    assert shares["colors"] == pytest.approx(0.25 / 5, abs=1e-3)  # only the floor's equal part is left
    assert all(shares[c] == pytest.approx(0.05 + 0.75 / 4, abs=1e-3) for c in names if c != "colors")
    tags = [p["tag"] for p in cur.schedule(12, 400, seed=0)]
    assert 0 < tags.count("colors") < 0.1 * len(tags) and sum(shares.values()) == pytest.approx(1.0)
    # a group with one finite reward carries no signal; NaN does not poison the average
    one = CategoryCurriculum(train, floor=0.0, decay=0.0)
    one.update([{"tag": "counting"}] * 4 + [{"tag": "position"}] * 4, [1.0, math.nan, math.nan, math.nan,
                                                                        0.0, 1.0, math.nan, 1.0], group_size=4)
    assert one.signal["counting"] == 0.0 and one.signal["position"] == 1.0
    assert one.shares()["counting"] == 0.0 and one.shares()["position"] == 0.25  # floor 0: no share without signal
    # the state (signal and each category's position in its permutations) round-trips; another prompt set is refused
    again = CategoryCurriculum(train, floor=0.25, decay=0.5)
    again.load_state_dict(cur.state_dict())
    assert again.schedule(12, 40, seed=0) == cur.schedule(12, 40, seed=0) and again.drawn == cur.drawn
    with pytest.raises(ValueError, match="categories"):
        CategoryCurriculum([p for p in train if p["tag"] != "colors"]).load_state_dict(cur.state_dict())


def test_file_prompts_split_and_overlap_removed(tmp_path):
    lines = [f"a photo of {n} {s}" for n in ("two", "three", "four") for s in ("circles", "squares", "diamonds")]
    train = tmp_path / "p.txt"
    train.write_text("\n".join(lines + ["a lighthouse at dusk"]) + "\n")
    held = tmp_path / "h.txt"
    held.write_text("a photo of 2 circles\n")  # same spec as "a photo of two circles": a different phrasing
    sets = build_prompt_sets(PromptsConfig(source="file", train_file=str(train), heldout_file=str(held)))
    assert "a photo of two circles" not in [p["prompt"] for p in sets.train] and len(sets.train) == 9
    assert sets.train[-1] == {"prompt": "a lighthouse at dusk", "tag": "text"}
    split = build_prompt_sets(PromptsConfig(source="file", train_file=str(train), heldout_fraction=0.3))
    assert split.heldout and not {prompt_key(p) for p in split.heldout} & {prompt_key(p) for p in split.train}
    assert len(split.heldout) + len(split.train) == 10


def test_geneval_prompt_file_loads():
    path = Path("/work/shared/data/geneval/evaluation_metadata.jsonl")
    if not path.exists():
        pytest.skip("GenEval metadata file not present")
    sets = build_prompt_sets(PromptsConfig(source="file", train_file=str(path), heldout_fraction=0.25))
    assert len(sets.train) + len(sets.heldout) == 553
    assert {p["tag"] for p in sets.heldout} == {"single_object", "two_object", "counting", "colors", "position",
                                                "color_attr"}


# ---------------------------------------------------------------------------------------------- loop
def test_heldout_summary_has_per_prompt_standard_errors():
    from rl.evaluation import summarize_eval
    entries = [{"tag": t, "prompt": p} for t, p in [("a", "p"), ("a", "p"), ("a", "q"), ("a", "q"), ("b", "r"),
                                                     ("b", "s"), ("b", "s")]]
    correct = [1, 1, 0, 0, 1, 0, 1]
    out = summarize_eval(entries, [0.0] * 7, [{"correct": bool(c)} for c in correct], "program")
    assert out["per_category"] == {"a": 0.5, "b": pytest.approx(2 / 3)} and out["overall"] == pytest.approx(7 / 12)
    # a: prompt means 1, 0 -> s.e. 0.5; b: prompt means 1, 0.5 -> s.e. 0.25; overall sqrt(0.25 + 0.0625) / 2
    assert out["per_category_standard_error"] == {"a": pytest.approx(0.5), "b": pytest.approx(0.25)}
    assert out["overall_standard_error"] == pytest.approx(0.3125 ** 0.5 / 2)


def test_nan_rewards_dropped_and_counted(artifacts, tmp_path):
    state = setup(_load(tiny_config(artifacts, tmp_path / "run")))
    real = state.reward

    class NaNOnSecond:
        name = "nan-on-second"

        def check_prompts(self, prompts):
            real.check_prompts(prompts)

        def __call__(self, images, prompts):
            out = real(images, prompts)
            scores = out.scores.clone()
            scores[1], scores[6] = float("nan"), float("inf")
            return RewardOutput(scores, out.details)

    state.reward = NaNOnSecond()
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    m = train_step(state)
    assert m["dropped"] == 2 and m["dropped_total"] == 2 and math.isfinite(m["loss"])
    after = state.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the rest of the batch still trained
    log = json.loads((tmp_path / "run" / "rollouts.jsonl").read_text().splitlines()[0])
    assert log["rewards"][1] is None and log["rewards"][6] is None and log["rewards"][0] is not None
    state.accelerator.end_training()


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_reference_equals_policy_until_the_first_update(artifacts, tmp_path, mode):
    cfg = _load(tiny_config(artifacts, tmp_path / "run", **{"policy.mode": mode, "update.beta": 0.1,
                                                             "update.epochs": 2}))
    state = setup(cfg)
    assert (state.reference is None) == (mode == "lora")
    from rl.rollout import collect_rollout

    rollout = collect_rollout(state, 0, {})
    inputs = scoring_inputs(state, rollout)
    tokens = rollout.token_ids
    policy = frozen_logprobs(state, inputs, tokens, reference=False)
    ref = frozen_logprobs(state, inputs, tokens, reference=True)
    assert torch.equal(policy, ref)  # ratio 1 and k3 KL 0 exactly before any update
    # the sampler's own log-probs agree with the teacher-forced ones (same policy, bf16 numerics)
    assert (policy - rollout.logprobs).abs().max() < 0.05
    m = train_step(state)
    assert m["kl"] > 0 and m["ratio"] != 1.0  # the second epoch sees an updated policy
    after = frozen_logprobs(state, inputs, tokens, reference=False)
    assert not torch.equal(after, frozen_logprobs(state, inputs, tokens, reference=True))
    state.accelerator.end_training()


def _run(cfg_path: Path, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "rl.train", "--config", str(cfg_path)], env=env,
                            stdout=log_path.open("w"), stderr=subprocess.STDOUT, cwd=Path(__file__).parents[1])


def _metrics(run: Path) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        d = json.loads(line)
        out[d["step"]] = {k: v for k, v in d.items() if k not in TIMING_KEYS}
    return out


def test_sigkill_and_resume_continue_identically(artifacts, tmp_path):
    paths = {}
    for name in ("straight", "killed"):
        paths[name] = tmp_path / f"{name}.yaml"
        # the adaptive curriculum: its state (each category's position in its permutations) must resume too
        cfg = tiny_config(artifacts, tmp_path / name, **{"update.max_steps": 4, "prompts.balance": "adaptive"})
        paths[name].write_text(yaml.safe_dump(cfg))
    straight = _run(paths["straight"], tmp_path / "straight.log")
    killed = _run(paths["killed"], tmp_path / "killed.log")
    ckpt = tmp_path / "killed" / "checkpoints" / "step_00000002" / "meta.json"
    deadline = time.time() + 240
    while not ckpt.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-2000:]
    assert not (tmp_path / "killed" / "final").exists()
    resumed = _run(paths["killed"], tmp_path / "resumed.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert straight.wait(timeout=300) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "resumed.log").read_text()
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    init = load_file(artifacts[0] / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], init[k]) for k in a)  # training did change the weights
    ma, mb = _metrics(tmp_path / "straight"), _metrics(tmp_path / "killed")
    assert sorted(ma) == sorted(mb) == list(range(1, 5)) and ma == mb
    # held-out prompts never appeared in a rollout
    held = {prompt_key(p) for p in heldout_prompts()}
    for line in (tmp_path / "straight" / "rollouts.jsonl").read_text().splitlines():
        for text in json.loads(line)["prompts"]:
            assert prompt_key(parse_prompt(text)) not in held
    assert (tmp_path / "straight" / "eval.jsonl").exists() and list((tmp_path / "straight" / "samples").glob("*.png"))


def test_grpo_raises_a_simple_image_reward(artifacts, tmp_path):
    """The update has the right sign: with a reward that prefers red images, ten steps make the images of
    fixed prompts and seeds redder, and the policy's entropy falls."""
    import numpy as np

    from rl.rollout import render, sample_images

    class Redness:
        name = "redness"

        def check_prompts(self, prompts):
            pass

        def __call__(self, images, prompts):
            s = torch.tensor([np.asarray(im, dtype=np.float32)[..., 0].mean() / 255 for im in images])
            return RewardOutput(s, [{} for _ in images])

    cfg = tiny_config(artifacts, tmp_path / "run", **{"update.lr": 1e-2, "rollout.batch_size": 16,
                                                      "update.micro_batch_size": 16, "log_rollouts": False})
    state = setup(_load(cfg))
    state.reward = Redness()
    captions, seeds = ["a photo of a red circle", "a photo of two squares"] * 8, list(range(100, 116))

    def redness():
        tokens, logp = sample_images(state, captions, seeds)
        return float(state.reward(render(state, tokens), [{}] * 16).scores.mean()), float(-logp.mean())

    r0, h0 = redness()
    for _ in range(10):
        train_step(state)
    r1, h1 = redness()
    assert r1 > r0 + 1e-3 and h1 < h0 - 0.3, (r0, r1, h0, h1)
    state.accelerator.end_training()
