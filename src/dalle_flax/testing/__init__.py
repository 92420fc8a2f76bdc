"""Test utilities shipped with dalle_flax: a local Hub-protocol server and tiny configs.

Example: ``from dalle_flax.testing import LocalHubServer``.
"""

from dalle_flax.testing.hub_server import LocalHubServer

__all__ = ["LocalHubServer"]
