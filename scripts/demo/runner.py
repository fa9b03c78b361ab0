"""A resumable runner of pipeline stages, each a list of ``python -m`` commands run in subprocesses.

A stage that finished left ``stages/<name>.done.json`` (fingerprint of its settings and inputs, and size +
sha256 of every output file); `decide` reuses it when the fingerprint matches and every output is intact,
resumes an interrupted one in place and redoes the rest from scratch. `run_stage` runs one stage with
heartbeats and logs. The demo's stage list is `scripts.demo.pipeline`.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from selftok.runtime.io import read_json, sha256_file, write_atomic

log = logging.getLogger("demo")

#: The repository root: the commands run from it.
REPO = Path(__file__).resolve().parents[2]
EXIT_UNAVAILABLE = 3
EXIT_FAILED = 1
HEARTBEAT_S = 60.0


# ------------------------------------------------------------------------------------------------ stages
@dataclasses.dataclass
class Command:
    """``python -m <module> <argv...>``, run from the repository root."""

    module: str
    argv: list[str]


@dataclasses.dataclass
class Stage:
    name: str
    """Also the key of its time in report.json (`timing.<name>`)."""
    title: str
    workdir: str
    """Folder under the output directory that the stage owns; emptied before a fresh (re)do."""
    outputs: list[str]
    """Files or folders (relative to the output directory) recorded by size and sha256 and checked on re-run."""
    required: list[str]
    """Files that must exist when the stage's commands succeed."""
    commands: list[Command] = dataclasses.field(default_factory=list)
    configs: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Resolved YAML configs written to configs/<key>.yaml and passed with --config."""
    needs: list[str] = dataclasses.field(default_factory=list)
    """Files the stage cannot run without (stage configs, a shipped tokenizer's manifest), relative to the
    repository root or absolute."""


def unavailable(stage: Stage) -> str | None:
    """Why a stage cannot run in this checkout (its module or config is missing), or None."""
    for command in stage.commands:
        try:
            found = importlib.util.find_spec(command.module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"its command `python -m {command.module}` does not exist in this checkout"
    missing = [n for n in stage.needs if not (REPO / n).is_file()]
    if missing:
        return f"{', '.join(missing)} does not exist in this checkout"
    return None


# ------------------------------------------------------------------------------------------------ records
def output_files(out: Path, patterns: list[str]) -> list[Path]:
    """Every file under the output patterns (folders recursively), leftovers named *.tmp excluded."""
    files: set[Path] = set()
    for pattern in patterns:
        for hit in out.glob(pattern):
            items = [hit] if hit.is_file() else [p for p in hit.rglob("*") if p.is_file()]
            files.update(p for p in items if not p.name.endswith(".tmp") and ".tmp" not in p.parent.name)
    return sorted(files)


def digest_outputs(out: Path, patterns: list[str]) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(out)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in output_files(out, patterns)}


def check_outputs(out: Path, recorded: dict[str, dict[str, Any]]) -> str | None:
    """None when every recorded output is present and unchanged, else what is wrong (first problems)."""
    problems = []
    for name, meta in recorded.items():
        path = out / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != meta["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {meta['size']} when the stage finished "
                            "(truncated or overwritten)")
        elif sha256_file(path) != meta["sha256"]:
            problems.append(f"{name} changed since the stage finished (sha256 differs)")
        if len(problems) == 3:
            break
    if not recorded:
        problems.append("the completion record lists no outputs")
    return "; ".join(problems) or None


def fingerprint(stage: Stage, upstream: list[str]) -> str:
    """What the stage's result depends on: its commands, its resolved configs and its inputs' digests."""
    data = {"stage": stage.name, "commands": [dataclasses.asdict(c) for c in stage.commands],
            "configs": stage.configs, "upstream": upstream}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


@dataclasses.dataclass
class Decision:
    action: str
    """reuse | run | resume | redo"""
    reason: str = ""


def decide(stage: Stage, fp: str, records: Path, out: Path, force: bool, ran_before: str | None) -> Decision:
    """Reuse, run fresh, resume in place, or redo from scratch — and why."""
    done = read_json(records / f"{stage.name}.done.json")
    started = read_json(records / f"{stage.name}.started.json")
    if force:
        return Decision("redo", "--force")
    if done is not None:
        if ran_before is not None:
            return Decision("redo", f"the earlier stage {ran_before!r} ran again, so its inputs are new")
        if done.get("fingerprint") != fp:
            return Decision("redo", "its settings or inputs changed since it finished")
        problem = check_outputs(out, done.get("outputs", {}))
        if problem is not None:
            return Decision("redo", f"its output is missing or broken: {problem}")
        return Decision("reuse", f"finished {done.get('finished', '?')} in {done.get('seconds', 0):.1f} s")
    if started is not None and started.get("failed"):
        # a failure may have left state its command refuses or repeats (e.g. a config pinned by older code)
        return Decision("redo", "its last attempt failed; starting it from scratch")
    if started is not None and ran_before is None and started.get("fingerprint") == fp:
        return Decision("resume", "its last attempt was interrupted; its command resumes from its own checkpoints")
    if started is not None or (out / stage.workdir).exists():
        why = (f"the earlier stage {ran_before!r} ran again" if ran_before is not None
               else "partial output from other settings")
        return Decision("redo", f"{why}; starting it from scratch")
    return Decision("run")


# ------------------------------------------------------------------------------------------------ running
def _die_with_parent() -> None:
    """In the child: get SIGTERM when the demo process dies, so a killed demo leaves no orphan stage."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def last_line(path: Path) -> str:
    """The newest progress line of a log (tqdm bars end with carriage returns)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [s.strip() for s in tail.replace("\r", "\n").split("\n") if s.strip()]
    return lines[-1][:160] if lines else ""


def run_command(command: Command, log_path: Path, verbose: bool, label: str,
                tick: Callable[[], None] | None = None, threads: int | None = None) -> int:
    """Run one command (stdout + stderr appended to `log_path`, and echoed with --verbose). Without
    --verbose a heartbeat line shows the stage's latest progress line every minute; `tick` is called every
    few seconds (it keeps the stage's elapsed time on disk, so an interrupted stage's time is not lost)."""
    argv = [sys.executable, "-m", command.module, *command.argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log_path, "ab") as logf:
        logf.write(f"\n$ {' '.join(argv)}\n".encode())
        logf.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)  # noqa: PLW1509 - no other thread runs yet
        pump = threading.Thread(target=_pump, args=(proc.stdout, logf, verbose), daemon=True)
        pump.start()
        start = last_tick = time.monotonic()
        beats = 0
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                elapsed = time.monotonic() - start
                if not verbose and elapsed >= HEARTBEAT_S * (beats + 1):
                    beats += 1
                    log.info("   %s: running for %s … %s", label, fmt_seconds(elapsed), last_line(log_path))
                if tick is not None and time.monotonic() - last_tick >= 5:
                    tick()
                    last_tick = time.monotonic()
        except BaseException:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            if proc.poll() is None:
                proc.kill()
            raise
        finally:
            pump.join(timeout=5)
    return proc.returncode


def _pump(stream, logf, verbose: bool) -> None:
    for chunk in iter(lambda: stream.read1(4096), b""):
        logf.write(chunk)
        logf.flush()
        if verbose:
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()


def fmt_seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{int(s // 60)} min {int(s % 60):02d} s"


class StageFailed(RuntimeError):
    pass


def write_configs(stage: Stage, out: Path) -> None:
    for key, data in stage.configs.items():
        path = out / "configs" / f"{key}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(data, sort_keys=False))


def execute(stage: Stage, out: Path, verbose: bool, label: str, tick: Callable[[], None] | None = None,
            threads: int | None = None) -> None:
    """Run the stage's commands and check that its required files exist."""
    write_configs(stage, out)
    log_path = out / "logs" / f"{stage.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    (out / stage.workdir).mkdir(parents=True, exist_ok=True)
    for command in stage.commands:
        rc = run_command(command, log_path, verbose, label, tick, threads)
        if rc != 0:
            tail = "\n".join("      " + ln for ln in log_tail(log_path, 15))
            raise StageFailed(f"stage {stage.name!r} failed: `python -m {command.module}` exited with status {rc}."
                              f" Full log: {log_path}\n{tail}")
    missing = [r for r in stage.required if not list(out.glob(r))]
    if missing:
        raise StageFailed(f"stage {stage.name!r} finished but did not write {', '.join(missing)} "
                          f"(log: {log_path})")


def log_tail(path: Path, n: int) -> list[str]:
    text = path.read_text(errors="replace") if path.is_file() else ""
    lines = [ln for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
    return lines[-n:]


def clear_workdir(out: Path, stage: Stage) -> None:
    target = (out / stage.workdir).resolve()
    if out.resolve() not in target.parents:
        raise RuntimeError(f"refusing to delete {target}: not inside {out}")
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def run_stage(stage: Stage, decision: Decision, fp: str, out: Path, later: list[Stage], verbose: bool,
              label: str, threads: int | None = None) -> dict[str, Any]:
    """Execute one stage and leave its completion record; returns the record. `seconds` adds up the time of
    every attempt (an interrupted attempt's time is kept in the started record)."""
    records = out / "stages"
    for other in [stage, *later]:  # their results (if any) no longer follow from their inputs
        (records / f"{other.name}.done.json").unlink(missing_ok=True)
    if decision.action == "redo":
        clear_workdir(out, stage)
    started_path = records / f"{stage.name}.started.json"
    previous = (read_json(started_path) or {}) if decision.action == "resume" else {}
    attempts, before = previous.get("attempts", 0) + 1, float(previous.get("seconds", 0.0))
    start = time.monotonic()

    def tick() -> None:
        write_json(started_path, {"stage": stage.name, "fingerprint": fp, "started": now(), "attempts": attempts,
                                  "seconds": before + time.monotonic() - start})

    tick()
    try:
        execute(stage, out, verbose, label, tick, threads)
    except StageFailed as e:
        write_json(started_path, {**(read_json(started_path) or {}), "failed": str(e).split("\n")[0]})
        raise
    seconds = time.monotonic() - start
    record = {"stage": stage.name, "title": stage.title, "fingerprint": fp, "finished": now(),
              "seconds": before + seconds, "seconds_last_attempt": seconds, "attempts": attempts,
              "commands": [" ".join(["python", "-m", c.module, *c.argv]) for c in stage.commands],
              "configs": sorted(f"configs/{k}.yaml" for k in stage.configs),
              "outputs": digest_outputs(out, stage.outputs)}
    write_json(records / f"{stage.name}.done.json", record)
    started_path.unlink(missing_ok=True)
    return record
