"""A local stand-in for the Hugging Face Hub: the HTTP routes huggingface_hub uses to push and pull.

Tests point huggingface_hub and transformers at it (the ``local_hub`` fixture of
`dalle_flax.testing.pytest_plugin` does) instead of huggingface.co.

Example: ``with LocalHubServer() as hub: HfApi(hub.endpoint, token="t").create_repo("me/x")``

Routes (model repos with ``namespace/name`` ids only; ``{rev}`` is a branch, ``refs/pr/N`` or a
commit id)::

  GET  /api/whoami-v2                        {"name": username}
  POST /api/repos/create                     a repo whose ``main`` holds a ``.gitattributes``
  POST /api/validate-yaml                    README metadata: always valid
  GET  /api/models/{repo}[/revision/{rev}]   model info: sha and siblings (with size and blobId)
  GET  /api/models/{repo}/tree/{rev}[/{dir}] files and folders (``?recursive=true``)
  POST /api/models/{repo}/paths-info/{rev}   the same entries for the given ``paths``
  POST /api/models/{repo}/branch/{name}      a branch at ``startingPoint`` (default ``main``)
  POST /api/models/{repo}/preupload/{rev}    every file "regular", with the oid of the current one
  POST /api/models/{repo}/commit/{rev}       NDJSON commit (``?create_pr=1``: onto a new refs/pr/N)
  HEAD|GET /{repo}/resolve/{rev}/{path}      the file, with ETag and X-Repo-Commit

Errors carry the ``X-Error-Code`` header huggingface_hub maps to its exceptions: ``RepoNotFound``,
``RevisionNotFound`` and ``EntryNotFound`` (with ``X-Repo-Commit``, so the client caches the
miss). Other routes get a 404 and a logged warning. Any token, or none, is accepted.

Preupload answering "regular" makes clients send file contents base64-inlined in the commit, so
there is no LFS or Xet storage. Commits are immutable ``{path: blob id}`` snapshots, so every past
commit id stays resolvable. Repos live in memory; file contents under ``root/blobs``, named by
their git blob id (what ``git hash-object`` prints, also the ETag and the tree ``oid``).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["LocalHubServer"]

logger = logging.getLogger(__name__)

DEFAULT_USERNAME = "local-user"
"""Name ``whoami`` returns, and namespace of repos created without one."""

# What the Hub puts in the first commit of a new repo (shortened).
_GITATTRIBUTES = "".join(f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n"
                         for ext in ("bin", "h5", "msgpack", "npz", "safetensors"))

_REPO = r"/api/models/(?P<repo_id>[^/]+/[^/]+)"
_ROUTES = [(method, re.compile(pattern), handler) for method, pattern, handler in (
    # HEAD requests take the GET routes; matched against the path still %-encoded
    ("GET", r"/api/whoami-v2", "_whoami"),
    ("POST", r"/api/repos/create", "_create_repo"),
    ("POST", r"/api/validate-yaml", "_validate_yaml"),
    ("GET", _REPO + r"(?:/revision/(?P<rev>[^/]+))?", "_model_info"),
    ("GET", _REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "_tree"),
    ("POST", _REPO + r"/paths-info/(?P<rev>[^/]+)", "_paths_info"),
    ("POST", _REPO + r"/branch/(?P<branch>[^/]+)", "_create_branch"),
    ("POST", _REPO + r"/preupload/(?P<rev>[^/]+)", "_preupload"),
    ("POST", _REPO + r"/commit/(?P<rev>[^/]+)", "_commit"),
    ("GET", r"/(?P<repo_id>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "_resolve"),
)]


class _HubError(Exception):
  """An error answered as JSON ``{"error": message}``, with the Hub's error headers."""

  def __init__(self, status: int, message: str, code: str | None = None,
               headers: Mapping[str, str] | None = None, **body: Any) -> None:
    super().__init__(message)
    self.status = status
    self.body = {"error": message, **body}
    ascii_message = message.encode("ascii", "replace").decode()  # headers are latin-1
    self.headers = {"X-Error-Message": ascii_message, **({"X-Error-Code": code} if code else {}),
                    **(headers or {})}


def _entry_not_found(path: str, commit_id: str) -> _HubError:
  # X-Repo-Commit lets huggingface_hub cache the miss for that commit.
  return _HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit_id})


