#!/usr/bin/env bash
# The README's test command: set-up (idempotent, seconds when done) and the whole test suite.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash tools/setup_env.sh
set +e
.venv/bin/python -m pytest tests -q -p no:cacheprovider "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "[run_tests] pytest collected no tests: failing" >&2
  exit 1
fi
exit $rc
