"""The typed config loader: strict keys, nested overrides, type checks, invariants, every shipped YAML loads."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest
import yaml

from selftok.runtime.config import (
    ConfigError,
    apply_overrides,
    config_diff,
    from_dict,
    load_config,
    read_config_file,
    to_dict,
)


@dataclasses.dataclass
class Optim:
    lr: float = 1e-3
    """learning rate"""
    betas: tuple[float, float] = (0.9, 0.99)

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclasses.dataclass
class Run:
    name: str = "run"
    steps: int = 10
    precision: Literal["fp32", "bf16"] = "bf16"
    init_from: str | None = None
    optim: Optim = dataclasses.field(default_factory=Optim)


def test_nested_override_and_yaml(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("name: a\noptim:\n  lr: 0.5\n")
    cfg = load_config(Run, path, ["optim.lr=1e-4", "steps=3", "optim.betas=[0.8, 0.9]"])
    assert cfg.name == "a" and cfg.steps == 3
    assert cfg.optim.lr == pytest.approx(1e-4) and cfg.optim.betas == (0.8, 0.9)
    assert to_dict(cfg)["optim"] == {"lr": 1e-4, "betas": [0.8, 0.9]}


def test_unknown_key_names_key_and_valid_ones():
    with pytest.raises(ConfigError) as e:
        from_dict(Run, {"optim": {"learning_rate": 1.0}})
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "betas" in msg and "lr" in msg


def test_type_errors_and_invariants_are_clear():
    with pytest.raises(ConfigError, match="steps"):
        from_dict(Run, {"steps": "many"})
    with pytest.raises(ConfigError, match="precision"):
        from_dict(Run, {"precision": "fp16"})
    with pytest.raises(ConfigError, match="lr must be positive"):
        from_dict(Run, {"optim": {"lr": -1}})
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    assert from_dict(Run, {"init_from": None}).init_from is None


def test_a_bare_no_is_the_literal_no():
    @dataclasses.dataclass
    class Precision:
        mixed_precision: Literal["bf16", "no"] = "bf16"

    assert load_config(Precision, None, ["mixed_precision=no"]).mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(Precision, None, ["mixed_precision=yes"])


def test_config_diff_lists_changed_keys():
    assert config_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == ["a.c: 2 -> 3"]


def test_base_key_merges_the_variant_over_its_base(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("name: base\nsteps: 7\noptim: {lr: 0.5, betas: [0.1, 0.2]}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../base.yaml\noptim: {lr: 0.25}\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: mid.yaml\nname: leaf\noptim: {betas: [0.3, 0.4]}\n")
    assert read_config_file(tmp_path / "sub" / "leaf.yaml") == {
        "name": "leaf", "steps": 7, "optim": {"lr": 0.25, "betas": [0.3, 0.4]}}
    cfg = load_config(Run, tmp_path / "sub" / "leaf.yaml", ["steps=2"])  # overrides still win
    assert (cfg.name, cfg.steps, cfg.optim.lr, cfg.optim.betas) == ("leaf", 2, 0.25, (0.3, 0.4))


@pytest.mark.parametrize("text, match", [("base: missing.yaml\n", "not a file"), ("base: [a.yaml]\n", "must be the path"),
                                         ("base: loop.yaml\n", "loops back")])
def test_bad_base_key_is_refused(tmp_path: Path, text: str, match: str):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        read_config_file(tmp_path / "loop.yaml")


def test_refine_config_keeps_the_full_recipes_model_and_data():
    from selftok.train import TrainConfig
    root = Path(__file__).resolve().parents[1] / "configs"
    full, refine = (load_config(TrainConfig, root / f"tokenizer_shapes_{n}.yaml") for n in ("full", "refine"))
    assert refine.model == full.model and refine.data == full.data and refine.eval == full.eval
    assert (refine.stage0.steps, refine.shape_net.distance, refine.stage1.steps) == (0, "object_logits", 1500)


def test_every_shipped_yaml_loads():
    """Each YAML under configs/ (except accelerate/DeepSpeed launcher files) loads into its run config."""
    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(p for p in root.glob("*.yaml"))
    assert files, "no run configs shipped"
    for path in files:
        cls = _config_class_for(path.name)
        cfg = load_config(cls, path)
        assert dataclasses.is_dataclass(cfg)
        yaml.safe_dump(to_dict(cfg))  # serialisable as written next to a run


# Run-config files are named after the job that reads them: <prefix>_<variant>.yaml.
CONFIG_CLASSES = {
    "tokenizer": "selftok.train:TrainConfig",
    "renderer": "selftok.train:TrainConfig",
    "pretokenize": "selftok.pretokenize:PretokenizeConfig",
    "vlm": "vlm.train:TrainConfig",
    "rl": "rl.train:RLConfig",
    "demo": "scripts.demo.pipeline:DemoConfig",
}


def _config_class_for(name: str):
    import importlib

    prefix = name.split("_")[0].removesuffix(".yaml")
    if prefix not in CONFIG_CLASSES:
        raise AssertionError(f"configs/{name}: no run config registered for prefix {prefix!r} in {CONFIG_CLASSES}")
    module, cls = CONFIG_CLASSES[prefix].split(":")
    return getattr(importlib.import_module(module), cls)


TRAINING_JOBS = ("selftok.train:TrainConfig", "vlm.train:TrainConfig", "rl.train:RLConfig")
#: The run-level keys every training job names the same way, with the same type, in its section ``run``.
SHARED_RUN_KEYS = {"out_dir": str, "seed": int, "mixed_precision": Literal["bf16", "no"], "log_every": int,
                   "checkpoint_every": int, "keep_checkpoints": int}


def _job_class(spec: str):
    import importlib

    module, cls = spec.split(":")
    return getattr(importlib.import_module(module), cls)


@pytest.mark.parametrize("spec", TRAINING_JOBS)
def test_training_jobs_share_one_run_vocabulary(spec):
    import typing

    cls = _job_class(spec)
    run = typing.get_type_hints(cls)["run"]
    hints = typing.get_type_hints(run)
    assert {k: hints.get(k) for k in SHARED_RUN_KEYS} == SHARED_RUN_KEYS
    top = {f.name for f in dataclasses.fields(cls)}
    assert not top & {"output_dir", "seed", "threads", "checkpoint_every", "log_every"}


@pytest.mark.parametrize(("spec", "old", "new"), [
    ("vlm.train:TrainConfig", "output_dir=runs/x", "run.out_dir"),
    ("vlm.train:TrainConfig", "optim.seed=1", "run.seed"),
    ("vlm.train:TrainConfig", "optim.precision=fp32", "run.mixed_precision"),
    ("vlm.train:TrainConfig", "checkpoint_every=5", "run.checkpoint_every"),
    ("rl.train:RLConfig", "output_dir=runs/x", "run.out_dir"),
    ("rl.train:RLConfig", "update.seed=1", "run.seed"),
    ("rl.train:RLConfig", "update.mixed_precision=no", "run.mixed_precision"),
    ("rl.train:RLConfig", "threads=1", "run.num_threads"),
    ("selftok.pretokenize:PretokenizeConfig", "run.precision=bf16", "run.mixed_precision"),
])
def test_a_renamed_key_is_an_error_that_names_the_new_key(spec, old, new):
    overrides = [old] + (["output.dir=out"] if "pretokenize" in spec else [])
    with pytest.raises(ConfigError) as e:
        load_config(_job_class(spec), None, overrides)
    assert f"'{old.split('=')[0]}' was renamed '{new}'" in str(e.value)
