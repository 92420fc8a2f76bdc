"""Training batches from encoded parquet shards (``caption`` str, ``encoding`` list of codes), with grain.

Example::

    rows = load_encoded_rows("encoded/", config)              # validated; this process's share
    dataset = make_dataset(rows, processor, config, batch_size=8, seed=0)
    iterator = iter(dataset)                                   # get_state() / set_state()
    batch = next(iterator)  # numpy int32: input_ids, attention_mask (b, t); decoder_input_ids, labels (b, n)

The original's semantics (reference §7.1): captions are normalized as the model config says
(the processor does it), a caption is blanked with probability ``blank_caption_prob`` (this
trains the unconditional branch that guidance uses), tokenized to ``max_text_length``;
``labels`` are the codes and ``decoder_input_ids`` the labels shifted right after
``decoder_start_token_id``.

Reading: every file is read and checked once, before anything compiles; a process keeps the
rows ``process_index::process_count`` (of a row count that every process shares equally, so
all stop together) in memory, about ``2 * image_length`` bytes plus the caption per row.
Iteration is a ``grain.MapDataset``: shuffled with a fresh permutation each epoch, repeated,
batched within an epoch; the blank-caption draw is a pure function of (seed, row, epoch). So the
iterator's ``get_state()`` (a small dict) restores exactly the batches that would have come next.
"""

from __future__ import annotations

import glob
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["EncodedRows", "find_parquet_files", "load_encoded_rows", "make_dataset", "prepare_batch",
           "shift_tokens_right"]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
_TOKENIZER_LOCK = threading.Lock()  # fast tokenizers change padding state per call: one call at a time


class EncodedRows:
  """This process's validated rows: a grain random-access source of ``(row_id, caption, codes)``.

  Attributes:
    captions: raw captions, one per row.
    codes: (rows, image_length) int16 or int32 VQGAN codes.
    row_ids: (rows,) int64 index of each row in the whole dataset (files in order).
    files: the parquet files read; total_rows: rows of all processes together.
  """

  def __init__(self, captions: list[str], codes: np.ndarray, row_ids: np.ndarray, files: Sequence[Path],
               total_rows: int):
    self.captions, self.codes, self.row_ids = captions, codes, row_ids
    self.files, self.total_rows = tuple(files), total_rows

  def __len__(self) -> int:
    return len(self.captions)

  def __getitem__(self, index: int) -> tuple[int, str, np.ndarray]:
    return int(self.row_ids[index]), self.captions[index], self.codes[index]

  def __repr__(self) -> str:
    return f"EncodedRows({len(self)} of {self.total_rows} rows from {len(self.files)} file(s))"


def find_parquet_files(files: PathLike | Sequence[PathLike]) -> list[Path]:
  """A folder (its ``*.parquet``), a glob pattern, a file, or a list of those -> sorted files.

  Raises:
    FileNotFoundError: nothing matches an entry.
  """
  entries = [files] if isinstance(files, (str, os.PathLike)) else list(files)
  found: list[Path] = []
  for entry in entries:
    path = Path(entry)
    if path.is_dir():
      matches = sorted(path.glob("*.parquet"))
    elif glob.has_magic(str(entry)):
      matches = sorted(Path(p) for p in glob.glob(str(entry)) if Path(p).is_file())
    else:
      matches = [path] if path.is_file() else []
    if not matches:
      raise FileNotFoundError(f"no parquet file found for {str(entry)!r}: give a folder of *.parquet "
                              "files, a glob such as 'encoded/*.parquet', a file, or a list of those.")
    found.extend(m for m in matches if m not in found)  # a file named twice is read once
  return found


