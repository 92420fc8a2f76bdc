"""The loss and the pure, jitted train / eval steps of DalleBart, sharded over a ("dp", "mp") mesh.

Example::

    optimizer = build_optimizer(settings)
    state = init_train_state(model, model.params, optimizer, mesh, seed=0)
    train_step = make_train_step(model, optimizer, mesh, trainable=settings.trainable)
    state, metrics = train_step(state, shard_batch(batch, mesh))   # metrics["loss"], ...

With LoRA (:mod:`dalle_flax.training.lora`), pass the same ``lora=LoraSettings(rank=8)`` to
``init_train_state``, ``abstract_train_state`` and ``make_train_step``: the state then holds
adapters, the optimizer state is built for the adapters alone, the gradient is taken with
respect to the adapters only (the base parameters are constants of the loss: no gradient, no
optimizer state, never changed), and :func:`merged_params` gives the weights to evaluate
and export. Adapters and their optimizer state are replicated over the mesh (a few MB); the
merged kernel ``W + scale * A @ B`` follows ``W``'s sharding.

Conventions (big_vision ``train.py``, maxtext): the state is created inside ``jax.jit(...,
out_shardings=...)`` so the optimizer state is never built on one device; parameters and their
optimizer moments follow the partition rules of :mod:`dalle_flax.sharding`; batches are split
over "dp"; the train step donates the state; the dropout key of a step is ``fold_in(key,
step)``, so a resumed run draws the same masks. Parameters stay float32; the computation runs
in the model's dtype (``FlaxDalleMiniForConditionalGeneration(config, dtype=jnp.bfloat16)``),
the loss in float32, and the eval step always in float32 (as the original, reference §7.2).
Remat follows ``config.gradient_checkpointing`` (per layer).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..modeling_flax_dalle_mini import DalleBartModule, model_spec
from ..modeling_flax_utils import flatten_params
from ..sharding import batch_sharding, partition_specs
from .lora import LoraSettings, apply_lora, init_lora, merge_lora
from .optim import trainable_mask

__all__ = ["BATCH_KEYS", "TrainState", "abstract_train_state", "init_train_state", "loss_and_accuracy",
           "make_eval_step", "make_train_step", "merged_params", "shard_batch", "train_state_shardings"]

Array = jax.Array
BATCH_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "labels")


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes (a pytree; orbax saves it as it is).

  Attributes:
    step: () int32, train steps (micro-batches) done.
    params: the model's parameter tree, float32 (with LoRA: the frozen base).
    opt_state: the optimizer's state; frozen parameters have none (with LoRA: the adapters').
    key: (2,) uint32 raw key data (``jax.random.key_data``) of the run's base key; step ``s``
      uses dropout key ``fold_in(wrap_key_data(key), s)``. Raw data so any checkpointer saves it.
    adapters: the LoRA adapter tree (:func:`~dalle_flax.training.lora.init_lora`); an empty
      dict when LoRA is off.
  """

  step: Array
  params: Any
  opt_state: Any
  key: Array
  adapters: Any = flax.struct.field(default_factory=dict)


def loss_and_accuracy(logits: Array, labels: Array) -> tuple[Array, Array]:
  """The original's loss (reference §7.2): softmax cross-entropy over every image position.

  Args:
    logits: (b, n, image_vocab_size + 1), any float dtype (computed in float32).
    labels: (b, n) int image codes.

  Returns:
    mean cross-entropy over b x n (no masking, no smoothing) and token accuracy (argmax).
  """
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()  # == one-hot CE
  accuracy = (jnp.argmax(logits, axis=-1) == labels).mean()
  return loss, accuracy


def train_state_shardings(params: Any, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                          lora: LoraSettings | None = None) -> TrainState:
  """NamedShardings of the :class:`TrainState` for ``params`` (a tree of arrays or shapes).

  Parameters follow :data:`dalle_flax.sharding.PARTITION_RULES`; optimizer leaves shaped like
  their parameter (Adam moments, accumulated gradients) take its sharding; the rest (counts,
  Adafactor's factored statistics) is replicated, as in the original. With ``lora``, the
  adapters and the whole optimizer state (the adapters') are replicated.
  """
  params = _fp32_shapes(params)
  replicated = NamedSharding(mesh, P())
  param_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), partition_specs(params, mesh.shape["mp"]))
  flat_params, flat_shardings = flatten_params(params), flatten_params(param_shardings)

  def opt_sharding(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    for start in range(len(keys)):  # the parameter path is the trailing run of dict keys
      name = "/".join(keys[start:])
      if name in flat_params:
        return flat_shardings[name] if flat_params[name].shape == leaf.shape else replicated
    return replicated

  if lora is None:
    opt_shardings = jax.tree_util.tree_map_with_path(opt_sharding, jax.eval_shape(optimizer.init, params))
    adapter_shardings = {}
  else:
    adapters = jax.eval_shape(lambda p: init_lora(p, lora.rank, jax.random.key(0), targets=lora.targets), params)
    opt_shardings = jax.tree.map(lambda _: replicated, jax.eval_shape(optimizer.init, adapters))
    adapter_shardings = jax.tree.map(lambda _: replicated, adapters)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, key=replicated,
                    adapters=adapter_shardings)


