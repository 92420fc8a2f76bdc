"""Damaged, hostile and hand-edited weight folders: each is a clear error naming the file and the fix."""

from __future__ import annotations

import json
import os
import struct
import time
import tracemalloc
from pathlib import Path

import flax.linen as nn
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
from flax import serialization
from transformers import PreTrainedConfig

from dalle_flax.file_checks import (CHECKSUMS_NAME, LFS_POINTER_PREFIX, read_checksums, sha256_file,
                                    verify_checksums, write_checksums)
from dalle_flax.hub_utils import StagedFiles
from dalle_flax.modeling_flax_utils import FlaxPreTrainedModel

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-dalle-mini"
LFS_POINTER = (LFS_POINTER_PREFIX + b"v1\noid sha256:" + b"a" * 64 + b"\nsize 1234567\n")


class TinyConfig(PreTrainedConfig):
  model_type = "tiny-file-checks"

  def __init__(self, width: int = 8, **kwargs):
    self.width = width
    super().__init__(**kwargs)


class TinyModule(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.width, name="dense_1")(nn.Dense(self.width, name="dense_0")(x))


class TinyModel(FlaxPreTrainedModel):
  config_class = TinyConfig

  def build_module(self):
    return TinyModule(self.config.width)

  def init_weights(self, key):
    return self.module.init(key, jnp.zeros((1, self.config.width)))["params"]


@pytest.fixture
def model():
  return TinyModel(TinyConfig(), seed=0)


def _same(a, b):
  from dalle_flax.modeling_flax_utils import flatten_params
  fa, fb = flatten_params(a), flatten_params(b)
  return fa.keys() == fb.keys() and all(np.array_equal(np.asarray(fa[k]), np.asarray(fb[k])) for k in fa)


# --- git-lfs pointers, empty and short files -------------------------------------------------

@pytest.mark.parametrize("name", ["model.safetensors", "flax_model.msgpack"])
def test_lfs_pointer_names_git_lfs_pull(tmp_path, model, name):
  model.save_pretrained(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  (tmp_path / CHECKSUMS_NAME).unlink()
  (tmp_path / name).write_bytes(LFS_POINTER)
  with pytest.raises(OSError, match=r"(?s)git-lfs pointer.*git lfs pull.*force_download=True") as err:
    TinyModel.from_pretrained(tmp_path)
  assert name in str(err.value)


def test_lfs_pointer_shard_is_named(tmp_path, model):
  model.save_pretrained(tmp_path, max_shard_size=100)
  (tmp_path / CHECKSUMS_NAME).unlink()
  shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
  shard.write_bytes(LFS_POINTER)
  with pytest.raises(OSError, match=rf"{shard.name}' is a git-lfs pointer"):
    TinyModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("name,data,found", [
    ("model.safetensors", b"", "is empty"), ("model.safetensors", b"\x05\x00\x00", "is 3 bytes"),
    ("flax_model.msgpack", b"", "is empty")])
def test_empty_and_short_files_say_what_was_expected(tmp_path, model, name, data, found):
  model.save_pretrained(tmp_path)
  for p in (tmp_path / "model.safetensors", tmp_path / CHECKSUMS_NAME):
    p.unlink()
  (tmp_path / name).write_bytes(data)
  with pytest.raises(OSError, match=rf"(?s){name}' {found}.*at least \d+ bytes.*download it again"):
    TinyModel.from_pretrained(tmp_path)


# --- the sha256 manifest ---------------------------------------------------------------------

def test_save_writes_a_sha256sum_manifest_of_every_weight_file(tmp_path, model):
  model.save_pretrained(tmp_path, max_shard_size=100)
  sums = read_checksums(tmp_path / CHECKSUMS_NAME)
  weight_files = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("model"))
  assert sorted(sums) == weight_files and len(weight_files) >= 3  # shards + index
  assert all(sums[name] == sha256_file(tmp_path / name) for name in weight_files)
  line = (tmp_path / CHECKSUMS_NAME).read_text().splitlines()[0]
  assert line == f"{sums[line[66:]]}  {line[66:]}"  # coreutils' `sha256sum -c` format


@pytest.mark.parametrize("sharded", [False, True])
def test_a_flipped_data_byte_is_reported_with_the_file(tmp_path, model, sharded):
  model.save_pretrained(tmp_path, **({"max_shard_size": 100} if sharded else {}))
  victim = sorted(tmp_path.glob("model*.safetensors"))[0]
  data = bytearray(victim.read_bytes())
  data[-3] ^= 0x10  # a data byte: safetensors itself loads this silently
  victim.write_bytes(bytes(data))
  with pytest.raises(OSError, match=rf"(?s){victim.name}' is damaged: its sha256 is [0-9a-f]{{64}}.*expects"):
    TinyModel.from_pretrained(tmp_path)
  unchecked = TinyModel.from_pretrained(tmp_path, verify_checksums=False)  # the opt-out
  assert not _same(unchecked.params, model.params)  # what the format alone lets through


