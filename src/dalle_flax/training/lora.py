"""LoRA adapters for DalleBart: low-rank updates of the attention and feed-forward kernels.

Example::

    adapters = init_lora(model.params, rank=8, key=jax.random.key(0))
    logits = model.module.apply({"params": apply_lora(model.params, adapters, alpha=8)}, ...)
    model.params = merge_lora(model.params, adapters, alpha=8)   # plain weights, for export

LoRA (Hu et al. 2021, arXiv:2106.09685) freezes each targeted kernel ``W`` and trains ``W +
(alpha / rank) * A @ B`` with ``A`` of shape (in, rank) and ``B`` of shape (rank, out).
``B`` starts at zero, so step 0 is exactly the base model. Everything here is a pure function
of parameter trees: the linen modules and the checkpoint's parameter names stay as they are.

The adapter tree mirrors the paths of its kernels, with two leaves under each kernel path:
``.../q_proj/kernel/lora_a`` and ``.../q_proj/kernel/lora_b``. Leading axes of a kernel (the
layer axis of a scanned stack, ``(layers, in, out)``) are batch axes: each layer has its own
``A`` (layers, in, rank) and ``B`` (layers, rank, out). Every targeted kernel of DalleBart is an
``nn.Dense`` kernel, (in, out) per layer; kernels of other ranks are refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ..modeling_flax_utils import flatten_params, unflatten_params

__all__ = ["LORA_TARGETS", "LoraSettings", "apply_lora", "init_lora", "lora_targets", "merge_lora"]

# Regexes on the "/"-joined parameter path of the kernels that get adapters: the attention
# projections (self and cross) and the GLU / FFN Dense layers, in encoder and decoder. Not the
# embeddings, norms, biases or lm_head.
LORA_TARGETS: tuple[str, ...] = (
    r"/(q_proj|k_proj|v_proj|out_proj)/kernel$",
    r"/(GLU|FFN)_\d+/Dense_\d+/kernel$",
)
_A, _B = "lora_a", "lora_b"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
  """What the train step needs to know about LoRA (hashable, so it can be static in a jit).

  Attributes:
    rank: the rank of each update (>= 1).
    alpha: the update is scaled by ``alpha / rank``; None means ``alpha = rank`` (scale 1).
    targets: regexes of the kernels that get adapters (:data:`LORA_TARGETS`).
  """

  rank: int
  alpha: float | None = None
  targets: tuple[str, ...] = LORA_TARGETS

  def __post_init__(self) -> None:
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"LoRA rank must be an int >= 1, got {self.rank!r}.")
    if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f"LoRA alpha must be a finite number > 0 or None (alpha = rank), got {self.alpha!r}.")
    object.__setattr__(self, "targets", tuple(self.targets))

  @property
  def scale(self) -> float:
    """``alpha / rank``, the factor of ``A @ B``."""
    return _scale(self.alpha, self.rank)


def lora_targets(params: Mapping[str, Any], targets: tuple[str, ...] = LORA_TARGETS) -> list[str]:
  """The sorted "/"-joined paths of the kernels of ``params`` that ``targets`` select.

  Raises:
    ValueError: no parameter matches (a tree of another model, or wrong regexes).
  """
  paths = sorted(p for p in flatten_params(params) if any(re.search(t, p) for t in targets))
  if not paths:
    raise ValueError(f"no parameter path matches the LoRA targets {list(targets)}; expected DalleBart's "
                     "attention (q_proj/k_proj/v_proj/out_proj) and GLU/FFN Dense kernels.")
  return paths


def init_lora(params: Mapping[str, Any], rank: int, key: jax.Array, *,
              targets: tuple[str, ...] = LORA_TARGETS) -> dict[str, Any]:
  """New adapters for the targeted kernels of ``params``: ``A ~ N(0, 1 / in)``, ``B = 0``.

  The ``1 / sqrt(in)`` scale of ``A`` is the Kaiming-like scale PEFT uses; with ``B = 0``
  the adapted model equals the base model exactly until the first update.

  Args:
    params: the base parameter tree (arrays or ``jax.ShapeDtypeStruct``; only shapes are read).
    rank: the rank of each update (>= 1).
    key: a ``jax.random.key``; each kernel draws from its own split, in path order.
    targets: regexes of the kernels to adapt (:data:`LORA_TARGETS`).

  Returns:
    The adapter tree (float32): for a kernel (*lead, in, out), ``lora_a`` (*lead, in, rank)
    and ``lora_b`` (*lead, rank, out) under the kernel's path.
  """
  LoraSettings(rank)  # validates rank
  flat = flatten_params(params)
  paths = lora_targets(params, targets)
  adapters = {}
  for path, path_key in zip(paths, jax.random.split(key, len(paths))):
    shape = tuple(flat[path].shape)
    if len(shape) not in (2, 3):
      raise ValueError(f"LoRA expects a Dense kernel (in, out) or a scanned stack (layers, in, out) at "
                       f"{path}, got shape {shape}; leave it out of the targets.")
    *lead, fan_in, fan_out = shape
    adapters[f"{path}/{_A}"] = jax.random.normal(path_key, (*lead, fan_in, rank), jnp.float32) / math.sqrt(fan_in)
    adapters[f"{path}/{_B}"] = jnp.zeros((*lead, rank, fan_out), jnp.float32)
  return unflatten_params(adapters)


def apply_lora(params: Mapping[str, Any], adapters: Mapping[str, Any], alpha: float | None = None) -> dict[str, Any]:
  """``params`` with ``W + (alpha / rank) * A @ B`` on each adapted kernel (differentiable; for jit).

  Args:
    params: the base parameter tree.
    adapters: from :func:`init_lora` (an empty tree returns ``params`` as it is).
    alpha: the LoRA alpha; None means ``alpha = rank``.

  Returns:
    A tree with the structure and dtypes of ``params``; the other leaves are the same arrays.

  Raises:
    ValueError: adapters that do not fit ``params`` (unknown path, shapes that disagree).
  """
  if not flatten_params(adapters):
    return params
  flat = flatten_params(params)
  for path, (a, b) in _pairs(adapters, flat).items():
    flat[path] = _merged(flat[path], a, b, _scale(alpha, a.shape[-1]))
  return unflatten_params(flat)


def merge_lora(params: Mapping[str, Any], adapters: Mapping[str, Any], alpha: float | None = None) -> dict[str, Any]:
  """The plain weights of the adapted model, for export and evaluation (jitted, eager callers).

  The same sum as :func:`apply_lora`, computed for the adapted kernels only, each result
  placed with its base kernel's sharding; other leaves are returned as they are. The result
  has the base tree's paths and dtypes, so it loads wherever the base checkpoint does.

  Args:
    params: the base parameter tree (jax or numpy arrays).
    adapters: from :func:`init_lora`, trained.
    alpha: the LoRA alpha used in training; None means ``alpha = rank``.

  Returns:
    The merged parameter tree.
  """
  if not flatten_params(adapters):
    return params
  flat = flatten_params(params)
  pairs = _pairs(adapters, flat)
  kernels = {path: jnp.asarray(flat[path]) for path in pairs}
  scales = {path: _scale(alpha, a.shape[-1]) for path, (a, _) in pairs.items()}

  def merge(kernels: dict[str, jax.Array], pairs: dict[str, tuple[jax.Array, jax.Array]]) -> dict[str, jax.Array]:
    return {path: _merged(kernels[path], a, b, scales[path]) for path, (a, b) in pairs.items()}

  shardings = {path: kernel.sharding for path, kernel in kernels.items()}
  flat.update(jax.jit(merge, out_shardings=shardings)(kernels, pairs))
  return unflatten_params(flat)


def _scale(alpha: float | None, rank: int) -> float:
  return (rank if alpha is None else alpha) / rank


def _merged(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """``kernel + scale * a @ b`` in (at least) float32, cast back to the kernel's dtype."""
  delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)  # (*lead, in, out); rank is tiny
  compute = jnp.promote_types(kernel.dtype, jnp.float32)
  return (kernel.astype(compute) + scale * delta.astype(compute)).astype(kernel.dtype)


