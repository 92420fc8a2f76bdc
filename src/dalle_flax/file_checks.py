"""Checks on weight files before and after they are parsed: what the file formats do not check.

Example::

    sniff_weights_file(path)                       # empty file / git-lfs pointer / too short
    shard_path = contained_shard(folder, name, index_path)  # an index may not name ../x
    write_checksums(folder, ["model.safetensors"])  # checksums.sha256, `sha256sum -c` format
    verify_checksums(folder / CHECKSUMS_NAME, {"model.safetensors": path})

safetensors and flax msgpack check the structure of a file, not its bytes: a flipped data byte
loads silently with wrong values, and a git-lfs pointer (a clone made without git-lfs) surfaces
as a misleading "header too large". These checks run first and name the fix.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from .hub_utils import atomic_write

__all__ = [
    "CHECKSUMS_NAME", "LFS_POINTER_PREFIX", "contained_shard", "read_checksums", "sha256_file",
    "sniff_weights_file", "verify_checksums", "write_checksums",
]

CHECKSUMS_NAME = "checksums.sha256"
"""The manifest of a saved folder's weight files: ``<sha256 hex>  <file name>`` lines (``sha256sum -c``)."""
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"
_MIN_BYTES = {".safetensors": 8 + 2, ".msgpack": 1}  # safetensors: u64 header length + "{}"
_HEX = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 22


def sniff_weights_file(path: str | os.PathLike) -> None:
  """Raises OSError when ``path`` is empty, a git-lfs pointer, or too short for its format.

  Reads at most 100 bytes; run before a parser sees the file, whose own error would mislead.
  """
  path = Path(path)
  size = path.stat().st_size
  with path.open("rb") as f:
    head = f.read(100)
  if head.startswith(LFS_POINTER_PREFIX):
    raise OSError(
        f"The weights file {str(path)!r} is a git-lfs pointer ({size} bytes of text), not the "
        "weights: the repository was cloned without git-lfs. Run `git lfs install && git lfs pull` "
        "in the clone, or load the repo id from the Hub (force_download=True if the cache holds "
        "the pointer)."
    )
  least = _MIN_BYTES.get(path.suffix, 1)
  if size < least:
    found = "empty" if size == 0 else f"{size} bytes"
    raise OSError(
        f"The weights file {str(path)!r} is {found}; a {path.suffix or 'weights'} file has at "
        f"least {least} bytes. The download or save was cut short: delete it and download it again "
        "(force_download=True for a Hub repo) or save the model again."
    )


def contained_shard(folder: str | os.PathLike, name: str, index_path: str | os.PathLike) -> str:
  """Returns ``name`` when it is a plain file name; else raises ValueError naming the index.

  A shard index may only name files beside it: no folder parts, no ``..``, no absolute path
  (a local folder's shard that is a symlink is checked by :func:`within_folder`).
  """
  bad = (not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name
         or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"))
  if bad:
    raise ValueError(
        f"The index {str(index_path)!r} names the shard {name!r}, which is not a plain file name "
        f"in {str(folder)!r}: an index may only name files beside it (expected e.g. "
        "'model-00001-of-00002.safetensors'). Refusing to read outside the folder; re-download or "
        "save the model again."
    )
  return name


def within_folder(folder: str | os.PathLike, path: str | os.PathLike, index_path: str | os.PathLike) -> Path:
  """Returns ``path`` when it resolves inside ``folder`` (or the Hub cache blobs of that snapshot).

  A local folder whose shard is a symlink leading elsewhere (a git clone can hold one) is refused;
  the Hub cache's own layout (``snapshots/<rev>/f -> ../../blobs/<sha>``) is allowed.
  """
  folder, path = Path(folder).resolve(), Path(path)
  target = path.resolve()
  allowed = [folder]
  if folder.parent.name == "snapshots":  # a Hub cache snapshot given as a folder
    allowed.append(folder.parent.parent / "blobs")
  if not any(target == root or root in target.parents for root in allowed):
    raise ValueError(
        f"The index {str(index_path)!r} names the shard {path.name!r}, which is a link to "
        f"{str(target)!r}, outside the folder {str(folder)!r}. Refusing to read it; replace the "
        "link with the file itself."
    )
  return path


def sha256_file(path: str | os.PathLike) -> str:
  """The hex sha256 of a file, read in 4 MiB chunks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def write_checksums(folder: str | os.PathLike, names: Iterable[str],
                    known: Mapping[str, str] | None = None) -> Path:
  """Writes ``folder/checksums.sha256`` for the files ``names`` (atomically); returns its path.

  ``known`` ({name: hex}) gives hashes already computed from the bytes written; other files are read.
  """
  folder, known = Path(folder), known or {}
  lines = [f"{known.get(name) or sha256_file(folder / name)}  {name}\n" for name in sorted(names)]
  with atomic_write(folder / CHECKSUMS_NAME, "w") as f:
    f.write("".join(lines))
  return folder / CHECKSUMS_NAME


def read_checksums(path: str | os.PathLike) -> dict[str, str]:
  """Parses a ``sha256sum`` manifest into {file name: hex}; a malformed line is an OSError."""
  path = Path(path)
  if path.stat().st_size > 1 << 20:
    raise OSError(f"The checksum manifest {str(path)!r} is {path.stat().st_size} bytes; expected a few "
                  "lines (at most 1 MiB). Delete it or save the model again.")
  sums: dict[str, str] = {}
  for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
    if not line.strip():
      continue
    digest, sep, name = line.partition("  ")
    name = name.removeprefix("*")
    if not sep or not _HEX.match(digest) or not name:
      raise OSError(
          f"The checksum manifest {str(path)!r} has a malformed line {number}: {line[:120]!r}; "
          "expected '<64 hex digits>  <file name>'. Delete it or save the model again.")
    sums[name] = digest
  return sums


def verify_checksums(manifest: str | os.PathLike, files: Mapping[str, str | os.PathLike], *,
                     fix: str = "Delete it and download it again (force_download=True for a Hub repo) or save "
                                "the model again; verify_checksums=False loads it unchecked.") -> None:
  """Checks each of ``files`` ({name in the manifest: path}) against ``manifest``.

  ``fix`` ends the message of a damaged file (what the user can do about it).

  Raises:
    OSError: a file's sha256 differs from the manifest's (naming the file and both hashes), or
      the manifest does not list a file that was read.
  """
  sums = read_checksums(manifest)
  for name, path in files.items():
    if name not in sums:
      raise OSError(
          f"The checksum manifest {str(manifest)!r} does not list {name!r} (it lists {sorted(sums)}): "
          "the folder's files do not belong together. Save the model again, or pass "
          "verify_checksums=False to load it unchecked.")
    got = sha256_file(path)
    if got != sums[name]:
      raise OSError(f"The file {str(path)!r} is damaged: its sha256 is {got}, but {str(manifest)!r} "
                    f"expects {sums[name]}. {fix}")
