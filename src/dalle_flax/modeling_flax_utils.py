"""Our Flax model base class: configs, parameters and Hub I/O (transformers 5.x has no Flax).

Example: ``model = FlaxVQGANModel.from_pretrained("dalle-mini/vqgan_imagenet_f16_16384")``.

A subclass provides ``config_class``, ``build_module()`` (the linen module) and
``init_weights(key)`` (its nested parameter dict); it may override ``config_from_dict`` and
``convert_checkpoint_params`` to read legacy layouts. The base class gives it
``from_pretrained`` (folder or repo id; safetensors or flax msgpack, sharded or not; a sharded
checkpoint is read through its index, each tensor from the shard it names; stored dtypes are kept),
``save_pretrained`` (safetensors, sharded past ``max_shard_size``, atomic) and ``push_to_hub``
(with a model card). Weights are read with safetensors and ``flax.serialization.msgpack_restore``:
nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import serialization
from transformers import PreTrainedConfig

from .file_checks import (CHECKSUMS_NAME, contained_shard, sniff_weights_file, verify_checksums, within_folder,
                          write_checksums)
from .hub_utils import (HubOptions, StagedFiles, atomic_write_json, push_folder, read_json_object,
                        resolve_file)

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_NAME",
    "FlaxPreTrainedModel",
    "MSGPACK_INDEX_NAME",
    "MSGPACK_WEIGHTS_NAME",
    "SAFE_INDEX_NAME",
    "SAFE_WEIGHTS_NAME",
    "flatten_params",
    "unflatten_params",
]

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
MSGPACK_WEIGHTS_NAME = "flax_model.msgpack"
MSGPACK_INDEX_NAME = "flax_model.msgpack.index.json"
_WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_INDEX_NAME, MSGPACK_WEIGHTS_NAME, MSGPACK_INDEX_NAME)
_SHARD_PATTERN = re.compile(r"^(model|flax_model)-\d{5}-of-\d{5}\.(safetensors|msgpack)$")


def flatten_params(tree: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """Flattens a nested parameter dict into ``{"a/b/kernel": array}``."""
  flat: dict[str, Any] = {}

  def visit(node: Any, prefix: str) -> None:
    if isinstance(node, Mapping):
      for key, value in node.items():
        visit(value, f"{prefix}{sep}{key}" if prefix else str(key))
    else:
      flat[prefix] = node

  visit(tree, "")
  return flat


def unflatten_params(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """Inverse of :func:`flatten_params`."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split(sep)
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree


def parse_size(size: int | str) -> int:
  """Parses ``"10GB"``, ``"500MB"``, ``"2GiB"`` or an int number of bytes."""
  if isinstance(size, int) and not isinstance(size, bool):
    if size <= 0:
      raise ValueError(f"max_shard_size must be positive, got {size}.")
    return size
  match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
  if not match:
    raise ValueError(f"max_shard_size must look like '10GB', '500MB' or an int, got {size!r}.")
  number, unit = float(match.group(1)), (match.group(2) or "B").upper()
  scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
           "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
  return max(1, int(number * scale))


def _memory_bytes() -> int:
  """Physical memory of the host, or of the default device where it reports more (0: unknown)."""
  try:
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    host = 0
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001 - CPU devices may not implement memory_stats
    stats = {}
  return max(int(host), int(stats.get("bytes_limit", 0)))


def _corrupted(path: Path, error: Exception) -> OSError:
  return OSError(
      f"Could not read the weights file {str(path)!r}: it is truncated or corrupted ({error}). "
      "Delete it (or pass force_download=True for a Hub repo) and download it again."
  )


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  sniff_weights_file(path)
  try:
    with safetensors.safe_open(str(path), framework="numpy") as f:
      return {key.replace(".", "/"): f.get_tensor(key) for key in f.keys()}
  except Exception as e:  # safetensors raises SafetensorError / OSError variants
    raise _corrupted(path, e) from None


