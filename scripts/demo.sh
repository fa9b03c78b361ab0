#!/usr/bin/env bash
# Fresh machine -> demo: create or reuse a virtual environment, install the project, run the whole pipeline
# on the shapes world and write runs/demo/report.md (docs/demo.md).
#
#   scripts/demo.sh [--smoke] [--force] [--out DIR] [--verbose] [key.sub=value ...]
#
# VENV (default .venv) picks the environment. The install is skipped when the environment already holds
# this checkout's pyproject.toml (a stamp file records its hash); DEMO_SKIP_INSTALL=1 always skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    echo "[demo] creating the virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
STAMP="$VENV/.selftok-demo-install"
WANT="$(sha256sum pyproject.toml | cut -d' ' -f1) $(pwd)"
if [ "${DEMO_SKIP_INSTALL:-0}" != "1" ] && [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    echo "[demo] installing the project into $VENV (torch first)"
    "$PY" -m pip install -q --upgrade pip
    # torch==2.13.0 is a CPU wheel available offline on these machines; other torch versions in the
    # project's range work too.
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.4,<2.15"
    "$PY" -m pip install -q -e .
    echo "$WANT" > "$STAMP"
fi
exec "$PY" -m scripts.demo "$@"
