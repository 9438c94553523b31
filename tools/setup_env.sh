#!/usr/bin/env bash
# Creates .venv in the repository root and installs the whole stack on a CPU machine.
#
#   bash tools/setup_env.sh            # first run: ~8 min (mmcv compiles its ops), re-run: seconds
#   MMSEG_CBT_WHEEL_DIR=../shared/wheels bash tools/setup_env.sh   # take a prebuilt mmcv wheel: ~1-2 min
#   MMSEG_CBT_WITH_TRITON=1 bash tools/setup_env.sh   # also triton (~290 MB): interpreter tests of the CUDA kernel
#
# Order matters: torch 2.13.0 (local CPU wheel, never a newer CUDA build) first, then the build tools,
# then mmcv with --no-build-isolation (otherwise pip builds it against a freshly downloaded CUDA torch),
# then the rest and this package in editable mode.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3.11}"
VENV="$ROOT/.venv"
STAMP="$VENV/.mmseg_cbt_setup_stamp"
want_stamp="$( (cat requirements/*.txt setup.py; echo "triton=${MMSEG_CBT_WITH_TRITON:-0}") | sha1sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" ]] \
   && "$VENV/bin/python" -c "import mmcv._ext, mmseg, mmseg_cbt" 2>/dev/null; then
  echo "[setup_env] environment up to date ($VENV)"
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
echo "[setup_env] torch 2.13.0 + build tools"
"${PIP[@]}" install -q "torch==2.13.0" -r requirements/build.txt

echo "[setup_env] mmcv 2.1.0 with ops"
if ! "$VENV/bin/python" -c "import mmcv._ext" 2>/dev/null; then
  MMCV_ARGS=()
  if [[ -n "${MMSEG_CBT_WHEEL_DIR:-}" && -d "${MMSEG_CBT_WHEEL_DIR}" ]]; then
    # scoped to this step only: a global PIP_FIND_LINKS would hide the machine's torch wheel dir
    MMCV_ARGS+=(--find-links "$(cd "$MMSEG_CBT_WHEEL_DIR" && pwd)")
    echo "[setup_env]   using wheels from $MMSEG_CBT_WHEEL_DIR"
  else
    echo "[setup_env]   building mmcv with its ops from source (7-14 min on 2 cores; pip reuses a wheel it built before)"
  fi
  MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "${PIP[@]}" install -q --no-build-isolation "${MMCV_ARGS[@]}" "mmcv==2.1.0"
fi

echo "[setup_env] runtime, test and lint requirements, mmseg_cbt (editable)"
"${PIP[@]}" install -q -r requirements/runtime.txt -r requirements/tests.txt -r requirements/lint.txt "torch==2.13.0"
if [[ "${MMSEG_CBT_WITH_TRITON:-0}" == "1" ]]; then
  echo "[setup_env] optional: triton (CPU interpreter tests of the CUDA kernel)"
  "${PIP[@]}" install -q -r requirements/optional.txt "torch==2.13.0"
fi
"${PIP[@]}" install -q --no-build-isolation --no-deps -e .
"$VENV/bin/python" -c "import mmcv._ext, mmseg, mmseg_cbt; print('[setup_env] ok: mmcv', mmcv.__version__, 'mmseg', mmseg.__version__)"
echo "$want_stamp" > "$STAMP"