def _git_blob_id(data: bytes) -> str:
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Repo:
  refs: dict[str, str]  # branch name or "refs/pr/N" -> commit id
  commits: dict[str, dict[str, str]]  # commit id -> {path: blob id}


class _Store:
  """Repos in memory, file contents in ``blob_dir``. Writes hold ``lock``; no blob is rewritten."""

  def __init__(self, blob_dir: Path) -> None:
    self.blob_dir = blob_dir
    self.repos: dict[str, _Repo] = {}
    self.lock = threading.Lock()

  def blob(self, blob_id: str) -> Path:
    return self.blob_dir / blob_id

  def _put_blob(self, data: bytes) -> str:  # with lock held
    blob_id = _git_blob_id(data)
    if not self.blob(blob_id).exists():
      self.blob(blob_id).write_bytes(data)
    return blob_id

  def repo(self, repo_id: str) -> _Repo:
    if repo_id not in self.repos:
      raise _HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
    return self.repos[repo_id]

  def snapshot(self, repo_id: str, rev: str) -> tuple[str, dict[str, str]]:
    """Returns the commit id ``rev`` names and its files ``{path: blob id}``."""
    repo = self.repo(repo_id)
    commit_id = repo.refs.get(rev.removeprefix("refs/heads/"), rev)
    if commit_id not in repo.commits:
      raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
    return commit_id, repo.commits[commit_id]

  def create_repo(self, repo_id: str, url: str) -> None:
    with self.lock:
      if repo_id in self.repos:  # create_repo(exist_ok=True) reads the url of the 409 too
        raise _HubError(409, f"You already created this model repo: {repo_id}", url=url)
      commit_id = secrets.token_hex(20)
      files = {".gitattributes": self._put_blob(_GITATTRIBUTES.encode())}
      self.repos[repo_id] = _Repo(refs={"main": commit_id}, commits={commit_id: files})

  def create_branch(self, repo_id: str, branch: str, start: str) -> None:
    with self.lock:
      repo = self.repo(repo_id)
      if branch in repo.refs:
        raise _HubError(409, f"Reference already exists: {branch}")
      repo.refs[branch] = self.snapshot(repo_id, start)[0]

  def commit(self, repo_id: str, rev: str, operations: list[dict[str, Any]],
             create_pr: bool) -> tuple[str, str]:
    """Applies NDJSON commit ``operations`` on top of branch or PR ``rev``.

    Returns:
      The new commit id, and the ref moved to it: ``rev``, or a new ``refs/pr/N`` if ``create_pr``.
    """
    with self.lock:
      repo = self.repo(repo_id)
      ref = rev.removeprefix("refs/heads/")
      if ref not in repo.refs:
        raise _HubError(404, f"Invalid rev id: {rev} (commits go to a branch or a PR)",
                        "RevisionNotFound")
      files = dict(repo.commits[repo.refs[ref]])
      for operation in operations:
        key, value = operation["key"], operation["value"]
        if key == "file":
          content = value["content"]
          base64_encoded = value.get("encoding") == "base64"
          data = base64.b64decode(content) if base64_encoded else content.encode()
          files[value["path"]] = self._put_blob(data)
        elif key == "deletedFile":
          files.pop(value["path"], None)
        elif key == "deletedFolder":
          folder = value["path"].rstrip("/") + "/"
          files = {path: blob_id for path, blob_id in files.items() if not path.startswith(folder)}
        elif key != "header":
          raise _HubError(400, f"Unsupported commit operation: {key}")
      if create_pr:
        ref = f"refs/pr/{1 + sum(name.startswith('refs/pr/') for name in repo.refs)}"
      commit_id = secrets.token_hex(20)
      repo.commits[commit_id] = files
      repo.refs[ref] = commit_id
      return commit_id, ref