def test_pipeline_loader_checks_and_passes_the_opt_out(tmp_path):
  from dalle_flax.pipelines.loading import DalleMiniPipelineModel
  folder = tmp_path / "pipe"
  DalleMiniPipelineModel.from_pretrained(TINY).save_pretrained(folder)
  victim = folder / "vqgan" / "model.safetensors"
  data = bytearray(victim.read_bytes())
  data[-1] ^= 1
  victim.write_bytes(bytes(data))
  with pytest.raises(OSError, match=r"vqgan/model.safetensors' is damaged"):
    DalleMiniPipelineModel.from_pretrained(folder)
  DalleMiniPipelineModel.from_pretrained(folder, verify_checksums=False)


def test_manifest_that_does_not_list_a_file_or_is_malformed(tmp_path, model):
  model.save_pretrained(tmp_path)
  manifest = tmp_path / CHECKSUMS_NAME
  manifest.write_text(f"{'0' * 64}  other.safetensors\n")
  with pytest.raises(OSError, match=r"does not list 'model.safetensors'"):
    TinyModel.from_pretrained(tmp_path)
  manifest.write_text("not a checksum line\n")
  with pytest.raises(OSError, match=r"malformed line 1.*expected '<64 hex digits>  <file name>'"):
    TinyModel.from_pretrained(tmp_path)
  manifest.write_bytes(b"0" * (2 << 20))
  with pytest.raises(OSError, match="at most 1 MiB"):
    TinyModel.from_pretrained(tmp_path)


def test_folders_without_a_manifest_still_load(tmp_path, model):
  model.save_pretrained(tmp_path)
  (tmp_path / CHECKSUMS_NAME).unlink()
  assert _same(TinyModel.from_pretrained(tmp_path).params, model.params)


def test_write_and_verify_checksums_round_trip(tmp_path):
  (tmp_path / "a.bin").write_bytes(b"abc")
  write_checksums(tmp_path, ["a.bin"])
  verify_checksums(tmp_path / CHECKSUMS_NAME, {"a.bin": tmp_path / "a.bin"})
  (tmp_path / "a.bin").write_bytes(b"abd")
  with pytest.raises(OSError, match="a.bin' is damaged"):
    verify_checksums(tmp_path / CHECKSUMS_NAME, {"a.bin": tmp_path / "a.bin"})


def test_a_failed_save_keeps_the_old_manifest_and_weights(tmp_path, model, monkeypatch):
  model.save_pretrained(tmp_path, max_shard_size=100)
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  real_add = StagedFiles.add
  calls = []

  def fail_on_third(self, name, data):
    calls.append(name)
    if len(calls) == 3:
      raise OSError(28, "No space left on device")
    real_add(self, name, data)

  monkeypatch.setattr(StagedFiles, "add", fail_on_third)
  with pytest.raises(OSError, match="No space left"):
    TinyModel(TinyConfig(), seed=3).save_pretrained(tmp_path, max_shard_size=100)
  assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files either
  assert _same(TinyModel.from_pretrained(tmp_path).params, model.params)


# --- shard names from an index may not leave the folder --------------------------------------

@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "sub/model.safetensors",
                                 "..", "C:\\x.safetensors"])
def test_index_shard_names_outside_the_folder_are_refused(tmp_path, model, bad):
  folder = tmp_path / "m"
  model.save_pretrained(folder, max_shard_size=100)
  (folder / CHECKSUMS_NAME).unlink()
  index = json.loads((folder / "model.safetensors.index.json").read_text())
  key = sorted(index["weight_map"])[0]
  index["weight_map"][key] = bad
  (folder / "model.safetensors.index.json").write_text(json.dumps(index))
  (tmp_path / "outside.safetensors").write_bytes(b"x" * 100)
  with pytest.raises(ValueError, match=r"not a plain file name.*Refusing to read outside the folder"):
    TinyModel.from_pretrained(folder)


