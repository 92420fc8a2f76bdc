"""Checkpoint files as other libraries read them: sharded indexes, fp16/bf16 msgpack and safetensors.

Our own save -> load round trip cannot catch an index that points at the wrong shard if the
loader ignored the index, so the sharded checkpoints are read here per ``weight_map`` entry with
plain ``safetensors.safe_open`` (what transformers and accelerate do), and the loader is checked
to take each tensor from the shard the index names.
"""

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
from flax import serialization

from dalle_flax import DalleBartConfig, FlaxDalleMiniForConditionalGeneration
from dalle_flax.modeling_flax_utils import flatten_params, unflatten_params

TINY = {"d_model": 32, "encoder_layers": 2, "decoder_layers": 2, "encoder_attention_heads": 2,
        "decoder_attention_heads": 2, "encoder_ffn_dim": 48, "decoder_ffn_dim": 48,
        "encoder_vocab_size": 100, "image_vocab_size": 24, "decoder_start_token_id": 24,
        "bos_token_id": 25, "eos_token_id": 25, "pad_token_id": 25, "image_length": 16,
        "max_text_length": 8, "gradient_checkpointing": False}
Model = FlaxDalleMiniForConditionalGeneration
HALF_DTYPES = [np.dtype(np.float16), np.dtype(jnp.bfloat16)]


@pytest.fixture(scope="module")
def model():
  return Model(DalleBartConfig(**TINY), seed=3)


@pytest.fixture(scope="module")
def flat(model):
  """The model's parameters as ``{"a/b/kernel": numpy array}``."""
  return {k: np.asarray(v) for k, v in flatten_params(model.params).items()}


def assert_same(loaded: dict, expected: dict) -> None:
  """Same keys, dtypes and bits."""
  assert sorted(loaded) == sorted(expected)
  for key, value in expected.items():
    assert loaded[key].dtype == value.dtype, key
    np.testing.assert_array_equal(np.asarray(loaded[key]), value, err_msg=key)


def loaded_flat(folder: Path, **kwargs) -> dict:
  return {k: np.asarray(v) for k, v in flatten_params(Model.from_pretrained(folder, **kwargs).params).items()}


