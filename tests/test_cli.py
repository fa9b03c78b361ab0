"""Process entry points: every console script exits 0 after a successful job, and a rank of a multi-process
launch ends through `os._exit` with its logs flushed (see `selftok.runtime.cli.exit_process`)."""
from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_console_scripts_point_at_process_entry_points():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) == 8
    for name, target in scripts.items():
        module, attr = target.split(":")
        assert attr == "cli", f"{name} -> {target}: console scripts call `cli`, which exits with main's status"
        assert callable(getattr(importlib.import_module(module), attr))


def test_a_finished_job_exits_zero(tmp_path, monkeypatch):
    """`sys.exit(main())` with a dict or Path return value exits 1: each `main` returns an exit status."""
    from selftok.shapes.cli import cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = tmp_path / "prompts.jsonl"
    monkeypatch.setattr(sys, "argv", ["selftok-shapes", "prompts", "--split", "heldout", "--out", str(out)])
    with pytest.raises(SystemExit) as e:
        cli()
    assert e.value.code == 0 and out.read_text().count("\n") == 96


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_exit_process_flushes_logs_and_keeps_the_status(world_size):
    code = ("import logging, sys\n"
            "from selftok.runtime.cli import exit_process, setup_logging\n"
            "setup_logging()\n"
            "logging.getLogger('job').info('finished')\n"
            "sys.stdout.write('unflushed stdout')\n"
            "exit_process(3)\n"
            "print('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={"PATH": "", "WORLD_SIZE": world_size, "PYTHONPATH": str(ROOT)}, check=False)
    assert proc.returncode == 3
    assert "finished" in proc.stderr and proc.stdout == "unflushed stdout"