def load_encoded_rows(files: PathLike | Sequence[PathLike], config: Any, *, caption_column: str = "caption",
                      encoding_column: str = "encoding", process_index: int | None = None,
                      process_count: int | None = None) -> EncodedRows:
  """Reads and validates encoded shards; keeps this JAX process's rows.

  Args:
    files: see :func:`find_parquet_files`.
    config: the model's :class:`~dalle_flax.DalleBartConfig` (``image_length``, ``image_vocab_size``).
    caption_column, encoding_column: column names.
    process_index, process_count: this process's share (default ``jax.process_index()`` /
      ``jax.process_count()``); rows past a multiple of ``process_count`` are dropped.

  Raises:
    ValueError: a missing column, a null value, an encoding of the wrong length or with a code
      outside ``[0, image_vocab_size)``, or no rows: the message names file, row, expected and got.
  """
  if process_index is None or process_count is None:
    import jax  # deferred: reading data needs no accelerator runtime otherwise

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}.")
  paths = find_parquet_files(files)
  counts = [_parquet_file(p).metadata.num_rows for p in paths]
  total = sum(counts)
  if total == 0:
    raise ValueError(f"the dataset is empty: 0 rows in {[str(p) for p in paths]}.")
  usable = total // process_count * process_count
  if usable == 0:
    raise ValueError(f"the dataset has {total} rows, fewer than the {process_count} processes that share it.")
  if usable < total:
    logger.info("Dropping the last %d of %d rows so %d processes get equal shares.", total - usable, total,
                process_count)
  captions: list[str] = []
  codes: list[np.ndarray] = []
  row_ids: list[np.ndarray] = []
  start = 0
  for path, count in zip(paths, counts):
    caption, encoding = _read_checked(path, caption_column, encoding_column, config)
    ids = np.arange(start, start + count)
    keep = np.flatnonzero((ids < usable) & (ids % process_count == process_index))
    captions.extend(caption[i] for i in keep)
    codes.append(encoding[keep])
    row_ids.append(ids[keep])
    start += count
  return EncodedRows(captions, np.concatenate(codes), np.concatenate(row_ids), paths, total)


def _parquet_file(path: Path) -> pq.ParquetFile:
  try:
    return pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as error:  # pyarrow's messages do not name the file
    raise ValueError(f"{path}: not a readable parquet file ({error}).") from error


def _read_checked(path: Path, caption_column: str, encoding_column: str, config: Any) -> tuple[list[str], np.ndarray]:
  """One file's captions and (rows, image_length) codes, or a ValueError naming file and row."""
  names = _parquet_file(path).schema_arrow.names
  missing = [c for c in (caption_column, encoding_column) if c not in names]
  if missing:
    raise ValueError(f"{path}: missing column(s) {missing}; it has {names}. Encoded shards need a caption "
                     f"column {caption_column!r} (str) and an encoding column {encoding_column!r} (list of int).")
  table = pq.read_table(path, columns=[caption_column, encoding_column])
  caption, encoding = table.column(caption_column).combine_chunks(), table.column(encoding_column).combine_chunks()
  if not (pa.types.is_string(caption.type) or pa.types.is_large_string(caption.type)):
    raise ValueError(f"{path}: column {caption_column!r} must hold strings, got {caption.type}.")
  if not (pa.types.is_list(encoding.type) or pa.types.is_large_list(encoding.type)
          or pa.types.is_fixed_size_list(encoding.type)) or not pa.types.is_integer(encoding.type.value_type):
    raise ValueError(f"{path}: column {encoding_column!r} must hold lists of integers, got {encoding.type}.")
  for name, column in ((caption_column, caption), (encoding_column, encoding)):
    if column.null_count:
      row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
      raise ValueError(f"{path}: row {row}: {name!r} is null ({column.null_count} null row(s) in this file).")
  length, vocab = config.image_length, config.image_vocab_size
  lengths = pc.list_value_length(encoding).to_numpy(zero_copy_only=False)
  wrong = np.flatnonzero(lengths != length)
  if wrong.size:
    row = int(wrong[0])
    raise ValueError(f"{path}: row {row}: {encoding_column!r} has {lengths[row]} codes, expected "
                     f"config.image_length={length} ({wrong.size} such row(s)); was it encoded with another VQGAN "
                     "or image size?")
  values = pc.list_flatten(encoding).to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, length)
  bad = np.argwhere((values < 0) | (values >= vocab))
  if bad.size:
    row, position = (int(i) for i in bad[0])
    raise ValueError(f"{path}: row {row}: code {values[row, position]} at position {position} is outside "
                     f"[0, config.image_vocab_size={vocab}) ({len(bad)} such code(s)); was it encoded with "
                     "another VQGAN?")
  dtype = np.int16 if vocab <= np.iinfo(np.int16).max + 1 else np.int32
  return caption.to_pylist(), values.astype(dtype)


