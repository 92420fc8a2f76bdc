"""Reporting a run's metrics and sample grids to TensorBoard and / or Weights & Biases.

Example::

    reporters = make_reporters(("tensorboard",), "runs/cats", args.to_dict(), start_step=0)
    reporters.log_metrics(tagged("train", {"loss": 2.3}), step=10)  # tag "train/loss"
    reporters.close()

``report_to`` takes the names transformers' ``TrainingArguments.report_to`` uses: "tensorboard"
(event files in ``output_dir/runs/``, written with tensorboardX), "wandb", "all" (every one whose
package is installed) or "none". Each package is imported only when asked for, and only process 0
reports. A resumed run continues where its checkpoint stopped: TensorBoard is told to drop the
events past that step (``purge_step``), and W&B resumes the run whose id is kept in
``output_dir/wandb_run_id``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import logging
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import jax
import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

__all__ = ["REPORT_TO_CHOICES", "Reporter", "Reporters", "TensorBoardReporter", "WandbReporter",
           "make_reporters", "normalize_report_to", "resolve_report_to", "tagged"]

REPORT_TO_CHOICES = ("none", "all", "tensorboard", "wandb")
# reporter name -> (module it imports, the pip package that provides it)
_PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX"), "wandb": ("wandb", "wandb")}
TENSORBOARD_DIR, WANDB_ID_FILE = "runs", "wandb_run_id"


class Reporter(Protocol):
  """Where a run's metrics and images go besides ``metrics.jsonl`` and ``samples/``."""

  def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
    """Records scalars (tag -> value) at ``step``."""

  def log_image(self, tag: str, image: Image.Image, step: int, caption: str | None = None) -> None:
    """Records one image at ``step``."""

  def close(self) -> None:
    """Flushes and ends the run."""


def normalize_report_to(value: str | Sequence[str] | None) -> tuple[str, ...]:
  """``"tensorboard,wandb"`` / ``["wandb"]`` / ``"none"`` -> the checked names (``()`` for none).

  Args:
    value: a name, comma-separated names, or a list of them (from a flag, a file or Python).

  Returns:
    ``()``, ``("all",)`` or a tuple of reporter names without repeats.
  """
  if value is None:
    return ()
  items = [value] if isinstance(value, str) else list(value)
  names: list[str] = []
  for item in items:
    if not isinstance(item, str):
      raise TypeError(f"report_to takes names (str), got {item!r} of type {type(item).__name__}.")
    for name in (part.strip().lower() for part in item.split(",")):
      if not name or name in names:
        continue
      if name not in REPORT_TO_CHOICES:
        close = difflib.get_close_matches(name, REPORT_TO_CHOICES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"report_to got {name!r}{hint}; valid values: {', '.join(map(repr, REPORT_TO_CHOICES))}, "
                         "comma-separated or as a list (e.g. --report-to tensorboard,wandb).")
      names.append(name)
  if "none" in names:
    if len(names) > 1:
      raise ValueError(f"report_to 'none' does not combine with {[n for n in names if n != 'none']}; "
                       "drop 'none' or the others.")
    return ()
  return ("all",) if "all" in names else tuple(names)


def resolve_report_to(report_to: str | Sequence[str] | None) -> tuple[str, ...]:
  """The reporters ``report_to`` asks for, checking their packages are installed.

  "all" picks those whose package is installed; a name asked for explicitly whose package is
  missing raises ImportError with the pip command.
  """
  names = normalize_report_to(report_to)
  if names == ("all",):
    found = tuple(name for name, (module, _) in _PACKAGES.items() if _installed(module))
    logger.info("report_to='all': reporting to %s", ", ".join(found) or "nothing (no reporter package installed)")
    return found
  for name in names:
    _import(name)
  return names


def _installed(module: str) -> bool:
  if module in sys.modules:  # already imported (or blocked with None)
    return sys.modules[module] is not None
  return importlib.util.find_spec(module) is not None


def _import(name: str) -> ModuleType:
  module, package = _PACKAGES[name]
  try:
    return importlib.import_module(module)
  except ImportError as error:
    raise ImportError(f"report_to={name!r} needs the {package} package, which is not importable ({error}); "
                      f"install it with `pip install {package}`, or drop {name!r} from --report-to.") from error


