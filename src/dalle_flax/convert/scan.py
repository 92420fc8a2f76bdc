"""Scanned <-> unscanned DalleBart layer layouts (pure functions on flat parameter dicts).

Example: ``flat = unscan_params(flatten_params(params))`` turns
``model/encoder/layers/FlaxBartEncoderLayers/LayerNorm_0/bias`` (L, d) into
``model/encoder/layers/FlaxBartEncoderLayer_{i}/LayerNorm_0/bias`` (d,) for i < L.

Keys are ``"/"``-joined paths; values are numpy or jax arrays (the array type is kept).
"""

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["is_scanned", "scan_params", "unscan_params"]

_SCANNED = re.compile(r"^(?P<prefix>(?:.*/)?layers/)(?P<stack>FlaxBart(?:En|De)coderLayer)s/(?P<rest>.+)$")
_UNSCANNED = re.compile(r"^(?P<prefix>(?:.*/)?layers/)(?P<stack>FlaxBart(?:En|De)coderLayer)_(?P<index>\d+)/(?P<rest>.+)$")


def is_scanned(flat: Mapping[str, Any]) -> bool | None:
  """True for a scanned tree, False for an unrolled one, None when it has no DalleBart layers."""
  if any(_SCANNED.match(k) for k in flat):
    return True
  if any(_UNSCANNED.match(k) for k in flat):
    return False
  return None


def unscan_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Splits every ``FlaxBart*Layers`` leaf along its leading layer axis into ``FlaxBart*Layer_{i}``."""
  out: dict[str, Any] = {}
  for key, value in flat.items():
    match = _SCANNED.match(key)
    if match is None:
      out[key] = value
      continue
    for i in range(value.shape[0]):
      out[f"{match['prefix']}{match['stack']}_{i}/{match['rest']}"] = value[i]
  return out


def scan_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Stacks ``FlaxBart*Layer_{i}`` leaves into ``FlaxBart*Layers`` with a leading layer axis.

  The unrolled layout omits the end-of-layer norm scale of the last layer (postln without
  ``force_ln_scale``); the scanned one has a scale in every layer, so that scale is filled
  with ones (the identity). Any other difference between layers cannot be scanned.

  Raises:
    ValueError: layers are missing, or differ in leaves or shapes (e.g. swinv2's extra norm
      every 6th layer).
  """
  out: dict[str, Any] = {}
  groups: dict[tuple[str, str], dict[str, dict[int, Any]]] = {}
  for key, value in flat.items():
    match = _UNSCANNED.match(key)
    if match is None:
      out[key] = value
      continue
    group = groups.setdefault((match["prefix"], match["stack"]), {})
    group.setdefault(match["rest"], {})[int(match["index"])] = value
  for (prefix, stack), leaves in groups.items():
    num = 1 + max(i for per_layer in leaves.values() for i in per_layer)
    for rest, per_layer in leaves.items():
      missing = [i for i in range(num) if i not in per_layer]
      if missing == [num - 1] and rest.endswith("/scale") and num > 1:
        like = per_layer[0]
        per_layer[num - 1] = (jnp if isinstance(like, jax.Array) else np).ones_like(like)
      elif missing:
        raise ValueError(
            f"cannot scan {prefix}{stack}_*: leaf {rest!r} is missing in layers {missing} of {num}; "
            "only identical layers can be stacked (keep use_scan=False for this checkpoint)"
        )
      shapes = {tuple(v.shape) for v in per_layer.values()}
      if len(shapes) > 1:
        raise ValueError(f"cannot scan {prefix}{stack}_*/{rest}: layers have different shapes {sorted(shapes)}")
      arrays = [per_layer[i] for i in range(num)]
      xp = jnp if isinstance(arrays[0], jax.Array) else np
      out[f"{prefix}{stack}s/{rest}"] = xp.stack(arrays)
  return out
