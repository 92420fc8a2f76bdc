"""Encode a captioned image set into VQGAN codes: the parquet shards fine-tuning reads.

Example: ``summary = encode_dataset("photos/", vqgan="dalle-mini/vqgan_imagenet_f16_16384", out="encoded/")``.

The output folder holds what dalle-mini's trainer reads, plus two files for us:

- ``00000.parquet``, ``00001.parquet``...: columns ``caption`` (string) and ``encoding``
  (list<int32>, the image's ``codes_per_image`` VQGAN codes in row-major order);
- ``encoding_info.json``: the VQGAN (name, parameter digest, resolution, codes per image, codebook
  size) and the settings, for training to check compatibility and for resuming;
- ``README.md``: a dataset card (source, VQGAN, rows, skipped inputs by reason, columns).

Each image is converted to RGB, its shorter side resized to the VQGAN resolution (LANCZOS), centre
cropped and scaled to [0, 1] (``image_utils.from_pil``: dalle-mini's recipe). Shard ``k`` holds the
inputs ``[k * shard_size, (k + 1) * shard_size)`` of the source's fixed order, minus the skipped
ones, so a shard never depends on another: shards are written to a temporary name and renamed
when complete, and a rerun encodes only the missing ones and gives the same bytes as an
uninterrupted run. With several JAX processes, process ``p`` of ``P`` encodes shards ``p, p + P,
...`` (global names: no collisions, no coordination; the union is the one-process output).
Within a process the batch is split over ``jax.local_devices()`` on a 1-D mesh.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import huggingface_hub
import jax
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from ..hub_utils import atomic_write, atomic_write_json, read_json_object
from ..image_utils import from_pil
from ..model_cards import render_model_card
from ..modeling_flax_utils import flatten_params
from ..modeling_flax_vqgan import FlaxVQGANModel
from .sources import Example, Source, open_source

__all__ = ["INFO_NAME", "SKIP_REASONS", "EncodeSummary", "encode_dataset", "push_encoded_dataset"]

logger = logging.getLogger(__name__)

INFO_NAME = "encoding_info.json"
SKIP_REASONS = ("no caption", "unreadable caption", "unreadable image", "too small")
_FORMAT_VERSION = 1
_SHARD_METADATA_KEY = b"dalle_flax"  # parquet key-value metadata: shard index, inputs, skip counts
_NOT_COMPARED = ("source.location", "vqgan.name")  # a moved folder or renamed VQGAN still resumes
_PUSHED_FILES = ["*.parquet", "README.md", INFO_NAME]


@dataclasses.dataclass(frozen=True)
class EncodeSummary:
  """What :func:`encode_dataset` did.

  Attributes:
    out: the output folder.
    num_inputs: examples in the source.
    num_shards: shards of the whole encoding.
    shards_done: shards finished in ``out``: this call's, an earlier run's or another process's.
    shards_encoded: shards this call encoded.
    written: rows of the finished shards.
    skipped: inputs of the finished shards left out, by reason (see ``SKIP_REASONS``).
    seconds: time this call spent reading and encoding.
    images_per_second: inputs (skipped ones included) this call read per second.
    pushed: the Hub commit URL when the folder was pushed, else None.
  """

  out: Path
  num_inputs: int
  num_shards: int
  shards_done: int
  shards_encoded: int
  written: int
  skipped: dict[str, int]
  seconds: float
  images_per_second: float
  pushed: str | None = None

  @property
  def complete(self) -> bool:
    """Whether every shard of the encoding is finished."""
    return self.shards_done == self.num_shards


def encode_dataset(
    source: str | os.PathLike,
    *,
    vqgan: str | os.PathLike | FlaxVQGANModel,
    out: str | os.PathLike,
    source_type: str | None = None,
    image_column: str | None = None,
    caption_column: str | None = None,
    split: str = "train",
    batch_size: int = 64,
    shard_size: int = 2048,
    min_size: int | None = None,
    on_bad_image: str = "skip",
    push_to_hub: str | None = None,
    token: str | None = None,
    private: bool | None = None,
    progress: bool = True,
) -> EncodeSummary:
  """Encodes the (image, caption) examples of ``source`` into parquet shards in ``out``.

  Args:
    source: a folder, ``.tar`` shard or ``datasets`` id (see ``dalle_flax.training.sources``).
    vqgan: a ``FlaxVQGANModel`` or the folder / Hub repo to load it from.
    out: output folder; a folder of an earlier run with the same settings resumes it.
    source_type, image_column, caption_column, split: see ``sources.open_source``.
    batch_size: images per VQGAN call, split over the local devices (padded to a multiple of
      their number; the padding is dropped).
    shard_size: inputs per shard; a shard has fewer rows when inputs are skipped.
    min_size: images whose shorter side is below this are skipped (default: half the VQGAN
      resolution); 0 keeps every image (small ones are upscaled).
    on_bad_image: "skip" counts unusable inputs (``SKIP_REASONS``) and goes on; "error" raises
      on the first one.
    push_to_hub: a dataset repo id to upload the finished folder to (process 0 only).
    token, private: Hub token and visibility of a created repo.
    progress: show a tqdm bar over the inputs, with images/s.

  Returns:
    An :class:`EncodeSummary`.

  Raises:
    ValueError: bad settings, an empty or captionless source, an unusable input in "error"
      mode, or an ``out`` folder holding an encoding with other settings.
  """
  for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be an int >= 1, got {value!r}")
  if on_bad_image not in ("skip", "error"):
    raise ValueError(f"on_bad_image must be 'skip' or 'error', got {on_bad_image!r}")
  model, vqgan_name = _load_vqgan(vqgan)
  config = model.config
  resolution = config.latent_resolution * config.downsample_factor
  min_size = resolution // 2 if min_size is None else min_size
  if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
    raise ValueError(f"min_size must be an int >= 0, got {min_size!r}")
  src = open_source(source, source_type=source_type, image_column=image_column,
                    caption_column=caption_column, split=split)
  out = Path(out)
  info = _encoding_info(src, model, vqgan_name, resolution=resolution, min_size=min_size,
                        shard_size=shard_size)
  process_index, process_count = _process_slot()
  _prepare_out(out, info, clean_temporary=process_count == 1)
  num_shards = info["sharding"]["num_shards"]
  pending = [k for k in range(process_index, num_shards, process_count)
             if not _shard_path(out, k, num_shards).exists()]
  logger.info("%s: %d inputs in %d shards; this process encodes %d", out, len(src.examples),
              num_shards, len(pending))
  start = time.perf_counter()
  read = _encode_shards(src.examples, pending, out, model, num_shards=num_shards,
                        resolution=resolution, min_size=min_size, batch_size=batch_size,
                        shard_size=shard_size, on_bad_image=on_bad_image, progress=progress)
  seconds = time.perf_counter() - start
  shards_done, written, skipped = _finished_shards(out, info)
  summary = EncodeSummary(out, len(src.examples), num_shards, shards_done, len(pending), written,
                          skipped, seconds, read / seconds if read and seconds > 0 else 0.0)
  with atomic_write(out / "README.md", "w") as f:
    f.write(render_model_card("dataset.md", info=info, summary=summary, repo_id=push_to_hub))
  if push_to_hub and process_index == 0:
    if summary.complete:
      url = push_encoded_dataset(out, push_to_hub, token=token, private=private)
      summary = dataclasses.replace(summary, pushed=url)
    else:
      logger.warning("not pushing %s: %d of %d shards are finished (other processes still run?); "
                     "push later with push_encoded_dataset", out, shards_done, num_shards)
  return summary


def push_encoded_dataset(out: str | os.PathLike, repo_id: str, *, token: str | None = None,
                         private: bool | None = None, repo_type: str = "dataset",
                         commit_message: str = "Upload a dataset encoded with dalle-flax") -> str:
  """Uploads a finished encoding (shards, README.md, encoding_info.json) to a Hub repo.

  Args:
    out: the folder ``encode_dataset`` wrote; every shard must be finished.
    repo_id: the repo, created if needed. repo_type: "dataset" (the Hub's kind for data).
    token, private, commit_message: as for ``HfApi.upload_folder`` / ``create_repo``.

  Returns:
    The commit URL.
  """
  out = Path(out)
  if not (out / INFO_NAME).is_file():
    raise FileNotFoundError(f"{str(out)!r} has no {INFO_NAME}; expected a folder written by "
                            "encode_dataset")
  info = read_json_object(out / INFO_NAME)
  done, _, _ = _finished_shards(out, info)
  if done != info["sharding"]["num_shards"]:
    raise ValueError(f"{str(out)!r} has {done} of {info['sharding']['num_shards']} shards; "
                     "run encode_dataset again to finish them before pushing")
  api = huggingface_hub.HfApi(token=token)
  repo_id = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True).repo_id
  commit = api.upload_folder(repo_id=repo_id, repo_type=repo_type, folder_path=out,
                             allow_patterns=_PUSHED_FILES, commit_message=commit_message)
  return str(getattr(commit, "commit_url", commit))


# --- the encoding loop ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("module",))
def _encode_codes(module: Any, params: Any, pixels: jax.Array) -> jax.Array:
  """(b, H, W, 3) pixels in [0, 1] -> (b, h * w) int32 codes, as ``FlaxVQGANModel.encode``."""
  return module.apply({"params": params}, pixels, method="encode")[1]


def _encode_shards(examples: tuple[Example, ...], shards: list[int], out: Path,
                   model: FlaxVQGANModel, *, num_shards: int, resolution: int, min_size: int,
                   batch_size: int, shard_size: int, on_bad_image: str, progress: bool) -> int:
  """Encodes and writes ``shards``; returns the number of inputs read."""
  if not shards:
    return 0
  mesh = Mesh(np.array(jax.local_devices()), ("batch",))
  params = jax.device_put(model.params, NamedSharding(mesh, PartitionSpec()))
  batch_sharding = NamedSharding(mesh, PartitionSpec("batch"))
  padded_size = -(-batch_size // mesh.size) * mesh.size  # one shape, so one compilation
  codes_per_image = model.config.latent_resolution ** 2

  def encode(pixels: list[np.ndarray]) -> tuple[jax.Array, int]:
    batch = np.zeros((padded_size, resolution, resolution, 3), np.float32)
    batch[:len(pixels)] = pixels
    return _encode_codes(model.module, params, jax.device_put(batch, batch_sharding)), len(pixels)

  ranges = {k: range(k * shard_size, min((k + 1) * shard_size, len(examples))) for k in shards}
  prepare = functools.partial(_prepare, resolution=resolution, min_size=min_size)
  workers = min(8, os.cpu_count() or 1)
  total = sum(len(r) for r in ranges.values())
  with ThreadPoolExecutor(workers, thread_name_prefix="dalle-flax-encode") as pool, tqdm(
      total=total, unit="img", desc="encoding", disable=not progress) as bar:
    prepared = _ordered_map(pool, lambda i: prepare(examples[i]),
                            (i for k in shards for i in ranges[k]), window=2 * batch_size + workers)
    for k in shards:
      captions, pixels, batches = [], [], []
      skipped: collections.Counter[str] = collections.Counter()
      for i in ranges[k]:
        caption, image, reason, detail = next(prepared)
        bar.update()
        if reason is not None:
          if on_bad_image == "error":
            raise ValueError(f"input {examples[i].key!r} is unusable ({reason}: {detail}); fix or "
                             "remove it, or pass on_bad_image='skip' (--on-bad-image skip)")
          logger.info("skipping %s (%s: %s)", examples[i].key, reason, detail)
          skipped[reason] += 1
          continue
        captions.append(caption)
        pixels.append(image)
        if len(pixels) == batch_size:
          batches.append(encode(pixels))
          pixels = []
      if pixels:
        batches.append(encode(pixels))
      codes = (np.concatenate([np.asarray(c)[:n] for c, n in batches]) if batches
               else np.zeros((0, codes_per_image), np.int32))  # (rows, codes_per_image)
      meta = {"shard": k, "inputs": [ranges[k].start, ranges[k].stop], "skipped": dict(skipped)}
      _write_shard(_shard_path(out, k, num_shards), captions, codes, meta)
  return total


def _ordered_map(pool: ThreadPoolExecutor, fn: Callable[[Any], Any], items: Iterable[Any], *,
                 window: int) -> Iterator[Any]:
  """``map(fn, items)`` on ``pool``, in order, with at most ``window`` items in flight."""
  in_flight: collections.deque[Future] = collections.deque()
  for item in items:
    in_flight.append(pool.submit(fn, item))
    if len(in_flight) >= window:
      yield in_flight.popleft().result()
  while in_flight:
    yield in_flight.popleft().result()


def _prepare(example: Example, *, resolution: int,
             min_size: int) -> tuple[str | None, np.ndarray | None, str | None, str | None]:
  """Returns (caption, (resolution, resolution, 3) float32 pixels, None, None) or, for an
  unusable input, (None, None, reason, detail)."""
  try:
    caption = example.read_caption()
  except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
    return None, None, "unreadable caption", f"{type(e).__name__}: {e}"
  if caption is None:
    return None, None, "no caption", "no caption text for this image"
  try:
    with example.open_image() as image:
      image.load()
      rgb = image.convert("RGB")
  except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, EOFError... on bad files
    return None, None, "unreadable image", f"{type(e).__name__}: {e}"
  if min(rgb.size) < min_size:
    width, height = rgb.size
    return None, None, "too small", f"{width}x{height} has a side under min_size={min_size}"
  return caption, from_pil(rgb, size=resolution)[0], None, None


def _write_shard(path: Path, captions: list[str], codes: np.ndarray, meta: dict[str, Any]) -> None:
  offsets = np.arange(len(captions) + 1, dtype=np.int32) * codes.shape[1]
  encoding = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()),
                                      pa.array(codes.reshape(-1), pa.int32()))
  table = pa.table({"caption": pa.array(captions, pa.string()), "encoding": encoding})
  table = table.replace_schema_metadata({_SHARD_METADATA_KEY: json.dumps(meta, sort_keys=True)})
  with atomic_write(path) as f:  # a killed run leaves only a hidden .tmp file behind
    pq.write_table(table, f)


# --- the output folder ---------------------------------------------------------------------------
def _process_slot() -> tuple[int, int]:
  """(this process's index, number of processes) of the JAX runtime."""
  return jax.process_index(), jax.process_count()


def _shard_path(out: Path, k: int, num_shards: int) -> Path:
  return out / f"{k:0{max(5, len(str(num_shards - 1)))}d}.parquet"


def _load_vqgan(vqgan: Any) -> tuple[FlaxVQGANModel, str]:
  if isinstance(vqgan, FlaxVQGANModel):
    return vqgan, vqgan.config._name_or_path or "a FlaxVQGANModel instance"
  if isinstance(vqgan, (str, os.PathLike)):
    return FlaxVQGANModel.from_pretrained(vqgan), str(vqgan)
  raise TypeError(f"vqgan must be a FlaxVQGANModel or a folder / repo id, got {type(vqgan).__name__}")


def _params_digest(params: Any) -> str:
  digest = hashlib.sha256()
  for name, value in sorted(flatten_params(params).items()):
    array = np.asarray(value)
    digest.update(f"{name}:{array.dtype}:{array.shape}\0".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def _encoding_info(src: Source, model: FlaxVQGANModel, vqgan_name: str, *, resolution: int,
                   min_size: int, shard_size: int) -> dict[str, Any]:
  config = model.config
  return {
      "format_version": _FORMAT_VERSION,
      "columns": {"caption": "string", "encoding": "list<int32>"},
      "vqgan": {"name": vqgan_name, "params_sha256": _params_digest(model.params),
                "dtype": str(model.dtype), "resolution": resolution,
                "codes_per_image": config.latent_resolution ** 2, "codebook_size": config.n_embed,
                "downsample_factor": config.downsample_factor},
      "source": {"kind": src.kind, "location": src.location, "num_inputs": len(src.examples),
                 "fingerprint": src.fingerprint, "image_column": src.image_column,
                 "caption_column": src.caption_column},
      "preprocessing": {"resize": "shorter side to resolution, LANCZOS", "crop": "centre",
                        "pixels": "RGB float32 [0, 1]", "min_size": min_size},
      "sharding": {"shard_size": shard_size,
                   "num_shards": math.ceil(len(src.examples) / shard_size)},
  }


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    flat.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
  return flat


def _prepare_out(out: Path, info: dict[str, Any], *, clean_temporary: bool) -> None:
  """Creates ``out`` with ``info``, or checks that the encoding already there has the same settings."""
  path = out / INFO_NAME
  if path.is_file():
    old, new = _flat(read_json_object(path)), _flat(info)
    changed = [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
               if key not in _NOT_COMPARED and old.get(key) != new.get(key)]
    if changed:
      raise ValueError(
          f"{str(out)!r} holds an encoding made with other settings ({'; '.join(changed)}), so its "
          "finished shards would not match this run's; rerun with the original settings to resume "
          "it, or pass a new out folder (or delete this one)")
  elif out.is_dir() and any(out.glob("*.parquet")):
    raise ValueError(f"{str(out)!r} holds parquet files but no {INFO_NAME}, so it is not an "
                     "encoding this run can resume; pass a new or empty out folder")
  else:
    atomic_write_json(path, info)
  if clean_temporary:  # with several processes another one may be writing its own right now
    for leftover in out.glob(".*.parquet.*.tmp"):
      leftover.unlink(missing_ok=True)


def _finished_shards(out: Path, info: dict[str, Any]) -> tuple[int, int, dict[str, int]]:
  """(finished shards, their rows, their skipped inputs by reason), read from the shard metadata."""
  num_shards, shard_size = info["sharding"]["num_shards"], info["sharding"]["shard_size"]
  num_inputs = info["source"]["num_inputs"]
  done, rows, skipped = 0, 0, collections.Counter()
  for k in range(num_shards):
    path = _shard_path(out, k, num_shards)
    if not path.exists():
      continue
    try:
      metadata = pq.read_metadata(path)
      meta = json.loads(metadata.metadata[_SHARD_METADATA_KEY])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{str(path)!r} is not a shard written by encode_dataset ({e}); delete it "
                       "and rerun to encode it again") from None
    expected = [k * shard_size, min((k + 1) * shard_size, num_inputs)]
    if meta.get("inputs") != expected:
      raise ValueError(f"{str(path)!r} holds inputs {meta.get('inputs')}, expected {expected}; "
                       "delete it and rerun to encode it again")
    done, rows = done + 1, rows + metadata.num_rows
    skipped.update(meta["skipped"])
  return done, rows, {reason: skipped[reason] for reason in SKIP_REASONS if skipped[reason]}