def shift_tokens_right(labels: np.ndarray, decoder_start_token_id: int) -> np.ndarray:
  """(b, n) labels -> (b, n) ``[start, labels[:, :-1]]``, the decoder's teacher-forced input."""
  start = np.full((labels.shape[0], 1), decoder_start_token_id, labels.dtype)
  return np.concatenate([start, labels[:, :-1]], axis=1)


def prepare_batch(captions: Sequence[str], codes: np.ndarray, processor: Any, decoder_start_token_id: int, *,
                  normalize: bool = True) -> dict[str, np.ndarray]:
  """Captions and (b, n) codes -> the train step's batch (numpy int32).

  ``normalize=False`` when the captions were already normalized (and blanked) by the dataset.
  Captions are tokenized to ``processor.max_text_length`` (``<s> ... </s> <pad>...``; ``""``
  gives the unconditional row ``<s> </s> <pad>...``).
  """
  texts = [processor.normalize(c) if normalize else c for c in captions]
  with _TOKENIZER_LOCK:
    tokens = processor.tokenizer(texts, padding="max_length", truncation=True,
                                 max_length=processor.max_text_length, return_tensors="np")
  labels = np.asarray(codes, np.int32)
  return {
      "input_ids": tokens["input_ids"].astype(np.int32),            # (b, t)
      "attention_mask": tokens["attention_mask"].astype(np.int32),  # (b, t)
      "decoder_input_ids": shift_tokens_right(labels, decoder_start_token_id),  # (b, n)
      "labels": labels,                                              # (b, n)
  }


def check_tokenizer(processor: Any, captions: Sequence[str]) -> None:
  """Raises when the tokenizer turns every non-empty caption of ``captions`` into special tokens.

  A tokenizer that lost its vocabulary (built from files under a name the tokenizer class does
  not read, a wrong folder) maps every caption to ``<s> </s>``; a model trained on that learns
  to ignore its text, and nothing else would fail.
  """
  texts = [text for text in (processor.normalize(c) for c in captions) if text.strip()]
  if not texts:
    return
  tokenizer = processor.tokenizer
  special = set(tokenizer.all_special_ids)
  with _TOKENIZER_LOCK:
    ids = tokenizer(texts[:64])["input_ids"]
  if all(set(row) <= special for row in ids):
    raise ValueError(f"the tokenizer turns every caption into special tokens only (e.g. {texts[0]!r} -> "
                     f"{tokenizer.convert_ids_to_tokens(ids[0])}); its vocabulary holds {len(tokenizer)} "
                     "entries. Load it with from_pretrained(folder), or build it with vocab= and merges= "
                     "(DalleBartTokenizer also takes vocab_file= and merges_file=).")