def _read_msgpack(path: Path) -> dict[str, np.ndarray]:
  """Reads a flax msgpack file; every leaf keeps its stored dtype (fp16 and bf16 included).

  msgpack bounds what a hostile file can make it do: declared lengths are checked against the
  bytes present and nesting stops at 1024 levels (StackError); deeper Python-level trees and
  non-array leaves are refused here, all as the OSError of a damaged file.
  """
  sniff_weights_file(path)
  try:
    state = serialization.msgpack_restore(path.read_bytes())
    if not isinstance(state, Mapping):
      raise TypeError(f"expected a dict of arrays, got {type(state).__name__}")
    if set(state) == {"params"}:  # some exports wrap the tree in {"params": ...}
      state = state["params"]
    flat = flatten_params(state)
    for key, value in flat.items():
      if not isinstance(value, (np.ndarray, np.generic)):
        raise TypeError(f"expected array leaves, got {type(value).__name__} at {key!r}")
  except Exception as e:  # msgpack raises several unrelated exception types on bad input
    raise _corrupted(path, e) from None
  return {k: np.asarray(v) for k, v in flat.items()}


def _read_index(index_path: Path) -> dict[str, str]:
  try:
    index = json.loads(index_path.read_text())
    weight_map = index["weight_map"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise _corrupted(index_path, e) from None
  if not isinstance(weight_map, dict) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
    raise _corrupted(index_path, TypeError("weight_map must map tensor names to shard file names"))
  return weight_map


def _shard_keys(weight_map: Mapping[str, str]) -> dict[str, list[str]]:
  """Groups the index's tensor names by the shard file it names for them, in index order."""
  by_shard: dict[str, list[str]] = {}
  for key, shard in weight_map.items():
    by_shard.setdefault(shard, []).append(key)
  return by_shard


def _some(keys: list[str], n: int = 5) -> str:
  return ", ".join(repr(k) for k in keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _inconsistent_index(index_path: Path, shard_path: Path, keys: list[str], held: int) -> OSError:
  return OSError(
      f"The index {str(index_path)!r} maps {len(keys)} tensor(s) to the shard "
      f"{str(shard_path)!r}, which does not hold them (it holds {held} tensors): "
      f"{_some(keys)}. The index and its shards do not belong "
      "together; save the model again (or re-download with force_download=True)."
  )


def _read_safetensors_shard(index_path: Path, shard_path: Path, keys: list[str]) -> dict[str, np.ndarray]:
  """Reads exactly ``keys`` from one safetensors shard, as transformers and accelerate do."""
  sniff_weights_file(shard_path)
  try:
    with safetensors.safe_open(str(shard_path), framework="numpy") as f:
      held = set(f.keys())
      tensors = {key.replace(".", "/"): f.get_tensor(key) for key in keys if key in held}
  except Exception as e:  # safetensors raises SafetensorError / OSError variants
    raise _corrupted(shard_path, e) from None
  absent = [key for key in keys if key not in held]
  if absent:
    raise _inconsistent_index(index_path, shard_path, absent, len(held))
  return tensors


def _read_msgpack_shard(index_path: Path, shard_path: Path, keys: list[str]) -> dict[str, np.ndarray]:
  """Reads exactly ``keys`` ("/"-joined, as transformers 4.x wrote them) from a msgpack shard."""
  held = _read_msgpack(shard_path)
  names = [key.replace(".", "/") for key in keys]
  absent = [key for key, name in zip(keys, names) if name not in held]
  if absent:
    raise _inconsistent_index(index_path, shard_path, absent, len(held))
  return {name: held[name] for name in names}


class FlaxPreTrainedModel:
  """Holds a config, a linen module and its parameters; loads and saves Hub checkpoints.

  Attributes:
    config: the model's transformers config.
    module: the linen module (pure: call ``module.apply({"params": params}, ...)``).
    params: the nested parameter dict (no ``{"params": ...}`` wrapper), or None when the model
      was built with ``_do_init=False`` and no parameters were given.
    dtype: computation dtype; param_dtype: dtype parameters are created in.
  """

  config_class: ClassVar[type[PreTrainedConfig]]
  model_card_template: ClassVar[str] = "default.md"
  main_input_name: ClassVar[str] = "input_ids"

  def __init__(
      self,
      config: PreTrainedConfig,
      params: Mapping[str, Any] | None = None,
      *,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      seed: int = 0,
      _do_init: bool = True,
  ):
    if not isinstance(config, self.config_class):
      raise TypeError(
          f"{type(self).__name__} expects a {self.config_class.__name__}, got "
          f"{type(config).__name__}; build one with {self.config_class.__name__}(...) or "
          f"{type(self).__name__}.from_pretrained(...)."
      )
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.param_dtype = jnp.dtype(param_dtype)
    self.module = self.build_module()
    if params is None and _do_init:
      self._check_fits_in_memory()
      params = self.init_weights(jax.random.key(seed))
    self._params = params

  def _check_fits_in_memory(self) -> None:
    """Refuses, before allocating, a config whose parameters alone exceed this machine's memory."""
    leaves = jax.tree.leaves(self.params_shape_tree)  # shapes only: nothing is allocated
    need = sum(int(np.prod(leaf.shape, dtype=np.float64)) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves)
    limit = _memory_bytes()
    if limit and need > limit:
      count = sum(int(np.prod(leaf.shape, dtype=np.float64)) for leaf in leaves)
      raise ValueError(
          f"{type(self).__name__} built from this config has {count:,} parameters ({need / 1e9:,.1f} GB "
          f"as {self.param_dtype.name}), more than this machine's memory ({limit / 1e9:,.1f} GB). Check the "
          "config's sizes (d_model, layer counts, vocabulary sizes, ffn dims), or pass "
          "param_dtype='bfloat16' / load real weights with from_pretrained."
      )

  # --- to implement in subclasses ---------------------------------------------------------
  def build_module(self) -> nn.Module:
    """Returns the linen module built from ``self.config``, ``self.dtype``, ``self.param_dtype``."""
    raise NotImplementedError(f"{type(self).__name__} must implement build_module()")

  def init_weights(self, key: jax.Array) -> dict[str, Any]:
    """Returns freshly initialised parameters (a nested dict); pure, usable under eval_shape."""
    raise NotImplementedError(f"{type(self).__name__} must implement init_weights()")

  @classmethod
  def config_from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> PreTrainedConfig:
    """Builds the config from a raw ``config.json`` dict (override for legacy layouts)."""
    return cls.config_class.from_dict(config_dict, **kwargs)

  @classmethod
  def convert_checkpoint_params(
      cls, flat: dict[str, np.ndarray], config: PreTrainedConfig
  ) -> dict[str, np.ndarray]:
    """Converts ``"/"``-joined checkpoint params to this class's layout (default: unchanged)."""
    return flat

  # --- parameters ------------------------------------------------------------------------
  @property
  def params(self) -> dict[str, Any] | None:
    return self._params

  @params.setter
  def params(self, params: Mapping[str, Any] | None) -> None:
    self._params = params

  @property
  def params_shape_tree(self) -> dict[str, Any]:
    """The parameter tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything.

    A config whose sizes cannot even be traced (a tensor of more than 2**63 elements) is a
    ValueError naming the config, not the TypeError/OverflowError jax raises deep inside.
    """
    try:
      return jax.eval_shape(self.init_weights, jax.random.key(0))
    except (TypeError, OverflowError, ValueError) as e:
      message = " ".join(str(e).split("\n")[0].split())[:300]
      raise ValueError(
          f"{type(self).__name__} cannot be built from this {type(self.config).__name__}: its sizes give "
          f"tensors jax cannot shape ({type(e).__name__}: {message}). Check the config's sizes "
          "(d_model, channel counts, embed_dim, vocabulary sizes, ffn dims)."
      ) from e

  def num_parameters(self, params: Mapping[str, Any] | None = None) -> int:
    """Counts parameters of ``params`` (default: the model's, or its shape tree)."""
    tree = params if params is not None else (self._params or self.params_shape_tree)
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(tree)))

  def _require_params(self, params: Mapping[str, Any] | None) -> Mapping[str, Any]:
    params = params if params is not None else self._params
    if params is None:
      raise ValueError(
          f"{type(self).__name__} has no parameters (built with _do_init=False); pass params=... "
          "or load them with from_pretrained(...)."
      )
    return params

  # --- loading ---------------------------------------------------------------------------
  @classmethod
  def load_config(
      cls, pretrained_model_name_or_path: str | os.PathLike, options: HubOptions, **config_kwargs: Any
  ) -> PreTrainedConfig:
    config_dict = read_json_object(resolve_file(pretrained_model_name_or_path, CONFIG_NAME, options))
    return cls.config_from_dict(config_dict, **config_kwargs)

  @classmethod
  def load_checkpoint(
      cls, pretrained_model_name_or_path: str | os.PathLike, options: HubOptions, *,
      verify_checksums: bool = True,
  ) -> tuple[dict[str, np.ndarray], str]:
    """Reads the first weights file found (safetensors before msgpack); returns (flat, path).

    A sharded checkpoint is read through its index: each tensor from the shard the index's
    ``weight_map`` names for it (as transformers and accelerate read it), so an index that
    disagrees with its shards is an error here too, and so is a shard name that would leave the
    folder. With ``verify_checksums`` and a ``checksums.sha256`` beside the weights (what
    ``save_pretrained`` writes), every file read is checked against it first.
    """
    for name in _WEIGHT_FILES:
      path = resolve_file(pretrained_model_name_or_path, name, options, required=False)
      if path is None:
        continue
      if not name.endswith(".index.json"):
        cls._verify(pretrained_model_name_or_path, options, {name: path}, verify_checksums)
        reader = _read_safetensors if name.endswith(".safetensors") else _read_msgpack
        return reader(path), str(path)
      read_shard = _read_safetensors_shard if name.startswith("model.") else _read_msgpack_shard
      by_shard = _shard_keys(_read_index(path))
      local = Path(pretrained_model_name_or_path).is_dir()
      shard_paths: dict[str, Path] = {}
      for shard, keys in by_shard.items():
        contained_shard(path.parent, shard, path)
        try:
          shard_paths[shard] = resolve_file(pretrained_model_name_or_path, shard, options)
        except FileNotFoundError as e:
          raise FileNotFoundError(
              f"The index {str(path)!r} maps {len(keys)} tensor(s) to the shard {shard!r}, which "
              f"could not be found: {e} Its tensors: {_some(keys)}. Save the model again, or "
              "re-download the whole checkpoint."
          ) from None
        if local:
          within_folder(path.parent, shard_paths[shard], path)
      cls._verify(pretrained_model_name_or_path, options, {name: path, **shard_paths}, verify_checksums)
      flat: dict[str, np.ndarray] = {}
      for shard, keys in by_shard.items():
        flat.update(read_shard(path, shard_paths[shard], keys))
      return flat, str(path)
    raise FileNotFoundError(
        f"No weights found in {str(pretrained_model_name_or_path)!r}: expected one of "
        f"{list(_WEIGHT_FILES)}."
    )

  @staticmethod
  def _verify(pretrained_model_name_or_path: str | os.PathLike, options: HubOptions,
              files: dict[str, Path], enabled: bool) -> None:
    if not enabled:
      return
    manifest = resolve_file(pretrained_model_name_or_path, CHECKSUMS_NAME, options, required=False)
    if manifest is not None:
      verify_checksums(manifest, files)

  @classmethod
  def from_pretrained(
      cls,
      pretrained_model_name_or_path: str | os.PathLike,
      *,
      revision: str | None = None,
      cache_dir: str | os.PathLike | None = None,
      token: str | bool | None = None,
      local_files_only: bool = False,
      force_download: bool = False,
      subfolder: str = "",
      config: PreTrainedConfig | None = None,
      dtype: Any = jnp.float32,
      param_dtype: Any = None,
      verify_checksums: bool = True,
      **config_kwargs: Any,
  ) -> FlaxPreTrainedModel:
    """Loads a model from a local folder or a Hub repo id.

    Args:
      pretrained_model_name_or_path: folder with ``config.json`` and weights, or a repo id.
      revision: branch, tag or commit sha (Hub only).
      cache_dir: Hub cache folder; token: Hub token; local_files_only: never download.
      force_download: re-download even if cached; subfolder: folder inside the repo.
      config: use this config instead of the checkpoint's ``config.json``.
      dtype: computation dtype. param_dtype: cast floating parameters to this dtype (default:
        keep the stored dtype).
      verify_checksums: check the weight files against the folder's ``checksums.sha256`` (written
        by ``save_pretrained``) before parsing them; a changed byte is an OSError naming the file.
        False skips the hashing (about 1 s per GB). Folders without the manifest load unchecked.
      **config_kwargs: override config attributes.

    Returns:
      The model with ``.params`` loaded.
    """
    options = HubOptions(revision=revision, cache_dir=cache_dir, token=token,
                         local_files_only=local_files_only, force_download=force_download,
                         subfolder=subfolder)
    if config is None:
      config = cls.load_config(pretrained_model_name_or_path, options, **config_kwargs)
    flat, path = cls.load_checkpoint(pretrained_model_name_or_path, options, verify_checksums=verify_checksums)
    flat = cls.convert_checkpoint_params(flat, config)
    stored_dtypes = {np.dtype(v.dtype) for v in flat.values() if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16"}
    model = cls(
        config,
        dtype=dtype,
        param_dtype=param_dtype or (stored_dtypes.pop() if len(stored_dtypes) == 1 else jnp.float32),
        _do_init=False,
    )
    model.params = model._validate_and_place(flat, path, param_dtype)
    model.load_extra_files(pretrained_model_name_or_path, options)
    return model

  def _validate_and_place(
      self, flat: dict[str, np.ndarray], path: str, param_dtype: Any
  ) -> dict[str, Any]:
    expected = flatten_params(self.params_shape_tree)
    missing = sorted(set(expected) - set(flat))
    unexpected = sorted(set(flat) - set(expected))
    mismatched = []
    for k in sorted(set(expected) & set(flat)):
      stored, wanted = flat[k], expected[k]
      if tuple(stored.shape) != tuple(wanted.shape):
        mismatched.append(f"{k}: checkpoint {tuple(stored.shape)} vs model {tuple(wanted.shape)}")
      if jnp.issubdtype(wanted.dtype, jnp.floating) and not jnp.issubdtype(stored.dtype, jnp.floating):
        # an int/bool/complex array where the model has float weights
        mismatched.append(f"{k}: checkpoint dtype {stored.dtype} vs model {jnp.dtype(wanted.dtype)} "
                          "(expected a float dtype)")
    if missing or unexpected or mismatched:
      lines = [f"Checkpoint {path!r} does not match {type(self).__name__} built from its config:"]
      for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape or dtype", mismatched)):
        if items:
          lines.append(f"  {len(items)} {title} parameter(s):")
          lines.extend(f"    {item}" for item in items)
      lines.append(
          "Check that config.json belongs to these weights (layer counts, d_model, vocab sizes, "
          "use_scan, ln_positions)."
      )
      raise ValueError("\n".join(lines))
    placed: dict[str, Any] = {}
    for key in list(flat):
      value = flat.pop(key)  # free host memory as we go (mega is 10 GB in fp32)
      if param_dtype is not None and jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(jnp.dtype(param_dtype))
      placed[key] = jnp.asarray(value)
    return unflatten_params(placed)

  # --- saving ----------------------------------------------------------------------------
  def save_pretrained(
      self,
      save_directory: str | os.PathLike,
      params: Mapping[str, Any] | None = None,
      *,
      max_shard_size: int | str = "10GB",
      push_to_hub: bool = False,
      **push_kwargs: Any,
  ) -> Path:
    """Writes ``config.json`` and safetensors weights (sharded past ``max_shard_size``).

    Every file is written to a temporary name and renamed into place; weight files of an
    earlier save that the new one does not use are removed afterwards.

    Returns:
      The folder written.
    """
    params = self._require_params(params)
    save_directory = Path(save_directory)
    if save_directory.is_file():
      raise ValueError(f"save_directory {str(save_directory)!r} is a file; give a folder path.")
    save_directory.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten_params(params).items()}
    written = self._write_safetensors(flat, save_directory, parse_size(max_shard_size))
    self._save_config(save_directory)
    self.save_extra_files(save_directory)
    for stale in save_directory.iterdir():
      if stale.name not in written and (stale.name in _WEIGHT_FILES or _SHARD_PATTERN.match(stale.name)):
        stale.unlink()
    if push_to_hub:
      repo_id = push_kwargs.pop("repo_id", None) or save_directory.name
      self.push_to_hub(repo_id, params=params, max_shard_size=max_shard_size, **push_kwargs)
    return save_directory

  def _save_config(self, save_directory: Path) -> None:
    config_dict = self.config.to_dict()
    config_dict["architectures"] = [type(self).__name__]
    atomic_write_json(save_directory / CONFIG_NAME, config_dict)

  def save_extra_files(self, save_directory: Path) -> None:
    """Hook for subclasses: write files that travel with the weights (e.g. generation config)."""

  def load_extra_files(self, pretrained_model_name_or_path: str | os.PathLike, options: HubOptions) -> None:
    """Hook for subclasses: read the files written by ``save_extra_files`` (optional files)."""

  @staticmethod
  def _write_safetensors(flat: dict[str, np.ndarray], folder: Path, max_bytes: int) -> set[str]:
    for key in flat:
      if "." in key:
        raise ValueError(
            f"parameter path {key!r} contains '.', which safetensors keys use as the separator; "
            "rename the module."
        )
    tensors = {k.replace("/", "."): v for k, v in flat.items()}
    metadata = {"format": "flax"}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key, value in sorted(tensors.items()):
      if shards[-1] and size + value.nbytes > max_bytes:
        shards.append({})
        size = 0
      shards[-1][key] = value
      size += value.nbytes
    # Two phases: every file is written to a temporary name first (a full disk leaves the old
    # save whole), then the old manifest goes, the files are renamed in, and the new manifest is
    # written last. A process killed between the renames leaves weights without a manifest
    # (loadable, unchecked), never new weights beside old checksums.
    with StagedFiles(folder) as staged:
      if len(shards) == 1:
        staged.add(SAFE_WEIGHTS_NAME, safetensors.numpy.save(shards[0], metadata=metadata))
      else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
          staged.add(name, safetensors.numpy.save(shard, metadata=metadata))
        weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
        total = int(sum(v.nbytes for v in tensors.values()))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        staged.add(SAFE_INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
      written = staged.commit(before_rename=lambda: (folder / CHECKSUMS_NAME).unlink(missing_ok=True))
    write_checksums(folder, written, known=staged.sha256)
    return written

  def model_card(self, repo_id: str) -> str:
    """Renders the model card (README.md) for ``repo_id`` from the class's template."""
    from .model_cards import render_model_card

    return render_model_card(
        self.model_card_template,
        repo_id=repo_id,
        model_class=type(self).__name__,
        config=self.config,
        num_parameters=self.num_parameters(),
    )

  def push_to_hub(
      self,
      repo_id: str,
      *,
      params: Mapping[str, Any] | None = None,
      commit_message: str | None = None,
      private: bool | None = None,
      token: str | bool | None = None,
      revision: str | None = None,
      create_pr: bool = False,
      max_shard_size: int | str = "10GB",
      model_card: bool = True,
  ) -> str:
    """Saves the model to a temporary folder and uploads it to ``repo_id`` in one commit.

    A ``README.md`` model card (``library_name: dalle-flax``, ``pipeline_tag: text-to-image``)
    is added unless ``model_card=False``. Returns the commit URL.
    """
    def write(folder: Path) -> None:
      self.save_pretrained(folder, params=params, max_shard_size=max_shard_size)
      if model_card:
        (folder / "README.md").write_text(self.model_card(repo_id))

    return push_folder(repo_id, write, commit_message=commit_message or f"Upload {type(self).__name__}",
                       private=private, token=token, revision=revision, create_pr=create_pr)

