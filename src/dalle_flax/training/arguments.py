"""``TrainingArguments``: every setting of a fine-tuning run, as flags or a JSON / YAML file.

Example::

    args = TrainingArguments(model="dalle-mini/dalle-mini", train_data="encoded/",
                             output_dir="runs/cats", max_steps=2000, learning_rate=1e-4)
    dalle_flax.training.train(args)

On the command line each field is a flag (``--learning-rate 1e-4`` or ``--learning_rate``) and
``dalle-flax train run.yaml --max-steps 10`` reads the file first, then applies the flags.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from .lora import LoraSettings
from .optim import OptimizerSettings
from .reporting import normalize_report_to

__all__ = ["TrainingArguments", "load_arguments_file", "parse_mesh"]

_OPTIMIZER_DEFAULTS = OptimizerSettings()  # the optimizer fields take their defaults from here


@dataclasses.dataclass
class TrainingArguments:
  """Settings of :func:`dalle_flax.training.train` (defaults: a small fine-tune on one host).

  Attributes:
    model: pretrained text model or pipeline (repo id or folder, any format we load).
    train_data: encoded parquet shards (a folder, glob or file; ``dalle-flax encode`` output).
    output_dir: checkpoints, ``metrics.jsonl`` and the exported pipeline folder go here;
      running again on the same folder resumes.
    vqgan: the VQGAN for the exported pipeline and sample images (default: the model's own).
    eval_data: held-out encoded shards (optional).
    from_scratch: start from random weights with the model's config instead of its weights.
    train_batch_size: rows per train step over all devices and hosts (divisible by dp).
    max_steps: train steps (micro-batches); with accumulation, updates = max_steps / k.
    seed: base of the data order, blank captions and dropout.
    blank_caption_prob: captions replaced by "" (trains the unconditional branch guidance uses).
    optimizer ... trainable: see :class:`~dalle_flax.training.optim.OptimizerSettings`.
    lora_rank: > 0 trains LoRA adapters of this rank on the attention and GLU/FFN kernels
      instead of the weights (:mod:`~dalle_flax.training.lora`); the base stays frozen,
      ``trainable`` stays "all", and the export holds the merged plain weights. 0: off.
    lora_alpha: the adapters' update is scaled by ``lora_alpha / lora_rank`` (None: = rank).
    dtype: computation dtype, "float32" or "bfloat16" (parameters stay float32).
    gradient_checkpointing: rematerialise each layer in the backward pass (less memory).
    mesh: "dp=4,mp=2"; default: every device on dp.
    logging_steps, eval_steps, save_steps, save_total_limit, export_steps: intervals in steps
      (0 disables eval / periodic export; the run always exports at the end).
    eval_prompts: prompts whose images (fixed seeds) are written at every eval as PNG.
    report_to: also log the metrics and sample grids to "tensorboard" (``output_dir/runs/``),
      "wandb", "all" (those installed) or "none"; a list or comma-separated names
      (:mod:`~dalle_flax.training.reporting`).
    push_to_hub: a repo id to push the exported pipeline to at the end.
    hub_token, hub_private: for the push.
    coordinator_address, num_processes, process_id: ``jax.distributed.initialize`` arguments for
      several hosts (None: single host unless the environment configures JAX's cluster).
  """

  model: str = ""
  train_data: str = ""
  output_dir: str = ""
  vqgan: str | None = None
  eval_data: str | None = None
  from_scratch: bool = False
  train_batch_size: int = 8
  max_steps: int = 1000
  seed: int = 0
  blank_caption_prob: float = 0.1
  optimizer: str = _OPTIMIZER_DEFAULTS.optimizer
  learning_rate: float = _OPTIMIZER_DEFAULTS.learning_rate
  warmup_steps: int = _OPTIMIZER_DEFAULTS.warmup_steps
  schedule: str = _OPTIMIZER_DEFAULTS.schedule
  decay_steps: int | None = _OPTIMIZER_DEFAULTS.decay_steps
  end_learning_rate: float = _OPTIMIZER_DEFAULTS.end_learning_rate
  weight_decay: float = _OPTIMIZER_DEFAULTS.weight_decay
  max_grad_norm: float | None = _OPTIMIZER_DEFAULTS.max_grad_norm
  gradient_accumulation_steps: int = _OPTIMIZER_DEFAULTS.gradient_accumulation_steps
  trainable: str = _OPTIMIZER_DEFAULTS.trainable
  lora_rank: int = 0
  lora_alpha: float | None = None
  dtype: str = "float32"
  gradient_checkpointing: bool = False
  mesh: str | None = None
  logging_steps: int = 10
  eval_steps: int = 0
  save_steps: int = 500
  save_total_limit: int = 3
  export_steps: int = 0
  eval_prompts: tuple[str, ...] = ()
  report_to: tuple[str, ...] = ()
  push_to_hub: str | None = None
  hub_token: str | None = None
  hub_private: bool | None = None
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self) -> None:
    for name in ("model", "train_data", "output_dir"):
      if not getattr(self, name):
        raise ValueError(f"TrainingArguments.{name} is required (CLI: --{name.replace('_', '-')}).")
    positive = ("train_batch_size", "max_steps", "logging_steps", "save_steps", "save_total_limit")
    for name in positive:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
    for name in ("eval_steps", "export_steps"):
      if getattr(self, name) < 0:
        raise ValueError(f"{name} must be >= 0 (0 disables it), got {getattr(self, name)!r}.")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}.")
    if not 0.0 <= self.blank_caption_prob <= 1.0:
      raise ValueError(f"blank_caption_prob must be in [0, 1], got {self.blank_caption_prob}.")
    if self.max_steps % self.gradient_accumulation_steps:
      raise ValueError(f"max_steps ({self.max_steps}) must be a multiple of gradient_accumulation_steps "
                       f"({self.gradient_accumulation_steps}) so the run ends on a whole update.")
    self.eval_prompts = tuple(self.eval_prompts)
    self.report_to = normalize_report_to(self.report_to)
    parse_mesh(self.mesh, None)  # syntax only; the device count is checked when training starts
    self.optimizer_settings()  # validates the optimizer fields
    self._check_lora()

  def optimizer_settings(self) -> OptimizerSettings:
    """The :class:`OptimizerSettings` these arguments describe."""
    fields = {f.name for f in dataclasses.fields(OptimizerSettings)}
    return OptimizerSettings(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})

  def lora_settings(self) -> LoraSettings | None:
    """The :class:`~dalle_flax.training.lora.LoraSettings` of ``lora_rank`` / ``lora_alpha``, or None."""
    return LoraSettings(self.lora_rank, self.lora_alpha) if self.lora_rank else None

  def _check_lora(self) -> None:
    rank, alpha = self.lora_rank, self.lora_alpha
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
      raise ValueError(f"lora_rank must be an int >= 0 (0: no LoRA), got {rank!r}.")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha <= 0):
      raise ValueError(f"lora_alpha must be a number > 0 or None (= lora_rank), got {alpha!r}.")
    if not rank:
      if alpha is not None:
        raise ValueError(f"lora_alpha={alpha} has no effect with lora_rank=0; set lora_rank (e.g. 8) to "
                         "train LoRA adapters, or leave lora_alpha unset.")
      return
    if self.trainable != "all":
      raise ValueError(f"trainable={self.trainable!r} does not combine with lora_rank={rank}: with LoRA only "
                       "the adapters train (on every attention and GLU/FFN kernel); leave trainable='all', "
                       "or set lora_rank=0 to train that part of the weights.")
    if self.from_scratch:
      raise ValueError(f"lora_rank={rank} adapts pretrained weights, but from_scratch starts from random ones; "
                       "drop from_scratch or set lora_rank=0.")

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready settings (the token left out), as recorded in the run's folder and model card."""
    values = dataclasses.asdict(self)
    values["hub_token"] = None
    values["eval_prompts"] = list(self.eval_prompts)
    values["report_to"] = list(self.report_to)
    return values


def parse_mesh(text: str | None, num_devices: int | None) -> tuple[int, int]:
  """``"dp=4,mp=2"`` -> (4, 2); None -> (all devices, 1). Checks the product when ``num_devices``."""
  if text is None or not str(text).strip():
    if num_devices is None:
      return (1, 1)
    return (num_devices, 1)
  sizes: dict[str, int] = {}
  for part in str(text).split(","):
    name, sep, value = part.partition("=")
    name = name.strip()
    if not sep or name not in ("dp", "mp") or name in sizes or not value.strip().isdigit() or int(value) < 1:
      raise ValueError(f"mesh must look like 'dp=4,mp=2' (positive sizes, each axis once), got {text!r}.")
    sizes[name] = int(value)
  if num_devices is None:
    return sizes.get("dp", 1), sizes.get("mp", 1)
  mp = sizes.get("mp", 1)
  dp = sizes.get("dp", num_devices // mp if num_devices % mp == 0 else 0)
  if dp * mp != num_devices:
    raise ValueError(f"mesh {text!r} needs dp x mp = {dp} x {mp} = {dp * mp} devices, but jax sees "
                     f"{num_devices}; pick sizes whose product is {num_devices}.")
  return dp, mp


def load_arguments_file(path: str | os.PathLike, cls: type = None) -> dict[str, Any]:
  """A JSON or YAML file of :class:`TrainingArguments` fields (or those of dataclass ``cls``) -> a
  dict (unknown keys raise)."""
  cls = cls or TrainingArguments
  path = Path(path)
  text = path.read_text(encoding="utf-8")
  if path.suffix.lower() in (".yaml", ".yml"):
    import yaml

    values = yaml.safe_load(text) or {}
  else:
    values = json.loads(text)
  if not isinstance(values, dict):
    raise ValueError(f"{path} must hold a mapping of {cls.__name__} fields, got {type(values).__name__}.")
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"{path} has unknown setting(s) {unknown}; known: {sorted(known)}.")
  return values