def make_dataset(rows: EncodedRows, processor: Any, config: Any, *, batch_size: int, seed: int = 0,
                 blank_caption_prob: float = 0.1, shuffle: bool = True, num_epochs: int | None = None,
                 drop_remainder: bool = True, num_threads: int = 2, prefetch: int = 4,
                 process_slice: tuple[int, int] | None = None) -> grain.IterDataset:
  """The batches of ``rows`` as a grain dataset; ``iter()`` of it is checkpointable.

  Args:
    rows: from :func:`load_encoded_rows`.
    processor: a :class:`~dalle_flax.DalleMiniProcessor` matching ``config`` (``normalize_text``,
      ``max_text_length``).
    config: the model's config (``decoder_start_token_id`` and the text settings).
    batch_size: rows per batch on this process (the global batch is ``batch_size *
      jax.process_count()``).
    seed: shuffling and blank-caption draws (the same on every process).
    blank_caption_prob: probability that a caption is replaced by ``""`` (drawn per row and
      epoch; the original's maintainer used 0.1). Use 0 for evaluation.
    shuffle: a new permutation each epoch (False for evaluation).
    num_epochs: None repeats forever (training); 1 for one evaluation pass.
    drop_remainder: drop each epoch's last partial batch (keeps shapes, so nothing recompiles).
    num_threads, prefetch: grain's reader threads and batches read ahead.
    process_slice: ``(process_index, process_count)`` when ``rows`` are *all* the rows (every
      process loads them, ``load_encoded_rows(..., process_index=0, process_count=1)``): the
      dataset then forms global batches of ``batch_size * process_count`` rows in the global
      shuffled order and yields this process's ``batch_size`` of each, so any number of
      processes sees exactly the batches of one process with the global batch size. Only the
      kept rows are normalized and tokenized.

  Returns:
    A ``grain.IterDataset`` of batch dicts (see :func:`prepare_batch`). Its iterator has
    ``get_state()`` / ``set_state()``; orbax saves it with ``grain.checkpoint.CheckpointSave``.

  Raises:
    ValueError: bad arguments, or a processor whose text settings differ from ``config``.
  """
  if not 0.0 <= blank_caption_prob <= 1.0:
    raise ValueError(f"blank_caption_prob must be in [0, 1], got {blank_caption_prob}.")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32), got {seed}.")
  index, count = process_slice or (0, 1)
  if not 0 <= index < count:
    raise ValueError(f"process_slice must be (index, count) with 0 <= index < count, got {process_slice}.")
  if batch_size < 1 or (drop_remainder and batch_size * count > len(rows)):
    raise ValueError(f"batch_size must be in [1, {len(rows) // count}] ({len(rows)} rows shared by {count} "
                     f"process(es)), got {batch_size}.")
  for name in ("max_text_length", "normalize_text"):
    if getattr(processor, name) != getattr(config, name):
      raise ValueError(f"processor.{name} is {getattr(processor, name)!r} but config.{name} is "
                       f"{getattr(config, name)!r}; load the processor from the model's folder or pass "
                       f"DalleMiniProcessor(..., {name}={getattr(config, name)!r}).")
  check_tokenizer(processor, rows.captions[:256])
  ds = grain.MapDataset.source(rows)
  if shuffle:
    ds = ds.shuffle(seed=int(np.random.SeedSequence([seed, 0]).generate_state(1)[0]))
  ds = ds.map_with_index(_CaptionPicker(blank_caption_prob, seed, len(rows)))
  collate = _Collate(processor, config.decoder_start_token_id, slice(index * batch_size, (index + 1) * batch_size))
  ds = ds.batch(batch_size * count, drop_remainder=drop_remainder, batch_fn=collate)
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch))


class _CaptionPicker:
  """``(index, row) -> (caption or None, codes)``: None when the row's draw for this epoch falls
  under ``prob`` (a blank caption). ``index // rows`` is the epoch (grain's repeat)."""

  def __init__(self, prob: float, seed: int, rows: int):
    self.prob, self.seed, self.rows = prob, seed, rows

  def __call__(self, index: int, row: tuple[int, str, np.ndarray]) -> tuple[str | None, np.ndarray]:
    row_id, caption, codes = row
    draw = np.random.default_rng([self.seed, 1, row_id, index // self.rows]).random()
    return (None if draw < self.prob else caption), codes


class _Collate:
  """grain ``batch_fn``: this process's part of a list of ``(caption or None, codes)`` ->
  :func:`prepare_batch`'s dict (captions normalized here, blanks become ``""``)."""

  def __init__(self, processor: Any, decoder_start_token_id: int, part: slice):
    self.processor, self.start, self.part = processor, decoder_start_token_id, part

  def __call__(self, items: Sequence[tuple[str | None, np.ndarray]]) -> dict[str, np.ndarray]:
    items = items[self.part]
    captions = ["" if caption is None else self.processor.normalize(caption) for caption, _ in items]
    codes = np.stack([codes for _, codes in items])
    return prepare_batch(captions, codes, self.processor, self.start, normalize=False)