def test_a_shard_symlinked_out_of_the_folder_is_refused(tmp_path, model):
  folder, elsewhere = tmp_path / "m", tmp_path / "elsewhere"
  model.save_pretrained(folder, max_shard_size=100)
  elsewhere.mkdir()
  shard = sorted(folder.glob("model-*.safetensors"))[0]
  target = elsewhere / shard.name
  shard.rename(target)
  shard.symlink_to(target)
  with pytest.raises(ValueError, match=rf"{shard.name}', which is a link to .*outside the folder"):
    TinyModel.from_pretrained(folder)
  inside = folder / "real.bin"
  target.rename(inside)
  shard.unlink()
  shard.symlink_to(inside.name)  # a link that stays inside the folder is fine
  assert _same(TinyModel.from_pretrained(folder).params, model.params)


def test_hub_cache_snapshot_links_to_its_blobs_are_allowed(tmp_path, model):
  repo = tmp_path / "models--me--tiny"
  snapshot, blobs = repo / "snapshots" / ("0" * 40), repo / "blobs"
  model.save_pretrained(snapshot, max_shard_size=100)
  blobs.mkdir()
  for path in sorted(snapshot.iterdir()):
    if path.name.startswith("model"):
      blob = blobs / sha256_file(path)
      path.rename(blob)
      path.symlink_to(os.path.relpath(blob, snapshot))
  assert _same(TinyModel.from_pretrained(snapshot).params, model.params)


# --- msgpack bombs ----------------------------------------------------------------------------

def _nested_maps(depth: int) -> bytes:
  return b"\x81\xa1k" * depth + msgpack.packb(1)


def _ndarray_ext(shape, dtype="<f4", data=b"") -> bytes:
  payload = msgpack.packb((shape, dtype, data), use_bin_type=True)
  return msgpack.packb({"params": {"w": msgpack.ExtType(1, payload)}}, use_bin_type=True)


BOMBS = {
    "nested 100k maps": _nested_maps(100_000),
    "nested 900 maps (under msgpack's limit)": _nested_maps(900),
    "map declaring 4G entries": b"\xdf\xff\xff\xff\xff" + b"\xa1k\x01",
    "str declaring 4 GB": b"\x81\xa1k\xdb\xff\xff\xff\xff" + b"x" * 10,
    "bin declaring 4 GB": b"\x81\xa1k\xc6\xff\xff\xff\xff" + b"x" * 10,
    "ext declaring 4 GB": b"\x81\xa1k\xc9\xff\xff\xff\xff\x01" + b"x" * 10,
    "array of 4G entries": b"\x81\xa1k\xdd\xff\xff\xff\xff" + b"\x01" * 10,
    "ndarray declaring 1e12 floats": _ndarray_ext((10**6, 10**6)),
    "ndarray with 100 dims": _ndarray_ext((1,) * 100, data=b"\x00" * 4),
    "ndarray of dtype object": _ndarray_ext((1,), dtype="|O", data=b"\x00" * 8),
    "leaf that is a string": msgpack.packb({"w": "not an array"}),
    "top level list": msgpack.packb([1, 2, 3]),
    "trailing garbage": serialization.msgpack_serialize({"w": np.ones(2, np.float32)}) + b"\x00",
}


@pytest.mark.parametrize("bomb", sorted(BOMBS))
def test_msgpack_bombs_are_refused_in_bounded_time_and_memory(tmp_path, bomb):
  path = tmp_path / "flax_model.msgpack"
  path.write_bytes(BOMBS[bomb])
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "tiny-file-checks", "width": 8}))
  tracemalloc.start()
  start = time.perf_counter()
  try:
    with pytest.raises(OSError, match=r"flax_model.msgpack'.*truncated or corrupted"):
      TinyModel.from_pretrained(tmp_path)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert elapsed < 10, f"{bomb}: {elapsed:.1f} s"  # a hang guard, not a speed target
  assert peak < 64 * 2**20 + 40 * len(BOMBS[bomb]), f"{bomb}: peak {peak / 2**20:.1f} MiB"


def test_a_safetensors_header_declaring_huge_tensors_is_refused(tmp_path):
  header = json.dumps({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}).encode()
  (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 16)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "tiny-file-checks", "width": 8}))
  with pytest.raises(OSError, match=r"model.safetensors'.*truncated or corrupted"):
    TinyModel.from_pretrained(tmp_path)


def test_staged_files_leave_nothing_behind_without_commit(tmp_path):
  with StagedFiles(tmp_path) as staged:
    staged.add("a.bin", b"1")
  assert list(tmp_path.iterdir()) == []
  with StagedFiles(tmp_path) as staged:
    staged.add("a.bin", b"1")
    order = []
    names = staged.commit(before_rename=lambda: order.append(sorted(p.name for p in Path(tmp_path).iterdir())))
  assert names == {"a.bin"} and (tmp_path / "a.bin").read_bytes() == b"1"
  assert order[0][0].startswith(".a.bin.")  # the hook ran while the file was still staged