def tagged(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
  """``("eval", {"eval_loss": x})`` -> ``{"eval/loss": x}``; ``("train", {"loss": x})`` -> ``{"train/loss": x}``."""
  return {f"{prefix}/{key.removeprefix(prefix + '_')}": float(value) for key, value in metrics.items()}


class TensorBoardReporter:
  """Scalars and images as TensorBoard event files in ``log_dir`` (tensorboardX).

  Args:
    log_dir: the event files' folder (one TensorBoard run; resumed runs add files to it).
    purge_step: TensorBoard drops the events at and past this step that earlier files hold (the
      steps a resumed run logs again).
  """

  def __init__(self, log_dir: str | os.PathLike, *, purge_step: int | None = None):
    tensorboardx = _import("tensorboard")
    # the files are named by the second they were opened in; the suffix keeps a quick restart's file
    # from overwriting the previous one
    self._writer = tensorboardx.SummaryWriter(logdir=str(log_dir), purge_step=purge_step,
                                              filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:6]}")

  def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
    for tag, value in metrics.items():
      self._writer.add_scalar(tag, float(value), step)
    self._writer.flush()

  def log_image(self, tag: str, image: Image.Image, step: int, caption: str | None = None) -> None:
    self._writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")  # (h, w, 3) uint8
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class WandbReporter:
  """A Weights & Biases run (project: ``$WANDB_PROJECT`` or "dalle-flax"), files under ``output_dir``.

  Args:
    output_dir: the training run's folder; W&B writes ``output_dir/wandb/`` and the run id is kept
      in ``output_dir/wandb_run_id``.
    run_config: the run's settings, shown as the W&B run config.
    resume: continue the W&B run whose id ``output_dir`` holds (a fresh start makes a new id).
  """

  def __init__(self, output_dir: str | os.PathLike, run_config: Mapping[str, Any], *, resume: bool):
    self._wandb = _import("wandb")
    output_dir = Path(output_dir)
    id_path = output_dir / WANDB_ID_FILE
    run_id = id_path.read_text(encoding="utf-8").strip() if resume and id_path.is_file() else ""
    if not run_id:
      run_id = uuid.uuid4().hex[:12]
      id_path.write_text(run_id + "\n", encoding="utf-8")
    self._run = self._wandb.init(project=os.environ.get("WANDB_PROJECT", "dalle-flax"), dir=str(output_dir),
                                 config=dict(run_config), id=run_id, resume="allow")

  def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
    self._run.log(dict(metrics), step=step)

  def log_image(self, tag: str, image: Image.Image, step: int, caption: str | None = None) -> None:
    self._run.log({tag: self._wandb.Image(image, caption=caption)}, step=step)

  def close(self) -> None:
    self._run.finish()


class Reporters:
  """Several reporters used as one (none: every call does nothing)."""

  def __init__(self, reporters: Sequence[Reporter] = ()):
    self.reporters = list(reporters)

  def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
    for reporter in self.reporters:
      reporter.log_metrics(metrics, step)

  def log_image(self, tag: str, image: Image.Image, step: int, caption: str | None = None) -> None:
    for reporter in self.reporters:
      reporter.log_image(tag, image, step, caption)

  def close(self) -> None:
    reporters, self.reporters = self.reporters, []
    with contextlib.ExitStack() as stack:  # closes every one even if one raises
      for reporter in reporters:
        stack.callback(reporter.close)


def make_reporters(report_to: str | Sequence[str] | None, output_dir: str | os.PathLike, run_config: Mapping[str, Any],
                   *, start_step: int = 0) -> Reporters:
  """The reporters ``report_to`` names, on process 0 (other processes get none).

  Args:
    report_to: see :func:`normalize_report_to`.
    output_dir: the training run's folder (TensorBoard writes ``output_dir/runs/``).
    run_config: the run's settings (JSON-ready), recorded by W&B.
    start_step: the step the run starts from (> 0: resumed from that checkpoint).

  Returns:
    A :class:`Reporters`; call its ``close()`` when the run ends.
  """
  if jax.process_index() != 0:
    return Reporters()
  names = resolve_report_to(report_to)
  made: list[Reporter] = []
  try:
    if "tensorboard" in names:
      made.append(TensorBoardReporter(Path(output_dir) / TENSORBOARD_DIR, purge_step=start_step))
    if "wandb" in names:
      made.append(WandbReporter(output_dir, run_config, resume=start_step > 0))
  except BaseException:
    Reporters(made).close()
    raise
  return Reporters(made)
