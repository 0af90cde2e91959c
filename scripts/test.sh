#!/usr/bin/env bash
# Creates .venv (if needed), installs bioscan-jax with the test, tf, torch and hub extras, runs pytest.
# Usage: bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# The CPU build of torch (the `torch` extra) is pinned here: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,tf,torch,hub]"
# The identify report's browser test renders with headless chromium; never fails the run without apt.
command -v chromium >/dev/null 2>&1 || (DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q chromium \
  >/dev/null 2>&1 || echo "chromium not installed: report browser test skipped")
export XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=3
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests" >&2
fi
if [ "$rc" -eq 0 ] && [ "$#" -eq 0 ]; then
  # The GPU suite's code path on the CPU, tiny shapes (benchmarks/gpu_suite.sh): a few minutes.
  out=$(mktemp -d)
  OUT="$out" PYTHON=.venv/bin/python bash benchmarks/gpu_suite.sh --dry-run > "$out/stdout" || rc=$?
  echo "gpu_suite --dry-run: rc=$rc; $(tail -c 300 "$out/stdout")"
fi
exit "$rc"
