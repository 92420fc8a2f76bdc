"""pytest fixtures that point huggingface_hub and transformers at a `LocalHubServer`.

Example: ``def test_x(local_hub): local_hub.api.create_repo("me/x"); hf_hub_download("me/x", ".gitattributes")``

Enable with ``pytest_plugins = ["dalle_flax.testing.pytest_plugin"]`` in the root ``conftest.py``.

huggingface_hub reads ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_OFFLINE``... once, at import time, into
``huggingface_hub.constants`` (and a few modules copy some of them at their own import). Setting
environment variables during a test is therefore not enough: `patch_hub_environment` also patches
those module attributes, every module-level copy of them it can find in ``sys.modules``, the
endpoint of the default ``huggingface_hub.hf_api.api`` instance, and transformers' cached ``HfApi``.
Everything is undone by ``monkeypatch`` at the end of the test.

Offline mode: ``local_hub.set_offline()`` / ``with local_hub.offline(): ...`` inside a test using the
fixture, or `set_hub_offline` with any ``monkeypatch``; setting ``HF_HUB_OFFLINE`` alone after
huggingface_hub was imported has no effect.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest

from dalle_flax.testing.hub_server import LocalHubServer

if TYPE_CHECKING:
    from huggingface_hub import HfApi

__all__ = ["LocalHub", "local_hub", "patch_hub_environment", "set_hub_offline"]

DEFAULT_TEST_TOKEN = "hf_local_test_token"

# huggingface_hub.constants attributes derived from HF_HOME at import time, and how to rebuild them.
_HOME_DERIVED = {
    "HF_HOME": lambda home: home,
    "default_cache_path": lambda home: os.path.join(home, "hub"),
    "HUGGINGFACE_HUB_CACHE": lambda home: os.path.join(home, "hub"),
    "HF_HUB_CACHE": lambda home: os.path.join(home, "hub"),
    "default_assets_cache_path": lambda home: os.path.join(home, "assets"),
    "HUGGINGFACE_ASSETS_CACHE": lambda home: os.path.join(home, "assets"),
    "HF_ASSETS_CACHE": lambda home: os.path.join(home, "assets"),
    "default_xet_cache_path": lambda home: os.path.join(home, "xet"),
    "HF_XET_CACHE": lambda home: os.path.join(home, "xet"),
    "HF_TOKEN_PATH": lambda home: os.path.join(home, "token"),
    "HF_STORED_TOKENS_PATH": lambda home: os.path.join(home, "stored_tokens"),
    "CHECK_FOR_UPDATE_DONE_PATH": lambda home: os.path.join(home, ".check_for_update_done"),
    "CHECK_FOR_SKILL_UPDATE_DONE_PATH": lambda home: os.path.join(home, ".check_for_skill_update_done"),
    "AGENT_HARNESSES_PATH": lambda home: os.path.join(home, ".agent_harnesses.json"),
}

# Environment variables that would leak the developer's real Hub setup into a test.
_ENV_TO_CLEAR = (
    "HUGGINGFACE_HUB_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HUGGINGFACE_CO_STAGING",
    "HF_OIDC_RESOURCE",
    "TRANSFORMERS_CACHE",
)


def _patch_everywhere(monkeypatch: pytest.MonkeyPatch, owner: ModuleType, updates: dict[str, Any]) -> None:
    """Set ``owner.NAME = new`` for each item of ``updates``, and every module-level copy of the old value.

    A copy is a module attribute with the same name whose value *is* (identity, not equality) the
    old value, i.e. what ``from huggingface_hub.constants import NAME`` leaves behind. Module
    ``__dict__`` is read directly so lazy modules (transformers) are not triggered to import. One
    pass over ``sys.modules`` handles all names.
    """
    old_values = {name: vars(owner).get(name, _MISSING) for name in updates}
    wanted = {name: old for name, old in old_values.items() if old is not _MISSING}
    for module in list(sys.modules.values()):
        if not isinstance(module, ModuleType):
            continue
        namespace = getattr(module, "__dict__", None)
        if not namespace:
            continue
        for name, old in wanted.items():
            if namespace.get(name, _MISSING) is old:
                monkeypatch.setattr(module, name, updates[name])


_MISSING = object()


def set_hub_offline(monkeypatch: pytest.MonkeyPatch, offline: bool = True) -> None:
    """Flip huggingface_hub's offline mode in-process (what ``HF_HUB_OFFLINE=1`` does at import).

    huggingface_hub reads ``constants.HF_HUB_OFFLINE`` on every request through
    ``constants.is_offline_mode()`` (the HTTP client's request hook raises ``OfflineModeIsEnabled``;
    ``hf_hub_download`` / ``snapshot_download`` then fall back to the cache), and transformers calls
    the same function. This patches the constant (and any module-level copy) and sets the
    ``HF_HUB_OFFLINE`` environment variable for subprocesses. Undone with ``monkeypatch``.

    Args:
        monkeypatch: The test's ``monkeypatch`` (or a ``pytest.MonkeyPatch.context()``).
        offline: True to go offline, False to go back online.
    """
    from huggingface_hub import constants

    _patch_everywhere(monkeypatch, constants, {"HF_HUB_OFFLINE": bool(offline)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")


def patch_hub_environment(
    monkeypatch: pytest.MonkeyPatch,
    *,
    endpoint: str,
    hf_home: Path | str,
    token: str | None = DEFAULT_TEST_TOKEN,
) -> None:
    """Point huggingface_hub (and transformers) at ``endpoint`` with a private ``hf_home``.

    Patches, all reverted by ``monkeypatch``:

    * env: ``HF_ENDPOINT``, ``HF_HOME``, ``HF_HUB_CACHE``, ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``,
      ``HF_TOKEN`` (if ``token``), ``HF_HUB_DISABLE_TELEMETRY=1``, ``HF_MODULES_CACHE``; clears
      ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE``, ``HUGGING_FACE_HUB_TOKEN`` and legacy cache vars.
    * ``huggingface_hub.constants``: ``ENDPOINT``, ``HUGGINGFACE_CO_URL_TEMPLATE``, ``HF_URL_HOSTS``,
      every path derived from ``HF_HOME`` (``HF_HUB_CACHE``, ``HUGGINGFACE_HUB_CACHE``,
      ``HF_ASSETS_CACHE``, ``HF_XET_CACHE``, ``HF_TOKEN_PATH``, ...), ``HF_HUB_OFFLINE=False``,
      ``HF_HUB_DISABLE_TELEMETRY=True``; plus module-level copies of those names (e.g.
      ``huggingface_hub.utils._cache_manager.HF_HUB_CACHE``, ``utils._git_credential.ENDPOINT``).
    * ``huggingface_hub.utils._http._HUB_ORIGINS`` (trusted redirect origins, frozen at import).
    * ``huggingface_hub.hf_api.api.endpoint`` (default instance behind ``huggingface_hub.create_repo``,
      ``upload_folder``, ``model_info``...).
    * ``transformers.utils.hub._hf_api`` (cached ``HfApi`` used by ``push_to_hub``) reset to None,
      ``HF_MODULES_CACHE`` and its copies, when transformers is imported.

    Args:
        monkeypatch: The test's ``monkeypatch`` (or a ``pytest.MonkeyPatch.context()``).
        endpoint: Hub base URL, e.g. ``LocalHubServer.endpoint``.
        hf_home: Folder to use as ``HF_HOME`` (caches live in ``hf_home/hub``).
        token: Token exported as ``HF_TOKEN``; None leaves the client anonymous.
    """
    from huggingface_hub import constants
    from huggingface_hub import hf_api as hf_api_module
    from huggingface_hub.utils import _http

    endpoint = endpoint.rstrip("/")
    home = str(Path(hf_home))

    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HOME", home)
    monkeypatch.setenv("HF_HUB_CACHE", os.path.join(home, "hub"))
    monkeypatch.setenv("HF_ASSETS_CACHE", os.path.join(home, "assets"))
    monkeypatch.setenv("HF_XET_CACHE", os.path.join(home, "xet"))
    monkeypatch.setenv("HF_MODULES_CACHE", os.path.join(home, "modules"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    for name in _ENV_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)

    updates: dict[str, Any] = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        **{name: build(home) for name, build in _HOME_DERIVED.items()},
    }
    host = urlsplit(endpoint).hostname
    if host and hasattr(constants, "HF_URL_HOSTS"):
        updates["HF_URL_HOSTS"] = frozenset(constants.HF_URL_HOSTS | {host.lower()})
    _patch_everywhere(monkeypatch, constants, updates)
    if hasattr(_http, "_HUB_ORIGINS") and hasattr(_http, "_url_origin"):
        monkeypatch.setattr(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)}))

    monkeypatch.setattr(hf_api_module.api, "endpoint", endpoint)

    hub_module = sys.modules.get("transformers.utils.hub")
    if hub_module is not None:
        if vars(hub_module).get("_hf_api") is not None:
            monkeypatch.setattr(hub_module, "_hf_api", None)
        _patch_everywhere(monkeypatch, hub_module, {"HF_MODULES_CACHE": os.path.join(home, "modules")})

    _clear_filesystem_instances()


def _clear_filesystem_instances() -> None:
    """Drop cached ``HfFileSystem`` instances (fsspec caches them with the endpoint they saw)."""
    module = sys.modules.get("huggingface_hub.hf_file_system")
    file_system = getattr(module, "HfFileSystem", None) if module is not None else None
    clear = getattr(file_system, "clear_instance_cache", None)
    if callable(clear):
        clear()


@dataclass
class LocalHub:
    """What the `local_hub` fixture yields.

    Attributes:
        server: The running `LocalHubServer` (``server.stop()`` makes the Hub unreachable).
        endpoint: Its base URL, also patched in as the default Hub endpoint.
        token: Token exported as ``HF_TOKEN`` (any token is accepted by the server).
        hf_home: Temporary ``HF_HOME``.
        cache_dir: Temporary ``HF_HUB_CACHE`` (``hf_home / "hub"``).
        api: ``HfApi(endpoint=endpoint, token=token)``.
        username: Namespace ``whoami`` returns (used for repo ids without a namespace).
    """

    server: LocalHubServer
    endpoint: str
    token: str
    hf_home: Path
    cache_dir: Path
    api: HfApi
    username: str
    _monkeypatch: pytest.MonkeyPatch = field(repr=False)

    def set_offline(self, offline: bool = True) -> None:
        """Turn huggingface_hub's offline mode on or off for the rest of the test (see `set_hub_offline`)."""
        set_hub_offline(self._monkeypatch, offline)

    @contextlib.contextmanager
    def offline(self) -> Iterator[None]:
        """Context manager: offline mode inside the block, online again after it."""
        self.set_offline(True)
        try:
            yield
        finally:
            self.set_offline(False)


