"""Shared pytest setup: the local Hub fixture, and faster XLA compiles for unit tests."""

import jax
import pytest

pytest_plugins = ["dalle_flax.testing.pytest_plugin"]


@pytest.fixture(autouse=True)
def _fast_compiles_for_unit_tests(request):
  """Unit tests run tiny models where XLA optimisation costs more than it saves (flax examples
  do the same); golden tests keep the default pipeline so they check what users run."""
  unit = "/tests/unit/" in str(request.node.path).replace("\\", "/")
  if bool(jax.config.values.get("jax_disable_most_optimizations")) != unit:
    jax.config.update("jax_disable_most_optimizations", unit)
  yield
