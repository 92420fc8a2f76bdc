"""Optimizers and learning-rate schedules for fine-tuning DalleBart (optax), built from settings.

Example: ``optimizer = build_optimizer(OptimizerSettings(learning_rate=1e-4, warmup_steps=500))``.

What :func:`build_optimizer` returns, from the inside out (big_vision's ``optax.py`` layout):

1. ``clip_by_global_norm(max_grad_norm)`` then AdamW or Adafactor on a learning-rate schedule
   (linear warmup, then constant / linear / cosine / exponential decay), weight decay on the
   ``kernel`` leaves only (not embeddings, norms or biases);
2. ``optax.MultiSteps`` when ``gradient_accumulation_steps > 1``: the mean gradient of k
   micro-batches is applied once, which equals one step on a k-times larger batch;
3. ``optax.multi_transform`` when only part of the model trains: frozen leaves get
   ``set_to_zero`` updates and hold no optimizer state (no moments, no accumulators).

The schedule counts optimizer *updates*: with accumulation, update ``u`` happens at micro-step
``(u + 1) * k - 1``, so the loop logs ``learning_rate_schedule(settings)(step // k)``.

Departures from the original (reference §7.3): no Shampoo; Adam has global-norm clipping and
its decay is masked to kernels (the original decayed every leaf); Adafactor keeps its own
update clipping (``clipping_threshold=1.0``, the paper's value) behind the global-norm clip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from ..modeling_flax_utils import flatten_params, unflatten_params

__all__ = ["OPTIMIZERS", "SCHEDULES", "TRAINABLE", "OptimizerSettings", "build_optimizer",
           "learning_rate_schedule", "trainable_mask", "weight_decay_mask"]

OPTIMIZERS = ("adamw", "adafactor")
_DECAYED = ("kernel", "lora_a", "lora_b")
SCHEDULES = ("constant", "linear", "cosine", "exponential")

# The original's --embeddings_only set (reference §7.1): the image side of the decoder.
_EMBEDDINGS = ("lm_head/", "model/decoder/embed_positions/", "model/decoder/embed_tokens/",
               "model/decoder/final_ln/", "model/decoder/layernorm_embedding/")

# Which parameters train, by "/"-joined path. LoRA (training.lora) is not a set here: with it only
# the adapters train, the optimizer sees the adapter tree alone and ``trainable`` stays "all".
TRAINABLE: dict[str, Callable[[str], bool]] = {
    "all": lambda path: True,
    "decoder": lambda path: not path.startswith("model/encoder/"),  # decoder layers + lm_head
    "embeddings": lambda path: path.startswith(_EMBEDDINGS),
}


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """What :func:`build_optimizer` builds (hashable; a training config holds one).

  Attributes:
    optimizer: "adamw" or "adafactor".
    learning_rate: peak learning rate, reached at the end of warmup.
    warmup_steps: updates of linear warmup from 0 (0: start at ``learning_rate``).
    schedule: after warmup, "constant", "linear" or "cosine" (to ``end_learning_rate`` over
      ``decay_steps`` updates, then held) or "exponential" (``learning_rate *
      decay_rate ** (u / transition_steps)``, ``u`` counted from the end of warmup).
    decay_steps: updates of linear / cosine decay after warmup (usually total - warmup).
    end_learning_rate: where linear / cosine decay ends.
    decay_rate, transition_steps, staircase: the exponential decay.
    beta1, beta2, eps: AdamW moments (Adafactor uses its own defaults).
    weight_decay: decoupled weight decay on kernels, ``p -= learning_rate * weight_decay * p``
      each update for both optimizers (AdamW ``weight_decay``; Adafactor ``weight_decay_rate``
      times the schedule); 0 disables it.
    max_grad_norm: global-norm clipping threshold; None disables it.
    gradient_accumulation_steps: micro-batches per update (``optax.MultiSteps``).
    trainable: a key of :data:`TRAINABLE`: "all", "decoder" (everything but the encoder) or
      "embeddings" (the original's ``--embeddings_only`` set).
  """

  optimizer: str = "adamw"
  learning_rate: float = 1e-4
  warmup_steps: int = 0
  schedule: str = "constant"
  decay_steps: int | None = None
  end_learning_rate: float = 0.0
  decay_rate: float = 0.5
  transition_steps: int = 1000
  staircase: bool = False
  beta1: float = 0.9
  beta2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0
  gradient_accumulation_steps: int = 1
  trainable: str = "all"

  def __post_init__(self) -> None:
    choices = (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("trainable", tuple(TRAINABLE)))
    for name, allowed in choices:
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}.")
    if self.learning_rate < 0 or self.end_learning_rate < 0 or self.weight_decay < 0:
      raise ValueError("learning_rate, end_learning_rate and weight_decay must be >= 0, got "
                       f"{self.learning_rate}, {self.end_learning_rate}, {self.weight_decay}.")
    if self.warmup_steps < 0:
      raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}.")
    if self.schedule in ("linear", "cosine") and (self.decay_steps is None or self.decay_steps < 1):
      raise ValueError(f"schedule={self.schedule!r} needs decay_steps >= 1 (the updates after warmup, "
                       f"usually num_train_steps - warmup_steps), got {self.decay_steps}.")
    if self.schedule == "exponential" and (self.transition_steps < 1 or not 0 < self.decay_rate):
      raise ValueError(f"schedule='exponential' needs transition_steps >= 1 and decay_rate > 0, got "
                       f"{self.transition_steps} and {self.decay_rate}.")
    if self.max_grad_norm is not None and self.max_grad_norm <= 0:
      raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm}.")
    if self.gradient_accumulation_steps < 1:
      raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}.")


def learning_rate_schedule(settings: OptimizerSettings) -> optax.Schedule:
  """The learning rate as a function of the update count (see the module docstring)."""
  lr = settings.learning_rate
  if settings.schedule == "constant":
    decay = optax.constant_schedule(lr)
  elif settings.schedule == "linear":
    decay = optax.linear_schedule(lr, settings.end_learning_rate, settings.decay_steps)
  elif settings.schedule == "cosine":
    alpha = settings.end_learning_rate / lr if lr else 0.0
    decay = optax.cosine_decay_schedule(lr, settings.decay_steps, alpha=alpha)
  else:
    decay = optax.exponential_decay(lr, settings.transition_steps, settings.decay_rate,
                                    staircase=settings.staircase)
  if not settings.warmup_steps:
    return decay
  warmup = optax.linear_schedule(0.0, lr, settings.warmup_steps)
  return optax.join_schedules([warmup, decay], [settings.warmup_steps])


def weight_decay_mask(params: Any) -> Any:
  """True on ``kernel`` leaves (Dense layers, lm_head) and on LoRA's ``lora_a`` / ``lora_b`` (the
  factors of a kernel's update: decay pulls the adapted kernel back to the base), False elsewhere;
  same structure."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _last_key(path) in _DECAYED, params)


def trainable_mask(params: Mapping[str, Any], trainable: str) -> dict[str, Any]:
  """True where the parameter trains under ``trainable`` (a key of :data:`TRAINABLE`).

  Raises:
    ValueError: unknown ``trainable``, or a set that selects no parameter of this tree.
  """
  if trainable not in TRAINABLE:
    raise ValueError(f"trainable must be one of {list(TRAINABLE)}, got {trainable!r}.")
  flat = {path: TRAINABLE[trainable](path) for path in flatten_params(params)}
  if not any(flat.values()):
    raise ValueError(f"trainable={trainable!r} selects none of the {len(flat)} parameters of this model.")
  return unflatten_params(flat)


def build_optimizer(settings: OptimizerSettings) -> optax.GradientTransformation:
  """The optax transformation described in the module docstring.

  Its ``init`` and ``update`` take the full parameter tree (``update(grads, state, params)``);
  run ``init`` under ``jax.jit`` with shardings (``training.step.init_train_state``).
  """
  schedule = learning_rate_schedule(settings)
  wd = settings.weight_decay
  if settings.optimizer == "adamw":
    core = optax.adamw(schedule, b1=settings.beta1, b2=settings.beta2, eps=settings.eps, weight_decay=wd,
                       mask=weight_decay_mask)
  else:
    # optax's Adafactor decays by weight_decay_rate unscaled; scaled by the schedule it means
    # what AdamW's weight_decay means (p -= lr * wd * p), so one setting works for both
    rate = (lambda count: wd * schedule(count)) if wd else None
    core = optax.adafactor(schedule, weight_decay_rate=rate, weight_decay_mask=weight_decay_mask)
  clip = [] if settings.max_grad_norm is None else [optax.clip_by_global_norm(settings.max_grad_norm)]
  tx = optax.chain(*clip, core)
  if settings.gradient_accumulation_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=settings.gradient_accumulation_steps).gradient_transformation()
  if settings.trainable == "all":
    return tx
  trainable = settings.trainable

  def labels(params: Any) -> Any:
    return jax.tree.map(lambda t: "train" if t else "frozen", trainable_mask(params, trainable))

  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _last_key(path: tuple[Any, ...]) -> str:
  key = path[-1] if path else None
  return str(getattr(key, "key", getattr(key, "name", key)))
