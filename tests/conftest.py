"""Shared pytest setup: the local Hub fixture, faster XLA compiles for unit tests, and the CI
guard that golden tests really ran."""

import os
from pathlib import Path

import jax
import pytest

pytest_plugins = ["dalle_flax.testing.pytest_plugin"]

# The golden fixtures live beside the checkout (../shared/fixtures); a user's clone has none and
# the golden tests skip. DALLE_FLAX_SHARED_FIXTURES only moves the path this guard checks.
SHARED_FIXTURES = Path(os.environ.get("DALLE_FLAX_SHARED_FIXTURES",
                                      Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"))


def pytest_sessionstart(session):
  """Under CI=true a missing fixtures folder is an error, not a run that skips every golden test."""
  if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes") and not SHARED_FIXTURES.is_dir():
    raise pytest.UsageError(
        f"CI is set but the golden fixtures are missing: expected the folder {SHARED_FIXTURES} "
        "(../shared/fixtures beside the checkout). Provide it, or unset CI to let golden tests skip.")


@pytest.fixture(autouse=True)
def _fast_compiles_for_unit_tests(request):
  """Unit tests run tiny models where XLA optimisation costs more than it saves (flax examples
  do the same); golden tests keep the default pipeline so they check what users run."""
  unit = "/tests/unit/" in str(request.node.path).replace("\\", "/")
  if bool(jax.config.values.get("jax_disable_most_optimizations")) != unit:
    jax.config.update("jax_disable_most_optimizations", unit)
  yield
