"""The web demo of dalle-flax: a FastAPI app (page, JSON and streaming API) served by uvicorn.

Example: ``dalle_flax.web.serve(dalle_flax.pipeline("text-to-image"))``, or from the command line
``dalle-flax serve [--model M ...] [--max-queue 8]``. Needs the ``[web]`` extra (fastapi, uvicorn).

:mod:`dalle_flax.web.app` has the routes and their contracts, :mod:`dalle_flax.web.jobs` the
one-at-a-time generation queue, :mod:`dalle_flax.web.server` the uvicorn server.
"""

try:
  from .app import (LEGACY_NUM_IMAGES, MAX_BODY_BYTES, MAX_IMAGES, MAX_PROMPT_CHARS, GenerateRequest,
                    GenerateResponse, HealthResponse, LegacyGenerateResponse, create_app)
  from .server import DemoServer, make_server, serve
except ModuleNotFoundError as error:  # pragma: no cover (exercised in a venv without the extra)
  if error.name not in ("fastapi", "uvicorn", "starlette", "pydantic"):
    raise
  raise ModuleNotFoundError(f"the web demo needs {error.name}: pip install 'dalle-flax[web]'",
                            name=error.name) from error
from .jobs import Cancelled, GenerationQueue, Job, QueueFull

__all__ = ["LEGACY_NUM_IMAGES", "MAX_BODY_BYTES", "MAX_IMAGES", "MAX_PROMPT_CHARS", "Cancelled", "DemoServer",
           "GenerateRequest", "GenerateResponse", "GenerationQueue", "HealthResponse", "Job",
           "LegacyGenerateResponse", "QueueFull", "create_app", "make_server", "serve"]
