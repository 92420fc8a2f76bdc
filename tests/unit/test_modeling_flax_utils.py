"""The Flax base class: save/load round trips, legacy msgpack, sharding, errors, push/pull."""

import json
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from transformers import PreTrainedConfig

from dalle_flax import modeling_flax_utils
from dalle_flax.modeling_flax_utils import (
    FlaxPreTrainedModel,
    flatten_params,
    parse_size,
    unflatten_params,
)


class ToyConfig(PreTrainedConfig):
  model_type = "dalle-flax-toy"

  def __init__(self, width: int = 8, depth: int = 2, **kwargs):
    self.width = width
    self.depth = depth
    super().__init__(**kwargs)


class ToyModule(nn.Module):
  width: int
  depth: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"dense_{i}")(x)
      x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm_{i}")(x)
    return x


class ToyModel(FlaxPreTrainedModel):
  config_class = ToyConfig

  def build_module(self):
    return ToyModule(self.config.width, self.config.depth, self.dtype, self.param_dtype)

  def init_weights(self, key):
    return self.module.init(key, jnp.zeros((1, self.config.width), self.dtype))["params"]


def assert_same_params(a, b):
  fa, fb = flatten_params(a), flatten_params(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.fixture
def model():
  return ToyModel(ToyConfig(width=8, depth=3), seed=1)


def test_flatten_roundtrip(model):
  flat = flatten_params(model.params)
  assert "dense_0/kernel" in flat
  assert_same_params(unflatten_params(flat), model.params)


@pytest.mark.parametrize("max_shard_size", ["10GB", 300])
def test_safetensors_roundtrip_bit_exact(tmp_path, model, max_shard_size):
  model.save_pretrained(tmp_path, max_shard_size=max_shard_size)
  sharded = (tmp_path / "model.safetensors.index.json").exists()
  assert sharded == (max_shard_size == 300)
  assert (tmp_path / "model.safetensors").exists() != sharded
  loaded = ToyModel.from_pretrained(tmp_path)
  assert loaded.config.width == 8 and loaded.config.depth == 3
  assert_same_params(loaded.params, model.params)
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["ToyModel"]


def test_resave_removes_stale_shards(tmp_path, model):
  model.save_pretrained(tmp_path, max_shard_size=300)
  model.save_pretrained(tmp_path)
  names = sorted(p.name for p in tmp_path.iterdir())
  assert names == ["checksums.sha256", "config.json", "model.safetensors"]
  assert_same_params(ToyModel.from_pretrained(tmp_path).params, model.params)


def _write_msgpack_checkpoint(folder: Path, model, shard: bool):
  folder.mkdir(parents=True, exist_ok=True)
  model.config.save_pretrained(folder)
  numpy_params = jax.tree.map(np.asarray, model.params)
  if not shard:
    (folder / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(numpy_params))
    return
  # transformers 4.x Flax sharding: each shard is a nested dict; the index maps "/"-keys.
  flat = flatten_params(numpy_params)
  keys = sorted(flat)
  halves = [keys[: len(keys) // 2], keys[len(keys) // 2 :]]
  weight_map = {}
  for i, part in enumerate(halves):
    name = f"flax_model-{i + 1:05d}-of-00002.msgpack"
    shard_tree = unflatten_params({k: flat[k] for k in part})
    (folder / name).write_bytes(serialization.msgpack_serialize(shard_tree))
    weight_map.update({k: name for k in part})
  (folder / "flax_model.msgpack.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("shard", [False, True])
def test_msgpack_origin_roundtrip(tmp_path, model, shard):
  _write_msgpack_checkpoint(tmp_path / "legacy", model, shard)
  loaded = ToyModel.from_pretrained(tmp_path / "legacy")
  assert_same_params(loaded.params, model.params)
  loaded.save_pretrained(tmp_path / "ours")
  assert_same_params(ToyModel.from_pretrained(tmp_path / "ours").params, model.params)


def test_safetensors_preferred_over_msgpack(tmp_path, model):
  model.save_pretrained(tmp_path)
  other = ToyModel(model.config, seed=2)
  (tmp_path / "flax_model.msgpack").write_bytes(
      serialization.msgpack_serialize(jax.tree.map(np.asarray, other.params))
  )
  assert_same_params(ToyModel.from_pretrained(tmp_path).params, model.params)


def test_param_dtype_and_dtype(tmp_path, model):
  model.save_pretrained(tmp_path)
  loaded = ToyModel.from_pretrained(tmp_path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  assert loaded.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(loaded.params))
  # bf16 weights round trip bit-exactly and keep their dtype when loaded without a cast
  loaded.save_pretrained(tmp_path / "bf16")
  again = ToyModel.from_pretrained(tmp_path / "bf16")
  assert_same_params(again.params, loaded.params)


def test_mismatch_lists_every_problem(tmp_path, model):
  model.save_pretrained(tmp_path)
  with pytest.raises(ValueError) as err:
    ToyModel.from_pretrained(tmp_path, depth=4, width=8)
  message = str(err.value)
  assert "4 missing" in message and "dense_3/kernel" in message and "norm_3/scale" in message
  assert "model.safetensors" in message
  with pytest.raises(ValueError) as err:
    ToyModel.from_pretrained(tmp_path, width=4)
  message = str(err.value)
  assert "wrong shape" in message and "dense_1/kernel: checkpoint (8, 8) vs model (4, 4)" in message
  with pytest.raises(ValueError, match=r"4 unexpected[\s\S]*dense_2/bias"):
    ToyModel.from_pretrained(tmp_path, depth=2)


@pytest.mark.parametrize("name", ["model.safetensors", "flax_model.msgpack"])
def test_truncated_or_corrupted_file(tmp_path, model, name):
  if name == "model.safetensors":
    model.save_pretrained(tmp_path)
  else:
    _write_msgpack_checkpoint(tmp_path, model, shard=False)
  path = tmp_path / name
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  if name == "model.safetensors":  # our save has a manifest: the checksum names the damage first
    with pytest.raises(OSError, match=rf"{re.escape(name)}' is damaged: its sha256 is"):
      ToyModel.from_pretrained(tmp_path)
  with pytest.raises(OSError, match="truncated or corrupted"):
    ToyModel.from_pretrained(tmp_path, verify_checksums=False)
  path.write_bytes(b"\x00garbage" * 10)
  with pytest.raises(OSError, match="truncated or corrupted"):
    ToyModel.from_pretrained(tmp_path, verify_checksums=False)


def test_missing_files_and_bad_paths(tmp_path, model):
  with pytest.raises(FileNotFoundError, match="config.json"):
    ToyModel.from_pretrained(tmp_path)
  model.config.save_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match="No weights found"):
    ToyModel.from_pretrained(tmp_path)
  with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub repo id"):
    ToyModel.from_pretrained(str(tmp_path / "does" / "not" / "exist"))
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON"):
    ToyModel.from_pretrained(tmp_path)


def test_wrong_config_type_and_no_params():
  with pytest.raises(TypeError, match="expects a ToyConfig"):
    ToyModel(PreTrainedConfig())
  empty = ToyModel(ToyConfig(), _do_init=False)
  assert empty.params is None
  assert empty.num_parameters() == 2 * (8 * 8 + 8 + 8 + 8)
  with pytest.raises(ValueError, match="has no parameters"):
    empty.save_pretrained("unused")


def test_atomic_save_leaves_no_partial_files(tmp_path, model, monkeypatch):
  model.save_pretrained(tmp_path)
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  import safetensors.numpy

  def boom(*args, **kwargs):
    raise RuntimeError("disk full")

  monkeypatch.setattr(safetensors.numpy, "save", boom)
  other = ToyModel(model.config, seed=5)
  with pytest.raises(RuntimeError, match="disk full"):
    other.save_pretrained(tmp_path)
  after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  assert after == before  # old checkpoint intact, no temporary files left behind


def test_parse_size():
  assert parse_size("10GB") == 10**10
  assert parse_size("500MB") == 5 * 10**8
  assert parse_size("1GiB") == 2**30
  assert parse_size(123) == 123
  with pytest.raises(ValueError, match="max_shard_size"):
    parse_size("ten gigs")


def test_model_card_renders(model):
  card = model.model_card("me/toy")
  assert card.startswith("---\nlibrary_name: dalle-flax")
  assert "ToyModel.from_pretrained(\"me/toy\")" in card


def test_push_to_hub_and_pull_by_repo_id(local_hub, model):
  url = model.push_to_hub("tester/toy")
  assert "tester/toy" in url
  files = set(local_hub.api.list_repo_files("tester/toy"))
  assert {"config.json", "model.safetensors", "README.md"} <= files
  loaded = ToyModel.from_pretrained("tester/toy")
  assert_same_params(loaded.params, model.params)
  # second commit; the first is still reachable by its sha
  first_sha = local_hub.api.model_info("tester/toy").sha
  other = ToyModel(model.config, seed=7)
  other.push_to_hub("tester/toy", max_shard_size=300)
  assert_same_params(ToyModel.from_pretrained("tester/toy").params, other.params)
  assert_same_params(ToyModel.from_pretrained("tester/toy", revision=first_sha).params, model.params)
  with pytest.raises(FileNotFoundError, match="was not found"):
    ToyModel.from_pretrained("tester/nope")
  with pytest.raises(FileNotFoundError, match="Revision 'v9'"):
    ToyModel.from_pretrained("tester/toy", revision="v9")


class _NoSleep:
  """Stands in for the ``time`` module of huggingface_hub's retry loop."""

  @staticmethod
  def sleep(seconds):
    pass


def test_cached_sharded_model_loads_while_the_hub_is_unreachable(local_hub, model, monkeypatch):
  """Optional files (model.safetensors of a sharded repo) that the Hub cannot be asked about are
  skipped, as transformers does; required ones still fail with a clear OSError."""
  model.push_to_hub("tester/toy-sharded", max_shard_size=300)
  assert_same_params(ToyModel.from_pretrained("tester/toy-sharded").params, model.params)  # caches
  local_hub.server.stop()
  from huggingface_hub.utils import _http

  monkeypatch.setattr(_http, "time", _NoSleep())
  assert_same_params(ToyModel.from_pretrained("tester/toy-sharded").params, model.params)
  with pytest.raises(OSError, match="Could not download 'config.json'"):
    ToyModel.from_pretrained("tester/never-cached")


def test_config_bigger_than_memory_is_refused_before_allocation(monkeypatch):
  """A config whose weights alone exceed the machine's memory fails fast, nothing allocated."""
  import time

  from dalle_flax import DalleBartConfig, FlaxDalleMiniForConditionalGeneration

  huge = DalleBartConfig(d_model=16384, encoder_layers=64, decoder_layers=64, encoder_ffn_dim=65536,
                         decoder_ffn_dim=65536, encoder_attention_heads=16, decoder_attention_heads=16)
  start = time.perf_counter()
  with pytest.raises(ValueError, match=r"parameters \([\d,.]+ GB as float32\), more than this machine's memory"):
    FlaxDalleMiniForConditionalGeneration(huge)
  assert time.perf_counter() - start < 30  # refused from the shapes, not after allocating

  # the limit is the machine's: a small model is refused when the machine is smaller still ...
  monkeypatch.setattr(modeling_flax_utils, "_memory_bytes", lambda: 1_000)
  with pytest.raises(ValueError, match="more than this machine's memory"):
    ToyModel(ToyConfig(width=64))
  # ... and an unknown memory size (0) checks nothing
  monkeypatch.setattr(modeling_flax_utils, "_memory_bytes", lambda: 0)
  assert ToyModel(ToyConfig(width=64)).num_parameters() > 0


def test_memory_bytes_reports_this_machine():
  assert modeling_flax_utils._memory_bytes() > 2**30
