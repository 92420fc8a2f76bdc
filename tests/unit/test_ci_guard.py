"""CI fails, rather than silently skipping every golden test, when ../shared/fixtures is absent."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _pytest(tmp_path, **env):
  done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "tests/unit/test_seeds.py", "-k", "fixed_forever"],
                        cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
  return done.returncode, done.stdout + done.stderr


def test_ci_without_fixtures_fails(tmp_path):
  code, output = _pytest(tmp_path, CI="true", DALLE_FLAX_SHARED_FIXTURES=str(tmp_path / "missing"))
  assert code != 0 and "golden fixtures are missing" in output and str(tmp_path / "missing") in output


def test_without_ci_the_run_goes_on(tmp_path):
  code, output = _pytest(tmp_path, CI="", DALLE_FLAX_SHARED_FIXTURES=str(tmp_path / "missing"))
  assert code == 0, output