def save_sharded(model, folder: Path, flat: dict) -> dict:
  """Saves with a max_shard_size that gives at least 3 shards; returns the index."""
  max_bytes = sum(v.nbytes for v in flat.values()) // 4
  model.save_pretrained(folder, max_shard_size=max_bytes)
  index = json.loads((folder / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) >= 3
  assert not (folder / "model.safetensors").exists()
  return index


# --- sharded safetensors: the index, read the way transformers / accelerate read it -----------

def test_sharded_index_maps_every_key_to_the_shard_that_holds_it(tmp_path, model, flat):
  index = save_sharded(model, tmp_path, flat)
  weight_map = index["weight_map"]
  assert sorted(weight_map) == sorted(k.replace("/", ".") for k in flat)
  for key, shard in weight_map.items():
    with safetensors.safe_open(str(tmp_path / shard), framework="numpy") as f:
      assert key in set(f.keys()), f"index maps {key} to {shard}, which lacks it"
      tensor = f.get_tensor(key)
    expected = flat[key.replace(".", "/")]
    assert tensor.dtype == expected.dtype, key
    np.testing.assert_array_equal(tensor, expected, err_msg=key)
  # every shard holds exactly the keys the index gives it, and nothing is stored twice
  shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
  assert shards == sorted(set(weight_map.values()))
  for shard in shards:
    with safetensors.safe_open(str(tmp_path / shard), framework="numpy") as f:
      assert sorted(f.keys()) == sorted(k for k, s in weight_map.items() if s == shard)
  assert index["metadata"]["total_size"] == sum(v.nbytes for v in flat.values())


def _add_decoy(folder: Path, index_name: str, key: str, decoy: np.ndarray, write_decoy) -> None:
  """Puts ``decoy`` under ``key`` into a shard the index does NOT name for ``key``: the last one,
  which a loader reading every shard in order would read after the right one."""
  weight_map = json.loads((folder / index_name).read_text())["weight_map"]
  other = max(set(weight_map.values()) - {weight_map[key]})
  write_decoy(folder / other, key, decoy)


def _add_safetensors_decoy(path: Path, key: str, decoy: np.ndarray) -> None:
  with safetensors.safe_open(str(path), framework="numpy") as f:
    tensors = {k: f.get_tensor(k) for k in f.keys()}
    metadata = f.metadata()
  path.write_bytes(safetensors.numpy.save({**tensors, key: decoy}, metadata=metadata))


def test_loader_takes_each_tensor_from_the_shard_the_index_names(tmp_path, model, flat):
  index = save_sharded(model, tmp_path, flat)
  first_shard = min(index["weight_map"].values())
  key = next(k for k, s in sorted(index["weight_map"].items()) if s == first_shard)
  decoy = np.full_like(flat[key.replace(".", "/")], 7)
  _add_decoy(tmp_path, "model.safetensors.index.json", key, decoy, _add_safetensors_decoy)
  (tmp_path / "checksums.sha256").unlink()  # edited by hand, as a folder from another tool
  assert_same(loaded_flat(tmp_path), flat)


def test_index_naming_the_wrong_shard_is_an_error_naming_file_and_key(tmp_path, model, flat):
  index = save_sharded(model, tmp_path, flat)
  key, shard = min(index["weight_map"].items())
  wrong = max(set(index["weight_map"].values()) - {shard})
  index["weight_map"][key] = wrong
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
  (tmp_path / "checksums.sha256").unlink()  # edited by hand, as a folder from another tool
  with pytest.raises(OSError, match=rf"(?s)maps 1 tensor.*{re.escape(wrong)}.*does not hold them.*{re.escape(key)}"):
    Model.from_pretrained(tmp_path)


def test_missing_shard_file_is_an_error_naming_file_and_key(tmp_path, model, flat):
  index = save_sharded(model, tmp_path, flat)
  shard = max(index["weight_map"].values())
  key = next(k for k, s in index["weight_map"].items() if s == shard)
  (tmp_path / shard).unlink()
  with pytest.raises(FileNotFoundError, match=rf"(?s)index.*{re.escape(shard)}.*could not be found.*{re.escape(key)}"):
    Model.from_pretrained(tmp_path)


# --- sharded flax msgpack (transformers 4.x Flax layout: nested shards, "/"-keyed index) -------

def write_msgpack_shards(folder: Path, model, flat: dict, n: int = 3) -> dict:
  folder.mkdir(parents=True, exist_ok=True)
  model.config.save_pretrained(folder)
  keys = sorted(flat)
  parts = [keys[i::n] for i in range(n)]  # interleaved, so shard order is not key order
  weight_map = {}
  for i, part in enumerate(parts):
    name = f"flax_model-{i + 1:05d}-of-{n:05d}.msgpack"
    (folder / name).write_bytes(serialization.msgpack_serialize(unflatten_params({k: flat[k] for k in part})))
    weight_map.update({k: name for k in part})
  index = {"metadata": {"total_size": sum(v.nbytes for v in flat.values())}, "weight_map": weight_map}
  (folder / "flax_model.msgpack.index.json").write_text(json.dumps(index))
  return index


def _add_msgpack_decoy(path: Path, key: str, decoy: np.ndarray) -> None:
  held = flatten_params(serialization.msgpack_restore(path.read_bytes()))
  held[key] = decoy
  path.write_bytes(serialization.msgpack_serialize(unflatten_params(held)))


def test_sharded_msgpack_follows_its_index(tmp_path, model, flat):
  index = write_msgpack_shards(tmp_path, model, flat)
  assert_same(loaded_flat(tmp_path), flat)
  first_shard = min(index["weight_map"].values())
  key = next(k for k, s in sorted(index["weight_map"].items()) if s == first_shard)
  _add_decoy(tmp_path, "flax_model.msgpack.index.json", key, np.full_like(flat[key], 7), _add_msgpack_decoy)
  assert_same(loaded_flat(tmp_path), flat)


def test_sharded_msgpack_inconsistent_index_errors(tmp_path, model, flat):
  index = write_msgpack_shards(tmp_path, model, flat)
  key, shard = min(index["weight_map"].items())
  wrong = max(set(index["weight_map"].values()) - {shard})
  index["weight_map"][key] = wrong
  (tmp_path / "flax_model.msgpack.index.json").write_text(json.dumps(index))
  with pytest.raises(OSError, match=rf"(?s){re.escape(wrong)}.*does not hold them.*{re.escape(key)}"):
    Model.from_pretrained(tmp_path)
  (tmp_path / wrong).unlink()
  with pytest.raises(FileNotFoundError, match=rf"(?s){re.escape(wrong)}.*could not be found"):
    Model.from_pretrained(tmp_path)


# --- stored dtypes are kept (the released mega-1-fp16 weights are an fp16 msgpack) ------------

def write_msgpack(folder: Path, model, tree) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  model.config.save_pretrained(folder)
  (folder / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(tree))


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_precision_msgpack_keeps_dtype_and_values(tmp_path, model, flat, dtype):
  half = {k: v.astype(dtype) for k, v in flat.items()}
  write_msgpack(tmp_path / "npy", model, unflatten_params(half))
  assert_same(loaded_flat(tmp_path / "npy"), half)
  # as transformers 4.x wrote it: jax arrays, wrapped in {"params": ...}
  jax_tree = {"params": jax.tree.map(jnp.asarray, unflatten_params(half))}
  write_msgpack(tmp_path / "jax", model, jax_tree)
  assert_same(loaded_flat(tmp_path / "jax"), half)
  # and sharded
  write_msgpack_shards(tmp_path / "sharded", model, half)
  assert_same(loaded_flat(tmp_path / "sharded"), half)


def test_mixed_dtypes_are_each_kept_unless_a_cast_is_asked_for(tmp_path, model, flat):
  mixed = {k: v.astype(HALF_DTYPES[i % 2]) if i % 3 else v for i, (k, v) in enumerate(sorted(flat.items()))}
  assert {str(v.dtype) for v in mixed.values()} == {"float32", "float16", "bfloat16"}
  write_msgpack(tmp_path, model, unflatten_params(mixed))
  assert_same(loaded_flat(tmp_path), mixed)
  # dtype is the computation dtype only: it leaves the stored parameters alone
  loaded = Model.from_pretrained(tmp_path, dtype=jnp.bfloat16)
  assert loaded.dtype == jnp.bfloat16
  assert_same({k: np.asarray(v) for k, v in flatten_params(loaded.params).items()}, mixed)
  # param_dtype is the explicit cast
  upcast = {k: v.astype(np.float32) for k, v in mixed.items()}
  assert_same(loaded_flat(tmp_path, param_dtype=jnp.float32), upcast)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_half_precision_safetensors_round_trip_keeps_dtype(tmp_path, model, flat, dtype, sharded):
  half = {k: v.astype(dtype) for k, v in flat.items()}
  write_msgpack(tmp_path / "msgpack", model, unflatten_params(half))
  from_msgpack = Model.from_pretrained(tmp_path / "msgpack")
  max_shard_size = sum(v.nbytes for v in half.values()) // 4 if sharded else "10GB"
  from_msgpack.save_pretrained(tmp_path / "st", max_shard_size=max_shard_size)
  assert (tmp_path / "st" / "model.safetensors.index.json").exists() == sharded
  # what another reader sees in the files
  for path in (tmp_path / "st").glob("*.safetensors"):
    with safetensors.safe_open(str(path), framework="numpy") as f:
      assert {f.get_tensor(k).dtype for k in f.keys()} == {dtype}, path.name
  assert_same(loaded_flat(tmp_path / "st"), half)
