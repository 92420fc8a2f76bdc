"""Fine-tuning DALL·E mini: encode a captioned image set with the VQGAN, then train the text model.

Example: ``dalle_flax.training.encode_dataset("photos/", vqgan="dalle-mini/vqgan_imagenet_f16_16384", out="encoded/")``.

Needs the ``[train]`` extra (optax, orbax-checkpoint, grain, pyarrow). Layout, one concept per
file: ``sources`` (image + caption readers), ``encode`` (VQGAN encoding to parquet shards),
``data`` (grain batches of the encoded shards), ``optim`` (optax optimizers and schedules),
``step`` (loss and the pure train / eval steps), ``checkpoint`` (orbax), ``arguments``
(``TrainingArguments``) and ``trainer`` (:func:`train`, the loop); ``vqgan_step`` and
``vqgan_trainer`` (:func:`train_vqgan`) train a VQGAN with the same checkpoints and resume.
"""

import importlib
from typing import Any

# name -> submodule; loaded on first use, so `dalle-flax generate` (whose parser lists the training
# flags from the argument dataclasses) works without the [train] extra
_EXPORTS = {
    "TrainingArguments": "arguments", "Checkpoints": "checkpoint", "load_encoded_rows": "data",
    "make_dataset": "data", "prepare_batch": "data", "LORA_TARGETS": "lora", "LoraSettings": "lora",
    "merge_lora": "lora", "INFO_NAME": "encode", "SKIP_REASONS": "encode", "EncodeSummary": "encode",
    "encode_dataset": "encode", "push_encoded_dataset": "encode", "OptimizerSettings": "optim",
    "build_optimizer": "optim", "learning_rate_schedule": "optim", "SOURCE_TYPES": "sources",
    "open_source": "sources", "TrainState": "step", "abstract_train_state": "step", "init_train_state": "step",
    "loss_and_accuracy": "step", "make_eval_step": "step", "make_train_step": "step", "shard_batch": "step",
    "TrainResult": "trainer", "train": "trainer", "VQGANLossSettings": "vqgan_step",
    "VQGANTrainState": "vqgan_step", "vqgan_losses": "vqgan_step", "VQGANTrainingArguments": "vqgan_trainer",
    "VQGANTrainResult": "vqgan_trainer", "train_vqgan": "vqgan_trainer",
}


def __getattr__(name: str) -> Any:
  module = _EXPORTS.get(name)
  if module is None:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  value = getattr(importlib.import_module(f".{module}", __name__), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted([*globals(), *_EXPORTS])


__all__ = [
    "INFO_NAME", "LORA_TARGETS", "SKIP_REASONS", "LoraSettings", "merge_lora", "SOURCE_TYPES", "Checkpoints", "EncodeSummary", "OptimizerSettings",
    "TrainResult", "TrainState", "TrainingArguments", "abstract_train_state", "build_optimizer",
    "encode_dataset", "init_train_state", "learning_rate_schedule", "load_encoded_rows", "loss_and_accuracy",
    "make_dataset", "make_eval_step", "make_train_step", "open_source", "prepare_batch", "push_encoded_dataset",
    "shard_batch", "train", "VQGANLossSettings", "VQGANTrainState", "VQGANTrainingArguments", "VQGANTrainResult",
    "train_vqgan", "vqgan_losses",
]
