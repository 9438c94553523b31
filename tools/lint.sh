#!/usr/bin/env bash
# Lint as OpenMMLab projects do (configuration in setup.cfg): flake8, isort and yapf over the package, tools, tests
# and configs. Fails on any finding; `bash tools/lint.sh --fix` rewrites imports and formatting in place first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=.venv/bin/python
PATHS=(mmseg_cbt tools tests configs setup.py)
if [[ "${1:-}" == "--fix" ]]; then
  $PY -m isort "${PATHS[@]}"
  $PY -m yapf -i -r "${PATHS[@]}"
fi
$PY -m flake8 "${PATHS[@]}"
$PY -m isort --check-only --diff "${PATHS[@]}"
$PY -m yapf --diff -r "${PATHS[@]}"
echo "[lint] ok"