def _pairs(adapters: Mapping[str, Any], flat_params: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{kernel path: (A, B)}, checked against the base kernels' shapes."""
  grouped: dict[str, dict[str, Any]] = {}
  for path, leaf in flatten_params(adapters).items():
    kernel_path, _, name = path.rpartition("/")
    grouped.setdefault(kernel_path, {})[name] = leaf
  pairs = {}
  for path, leaves in grouped.items():
    if set(leaves) != {_A, _B}:
      raise ValueError(f"adapters at {path} hold {sorted(leaves)}, expected exactly ['{_A}', '{_B}'] "
                       "(the tree init_lora returns).")
    if path not in flat_params:
      raise ValueError(f"adapters at {path} have no kernel in the base parameters; build them with "
                       "init_lora on this model's parameters.")
    a, b, kernel = leaves[_A], leaves[_B], flat_params[path]
    *lead, fan_in, fan_out = kernel.shape
    expected = ((*lead, fan_in, a.shape[-1]), (*lead, a.shape[-1], fan_out))
    if (tuple(a.shape), tuple(b.shape)) != expected:
      raise ValueError(f"adapters at {path} have shapes {tuple(a.shape)} and {tuple(b.shape)}, expected "
                       f"{expected[0]} and {expected[1]} for the kernel {tuple(kernel.shape)}; rebuild them "
                       "with init_lora on this model's parameters (same config, same use_scan).")
    pairs[path] = (a, b)
  return pairs