def abstract_train_state(params: Any, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                         lora: LoraSettings | None = None) -> TrainState:
  """The state as ``jax.ShapeDtypeStruct`` leaves with their shardings (what orbax restores into)."""
  shardings = train_state_shardings(params, optimizer, mesh, lora=lora)
  shapes = jax.eval_shape(lambda p: _new_state(p, optimizer, jnp.zeros((2,), jnp.uint32), lora), _fp32_shapes(params))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_train_state(model: Any, params: Any, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                     seed: int = 0, lora: LoraSettings | None = None) -> TrainState:
  """Places ``params`` on ``mesh`` and builds the optimizer state there, inside one ``jax.jit``.

  Args:
    model: a :class:`~dalle_flax.FlaxDalleMiniForConditionalGeneration`.
    params: its parameters (numpy or jax arrays, cast to float32), or None to initialise
      randomly inside the jit (nothing is ever built whole on one device). On several hosts
      pass identical numpy arrays on every process, or arrays placed with ``shard_params``.
    optimizer: from :func:`~dalle_flax.training.optim.build_optimizer`.
    mesh: a ("dp", "mp") mesh (:func:`dalle_flax.sharding.make_mesh`).
    seed: the base key (dropout; with ``lora``, also the adapters' ``A``) of the run.
    lora: LoRA settings: the state gets fresh adapters (``B = 0``) and the optimizer state
      is built for them; None trains ``params`` themselves.

  Returns:
    A :class:`TrainState` at step 0, sharded as :func:`train_state_shardings` says.
  """
  shape_tree = model.params_shape_tree if params is None else params
  shardings = train_state_shardings(shape_tree, optimizer, mesh, lora=lora)
  key = jax.random.key_data(jax.random.key(seed))
  if params is None:
    init = jax.jit(lambda k: _new_state(model.init_weights(jax.random.wrap_key_data(k)), optimizer, k, lora),
                   out_shardings=shardings)
    return init(key)
  placed = jax.device_put(params, shardings.params)  # may share the caller's buffers: not donated
  init = jax.jit(lambda p, k: _new_state(p, optimizer, k, lora), in_shardings=(shardings.params, shardings.key),
                 out_shardings=shardings)
  return init(placed, key)


def make_train_step(model: Any, optimizer: optax.GradientTransformation, mesh: Mesh, *, trainable: str = "all",
                    lora: LoraSettings | None = None
                    ) -> Callable[[TrainState, Mapping[str, Array]], tuple[TrainState, dict]]:
  """The jitted ``train_step(state, batch) -> (state, metrics)``; ``state`` is donated.

  Args:
    model: the model; its module (compute dtype, ``gradient_checkpointing``) runs in train mode.
    optimizer: the one the state was built with.
    mesh: the state's mesh; batch rows are split over "dp".
    trainable: the optimizer's ``settings.trainable``: the other parameters get zero gradients
      (XLA skips their backward pass; ``grad_norm`` counts trained ones only) and are kept as
      they are whatever the optimizer does (no weight decay on them either).
    lora: the state's LoRA settings: only the adapters train (``trainable`` must stay "all").

  Returns:
    A function of a :class:`TrainState` and a batch dict with (B, t) ``input_ids``,
    ``attention_mask`` and (B, n) ``decoder_input_ids``, ``labels`` (global B divisible by
    dp; see ``shard_batch``), returning the next state and float32 scalar metrics ``loss``,
    ``accuracy`` and ``grad_norm`` (before clipping).
  """
  if lora is not None and trainable != "all":
    raise ValueError(f"trainable={trainable!r} does not combine with LoRA: only the adapters train (on "
                     "every targeted kernel); use trainable='all' with lora, or lora=None.")
  module = model.module.clone(deterministic=False)
  shapes = model.params_shape_tree
  mask = trainable_mask(shapes, trainable)
  shardings = train_state_shardings(shapes, optimizer, mesh, lora=lora)

  def train_step(state: TrainState, batch: Mapping[str, Array]) -> tuple[TrainState, dict]:
    _check_batch(batch)
    dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)

    def loss_fn(params: Any) -> tuple[Array, Array]:
      logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                            batch["decoder_input_ids"], rngs={"dropout": dropout_key}).logits  # (b, n, v)
      return loss_and_accuracy(logits, batch["labels"])

    if lora is not None:  # differentiate w.r.t. the adapters only: the base is a constant of the loss
      def adapted_loss(adapters: Any) -> tuple[Array, Array]:
        return loss_fn(apply_lora(state.params, adapters, lora.alpha))

      (loss, accuracy), grads = jax.value_and_grad(adapted_loss, has_aux=True)(state.adapters)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.adapters)
      state = state.replace(adapters=optax.apply_updates(state.adapters, updates), opt_state=opt_state)
    else:
      (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      grads = jax.tree.map(lambda g, train: g if train else jnp.zeros_like(g), grads, mask)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      params = jax.tree.map(lambda new, old, train: new if train else old, params, state.params, mask)
      state = state.replace(params=params, opt_state=opt_state)
    metrics = {"loss": loss, "accuracy": accuracy, "grad_norm": optax.tree.norm(grads)}
    return state.replace(step=state.step + 1), metrics

  return jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)),
                 out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=0)


