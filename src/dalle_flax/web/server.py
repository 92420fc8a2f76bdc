"""Serving the demo app with uvicorn: bind first (port 0 picks a free one), then serve.

Example::

    server = make_server({"shapes": pipe}, "127.0.0.1", 0)   # bound and listening
    server.start()                                          # serves on a background thread
    print(server.url); ...; server.stop()

or ``serve(pipe, port=8000)`` in the foreground until Ctrl-C (what ``dalle-flax serve`` runs).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any

import uvicorn

from .app import create_app

logger = logging.getLogger(__name__)

__all__ = ["DemoServer", "make_server", "serve"]


def _is_loopback(host: str) -> bool:
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return host == "localhost"


class DemoServer:
  """The app under uvicorn on an already bound, listening socket.

  Args:
    app: the ASGI app (from :func:`~dalle_flax.web.app.create_app`).
    host, port: the address to bind (port 0: a free one; ``url`` says which).
  """

  def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0):
    self.app = app
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    self.socket = socket.socket(family, socket.SOCK_STREAM)
    self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      self.socket.bind((host, port))
      self.socket.listen(128)  # connections made before serving starts wait in the backlog
    except OSError:
      self.socket.close()
      raise
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, access_log=False)
    self._server = uvicorn.Server(config)
    self._thread: threading.Thread | None = None

  @property
  def url(self) -> str:
    """``http://host:port/`` of the bound socket."""
    host, port = self.socket.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

  def serve_forever(self) -> None:
    """Serves in this thread until :meth:`stop` (or Ctrl-C when this is the main thread)."""
    self._server.run(sockets=[self.socket])

  def start(self) -> DemoServer:
    """Serves on a daemon thread; returns once uvicorn has started."""
    self._thread = threading.Thread(target=self.serve_forever, name="dalle-flax-demo", daemon=True)
    self._thread.start()
    while not self._server.started and self._thread.is_alive():
      self._thread.join(0.02)
    if not self._server.started:
      raise RuntimeError("the demo server did not start (see the log)")
    return self

  def stop(self, timeout: float = 30.0) -> None:
    """Stops serving (running the app's shutdown, which closes its queue) and closes the socket."""
    self._server.should_exit = True
    if self._thread is not None:
      self._thread.join(timeout)
    self.socket.close()

  def __enter__(self) -> DemoServer:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.stop()


def make_server(pipes: Mapping[str, Any] | Any, host: str = "127.0.0.1", port: int = 0, *,
                max_queue: int = 8, progress_every: int = 16) -> DemoServer:
  """Builds the app over ``pipes`` and binds it (not serving yet: ``start()`` or ``serve_forever()``).

  Args:
    pipes: one loaded text-to-image pipeline, or ``{name: pipeline}`` (the first is the default).
    host: address to bind; 127.0.0.1 (the default) keeps the demo on this machine.
    port: port to bind; 0 picks a free one.
    max_queue: the most requests waiting behind the running one (more get 429).
    progress_every: image tokens between streamed previews unless a request says.
  """
  server = DemoServer(create_app(pipes, max_queue=max_queue, progress_every=progress_every), host, port)
  if not _is_loopback(host):
    logger.warning("serving on %s, not a loopback address: whoever reaches it can run "
                   "generations on this machine", host)
  return server


def serve(pipes: Mapping[str, Any] | Any, host: str = "127.0.0.1", port: int = 8000, *,
          max_queue: int = 8, progress_every: int = 16, on_ready: Callable[[str], Any] | None = None) -> None:
  """Serves the demo in the foreground until interrupted (Ctrl-C), then closes the socket.

  Args:
    pipes: one loaded text-to-image pipeline, or ``{name: pipeline}``.
    host, port: address to bind (default 127.0.0.1:8000; port 0 picks a free one).
    max_queue, progress_every: see :func:`make_server`.
    on_ready: called with the URL once the socket listens (default: log it).
  """
  server = make_server(pipes, host, port, max_queue=max_queue, progress_every=progress_every)
  try:
    (on_ready or (lambda url: logger.info("serving the demo on %s", url)))(server.url)
    server.serve_forever()
  except KeyboardInterrupt:
    logger.info("interrupted: stopping the demo server")
  finally:
    server.socket.close()
