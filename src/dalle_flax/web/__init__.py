"""The local web demo of dalle-flax: a standard-library HTTP server, one page, a JSON API.

Example: ``dalle_flax.web.serve(dalle_flax.pipeline("text-to-image", model="path/or/repo"))``.

``dalle-flax serve`` runs it from the command line; see :mod:`dalle_flax.web.server` for the
routes and the JSON contract.
"""

from .server import (LEGACY_NUM_IMAGES, MAX_BODY_BYTES, MAX_IMAGES, DemoServer, RequestError,
                     make_server, parse_generate_request, serve)

__all__ = ["LEGACY_NUM_IMAGES", "MAX_BODY_BYTES", "MAX_IMAGES", "DemoServer", "RequestError",
           "make_server", "parse_generate_request", "serve"]
