"""Readers of captioned image sets: what ``encode_dataset`` encodes.

Example: ``source = open_source("photos/"); image, caption = source.examples[0].open_image(), ...``.

Four kinds, detected from the path (``source_type=`` forces one):

- ``folder``: images anywhere under a folder, each with a same-stem caption (``cat.jpg`` +
  ``cat.txt``), in sorted path order.
- ``imagefolder``: Hugging Face's layout, a top-level ``metadata.jsonl`` or ``metadata.csv`` with a
  ``file_name`` column (relative to the folder) and a caption column; in metadata order.
- ``webdataset``: ``.tar`` shards (a file, or every ``.tar`` under a folder, sorted) whose members
  are ``key.jpg|jpeg|png|webp`` + ``key.txt``, read with the stdlib ``tarfile``; in shard order.
- ``datasets``: a ``datasets`` dataset (``save_to_disk`` folder, loading-script folder or Hub id),
  with ``image_column`` and ``caption_column``; needs the optional ``datasets`` package.

Nothing is decoded while listing: each :class:`Example` opens its image and reads its caption when
asked, so a resumed encoding skips finished inputs for free. The ``fingerprint`` hashes the kind
and the example keys in order; it changes when inputs are added, removed or renamed.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["SOURCE_TYPES", "Example", "Source", "detect_source_type", "open_source"]

SOURCE_TYPES = ("folder", "imagefolder", "webdataset", "datasets")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order within one key
_CAPTION_COLUMNS = ("caption", "text")  # auto-detected caption columns (diffusers uses "text")
_DATASETS_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
_LAYOUTS = ("a folder of images with same-stem .txt captions (cat.jpg + cat.txt), a folder with "
            "metadata.jsonl/metadata.csv (file_name + caption columns), .tar shards "
            "(key.jpg + key.txt), or a datasets dataset")


@dataclasses.dataclass(frozen=True)
class Example:
  """One input of a source.

  Attributes:
    key: where it comes from (relative path, ``shard.tar:key`` or row index); unique.
    open_image: returns the image as an opened PIL image (not yet decoded); may raise.
    read_caption: returns the stripped caption, or None when the example has none; may raise.
  """

  key: str
  open_image: Callable[[], Image.Image]
  read_caption: Callable[[], str | None]


@dataclasses.dataclass(frozen=True)
class Source:
  """A listed source: its kind, where it is, and its examples in their fixed order."""

  kind: str
  location: str
  examples: Sequence[Example]
  fingerprint: str
  image_column: str | None = None
  caption_column: str | None = None


# What a reader returns: examples, location, (image column, caption column), fingerprint salt.
_Listing = tuple[list[Example], str, tuple[str | None, str | None], str]


def detect_source_type(source: str | os.PathLike) -> str:
  """Returns the kind of ``source`` (one of ``SOURCE_TYPES``), from its files.

  A folder with ``metadata.jsonl``/``.csv`` is an ``imagefolder``; one with ``datasets`` files
  (``dataset_info.json``, ``state.json`` or ``dataset_dict.json``) or a missing path that looks
  like a Hub id is ``datasets``; a ``.tar`` file, or a folder holding ``.tar`` files and no images,
  is ``webdataset``; any other folder is ``folder``.
  """
  path = Path(source)
  if path.is_file():
    if path.suffix.lower() == ".tar":
      return "webdataset"
    raise ValueError(f"source {str(path)!r} is a file but not a .tar shard; expected {_LAYOUTS}")
  if not path.is_dir():
    if _REPO_ID.fullmatch(str(source)) and "/" in str(source):
      return "datasets"
    raise FileNotFoundError(f"source {str(path)!r} does not exist; expected {_LAYOUTS}")
  names = {p.name for p in path.iterdir()}
  if names & {"metadata.jsonl", "metadata.csv"}:
    return "imagefolder"
  if names & set(_DATASETS_FILES):
    return "datasets"
  files = _walk(path)
  if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in files) and any(
      f.suffix.lower() == ".tar" for f in files):
    return "webdataset"
  return "folder"


def open_source(source: str | os.PathLike, *, source_type: str | None = None,
                image_column: str | None = None, caption_column: str | None = None,
                split: str = "train", require_captions: bool = True) -> Source:
  """Lists the examples of ``source``.

  Args:
    source: a folder, a ``.tar`` file, or a ``datasets`` Hub id.
    source_type: one of ``SOURCE_TYPES``; default: :func:`detect_source_type`.
    image_column: image column of a ``datasets`` dataset (default ``"image"``).
    caption_column: caption column of an ``imagefolder`` or ``datasets`` dataset (default: the
      one of ``"caption"``/``"text"`` that exists).
    split: split of a ``datasets`` dataset.
    require_captions: refuse a folder of images without any ``.txt`` caption (False when the
      captions are not needed, as for VQGAN training).

  Returns:
    The :class:`Source`, with at least one example.

  Raises:
    ValueError: unknown ``source_type``, no examples, no captions, or missing columns.
    FileNotFoundError: ``source`` does not exist. ImportError: ``datasets`` is needed.
  """
  if source_type is None:
    source_type = detect_source_type(source)
  if source_type not in SOURCE_TYPES:
    raise ValueError(f"unknown source_type {source_type!r}; expected one of {list(SOURCE_TYPES)} "
                     "(or None to detect it from the files)")
  if source_type != "datasets" and not Path(source).exists():
    raise FileNotFoundError(f"source {str(source)!r} does not exist; expected {_LAYOUTS}")
  if image_column is not None and source_type != "datasets":
    raise ValueError(f"image_column applies to datasets sources only, got {image_column!r} for a "
                     f"{source_type} source; remove it")
  reader = {"folder": _folder, "imagefolder": _imagefolder, "webdataset": _webdataset,
            "datasets": _datasets}[source_type]
  examples, location, columns, salt = reader(source, image_column=image_column,
                                             caption_column=caption_column, split=split,
                                             require_captions=require_captions)
  if not examples:
    raise ValueError(f"{source_type} source {location!r} holds no images; expected {_LAYOUTS}")
  digest = hashlib.sha256(f"{source_type}\0{salt}".encode())
  for example in examples:
    digest.update(b"\0" + example.key.encode())
  return Source(source_type, location, tuple(examples), digest.hexdigest(), *columns)


def _walk(root: Path) -> list[Path]:
  """Every non-folder entry under ``root``, hidden ones skipped, in sorted relative-path order."""
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if not d.startswith(".")]
    found += [Path(folder, f) for f in files if not f.startswith(".")]
  return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path) -> str | None:
  return path.read_text(encoding="utf-8").strip() if path.exists() else None


def _constant(value: str | None) -> str | None:
  return value


def _open_bytes(data: bytes) -> Image.Image:
  return Image.open(io.BytesIO(data))


def _folder(source: Any, caption_column: str | None, require_captions: bool = True, **_: Any) -> _Listing:
  if caption_column is not None:
    raise ValueError(f"caption_column applies to imagefolder and datasets sources, got "
                     f"{caption_column!r} for a folder source, whose captions are .txt files")
  root = Path(source).resolve()
  files = _walk(root)
  names = set(files)
  examples, with_caption = [], 0
  for path in files:
    if path.suffix.lower() not in IMAGE_SUFFIXES:
      continue
    caption = path.with_suffix(".txt")
    with_caption += caption in names
    examples.append(Example(path.relative_to(root).as_posix(), functools.partial(Image.open, path),
                            functools.partial(_read_text, caption)))
  if examples and not with_caption and require_captions:
    raise ValueError(
        f"found {len(examples)} images under {str(root)!r} but no captions; expected a same-stem "
        ".txt file beside each image (cat.jpg + cat.txt), or a metadata.jsonl with file_name and "
        "caption columns (source_type='imagefolder')")
  return examples, str(root), (None, None), ""


def _pick_caption_column(columns: Sequence[str], caption_column: str | None, where: str) -> str:
  if caption_column is not None:
    if caption_column not in columns:
      raise ValueError(f"caption column {caption_column!r} is not in {where}, whose columns are "
                       f"{list(columns)}; pass one of them as caption_column (--caption-column)")
    return caption_column
  found = [c for c in _CAPTION_COLUMNS if c in columns]
  if len(found) != 1:
    problem = "has both" if found else "has neither"
    raise ValueError(f"{where} {problem} of the caption columns {list(_CAPTION_COLUMNS)} (columns: "
                     f"{list(columns)}); pass caption_column (--caption-column) to choose one")
  return found[0]


def _metadata_rows(root: Path) -> tuple[list[dict[str, Any]], Path]:
  paths = [root / name for name in ("metadata.jsonl", "metadata.csv") if (root / name).is_file()]
  if len(paths) != 1:
    found = "both metadata.jsonl and metadata.csv" if paths else "no metadata.jsonl or metadata.csv"
    raise ValueError(f"an imagefolder needs one metadata file, found {found} in {str(root)!r}; "
                     "keep one (or pass source_type='folder' for .txt captions)")
  path = paths[0]
  if path.suffix == ".csv":
    with path.open(newline="", encoding="utf-8") as f:
      return list(csv.DictReader(f)), path
  rows = []
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} line {number} is not JSON ({e}); fix or remove it") from None
  return rows, path


def _imagefolder(source: Any, caption_column: str | None, **_: Any) -> _Listing:
  root = Path(source).resolve()
  rows, path = _metadata_rows(root)
  columns = list(dict.fromkeys(key for row in rows for key in row))
  if rows and "file_name" not in columns:
    raise ValueError(f"{str(path)!r} has no file_name column (columns: {columns}); the imagefolder "
                     "layout names each image, relative to the folder, in file_name")
  column = _pick_caption_column(columns, caption_column, repr(str(path))) if rows else caption_column
  examples = []
  for row in rows:
    caption = row.get(column)
    caption = None if caption is None else str(caption).strip()
    examples.append(Example(str(row["file_name"]),
                            functools.partial(Image.open, root / str(row["file_name"])),
                            functools.partial(_constant, caption)))
  return examples, str(root), (None, column), ""


def _read_range(path: Path, offset: int, size: int) -> bytes:
  with path.open("rb") as f:
    f.seek(offset)
    return f.read(size)


def _tar_caption(path: Path, member: tarfile.TarInfo | None) -> str | None:
  if member is None:
    return None
  return _read_range(path, member.offset_data, member.size).decode("utf-8").strip()


def _tar_image(path: Path, member: tarfile.TarInfo) -> Image.Image:
  return _open_bytes(_read_range(path, member.offset_data, member.size))


def _webdataset(source: Any, caption_column: str | None, **_: Any) -> _Listing:
  if caption_column is not None:
    raise ValueError(f"caption_column applies to imagefolder and datasets sources, got "
                     f"{caption_column!r} for a webdataset source, whose captions are key.txt")
  root = Path(source).resolve()
  shards = [root] if root.is_file() else [p for p in _walk(root) if p.suffix.lower() == ".tar"]
  examples = []
  for shard in shards:
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}  # key -> extension -> member, tar order
    with tarfile.open(shard, "r:") as tar:
      for member in tar:
        if member.isfile():
          folder, _, name = member.name.rpartition("/")
          stem, _, extension = name.partition(".")
          samples.setdefault(f"{folder}/{stem}" if folder else stem, {})[extension.lower()] = member
    name = shard.name if shard == root else shard.relative_to(root).as_posix()
    for key, members in samples.items():
      image = next((members[e] for e in _TAR_IMAGE_EXTENSIONS if e in members), None)
      if image is not None:
        examples.append(Example(f"{name}:{key}", functools.partial(_tar_image, shard, image),
                                functools.partial(_tar_caption, shard, members.get("txt"))))
  return examples, str(root), (None, None), ""


def _datasets(source: Any, image_column: str | None, caption_column: str | None,
              split: str, **_: Any) -> _Listing:
  try:
    import datasets
  except ImportError as e:
    raise ImportError(
        "reading a datasets dataset needs the datasets package: pip install datasets (or use an "
        "image folder, a metadata.jsonl imagefolder or .tar shards, which need nothing)") from e
  path = Path(source)
  if path.is_dir() and any((path / name).exists() for name in _DATASETS_FILES):
    dataset = datasets.load_from_disk(str(path))
  else:
    dataset = datasets.load_dataset(str(source), split=split)
  if isinstance(dataset, datasets.DatasetDict):
    if split not in dataset:
      raise ValueError(f"{str(source)!r} has splits {list(dataset)}, not {split!r}; pass one as split")
    dataset = dataset[split]
  image_column = image_column or "image"
  if image_column not in dataset.column_names:
    raise ValueError(f"image column {image_column!r} is not in {str(source)!r}, whose columns are "
                     f"{dataset.column_names}; pass one as image_column (--image-column)")
  column = _pick_caption_column(dataset.column_names, caption_column, repr(str(source)))
  if isinstance(dataset.features[image_column], datasets.Image):
    # Undecoded {"bytes", "path"} rows: a corrupt image is one skipped example, not a crash.
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
  dataset = dataset.select_columns([image_column, column])
  examples = [Example(str(i), functools.partial(_dataset_image, dataset, image_column, i),
                      functools.partial(_dataset_caption, dataset, column, i))
              for i in range(len(dataset))]
  # Row keys do not change with the data: the dataset's own fingerprint goes into ours.
  return examples, str(source), (image_column, column), getattr(dataset, "_fingerprint", "")


def _dataset_image(dataset: Any, column: str, i: int) -> Image.Image:
  value = dataset[i][column]
  if isinstance(value, Image.Image):
    return value
  if isinstance(value, dict) and value.get("bytes") is not None:
    return _open_bytes(value["bytes"])
  if isinstance(value, dict) and value.get("path"):
    return Image.open(value["path"])
  if isinstance(value, (str, os.PathLike)):
    return Image.open(value)
  raise TypeError(f"row {i} column {column!r} holds {type(value).__name__}, not an image")


def _dataset_caption(dataset: Any, column: str, i: int) -> str | None:
  value = dataset[i][column]
  return None if value is None else str(value).strip()
