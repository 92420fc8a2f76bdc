"""Resolve files in a local folder or a Hugging Face Hub repository, and write files atomically.

Example: ``path = resolve_file("dalle-mini/dalle-mini", "config.json", HubOptions(revision="main"))``.

Every loader in dalle_flax goes through :func:`resolve_file`, so a folder and a repo id behave
the same, and the real huggingface_hub download paths (cache, revisions, ``HF_HUB_OFFLINE``,
``local_files_only``) are used for repo ids. Nothing here downloads at import time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub
from huggingface_hub import errors as hf_errors

logger = logging.getLogger(__name__)

__all__ = ["HubOptions", "atomic_write", "atomic_write_json", "push_folder", "read_json_object", "resolve_file"]


@dataclass(frozen=True)
class HubOptions:
  """Where and how to look for files; mirrors the Hub keyword arguments of ``from_pretrained``.

  Example: ``HubOptions(revision="v1", local_files_only=True)``.
  """

  revision: str | None = None
  cache_dir: str | os.PathLike | None = None
  token: str | bool | None = None
  local_files_only: bool = False
  force_download: bool = False
  subfolder: str = ""

  def download_kwargs(self) -> dict[str, Any]:
    """The keyword arguments of ``huggingface_hub.hf_hub_download`` (``subfolder`` excepted)."""
    return {
        "revision": self.revision,
        "cache_dir": self.cache_dir,
        "token": self.token,
        "local_files_only": self.local_files_only,
        "force_download": self.force_download,
    }

  def from_pretrained_kwargs(self) -> dict[str, Any]:
    """The same settings as keyword arguments of a ``from_pretrained`` (transformers' or ours)."""
    return {**self.download_kwargs(), "subfolder": self.subfolder}


def resolve_file(
    path_or_repo_id: str | os.PathLike,
    filename: str,
    options: HubOptions | None = None,
    *,
    required: bool = True,
) -> Path | None:
  """Returns the local path of ``filename`` in a folder or Hub repo (downloading it if needed).

  Args:
    path_or_repo_id: a local folder, or a Hub repo id such as ``"dalle-mini/dalle-mini"``.
    filename: file name inside the folder / repo (relative to ``options.subfolder``).
    options: revision, cache and offline settings.
    required: when False, an absent file returns None instead of raising; so does a file that is
      not cached while the Hub cannot be asked (offline, or unreachable: logged), as transformers
      does for optional files. Missing repos and revisions still raise.

  Returns:
    The path of the file on local disk, or None when it is absent and not required.

  Raises:
    FileNotFoundError: the file (or the folder / repo itself) does not exist.
    OSError: the Hub could not be reached and the required file is not cached.
  """
  options = options or HubOptions()
  folder = Path(path_or_repo_id)
  if folder.is_dir():
    path = folder / options.subfolder / filename
    if path.is_file():
      return path
    if required:
      raise FileNotFoundError(
          f"{filename!r} not found in the folder {str(folder / options.subfolder)!r}; "
          f"it holds {sorted(p.name for p in (folder / options.subfolder).glob('*'))}."
      )
    return None
  repo_id = str(path_or_repo_id)
  not_a_repo = (f"{repo_id!r} is neither a local folder nor a Hub repo id ('owner/name'); "
                "check the path.")
  if folder.exists() or os.sep in repo_id.strip("/").replace("/", "", 1) or repo_id.startswith((".", "/")):
    raise FileNotFoundError(not_a_repo)
  try:
    return Path(
        huggingface_hub.hf_hub_download(
            repo_id, filename, subfolder=options.subfolder or None, **options.download_kwargs()
        )
    )
  except hf_errors.HFValidationError as e:
    raise FileNotFoundError(f"{not_a_repo} ({e})") from None
  except hf_errors.RepositoryNotFoundError:
    raise FileNotFoundError(
        f"Repository {repo_id!r} was not found on {huggingface_hub.constants.ENDPOINT} (or it is "
        "private and no token was given). Check the name, pass token=..., or give a local folder."
    ) from None
  except hf_errors.RevisionNotFoundError:
    raise FileNotFoundError(
        f"Revision {options.revision!r} does not exist in {repo_id!r}; pass a branch, tag or "
        "commit sha that exists."
    ) from None
  # LocalEntryNotFoundError subclasses EntryNotFoundError: it must be caught first.
  except hf_errors.LocalEntryNotFoundError as e:
    offline = options.local_files_only or huggingface_hub.constants.HF_HUB_OFFLINE
    if not required:
      if not offline:
        logger.warning("Could not check %r of %r on the Hub and it is not cached (%s); going on "
                       "without this optional file.", filename, repo_id, e)
      return None
    if offline:
      raise FileNotFoundError(
          f"{filename!r} of {repo_id!r} is not in the local cache and downloads are disabled "
          "(local_files_only=True or HF_HUB_OFFLINE=1). Download it once while online, or pass "
          "a local folder."
      ) from None
    raise OSError(
        f"Could not download {filename!r} from {repo_id!r} and it is not cached: {e}. Check the "
        "network or HF_ENDPOINT, or pass a local folder."
    ) from None
  except hf_errors.EntryNotFoundError:
    if required:
      raise FileNotFoundError(
          f"{filename!r} not found in the Hub repo {repo_id!r} (revision "
          f"{options.revision or 'main'!r}, subfolder {options.subfolder!r})."
      ) from None
    return None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
  """Opens a temporary file next to ``path`` and renames it onto ``path`` only on success."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual file mode
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


class StagedFiles:
  """Files written under temporary names first and renamed into place together by :meth:`commit`.

  Example::

      with StagedFiles(folder) as staged:
        staged.add("model-00001-of-00002.safetensors", data1)
        staged.add("model-00002-of-00002.safetensors", data2)
        staged.commit()  # every rename happens only after every file is on disk

  A failure while writing (disk full, an exception) leaves the folder as it was; leaving the
  block without :meth:`commit` removes the temporary files. ``sha256`` holds each file's hash,
  computed from the bytes written.
  """

  def __init__(self, folder: str | os.PathLike) -> None:
    self.folder = Path(folder)
    self.sha256: dict[str, str] = {}
    self._staged: list[tuple[str, Path]] = []

  def __enter__(self) -> StagedFiles:
    return self

  def __exit__(self, *exc: Any) -> None:
    self.discard()

  def add(self, name: str, data: bytes | str) -> None:
    if isinstance(data, str):
      data = data.encode("utf-8")
    self.folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.folder)
    self._staged.append((tmp, self.folder / name))
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())
    self.sha256[name] = hashlib.sha256(data).hexdigest()

  def commit(self, before_rename: Callable[[], None] | None = None) -> set[str]:
    """Renames every staged file into place (after ``before_rename()``); returns their names."""
    if before_rename is not None:
      before_rename()
    names = set()
    while self._staged:
      tmp, path = self._staged.pop(0)
      os.replace(tmp, path)
      names.add(path.name)
    return names

  def discard(self) -> None:
    for tmp, _ in self._staged:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    self._staged.clear()


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
  """Writes ``obj`` as indented, key-sorted JSON atomically."""
  with atomic_write(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a JSON file that must hold an object (config files); clear errors otherwise."""
  try:
    content = json.loads(Path(path).read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{str(path)!r} is not valid JSON ({e}); re-save or re-download it.") from None
  except RecursionError:  # json's decoder on very deep nesting
    raise ValueError(f"{str(path)!r} nests too deeply to be a config file; re-save or re-download it.") from None
  if not isinstance(content, dict):
    raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(content).__name__}.")
  return content


# Weights of an earlier push (e.g. one file replaced by shards) would shadow the new ones.
_STALE_WEIGHT_PATTERNS = ["*.safetensors", "*.msgpack", "*.index.json"]


def push_folder(
    repo_id: str,
    write: Callable[[Path], None],
    *,
    commit_message: str,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
) -> str:
  """Creates ``repo_id`` (and ``revision``'s branch) if needed, lets ``write`` fill a temporary
  folder, and uploads it in one commit that also removes the repo's old weight files.

  Returns:
    The commit URL.
  """
  api = huggingface_hub.HfApi(token=token if isinstance(token, str) else None)
  repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
  if revision is not None and revision != "main":
    api.create_branch(repo_id, branch=revision, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="dalle-flax-push-") as tmp:
    write(Path(tmp))
    info = api.upload_folder(
        repo_id=repo_id, folder_path=tmp, commit_message=commit_message,
        commit_description=commit_description, revision=revision, create_pr=create_pr,
        delete_patterns=_STALE_WEIGHT_PATTERNS)
  return str(getattr(info, "commit_url", info))
