"""Fine-tuning DALL·E mini: encode a captioned image set with the VQGAN, then train the text model.

Example: ``dalle_flax.training.encode_dataset("photos/", vqgan="dalle-mini/vqgan_imagenet_f16_16384", out="encoded/")``.

Needs the ``[train]`` extra (optax, orbax-checkpoint, grain, pyarrow). Layout, one concept per
file: ``sources`` (image + caption readers), ``encode`` (VQGAN encoding to parquet shards),
``data`` (grain batches of the encoded shards), ``optim`` (optax optimizers and schedules),
``step`` (loss and the pure train / eval steps), ``checkpoint`` (orbax), ``arguments``
(``TrainingArguments``) and ``trainer`` (:func:`train`, the loop); ``vqgan_step`` and
``vqgan_trainer`` (:func:`train_vqgan`) train a VQGAN with the same checkpoints and resume.
"""

from .arguments import TrainingArguments
from .checkpoint import Checkpoints
from .data import load_encoded_rows, make_dataset, prepare_batch
from .lora import LORA_TARGETS, LoraSettings, merge_lora
from .encode import INFO_NAME, SKIP_REASONS, EncodeSummary, encode_dataset, push_encoded_dataset
from .optim import OptimizerSettings, build_optimizer, learning_rate_schedule
from .sources import SOURCE_TYPES, open_source
from .step import (TrainState, abstract_train_state, init_train_state, loss_and_accuracy, make_eval_step,
                   make_train_step, shard_batch)
from .trainer import TrainResult, train
from .vqgan_step import VQGANLossSettings, VQGANTrainState, vqgan_losses
from .vqgan_trainer import VQGANTrainingArguments, VQGANTrainResult, train_vqgan

__all__ = [
    "INFO_NAME", "LORA_TARGETS", "SKIP_REASONS", "LoraSettings", "merge_lora", "SOURCE_TYPES", "Checkpoints", "EncodeSummary", "OptimizerSettings",
    "TrainResult", "TrainState", "TrainingArguments", "abstract_train_state", "build_optimizer",
    "encode_dataset", "init_train_state", "learning_rate_schedule", "load_encoded_rows", "loss_and_accuracy",
    "make_dataset", "make_eval_step", "make_train_step", "open_source", "prepare_batch", "push_encoded_dataset",
    "shard_batch", "train", "VQGANLossSettings", "VQGANTrainState", "VQGANTrainingArguments", "VQGANTrainResult",
    "train_vqgan", "vqgan_losses",
]
