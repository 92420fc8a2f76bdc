"""A local, stdlib-only HTTP server that speaks the parts of the Hugging Face Hub protocol we use.

Tests (and users without network access) point ``huggingface_hub`` / ``transformers`` at it instead
of huggingface.co. It implements what huggingface_hub 2.x needs for repo creation, uploads
(preupload answering ``"regular"`` + NDJSON commits with base64 content), repo info, tree listings,
refs, branches, tags, commit history and file resolution (``HEAD``/``GET /{repo}/resolve/{rev}/{path}``
with ``ETag``, ``X-Repo-Commit``, ``Content-Length`` and the ``X-Error-Code`` headers the client maps
to ``RepositoryNotFoundError`` / ``RevisionNotFoundError`` / ``EntryNotFoundError``).

Example: ``with LocalHubServer() as hub: HfApi(endpoint=hub.endpoint, token="t").create_repo("me/x")``

Storage layout under ``root``: ``blobs/<sha256>`` holds file contents (content-addressed, written
once) and ``state.json`` holds repos, branches, tags and commits. Every commit is an immutable snapshot
``{path: sha256}`` with a 40-hex id and a parent pointer, so any past commit id stays resolvable.
A server restarted on the same ``root`` sees the same repos.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["LocalHubServer", "RequestRecord"]

logger = logging.getLogger(__name__)

DEFAULT_USERNAME = "local-user"
"""Name returned by ``whoami`` and used as namespace for repo ids given without one."""

_REPO_TYPE_BY_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX_BY_TYPE = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_REPO_ACTIONS = frozenset(
    {"revision", "tree", "paths-info", "refs", "commits", "branch", "tag", "preupload", "commit", "settings"}
)
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")
_HEX_PREFIX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_PR_REF_RE = re.compile(r"^refs/pr/(\d+)$")
_COPY_CHUNK = 1 << 20

# Content of the `.gitattributes` file of the initial commit, like the Hub creates for new repos.
_INITIAL_GITATTRIBUTES = "".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n"
    for ext in (
        "7z", "arrow", "bin", "bz2", "ckpt", "ftz", "gz", "h5", "joblib", "mlmodel", "model", "msgpack",
        "npy", "npz", "onnx", "ot", "parquet", "pb", "pickle", "pkl", "pt", "pth", "rar", "safetensors",
        "tar", "tflite", "tgz", "wasm", "xz", "zip", "zst",
    )
) + "*tfevents* filter=lfs diff=lfs merge=lfs -text\n"


def _now_iso() -> str:
    """Current UTC time in the Hub's ``%Y-%m-%dT%H:%M:%S.%fZ`` format (millisecond precision)."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _git_blob_oid(data: bytes) -> str:
    """Git object id of a blob (what ``git hash-object`` prints), used as ETag and tree ``oid``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _validate_repo_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a repo, else raise ``_HubError``."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in path:
        raise _HubError(400, f"Invalid path in repo: {path!r}")
    return path


class _HubError(Exception):
    """An error answered to the client as JSON ``{"error": message}`` plus Hub error headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.body = dict(body or {})


@dataclass
class RequestRecord:
    """One request served by `LocalHubServer` (see `LocalHubServer.requests`).

    Attributes:
        method: HTTP method, e.g. ``"HEAD"``.
        path: Request target as sent, including the query string.
        status: HTTP status code answered.
        known_route: False when no route matched (the request got a 404 and a warning was logged).
    """

    method: str
    path: str
    status: int
    known_route: bool = True


@dataclass
class _Commit:
    id: str
    parent: str | None
    files: dict[str, str]  # path -> sha256 of the blob
    title: str
    message: str
    date: str
    author: str


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    private: bool
    created_at: str
    internal_id: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pull_requests: dict[str, str] = field(default_factory=dict)  # "N" -> commit id
    commits: dict[str, _Commit] = field(default_factory=dict)

    @property
    def url_path(self) -> str:
        return _URL_PREFIX_BY_TYPE[self.repo_type] + self.repo_id