@pytest.fixture
def local_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalHub]:
    """A fresh `LocalHubServer` per test, with huggingface_hub and transformers pointed at it.

    Function-scoped: each test gets an empty server (storage under ``tmp_path``) and an empty
    ``HF_HOME``; starting one takes about a millisecond. Plain ``hf_hub_download(...)``,
    ``snapshot_download(...)``, ``HfApi().upload_folder(...)`` and transformers'
    ``push_to_hub`` / ``from_pretrained`` hit it without an ``endpoint=`` argument.

    Yields:
        A `LocalHub`.
    """
    from huggingface_hub import HfApi

    had_transformers_hub = "transformers.utils.hub" in sys.modules
    server = LocalHubServer(root=tmp_path / "local-hub-server").start()
    try:
        hf_home = tmp_path / "hf_home"
        hf_home.mkdir()
        token = DEFAULT_TEST_TOKEN
        patch_hub_environment(monkeypatch, endpoint=server.endpoint, hf_home=hf_home, token=token)
        yield LocalHub(
            server=server,
            endpoint=server.endpoint,
            token=token,
            hf_home=hf_home,
            cache_dir=hf_home / "hub",
            api=HfApi(endpoint=server.endpoint, token=token),
            username=server.username,
            _monkeypatch=monkeypatch,
        )
    finally:
        server.stop()
        # transformers imported during the test caches an HfApi bound to this server: drop it.
        hub_module = sys.modules.get("transformers.utils.hub")
        if hub_module is not None and not had_transformers_hub:
            hub_module._hf_api = None
        _clear_filesystem_instances()


def enable_jax_compilation_cache(cache_dir: Path) -> Any:
  """Turns on jax's persistent compilation cache in ``cache_dir``; returns a restore function.

  Tests that load the same tiny model in many places (pipeline, CLI, web demo, subprocesses)
  then compile it once per session. Uses ``jax._src.compilation_cache.reset_cache`` (private)
  so the new directory takes effect mid-process.
  """
  import jax
  from jax._src import compilation_cache

  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {name: getattr(jax.config, name) for name in names}
  for name, value in zip(names, (str(cache_dir), 0, 0)):
    jax.config.update(name, value)
  compilation_cache.reset_cache()

  def restore() -> None:
    for name, value in old.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()

  return restore


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
  """A persistent jax compilation cache shared by every test module of the session."""
  cache_dir = tmp_path_factory.getbasetemp() / "dalle-flax-jax-cache"
  restore = enable_jax_compilation_cache(cache_dir)
  yield cache_dir
  restore()
