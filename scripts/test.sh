#!/usr/bin/env bash
# Installs dalle-flax with every extra its tests use into .venv and runs the whole suite
# (default tests, golden fixtures, then the slow marker). Exit code 5 (no tests) is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# the browser test drives Debian's Chromium (Playwright cannot download a browser here)
if [ ! -x /usr/bin/chromium ]; then
  SUDO=$([ "$(id -u)" -eq 0 ] || echo sudo)
  $SUDO apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium >/dev/null
fi
python -m pip install -q --upgrade pip
# torch first, pinned: the CPU build these machines carry; an unpinned torch pulls CUDA (GBs).
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,torch,train,tensorboard,web]"  # not wandb: its tests use a fake module
run() {
  set +e; python -m pytest "$@"; rc=$?; set -e
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests for: $*" >&2; exit 1; fi
  if [ "$rc" -ne 0 ]; then exit "$rc"; fi
}
run -q -m "not slow" tests
run -q -m "slow" tests
