"""Sharding DALL·E mini parameters over a ``("dp", "mp")`` device mesh (jax.sharding).

Example: ``params = shard_params(model.params, make_mesh(dp=2, mp=4))``.

The rules are those the original used to train mega (reference §7.5): embeddings shard their
rows over "mp", q/k/v and the first feed-forward kernels their columns (column parallel),
out_proj and the last feed-forward kernel their rows (row parallel), ``lm_head`` its columns;
norms, biases and scales are replicated. Scanned layer stacks get a leading ``None`` for the
layer axis. A dimension that does not divide by the "mp" size is replicated instead (logged),
so any config works on any mesh.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .modeling_flax_utils import flatten_params, unflatten_params

logger = logging.getLogger(__name__)

__all__ = ["PARTITION_RULES", "batch_sharding", "make_mesh", "partition_specs", "shard_params"]

# (regex on the "/"-joined path, spec of the unstacked leaf)
PARTITION_RULES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    (r"embed_(positions|tokens)/embedding$", ("mp", None)),
    (r"(shared|decoder_embed)/embedding$", ("mp", None)),
    (r"rel_bias/embedding$", (None, "mp")),
    (r"(q_proj|k_proj|v_proj)/kernel$", (None, "mp")),
    (r"out_proj/kernel$", ("mp", None)),
    (r"GLU_\d+/Dense_[01]/kernel$", (None, "mp")),
    (r"GLU_\d+/Dense_2/kernel$", ("mp", None)),
    (r"FFN_\d+/Dense_0/kernel$", (None, "mp")),
    (r"FFN_\d+/Dense_1/kernel$", ("mp", None)),
    (r"(fc1)/kernel$", (None, "mp")),
    (r"(fc2)/kernel$", ("mp", None)),
    (r"lm_head/kernel$", (None, "mp")),
    (r"(bias|scale|head_scale|tau|final_logits_bias)$", ()),
)


def make_mesh(dp: int | None = None, mp: int = 1, devices: Any = None) -> Mesh:
  """A ("dp", "mp") mesh over ``devices`` (default: all); dp defaults to devices // mp."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  dp = devices.size // mp if dp is None else dp
  if dp * mp != devices.size:
    raise ValueError(f"dp * mp must equal the number of devices ({devices.size}), got dp={dp}, mp={mp}.")
  return Mesh(devices.reshape(dp, mp), ("dp", "mp"))


def partition_specs(params: Mapping[str, Any], mp_size: int = 1) -> dict[str, Any]:
  """PartitionSpecs for a parameter tree (same structure).

  Raises:
    ValueError: a parameter no rule matches (so new modules cannot silently go unsharded).
  """
  specs = {}
  for path, leaf in flatten_params(params).items():
    for pattern, spec in PARTITION_RULES:
      if re.search(pattern, path):
        break
    else:
      raise ValueError(f"No partition rule matches parameter {path!r}; add one to PARTITION_RULES.")
    shape = tuple(leaf.shape)
    lead = len(shape) - len(spec)
    full = (None,) * max(lead, 0) + tuple(spec)[-len(shape):] if shape else ()
    full = tuple(
        None if axis == "mp" and (shape[i] % mp_size) else axis for i, axis in enumerate(full)
    )
    if "mp" in spec and "mp" not in full and mp_size > 1:
      logger.info("Replicating %s %s: not divisible by mp=%d.", path, shape, mp_size)
    specs[path] = P(*full)
  return unflatten_params(specs)


def shard_params(params: Mapping[str, Any], mesh: Mesh) -> dict[str, Any]:
  """Places every parameter on ``mesh`` following :data:`PARTITION_RULES`."""
  specs = flatten_params(partition_specs(params, mesh.shape["mp"]))
  flat = flatten_params(params)
  return unflatten_params({k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in flat.items()})


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding for (batch, ...) inputs: rows split over "dp"."""
  return NamedSharding(mesh, P("dp"))