class _Handler(BaseHTTPRequestHandler):
  """Answers one request (HTTP/1.0: one per connection, so `LocalHubServer.stop` cuts them all)."""

  disable_nagle_algorithm = True  # headers and body are separate writes: no delayed-ACK wait

  def __init__(self, hub: LocalHubServer, *args: Any) -> None:
    self.hub = hub
    self.store = hub._store
    super().__init__(*args)  # handles the request

  def do_GET(self) -> None:
    self._dispatch()

  def do_HEAD(self) -> None:
    self._dispatch()

  def do_POST(self) -> None:
    self._dispatch()

  def _dispatch(self) -> None:
    url = urlsplit(self.path)
    self.query = parse_qs(url.query)
    self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
    method = "GET" if self.command == "HEAD" else self.command
    try:
      for route_method, pattern, handler in _ROUTES:
        match = pattern.fullmatch(url.path)
        if match and route_method == method:
          args = {key: unquote(value) for key, value in match.groupdict().items() if value}
          return getattr(self, handler)(**args)
      logger.warning("LocalHubServer: no route for %s %s, answering 404", self.command, url.path)
      raise _HubError(404, f"LocalHubServer does not implement {self.command} {url.path}")
    except _HubError as error:
      self._send_json(error.body, error.status, error.headers)
    except (BrokenPipeError, ConnectionResetError):
      logger.debug("client left during %s %s", self.command, self.path)
    except Exception:  # a 500 rather than a dropped connection
      logger.exception("LocalHubServer failed on %s %s", self.command, self.path)
      self._send_json({"error": "internal error in LocalHubServer (see the logs)"}, 500)

  def log_message(self, format: str, *args: Any) -> None:
    logger.debug("%s %s", self.address_string(), format % args)

  def _send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
    self.send_response(status)
    for name, value in {**headers, "Content-Length": str(len(body))}.items():
      self.send_header(name, value)
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _send_json(self, payload: Any, status: int = 200,
                 headers: Mapping[str, str] | None = None) -> None:
    self._send(status, json.dumps(payload).encode(),
               {"Content-Type": "application/json", **(headers or {})})

  def _json_body(self) -> dict[str, Any]:
    return json.loads(self.body) if self.body else {}

  # -- account and repos ---------------------------------------------------------------------

  def _whoami(self) -> None:
    self._send_json({"type": "user", "name": self.hub.username})

  def _create_repo(self) -> None:
    body = self._json_body()
    if body.get("type", "model") != "model":
      raise _HubError(400, f"LocalHubServer only has model repos, got type {body['type']!r}")
    repo_id = f"{body.get('organization') or self.hub.username}/{body['name']}"
    url = f"{self.hub.endpoint}/{repo_id}"
    self.store.create_repo(repo_id, url)
    self._send_json({"url": url, "name": repo_id})

  def _validate_yaml(self) -> None:
    self._send_json({"errors": [], "warnings": []})

  def _create_branch(self, repo_id: str, branch: str) -> None:
    self.store.create_branch(repo_id, branch, self._json_body().get("startingPoint") or "main")
    self._send_json({})

  # -- listings ------------------------------------------------------------------------------

  def _model_info(self, repo_id: str, rev: str = "main") -> None:
    commit_id, files = self.store.snapshot(repo_id, rev)
    siblings = [{"rfilename": path, "size": self.store.blob(blob_id).stat().st_size,
                 "blobId": blob_id} for path, blob_id in files.items()]
    self._send_json({"id": repo_id, "modelId": repo_id, "sha": commit_id, "private": False,
                     "tags": [], "siblings": siblings})

  def _entry(self, files: Mapping[str, str], path: str) -> dict[str, Any]:
    """The tree entry of ``path``: a file, else a folder (its oid hashes what it holds)."""
    if path in files:
      size = self.store.blob(files[path]).stat().st_size
      return {"type": "file", "path": path, "oid": files[path], "size": size}
    inside = sorted(item for item in files.items() if item[0].startswith(path + "/"))
    oid = hashlib.sha1(json.dumps(inside).encode()).hexdigest()
    return {"type": "directory", "path": path, "oid": oid, "size": 0}

  def _tree(self, repo_id: str, rev: str, path: str = "") -> None:
    commit_id, files = self.store.snapshot(repo_id, rev)
    prefix = path.strip("/") + "/" if path.strip("/") else ""
    recursive = self.query.get("recursive", ["false"])[0].lower() == "true"
    listed = set()
    for name in files:
      if name.startswith(prefix):
        parts = name[len(prefix):].split("/")
        depths = range(1, len(parts) + 1) if recursive else [1]
        listed.update(prefix + "/".join(parts[:depth]) for depth in depths)
    if prefix and not listed:
      raise _entry_not_found(path, commit_id)
    self._send_json([self._entry(files, name) for name in sorted(listed)])

  def _paths_info(self, repo_id: str, rev: str) -> None:
    _, files = self.store.snapshot(repo_id, rev)
    paths = [path.strip("/") for path in parse_qs(self.body.decode()).get("paths", [])]
    folders = {name.rsplit("/", i)[0] for name in files for i in range(1, name.count("/") + 1)}
    found = [path for path in paths if path in files or path in folders]
    self._send_json([self._entry(files, path) for path in found])

  # -- uploads -------------------------------------------------------------------------------

  def _preupload(self, repo_id: str, rev: str) -> None:
    commit_id, files = self.store.snapshot(repo_id, rev)
    answer = [{"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
               "oid": files.get(item["path"])} for item in self._json_body().get("files", [])]
    self._send_json({"files": answer, "commitOid": commit_id})

  def _commit(self, repo_id: str, rev: str) -> None:
    operations = [json.loads(line) for line in self.body.splitlines() if line.strip()]
    create_pr = self.query.get("create_pr", ["0"])[0].lower() in ("1", "true")
    commit_id, ref = self.store.commit(repo_id, rev, operations, create_pr)
    repo_url = f"{self.hub.endpoint}/{repo_id}"
    pr_url = f"{repo_url}/discussions/{ref.rsplit('/', 1)[1]}" if create_pr else None
    self._send_json({"success": True, "commitOid": commit_id,
                     "commitUrl": f"{repo_url}/commit/{commit_id}", "pullRequestUrl": pr_url})

  # -- downloads -----------------------------------------------------------------------------

  def _resolve(self, repo_id: str, rev: str, path: str) -> None:
    commit_id, files = self.store.snapshot(repo_id, rev)
    if path not in files:
      raise _entry_not_found(path, commit_id)
    self._send(200, self.store.blob(files[path]).read_bytes(),
               {"Content-Type": "application/octet-stream", "ETag": f'"{files[path]}"',
                "X-Repo-Commit": commit_id})


