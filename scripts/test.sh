#!/usr/bin/env bash
# Fresh machine -> tests: create/reuse .venv, install the project with its test extras, run the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
python -m pip install -q --upgrade pip
# torch==2.13.0 is a CPU wheel available offline on these machines; other torch versions in the
# project's range work too.
python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch>=2.4,<2.15"
python -m pip install -q -e ".[test,playground]"  # playground: gradio, for tests/test_playground.py
python -m pytest -q -x "$@"
