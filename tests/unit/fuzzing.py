"""What every fuzz test (``test_fuzz_*.py``) shares: how many examples, and hypothesis settings.

Seeded and bounded: ``derandomize=True`` and no example database, so every run (CI included)
tries the same inputs; no per-example deadline (a first call may compile); ``too_slow`` is
suppressed because the examples are real loads, generations and requests. ``DEFAULT_EXAMPLES``
run in the default suite and ``SLOW_EXAMPLES`` more under the ``slow`` marker: 10,000 per target.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

DEFAULT_EXAMPLES, SLOW_EXAMPLES = 1_000, 9_000


def fuzz_settings(max_examples: int, *suppress: HealthCheck) -> settings:
  """Seeded settings for ``max_examples`` examples; ``suppress`` adds health checks to skip."""
  return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, *suppress])