class LocalHubServer:
  """The Hub routes above on a local port, served from a daemon thread.

  Args:
    root: Folder for file contents (created if needed). Default: a temporary folder, deleted by
      `stop`.
    host: Interface to bind.
    port: TCP port; 0 picks a free one.
    username: Name ``whoami`` returns, and namespace of repos created without one.

  Attributes:
    root: The storage folder.
    username: See ``username`` above.
  """

  def __init__(self, root: Path | str | None = None, *, host: str = "127.0.0.1", port: int = 0,
               username: str = DEFAULT_USERNAME) -> None:
    self._owns_root = root is None
    self.root = Path(tempfile.mkdtemp(prefix="dalle-flax-hub-") if root is None else root)
    self.username = username
    self._address = (host, port)
    self._store = _Store(self.root / "blobs")
    self._httpd: ThreadingHTTPServer | None = None

  @property
  def endpoint(self) -> str:
    """Base URL without a trailing slash, e.g. ``"http://127.0.0.1:54321"``; the server must run."""
    if self._httpd is None:
      raise RuntimeError("LocalHubServer is not running: call start() or use it in a with block")
    host, port = self._httpd.server_address[:2]
    return f"http://{host}:{port}"

  def start(self) -> Self:
    """Binds the port and serves from a daemon thread (if not serving yet). Returns ``self``."""
    if self._httpd is None:
      self._store.blob_dir.mkdir(parents=True, exist_ok=True)
      self._httpd = ThreadingHTTPServer(self._address, functools.partial(_Handler, self))
      threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                       name="LocalHubServer", daemon=True).start()
    return self

  def stop(self) -> None:
    """Stops serving (clients then get connection errors); deletes a temporary ``root``."""
    httpd, self._httpd = self._httpd, None
    if httpd is not None:
      httpd.shutdown()
      httpd.server_close()
    if self._owns_root:
      shutil.rmtree(self.root, ignore_errors=True)

  def __enter__(self) -> Self:
    return self.start()

  def __exit__(self, *exc_info: object) -> None:
    self.stop()