def make_eval_step(model: Any, mesh: Mesh) -> Callable[[Any, Mapping[str, Array]], dict]:
  """The jitted ``eval_step(params, batch) -> {"loss", "accuracy"}``, float32 compute, no dropout.

  ``params`` is ``state.params`` (sharded like the train state); the batch as for training.
  """
  module = DalleBartModule(model_spec(model.config, jnp.float32, jnp.float32), deterministic=True)
  params_shape = _fp32_shapes(model.params_shape_tree)
  param_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), partition_specs(params_shape, mesh.shape["mp"]))

  def eval_step(params: Any, batch: Mapping[str, Array]) -> dict:
    _check_batch(batch)
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                          batch["decoder_input_ids"]).logits
    loss, accuracy = loss_and_accuracy(logits, batch["labels"])
    return {"loss": loss, "accuracy": accuracy}

  return jax.jit(eval_step, in_shardings=(param_shardings, batch_sharding(mesh)),
                 out_shardings=NamedSharding(mesh, P()))


def merged_params(state: TrainState, lora: LoraSettings | None = None) -> Any:
  """The weights the state's model runs with: ``state.params``, or with ``lora`` the base with
  the adapters merged (:func:`~dalle_flax.training.lora.merge_lora`, sharded like the base), for
  :func:`make_eval_step`, sampling and export.

  Raises:
    ValueError: the state holds adapters but ``lora`` is None (their alpha is unknown).
  """
  if lora is None:
    if flatten_params(state.adapters):
      raise ValueError("the state holds LoRA adapters; pass the LoraSettings it was trained with (lora=...).")
    return state.params
  return merge_lora(state.params, state.adapters, lora.alpha)


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Array]:
  """This process's rows of a batch -> global arrays split over "dp" (any number of hosts).

  Each process passes its own ``batch_size`` rows (the data iterator's); the global batch is
  ``batch_size * jax.process_count()`` rows.
  """
  _check_batch(batch)
  rows, dp = len(batch["labels"]) * jax.process_count(), mesh.shape["dp"]
  if rows % dp:
    raise ValueError(f"the global batch has {rows} rows, not divisible by the mesh's dp={dp}; "
                     "use a per-process batch size that makes the global batch a multiple of dp.")
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k])) for k in BATCH_KEYS}


def _new_state(params: Any, optimizer: optax.GradientTransformation, key: Array,
               lora: LoraSettings | None = None) -> TrainState:
  params = jax.tree.map(lambda p: p.astype(jnp.float32) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
  if lora is None:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), key=key)
  # split, not fold_in: fold_in(key, s) is step s's dropout key
  adapter_key = jax.random.split(jax.random.wrap_key_data(key))[1]
  adapters = init_lora(params, lora.rank, adapter_key, targets=lora.targets)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(adapters), key=key,
                    adapters=adapters)


def _fp32_shapes(params: Any) -> Any:
  def shape(p: Any) -> jax.ShapeDtypeStruct:
    dtype = jnp.float32 if jnp.issubdtype(p.dtype, jnp.floating) else p.dtype
    return jax.ShapeDtypeStruct(p.shape, dtype)
  return jax.tree.map(shape, params)


def _check_batch(batch: Mapping[str, Any]) -> None:
  """Keys and shapes (at trace time in the steps: once per compile), with the fix in the message."""
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"batch lacks {missing}; it needs {list(BATCH_KEYS)} (training.data builds them).")
  shapes = {k: tuple(np.shape(batch[k])) for k in BATCH_KEYS}
  if len({shape[0] for shape in shapes.values()}) != 1 or shapes["labels"] != shapes["decoder_input_ids"]:
    raise ValueError(f"batch arrays disagree: shapes {shapes}.")
