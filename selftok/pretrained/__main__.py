"""Ship a finished training run's tokenizer inside the package:

    python -m selftok.pretrained RUN_DIR NAME --command "python -m selftok.train --config ..."

Copies ``RUN_DIR/model`` to ``selftok/pretrained/NAME`` (replacing it atomically) with the run's summary, the
subset figures the tests recompute, the command, and the manifest of checksums.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
from pathlib import Path

from selftok.model.tokenizer import SelftokTokenizer
from selftok.pretrained import CHECKED_FILES, EVALUATION, ROOT, SUBSET, SUMMARY, subset_figures, write_manifest
from selftok.runtime.io import replace_dir


def ship(run_dir: Path, name: str, command: str, root: Path = ROOT, subset: int = SUBSET) -> Path:
    model, summary = run_dir / "model", run_dir / "summary.json"
    for path in [model / f for f in CHECKED_FILES] + [summary]:
        if not path.is_file():
            raise SystemExit(f"{path} is missing: is {run_dir} a finished selftok.train run?")
    tmp = root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in CHECKED_FILES:
        shutil.copyfile(model / f, tmp / f)
    shutil.copyfile(summary, tmp / SUMMARY)
    record = {"command": command, "run_dir": str(run_dir), "shipped": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "subset": subset_figures(SelftokTokenizer.from_pretrained(tmp), subset)}
    (tmp / EVALUATION).write_text(json.dumps(record) + "\n")
    write_manifest(tmp)
    replace_dir(tmp, root / name)
    return root / name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("name")
    ap.add_argument("--command", required=True, help="the exact command(s) that produced the run")
    args = ap.parse_args()
    out = ship(args.run_dir, args.name, args.command)
    print(f"shipped {args.run_dir} as {out}")


if __name__ == "__main__":
    main()