class _Store:
    """Repos, refs, commits and content-addressed blobs, persisted under ``root``. Thread-safe."""

    def __init__(self, root: Path, username: str) -> None:
        self.root = root
        self.username = username
        self.blob_dir = root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = root / "state.json"
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.blobs: dict[str, dict[str, Any]] = {}  # sha256 -> {"size": int, "git_oid": str}
        self._counter = 0
        if self.state_path.exists():
            self._load()

    # -- persistence -------------------------------------------------------------------------

    def _load(self) -> None:
        state = json.loads(self.state_path.read_text())
        self.blobs = state["blobs"]
        for raw in state["repos"]:
            commits = {cid: _Commit(**c) for cid, c in raw.pop("commits").items()}
            repo = _Repo(**raw, commits=commits)
            self.repos[(repo.repo_type, repo.repo_id)] = repo
        logger.debug("Loaded %d repos from %s", len(self.repos), self.state_path)

    def _save(self) -> None:
        state = {"blobs": self.blobs, "repos": [asdict(r) for r in self.repos.values()]}
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    # -- blobs -------------------------------------------------------------------------------

    def put_blob(self, data: bytes) -> str:
        """Store ``data`` (if new) and return its sha256."""
        sha256 = hashlib.sha256(data).hexdigest()
        with self.lock:
            if sha256 not in self.blobs:
                path = self.blob_dir / sha256
                tmp = path.with_name(f".{sha256}.{uuid.uuid4().hex}.tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
                self.blobs[sha256] = {"size": len(data), "git_oid": _git_blob_oid(data)}
        return sha256

    def blob_path(self, sha256: str) -> Path:
        return self.blob_dir / sha256

    def blob_info(self, sha256: str) -> dict[str, Any]:
        return self.blobs[sha256]

    # -- repos -------------------------------------------------------------------------------

    def get_repo(self, repo_type: str, repo_id: str) -> _Repo | None:
        with self.lock:
            return self.repos.get((repo_type, repo_id))

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> tuple[_Repo, bool]:
        """Create a repo with an initial commit on ``main``; returns ``(repo, created)``."""
        parts = repo_id.split("/")
        if len(parts) > 2 or not all(_NAME_RE.match(p) and "--" not in p and ".." not in p for p in parts):
            raise _HubError(400, f"Invalid repo id: {repo_id!r}")
        with self.lock:
            existing = self.repos.get((repo_type, repo_id))
            if existing is not None:
                return existing, False
            now = _now_iso()
            repo = _Repo(
                repo_id=repo_id,
                repo_type=repo_type,
                private=private,
                created_at=now,
                internal_id=uuid.uuid4().hex[:24],
            )
            self.repos[(repo_type, repo_id)] = repo
            sha = self.put_blob(_INITIAL_GITATTRIBUTES.encode())
            commit = self._new_commit(repo, None, {".gitattributes": sha}, "initial commit", "")
            repo.branches["main"] = commit.id
            self._save()
            return repo, True

    def delete_repo(self, repo_type: str, repo_id: str) -> bool:
        with self.lock:
            removed = self.repos.pop((repo_type, repo_id), None) is not None
            if removed:
                self._save()
            return removed

    def set_private(self, repo: _Repo, private: bool) -> None:
        with self.lock:
            repo.private = private
            self._save()

    # -- revisions ---------------------------------------------------------------------------

    def resolve(self, repo: _Repo, revision: str | None) -> str | None:
        """Return the commit id that ``revision`` (branch, tag, PR ref, full or short sha) names."""
        rev = revision or "main"
        with self.lock:
            if rev.startswith("refs/heads/"):
                return repo.branches.get(rev[len("refs/heads/") :])
            if rev.startswith("refs/tags/"):
                return repo.tags.get(rev[len("refs/tags/") :])
            pr = _PR_REF_RE.match(rev)
            if pr:
                return repo.pull_requests.get(pr.group(1))
            if rev in repo.branches:
                return repo.branches[rev]
            if rev in repo.tags:
                return repo.tags[rev]
            if _HEX_PREFIX_RE.match(rev):
                if rev in repo.commits:
                    return rev
                matches = [cid for cid in repo.commits if cid.startswith(rev)]
                if len(matches) == 1:
                    return matches[0]
            return None

    def resolve_or_raise(self, repo: _Repo, revision: str | None) -> _Commit:
        commit_id = self.resolve(repo, revision)
        if commit_id is None:
            raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return repo.commits[commit_id]

    def _new_commit(
        self, repo: _Repo, parent: str | None, files: dict[str, str], title: str, message: str
    ) -> _Commit:
        self._counter += 1
        seed = json.dumps([repo.repo_type, repo.repo_id, parent, files, title, message, time.time_ns(), self._counter])
        commit = _Commit(
            id=hashlib.sha1(seed.encode()).hexdigest(),
            parent=parent,
            files=dict(sorted(files.items())),
            title=title,
            message=message,
            date=_now_iso(),
            author=self.username,
        )
        repo.commits[commit.id] = commit
        return commit

    def history(self, repo: _Repo, commit_id: str) -> list[_Commit]:
        """Commits reachable from ``commit_id`` following parents, newest first."""
        out = []
        cid: str | None = commit_id
        with self.lock:
            while cid is not None:
                commit = repo.commits[cid]
                out.append(commit)
                cid = commit.parent
        return out

    def last_commit_for(self, repo: _Repo, head: str, path: str, is_dir: bool) -> _Commit:
        """Most recent commit reachable from ``head`` that changed ``path`` (a file or a folder)."""

        def snapshot(commit: _Commit | None) -> Any:
            if commit is None:
                return None
            if not is_dir:
                return commit.files.get(path)
            prefix = path + "/"
            return {p: s for p, s in commit.files.items() if p.startswith(prefix)}

        chain = self.history(repo, head)
        for commit, parent in zip(chain, chain[1:] + [None]):
            if snapshot(commit) != snapshot(parent):
                return commit
        return chain[-1]

    # -- refs --------------------------------------------------------------------------------

    def create_ref(self, repo: _Repo, kind: str, name: str, start: str | None) -> None:
        """Create a branch or a tag (``kind`` in {"branch", "tag"}) pointing at revision ``start``."""
        refs = repo.branches if kind == "branch" else repo.tags
        if not name or name.startswith(("/", "refs/")) or name.endswith("/") or ".." in name:
            raise _HubError(400, f"Invalid {kind} name: {name!r}")
        with self.lock:
            if name in refs:
                raise _HubError(409, "Reference already exists")
            refs[name] = self.resolve_or_raise(repo, start).id
            self._save()

    def delete_ref(self, repo: _Repo, kind: str, name: str) -> None:
        refs = repo.branches if kind == "branch" else repo.tags
        with self.lock:
            if kind == "branch" and name == "main":
                raise _HubError(403, "Cannot delete the default branch")
            if name not in refs:
                raise _HubError(404, f"Invalid rev id: {name}", code="RevisionNotFound")
            del refs[name]
            self._save()

    # -- commits -----------------------------------------------------------------------------

    def commit(
        self,
        repo: _Repo,
        revision: str,
        operations: Iterable[tuple[str, str, str | None]],
        *,
        title: str,
        message: str = "",
        parent_commit: str | None = None,
        create_pr: bool = False,
    ) -> tuple[_Commit, str | None]:
        """Apply ``operations`` on top of branch (or PR ref) ``revision`` and move it to the new commit.

        Args:
            repo: Target repo.
            revision: Branch name, ``refs/heads/<name>`` or ``refs/pr/<n>``.
            operations: ``(kind, path, sha256)`` with kind in {"add", "delete_file", "delete_folder"};
                blobs of additions must already be stored.
            title: Commit summary.
            message: Commit description.
            parent_commit: If given, the commit fails with 412 unless the ref points at it.
            create_pr: Commit onto a new ``refs/pr/<n>`` ref started from ``revision``.

        Returns:
            The new commit, and the PR number as a string when ``create_pr``.
        """
        with self.lock:
            pr_number: str | None = None
            ref_kind, ref_name = self._writable_ref(repo, revision)
            refs = repo.branches if ref_kind == "branch" else repo.pull_requests
            head = refs[ref_name]
            if parent_commit is not None:
                resolved_parent = self.resolve(repo, parent_commit)
                if resolved_parent != head:
                    raise _HubError(
                        412,
                        f"A commit has happened since. Please refresh and try again. "
                        f"(parent commit {parent_commit} is not the head {head} of {revision})",
                    )
            files = dict(repo.commits[head].files)
            for kind, path, sha256 in operations:
                if kind == "add":
                    assert sha256 is not None
                    files[path] = sha256
                elif kind == "delete_file":
                    if path not in files:
                        raise _HubError(
                            404, f"A file with this name doesn't exist: {path}", code="EntryNotFound"
                        )
                    del files[path]
                else:  # delete_folder
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise _HubError(
                            404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound"
                        )
                    for p in doomed:
                        del files[p]
            folders = {p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)}
            clashes = sorted(folders.intersection(files))
            if clashes:
                raise _HubError(409, f"Cannot commit: {clashes[0]!r} would be both a file and a folder")
            commit = self._new_commit(repo, head, files, title, message)
            if create_pr:
                pr_number = str(len(repo.pull_requests) + 1)
                repo.pull_requests[pr_number] = commit.id
            else:
                refs[ref_name] = commit.id
            self._save()
            return commit, pr_number

    def _writable_ref(self, repo: _Repo, revision: str) -> tuple[str, str]:
        rev = revision[len("refs/heads/") :] if revision.startswith("refs/heads/") else revision
        pr = _PR_REF_RE.match(rev)
        if pr:
            if pr.group(1) in repo.pull_requests:
                return "pr", pr.group(1)
        elif rev in repo.branches:
            return "branch", rev
        if self.resolve(repo, rev) is not None:
            raise _HubError(400, f"Cannot commit to {revision!r}: only branches and PR refs can be committed to")
        raise _HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")


@contextmanager
def _public_errors() -> Iterator[None]:
    """Re-raise `_HubError` from the in-process API as KeyError (404) or ValueError (anything else)."""
    try:
        yield
    except _HubError as err:
        raise (KeyError if err.status == 404 else ValueError)(err.message) from None


class _HubHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that remembers open connections so `stop()` can cut keep-alive ones."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, address: tuple[str, int], hub: LocalHubServer) -> None:
        self.hub = hub
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _HubRequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
            self._connections.clear()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("Connection error from %s", client_address, exc_info=True)


class _HubRequestHandler(BaseHTTPRequestHandler):
    """Routes one HTTP request to the Hub endpoints implemented by `LocalHubServer`."""

    protocol_version = "HTTP/1.1"
    server_version = "dalle-flax-LocalHub/1.0"
    timeout = 120  # seconds an idle keep-alive connection may stay open
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle + delayed ACKs add
    # ~40 ms to every keep-alive request.
    disable_nagle_algorithm = True
    server: _HubHTTPServer

    # -- plumbing ----------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 (stdlib naming)
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def send_response(self, code: int, message: str | None = None) -> None:
        # Record before any byte goes out, so a client that got its answer always finds its request
        # in `LocalHubServer.requests`.
        if not getattr(self, "_recorded", True):
            self._recorded = True
            self.server.hub._record(
                RequestRecord(self.command, self.path, code, getattr(self, "_known_route", True))
            )
        super().send_response(code, message)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _dispatch(self, method: str) -> None:
        self._recorded = False
        self._known_route = True
        self._method = method
        try:
            self._body = self._read_body()
            split = urlsplit(self.path)
            self._query = parse_qs(split.query)
            segments = [unquote(s) for s in split.path.split("/")[1:]]
            if segments and segments[-1] == "" and len(segments) > 1:
                segments = segments[:-1]
            self._route(method, segments)
        except _HubError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("Client went away during %s %s", method, self.path)
            self.close_connection = True
        except Exception:  # answer 500 rather than dropping the connection
            logger.exception("LocalHubServer failed on %s %s", method, self.path)
            self._send_error(_HubError(500, "Internal error in LocalHubServer (see logs)"))
        finally:
            if not self._recorded:  # no answer was sent (client went away)
                self._recorded = True
                self.server.hub._record(RequestRecord(method, self.path, 0, self._known_route))

    def _base_url(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.server.hub.endpoint

    def _send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self._method != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self._send(status, body, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})

    def _send_error(self, err: _HubError) -> None:
        headers = {"X-Error-Message": err.message.encode("ascii", "replace").decode(), **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        if err.status >= 500:
            self.close_connection = True
        try:
            self._send_json({"error": err.message, **err.body}, status=err.status, headers=headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _not_found_route(self) -> None:
        self._known_route = False
        logger.warning(
            "LocalHubServer: no route for %s %s (not implemented; answering 404)", self._method, self.path
        )
        raise _HubError(404, f"LocalHubServer does not implement {self._method} {urlsplit(self.path).path}")

    def _json_body(self) -> Any:
        if not self._body:
            return {}
        try:
            return json.loads(self._body)
        except ValueError as exc:
            raise _HubError(400, f"Invalid JSON body: {exc}") from exc

    def _has_token(self) -> bool:
        auth = self.headers.get("Authorization", "")
        return auth.lower().startswith("bearer ") and bool(auth[7:].strip())

    def _require_token(self) -> None:
        if not self._has_token():
            raise _HubError(401, "You must be authenticated to perform this action (any token is accepted).")

    def _param(self, name: str) -> str | None:
        values = self._query.get(name)
        return values[0] if values else None

    def _flag(self, name: str) -> bool:
        return (self._param(name) or "").lower() in ("1", "true", "yes")

    @property
    def _store(self) -> _Store:
        return self.server.hub._store

    def _repo_or_raise(self, repo_type: str, repo_id: str, *, write: bool = False) -> _Repo:
        """Look a repo up with Hub semantics: 401/404 + ``RepoNotFound`` when missing or private."""
        repo = self._store.get_repo(repo_type, repo_id)
        if write:
            self._require_token()
        if repo is None or (repo.private and not self._has_token()):
            status = 404 if self._has_token() else 401
            raise _HubError(status, "Repository not found", code="RepoNotFound")
        return repo

    # -- routing -----------------------------------------------------------------------------

    def _route(self, method: str, seg: list[str]) -> None:
        if seg and seg[0] == "api":
            self._route_api(method, seg[1:])
            return
        repo_type = "model"
        rest = seg
        if rest and rest[0] in ("datasets", "spaces"):
            repo_type, rest = _REPO_TYPE_BY_PLURAL[rest[0]], rest[1:]
        if method in ("GET", "HEAD"):
            if len(rest) >= 5 and rest[2] in ("resolve", "raw"):
                self._resolve_file(repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]))
                return
            if len(rest) >= 4 and rest[1] in ("resolve", "raw"):
                self._resolve_file(repo_type, rest[0], rest[2], "/".join(rest[3:]))
                return
        self._not_found_route()

    def _route_api(self, method: str, seg: list[str]) -> None:
        if seg == ["whoami-v2"] and method == "GET":
            return self._whoami()
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if seg == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if seg == ["validate-yaml"] and method == "POST":
            return self._send_json({"errors": [], "warnings": []})
        if seg and seg[0] in _REPO_TYPE_BY_PLURAL:
            repo_type = _REPO_TYPE_BY_PLURAL[seg[0]]
            rest = seg[1:]
            if not rest and method == "GET":
                return self._list_repos(repo_type)
            if rest:
                repo_id, action = self._split_repo_id(repo_type, rest)
                return self._route_repo(method, repo_type, repo_id, action)
        self._not_found_route()

    def _split_repo_id(self, repo_type: str, rest: list[str]) -> tuple[str, list[str]]:
        """Split ``ns/name/action...`` (or canonical ``name/action...``) into repo id and action."""
        if len(rest) >= 2 and self._store.get_repo(repo_type, f"{rest[0]}/{rest[1]}") is not None:
            return f"{rest[0]}/{rest[1]}", rest[2:]
        if self._store.get_repo(repo_type, rest[0]) is not None and (len(rest) == 1 or rest[1] in _REPO_ACTIONS):
            return rest[0], rest[1:]
        if len(rest) >= 2:
            return f"{rest[0]}/{rest[1]}", rest[2:]
        return rest[0], []

    def _route_repo(self, method: str, repo_type: str, repo_id: str, action: list[str]) -> None:
        head = action[0] if action else None
        if method == "GET" and head is None:
            return self._repo_info(repo_type, repo_id, None)
        if method == "GET" and head == "revision" and len(action) == 2:
            return self._repo_info(repo_type, repo_id, action[1])
        if method == "GET" and head == "tree" and len(action) >= 2:
            return self._tree(repo_type, repo_id, action[1], "/".join(action[2:]))
        if method == "POST" and head == "paths-info" and len(action) == 2:
            return self._paths_info(repo_type, repo_id, action[1])
        if method == "GET" and head == "refs" and len(action) == 1:
            return self._refs(repo_type, repo_id)
        if method == "GET" and head == "commits" and len(action) == 2:
            return self._commits(repo_type, repo_id, action[1])
        if head in ("branch", "tag") and len(action) == 2 and method in ("POST", "DELETE"):
            return self._ref_change(method, repo_type, repo_id, head, action[1])
        if method == "POST" and head == "preupload" and len(action) == 2:
            return self._preupload(repo_type, repo_id, action[1])
        if method == "POST" and head == "commit" and len(action) == 2:
            return self._commit(repo_type, repo_id, action[1])
        if method == "PUT" and head == "settings" and len(action) == 1:
            return self._settings(repo_type, repo_id)
        self._not_found_route()

    # -- account & repos ---------------------------------------------------------------------

    def _whoami(self) -> None:
        if not self._has_token():
            raise _HubError(401, "Invalid credentials in Authorization header")
        name = self.server.hub.username
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(name.encode()).hexdigest()[:24],
                "name": name,
                "fullname": "Local Hub test user",
                "email": None,
                "emailVerified": True,
                "isPro": False,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            }
        )

    def _create_repo(self) -> None:
        self._require_token()
        body = self._json_body()
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise _HubError(400, "Missing repo name")
        namespace = body.get("organization") or self.server.hub.username
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIX_BY_TYPE:
            raise _HubError(400, f"Unsupported repo type: {repo_type!r}")
        private = bool(body.get("private")) or body.get("visibility") == "private"
        repo, created = self._store.create_repo(repo_type, f"{namespace}/{name}", private)
        url = f"{self._base_url()}/{repo.url_path}"
        if not created:
            # huggingface_hub reads "url" from the 409 body too when `exist_ok=True`.
            raise _HubError(409, f"You already created this {repo_type} repo", body={"url": url})
        self._send_json({"url": url, "name": repo.repo_id, "id": repo.internal_id})

    def _delete_repo(self) -> None:
        self._require_token()
        body = self._json_body()
        namespace = body.get("organization") or self.server.hub.username
        repo_type = body.get("type") or "model"
        if not self._store.delete_repo(repo_type, f"{namespace}/{body.get('name')}"):
            raise _HubError(404, "Repository not found", code="RepoNotFound")
        self._send_json({})

    def _list_repos(self, repo_type: str) -> None:
        author = self._param("author")
        search = self._param("search")
        with self._store.lock:
            repos = [
                r
                for r in self._store.repos.values()
                if r.repo_type == repo_type
                and (not r.private or self._has_token())
                and (author is None or r.repo_id.split("/")[0] == author)
                and (search is None or search.lower() in r.repo_id.lower())
            ]
        limit = int(self._param("limit") or 0)
        repos = repos[:limit] if limit > 0 else repos
        full = self._flag("full")
        self._send_json([self._info_payload(r, r.commits[r.branches["main"]], full, False) for r in repos])

    def _info_payload(self, repo: _Repo, commit: _Commit, siblings: bool, blobs: bool) -> dict[str, Any]:
        author = repo.repo_id.split("/")[0] if "/" in repo.repo_id else None
        info: dict[str, Any] = {
            "_id": repo.internal_id,
            "id": repo.repo_id,
            "author": author,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        if siblings:
            entries = []
            total = 0
            for path, sha256 in commit.files.items():
                blob = self._store.blob_info(sha256)
                entry: dict[str, Any] = {"rfilename": path}
                if blobs:
                    entry.update(size=blob["size"], blobId=blob["git_oid"])
                entries.append(entry)
                total += blob["size"]
            info["siblings"] = entries
            info["usedStorage"] = total
            info["spaces"] = []
        return info

    def _repo_info(self, repo_type: str, repo_id: str, revision: str | None) -> None:
        repo = self._repo_or_raise(repo_type, repo_id)
        commit = self._store.resolve_or_raise(repo, revision)
        self._send_json(self._info_payload(repo, commit, True, self._flag("blobs")))

    def _settings(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo_or_raise(repo_type, repo_id, write=True)
        body = self._json_body()
        if "private" in body:
            self._store.set_private(repo, bool(body["private"]))
        elif body.get("visibility") in ("private", "public"):
            self._store.set_private(repo, body["visibility"] == "private")
        self._send_json({})

    # -- trees, refs, history ----------------------------------------------------------------

    def _file_entry(self, path: str, sha256: str) -> dict[str, Any]:
        blob = self._store.blob_info(sha256)
        return {"type": "file", "oid": blob["git_oid"], "size": blob["size"], "path": path}

    @staticmethod
    def _dir_entry(files: Mapping[str, str], path: str) -> dict[str, Any]:
        prefix = path + "/"
        listing = json.dumps(sorted((p, s) for p, s in files.items() if p.startswith(prefix)))
        return {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}

    def _with_last_commit(self, repo: _Repo, head: str, entry: dict[str, Any]) -> dict[str, Any]:
        commit = self._store.last_commit_for(repo, head, entry["path"], entry["type"] == "directory")
        return {**entry, "lastCommit": {"id": commit.id, "title": commit.title, "date": commit.date}}

    def _tree(self, repo_type: str, repo_id: str, revision: str, base: str) -> None:
        repo = self._repo_or_raise(repo_type, repo_id)
        commit = self._store.resolve_or_raise(repo, revision)
        recursive = self._flag("recursive")
        base = base.strip("/")
        prefix = base + "/" if base else ""
        file_paths: list[str] = []
        dirs: set[str] = set()
        for path in commit.files:
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            if recursive:
                dirs.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
                file_paths.append(path)
            elif len(parts) == 1:
                file_paths.append(path)
            else:
                dirs.add(prefix + parts[0])
        if base and not file_paths and not dirs:
            raise _HubError(
                404, f"Entry not found: {base}", code="EntryNotFound", headers={"X-Repo-Commit": commit.id}
            )
        entries = [self._dir_entry(commit.files, d) for d in dirs]
        entries += [self._file_entry(p, commit.files[p]) for p in file_paths]
        entries.sort(key=lambda e: e["path"])
        if self._flag("expand"):
            entries = [self._with_last_commit(repo, commit.id, e) for e in entries]
        self._send_json(entries)

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo_or_raise(repo_type, repo_id)
        commit = self._store.resolve_or_raise(repo, revision)
        if "json" in self.headers.get("Content-Type", ""):
            body = self._json_body()
            paths, expand = body.get("paths", []), bool(body.get("expand"))
        else:
            form = parse_qs(self._body.decode())
            paths = form.get("paths", [])
            expand = (form.get("expand", ["false"])[0]).lower() in ("1", "true")
        entries = []
        for raw in [paths] if isinstance(paths, str) else paths:
            path = raw.strip("/")
            if path in commit.files:
                entries.append(self._file_entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files):
                entries.append(self._dir_entry(commit.files, path))
        if expand:
            entries = [self._with_last_commit(repo, commit.id, e) for e in entries]
        self._send_json(entries)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo_or_raise(repo_type, repo_id)
        with self._store.lock:
            payload = {
                "branches": [
                    {"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in repo.branches.items()
                ],
                "converts": [],
                "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in repo.tags.items()],
                "pullRequests": [
                    {"name": n, "ref": f"refs/pr/{n}", "targetCommit": c} for n, c in repo.pull_requests.items()
                ],
            }
        self._send_json(payload)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo_or_raise(repo_type, repo_id)
        commit = self._store.resolve_or_raise(repo, revision)
        self._send_json(
            [
                {
                    "id": c.id,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "authors": [{"user": c.author}],
                }
                for c in self._store.history(repo, commit.id)
            ]
        )

    def _ref_change(self, method: str, repo_type: str, repo_id: str, kind: str, name: str) -> None:
        repo = self._repo_or_raise(repo_type, repo_id, write=True)
        if method == "DELETE":
            self._store.delete_ref(repo, kind, name)
        elif kind == "branch":
            self._store.create_ref(repo, "branch", name, self._json_body().get("startingPoint"))
        else:  # POST /tag/{revision} with {"tag": name}
            tag = self._json_body().get("tag")
            if not isinstance(tag, str):
                raise _HubError(400, "Missing tag name")
            self._store.create_ref(repo, "tag", tag, name)
        self._send_json({})

    # -- uploads -----------------------------------------------------------------------------

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo_or_raise(repo_type, repo_id, write=True)
        commit = self._store.resolve_or_raise(repo, revision)
        files = self._json_body().get("files", [])
        answer = []
        for item in files:
            path = item["path"]
            entry: dict[str, Any] = {"path": path, "uploadMode": "regular", "shouldIgnore": False}
            if path in commit.files:
                entry["oid"] = self._store.blob_info(commit.files[path])["git_oid"]
            answer.append(entry)
        self._send_json({"files": answer, "commitOid": commit.id})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo_or_raise(repo_type, repo_id, write=True)
        header: dict[str, Any] = {}
        operations: list[tuple[str, str, str | None]] = []
        for line_no, line in enumerate(self._body.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError) as exc:
                raise _HubError(400, f"Invalid NDJSON commit payload at line {line_no}: {exc}") from exc
            if key == "header":
                header = value
            elif key == "file":
                path = _validate_repo_path(value["path"])
                encoding = value.get("encoding", "utf-8")
                content = value["content"]
                data = base64.b64decode(content) if encoding == "base64" else content.encode("utf-8")
                operations.append(("add", path, self._store.put_blob(data)))
            elif key == "lfsFile":
                path = _validate_repo_path(value["path"])
                sha256 = value.get("oid")
                if sha256 not in self._store.blobs:
                    raise _HubError(
                        422,
                        f"LFS object {sha256} for {path!r} was never uploaded: LocalHubServer answers 'regular' "
                        "at preupload and has no LFS/Xet storage",
                    )
                operations.append(("add", path, sha256))
            elif key in ("deletedFile", "deletedFolder"):
                path = _validate_repo_path(value["path"].rstrip("/"))
                operations.append(("delete_file" if key == "deletedFile" else "delete_folder", path, None))
            else:
                raise _HubError(400, f"Unsupported commit operation {key!r} at line {line_no}")
        summary = header.get("summary")
        if not summary:
            raise _HubError(400, "Commit summary (header.summary) is required")
        commit, pr_number = self._store.commit(
            repo,
            revision,
            operations,
            title=summary,
            message=header.get("description") or "",
            parent_commit=header.get("parentCommit"),
            create_pr=self._flag("create_pr"),
        )
        base = f"{self._base_url()}/{repo.url_path}"
        self._send_json(
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": f"{base}/commit/{commit.id}",
                "hookOutput": "",
                "pullRequestUrl": f"{base}/discussions/{pr_number}" if pr_number else None,
            }
        )

    # -- downloads ---------------------------------------------------------------------------

    def _resolve_file(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        repo = self._repo_or_raise(repo_type, repo_id)
        commit = self._store.resolve_or_raise(repo, revision)
        sha256 = commit.files.get(path)
        if sha256 is None:
            raise _HubError(
                404, "Entry not found", code="EntryNotFound", headers={"X-Repo-Commit": commit.id}
            )
        blob = self._store.blob_info(sha256)
        size = blob["size"]
        start, end = 0, size - 1
        status = 200
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{blob["git_oid"]}"',
            "X-Repo-Commit": commit.id,
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{path.rsplit("/", 1)[-1]}"',
        }
        range_header = self.headers.get("Range")
        if range_header and self._method == "GET":
            unsatisfiable = {"Content-Range": f"bytes */{size}"}
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", range_header.strip())
            if match is None or (not match.group(1) and not match.group(2)):
                raise _HubError(416, f"Unsupported Range: {range_header}", headers=unsatisfiable)
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            else:  # suffix range "bytes=-N"
                start = max(size - int(match.group(2)), 0)
            if start >= size or start > end:
                raise _HubError(416, f"Range not satisfiable: {range_header}", headers=unsatisfiable)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self._method == "HEAD" or length == 0:
            return
        with open(self._store.blob_path(sha256), "rb") as f:
            f.seek(start)
            remaining = length
            while remaining > 0:
                chunk = f.read(min(_COPY_CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)


class LocalHubServer:
    """A Hub-protocol HTTP server on 127.0.0.1, served from a daemon thread.

    Any bearer token is accepted; requests without one can read public repos only (like the Hub,
    missing or private repos then answer 401 with ``X-Error-Code: RepoNotFound``), and writes need one.
    Every file is stored as a regular (non-LFS) file: preupload answers ``"regular"`` so clients
    inline content as base64 in the NDJSON commit and never use the LFS/Xet upload paths.

    Args:
        root: Storage folder (created if needed). Defaults to a fresh temporary folder that is
            deleted by `stop()`. A server started on a ``root`` used before sees its repos.
        host: Interface to bind.
        port: TCP port; 0 picks a free one.
        username: Name returned by ``whoami`` and namespace of repo ids created without one.

    Attributes:
        root: The storage folder.
        username: See ``username`` above.
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        username: str = DEFAULT_USERNAME,
    ) -> None:
        self._owns_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="dalle-flax-hub-")) if root is None else Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.username = username
        self._host = host
        self._port = port
        self._store = _Store(self.root, username)
        self._httpd: _HubHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._requests: list[RequestRecord] = []
        self._requests_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """Base URL, e.g. ``"http://127.0.0.1:54321"`` (no trailing slash). Requires a started server."""
        if self._httpd is None:
            raise RuntimeError("LocalHubServer is not running; call start() or use it as a context manager")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._httpd is not None

    def start(self) -> LocalHubServer:
        """Bind the socket and serve from a daemon thread. Returns ``self``."""
        if self._httpd is not None:
            return self
        self._httpd = _HubHTTPServer((self._host, self._port), self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="LocalHubServer", daemon=True
        )
        self._thread.start()
        logger.info("LocalHubServer serving %s from %s", self.endpoint, self.root)
        return self

    def stop(self) -> None:
        """Stop serving, cut open keep-alive connections, and delete ``root`` if it was a temp folder."""
        httpd, self._httpd = self._httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
            httpd.close_connections()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._thread = None
        if self._owns_root and self.root.exists():
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalHubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- request log -------------------------------------------------------------------------

    def _record(self, record: RequestRecord) -> None:
        with self._requests_lock:
            self._requests.append(record)

    @property
    def requests(self) -> list[RequestRecord]:
        """Copy of every request served so far, oldest first."""
        with self._requests_lock:
            return list(self._requests)

    @property
    def unknown_requests(self) -> list[RequestRecord]:
        """Requests no route matched (each was answered 404 and logged as a warning)."""
        return [r for r in self.requests if not r.known_route]

    def clear_requests(self) -> None:
        """Forget the request log."""
        with self._requests_lock:
            self._requests.clear()

    # -- direct (in-process) access, handy to seed or inspect repos in tests -------------------

    def _get_repo(self, repo_id: str, repo_type: str) -> _Repo:
        repo = self._store.get_repo(repo_type, repo_id)
        if repo is None:
            raise KeyError(f"No {repo_type} repo {repo_id!r} on this server")
        return repo

    def create_repo(
        self, repo_id: str, *, repo_type: str = "model", private: bool = False, exist_ok: bool = False
    ) -> str:
        """Create a repo without going through HTTP (``repo_id`` may be a canonical one-part id).

        Args:
            repo_id: ``"namespace/name"`` or ``"name"``.
            repo_type: ``"model"``, ``"dataset"`` or ``"space"``.
            private: Make the repo private (readable only with a token).
            exist_ok: Do not raise if it already exists.

        Returns:
            The repo id.

        Raises:
            FileExistsError: The repo exists and ``exist_ok`` is False.
            ValueError: Invalid repo id.
        """
        with _public_errors():
            _, created = self._store.create_repo(repo_type, repo_id, private)
        if not created and not exist_ok:
            raise FileExistsError(f"{repo_type} repo {repo_id!r} already exists")
        return repo_id

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | os.PathLike[str]] | None = None,
        *,
        delete: Iterable[str] = (),
        repo_type: str = "model",
        branch: str = "main",
        message: str = "Commit from LocalHubServer.commit",
    ) -> str:
        """Commit files without going through HTTP.

        Args:
            repo_id: Existing repo id.
            files: ``{path_in_repo: content}``; content is bytes, text (UTF-8) or a local file path.
            delete: Paths to delete (a trailing "/" deletes a folder).
            repo_type: Repo type.
            branch: Branch to commit to.
            message: Commit title.

        Returns:
            The new commit id (40 hex characters).

        Raises:
            KeyError: Unknown repo or branch, or a deleted path that does not exist.
            ValueError: Invalid path, or a path that would be both a file and a folder.
        """
        repo = self._get_repo(repo_id, repo_type)
        ops: list[tuple[str, str, str | None]] = []
        with _public_errors():
            for path in delete:
                kind = "delete_folder" if path.endswith("/") else "delete_file"
                ops.append((kind, _validate_repo_path(path.rstrip("/")), None))
            for path, content in (files or {}).items():
                if isinstance(content, str):
                    data = content.encode("utf-8")
                elif isinstance(content, bytes):
                    data = content
                else:
                    data = Path(content).read_bytes()
                ops.append(("add", _validate_repo_path(path), self._store.put_blob(data)))
            commit, _ = self._store.commit(repo, branch, ops, title=message)
        return commit.id

    def create_branch(
        self, repo_id: str, branch: str, *, revision: str | None = None, repo_type: str = "model"
    ) -> None:
        """Create ``branch`` at ``revision`` (default: head of ``main``) without going through HTTP.

        Raises:
            KeyError: Unknown repo or revision.
            ValueError: Invalid branch name, or the branch exists.
        """
        with _public_errors():
            self._store.create_ref(self._get_repo(repo_id, repo_type), "branch", branch, revision)

    def resolve(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Return the commit id that ``revision`` names.

        Raises:
            KeyError: Unknown repo or revision.
        """
        commit_id = self._store.resolve(self._get_repo(repo_id, repo_type), revision)
        if commit_id is None:
            raise KeyError(f"Unknown revision {revision!r} of {repo_id!r}")
        return commit_id

    def list_files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[str]:
        """Sorted paths of the files at ``revision``."""
        repo = self._get_repo(repo_id, repo_type)
        return sorted(repo.commits[self.resolve(repo_id, revision, repo_type=repo_type)].files)

    def read_file(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> bytes:
        """Content of ``path`` at ``revision``.

        Raises:
            KeyError: Unknown repo, revision or path.
        """
        repo = self._get_repo(repo_id, repo_type)
        files = repo.commits[self.resolve(repo_id, revision, repo_type=repo_type)].files
        if path not in files:
            raise KeyError(f"{path!r} not found in {repo_id!r} at {revision!r}")
        return self._store.blob_path(files[path]).read_bytes()
