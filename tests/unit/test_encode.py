"""Encoding captioned images into VQGAN-code parquet shards: sources, preprocessing, skips,
shards, resume (simulated and a SIGKILLed CLI run), devices, processes, Hub push and the CLI."""

import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dalle_flax import FlaxVQGANModel, cli, from_pil
from dalle_flax.training import encode, sources
from dalle_flax.training.encode import INFO_NAME, encode_dataset, push_encoded_dataset
from dalle_flax.training.sources import Example, open_source

REPO = Path(__file__).resolve().parents[2]
TINY_VQGAN = REPO / "tests" / "fixtures" / "tiny-dalle-mini" / "vqgan"  # 64x64 -> 16 codes of 64


@pytest.fixture(scope="module")
def vqgan():
  return FlaxVQGANModel.from_pretrained(TINY_VQGAN)


def _pixels(width, height, seed, mode="RGB"):
  channels = {"RGB": 3, "RGBA": 4}.get(mode)
  shape = (height, width) if channels is None else (height, width, channels)
  return Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, np.uint8), mode)


def _folder(root, n=5, *, sizes=None, captions=True):
  """n random PNGs 00.png... (nested from the fourth on) with same-stem .txt captions."""
  for i in range(n):
    path = root / ("sub" if i >= 3 else "") / f"{i:02d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    _pixels(*(sizes[i] if sizes else (64 + 8 * i, 72)), seed=i).save(path)
    if captions:
      path.with_suffix(".txt").write_text(f"  caption {i}\n")
  return root


def _rows(out):
  return [row for shard in sorted(out.glob("*.parquet")) for row in pq.read_table(shard).to_pylist()]


def _shard_bytes(out):
  return {p.name: p.read_bytes() for p in sorted(out.glob("*.parquet"))}


def _run(src, out, vqgan, **kwargs):
  return encode_dataset(src, vqgan=vqgan, out=out, batch_size=kwargs.pop("batch_size", 4),
                        progress=False, **kwargs)


def _prepare(image, resolution=64, min_size=32):
  return encode._prepare(Example("x", lambda: image, lambda: "c"), resolution=resolution,
                         min_size=min_size)


# --- preprocessing and sources -------------------------------------------------------------------
def test_preprocessing_resizes_the_short_side_and_crops_the_centre():
  tall = _pixels(64, 160, seed=0)  # short side already 64: no resize; rows (160 - 64) / 2 = 48 on
  _, pixels, reason, _ = _prepare(tall)
  assert reason is None and pixels.dtype == np.float32 and pixels.shape == (64, 64, 3)
  np.testing.assert_array_equal(pixels, np.asarray(tall)[48:112] / np.float32(255))
  wide = _pixels(200, 100, seed=1)  # -> 128x64 by LANCZOS, then columns 32..96
  expected = np.asarray(wide.resize((128, 64), Image.Resampling.LANCZOS).crop((32, 0, 96, 64)))
  np.testing.assert_array_equal(_prepare(wide)[1], expected / np.float32(255))
  gray, rgba = _pixels(64, 64, 2, "L"), _pixels(64, 64, 3, "RGBA")
  np.testing.assert_array_equal(_prepare(gray)[1], np.repeat(np.asarray(gray)[..., None], 3, -1) / np.float32(255))
  np.testing.assert_array_equal(_prepare(rgba)[1], np.asarray(rgba)[..., :3] / np.float32(255))


def test_folder_source_is_recursive_and_sorted(tmp_path):
  _folder(tmp_path, 5)
  (tmp_path / "notes.md").write_text("not an image")
  src = open_source(tmp_path)
  assert src.kind == "folder" and [e.key for e in src.examples] == [
      "00.png", "01.png", "02.png", "sub/03.png", "sub/04.png"]
  assert src.examples[3].read_caption() == "caption 3"  # stripped
  assert src.examples[4].open_image().size == (96, 72)


def test_imagefolder_metadata_jsonl_and_csv_with_caption_column(tmp_path):
  _folder(tmp_path, 3, captions=False)
  rows = [{"file_name": f"{i:02d}.png", "text": f"text {i}", "caption": f"cap {i}"} for i in (2, 0, 1)]
  (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(ValueError, match="has both of the caption columns.*--caption-column"):
    open_source(tmp_path)
  src = open_source(tmp_path, caption_column="text")
  assert src.kind == "imagefolder" and [e.key for e in src.examples] == ["02.png", "00.png", "01.png"]
  assert [e.read_caption() for e in src.examples] == ["text 2", "text 0", "text 1"]
  assert open_source(tmp_path, caption_column="caption").examples[0].read_caption() == "cap 2"
  with pytest.raises(ValueError, match="'title' is not in .*columns are"):
    open_source(tmp_path, caption_column="title")
  (tmp_path / "metadata.jsonl").unlink()
  (tmp_path / "metadata.csv").write_text("file_name,text\n01.png,from csv\n")
  assert [(e.key, e.read_caption()) for e in open_source(tmp_path).examples] == [("01.png", "from csv")]


def _tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _png(image, fmt="PNG"):
  buffer = io.BytesIO()
  image.save(buffer, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
  return buffer.getvalue()


def test_webdataset_tar_shards(tmp_path):
  a, b, c = (_pixels(64, 64, seed) for seed in range(3))
  _tar(tmp_path / "shard-1.tar", [("x/a.png", _png(a)), ("x/a.txt", b"cat "), ("b.webp", _png(b, "WEBP")),
                                  ("b.txt", b"dog"), ("orphan.txt", b"no image")])
  _tar(tmp_path / "shard-0.tar", [("c.jpg", _png(c, "JPEG")), ("c.txt", "café".encode())])
  src = open_source(tmp_path)
  assert src.kind == "webdataset" and [e.key for e in src.examples] == [
      "shard-0.tar:c", "shard-1.tar:x/a", "shard-1.tar:b"]
  assert [e.read_caption() for e in src.examples] == ["café", "cat", "dog"]
  np.testing.assert_array_equal(np.asarray(src.examples[1].open_image()), np.asarray(a))
  np.testing.assert_array_equal(np.asarray(src.examples[2].open_image().convert("RGB")), np.asarray(b))
  assert [e.key for e in open_source(tmp_path / "shard-1.tar").examples] == ["shard-1.tar:x/a", "shard-1.tar:b"]


@pytest.mark.skipif(importlib.util.find_spec("datasets") is None,
                    reason="the optional datasets package is not installed (pip install datasets)")
def test_datasets_source_gives_the_folder_codes(tmp_path, vqgan):
  import datasets

  folder = _folder(tmp_path / "folder", 3)
  paths = sorted(str(p) for p in folder.rglob("*.png"))
  table = {"picture": paths, "label": [f"caption {i}" for i in range(3)], "other": [0, 1, 2]}
  dataset = datasets.Dataset.from_dict(table).cast_column("picture", datasets.Image())
  dataset.save_to_disk(str(tmp_path / "saved"))
  with pytest.raises(ValueError, match="image column 'image' is not in"):
    open_source(tmp_path / "saved")
  _run(tmp_path / "saved", tmp_path / "a", vqgan, image_column="picture", caption_column="label")
  _run(folder, tmp_path / "b", vqgan)
  assert _rows(tmp_path / "a") == _rows(tmp_path / "b")
  datasets.DatasetDict({"train": dataset, "test": dataset.select([2])}).save_to_disk(str(tmp_path / "dict"))
  summary = _run(tmp_path / "dict", tmp_path / "c", vqgan, image_column="picture", caption_column="label",
                 split="test")
  assert summary.num_inputs == 1 and _rows(tmp_path / "c") == _rows(tmp_path / "b")[2:]


def test_datasets_source_without_the_package_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(ImportError, match="pip install datasets"):
    open_source(tmp_path, source_type="datasets")


def test_source_type_forces_the_kind(tmp_path):
  _folder(tmp_path, 2)
  (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "01.png", "text": "meta"}) + "\n")
  assert [e.read_caption() for e in open_source(tmp_path).examples] == ["meta"]
  forced = open_source(tmp_path, source_type="folder")
  assert forced.kind == "folder" and [e.read_caption() for e in forced.examples] == ["caption 0", "caption 1"]
  with pytest.raises(ValueError, match=r"unknown source_type 'zip'; expected one of \['folder'"):
    open_source(tmp_path, source_type="zip")
  for kind in sources.SOURCE_TYPES:  # the CLI's choices (written out there to import nothing)
    assert cli.build_parser().parse_args(["encode", "S", "--vqgan", "V", "--out", "O",
                                          "--source-type", kind]).source_type == kind


def test_bad_sources_say_what_was_expected(tmp_path):
  with pytest.raises(ValueError, match="holds no images; expected a folder of images with same-stem"):
    open_source(tmp_path)
  _folder(tmp_path, 2, captions=False)
  with pytest.raises(ValueError, match=r"found 2 images .* but no captions; expected a same-stem \.txt"):
    open_source(tmp_path)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    open_source(tmp_path / "missing")
  (tmp_path / "data.zip").write_bytes(b"PK")
  with pytest.raises(ValueError, match="is a file but not a .tar shard"):
    open_source(tmp_path / "data.zip")
  (tmp_path / "metadata.jsonl").write_text(json.dumps({"path": "00.png", "text": "t"}) + "\n")
  with pytest.raises(ValueError, match="has no file_name column"):
    open_source(tmp_path)


# --- encoding ------------------------------------------------------------------------------------
def test_shards_hold_captions_and_the_vqgan_codes(tmp_path, vqgan):
  src = _folder(tmp_path / "src", 5)
  summary = _run(src, tmp_path / "out", vqgan)
  table = pq.read_table(tmp_path / "out" / "00000.parquet")
  assert table.schema.field("caption").type == pa.string()
  assert table.schema.field("encoding").type.value_type == pa.int32()
  images = [Image.open(p) for p in sorted(src.rglob("*.png"), key=lambda p: p.relative_to(src).as_posix())]
  expected = np.asarray(vqgan.encode(from_pil(images, size=64))[1])  # (5, 16)
  assert table.column("caption").to_pylist() == [f"caption {i}" for i in range(5)]
  np.testing.assert_array_equal(np.array(table.column("encoding").to_pylist()), expected)
  assert (summary.written, summary.num_shards, summary.shards_encoded, summary.complete) == (5, 1, 1, True)
  info = json.loads((tmp_path / "out" / INFO_NAME).read_text())
  assert info["vqgan"] | {"params_sha256": None} == {
      "name": "a FlaxVQGANModel instance", "params_sha256": None, "dtype": "float32",
      "resolution": 64, "codes_per_image": 16, "codebook_size": 64, "downsample_factor": 16}
  card = (tmp_path / "out" / "README.md").read_text()
  assert "| Rows | 5 of 5 inputs, in 1 parquet shards" in card and "| Skipped | none |" in card


def test_unusable_inputs_are_skipped_and_counted_or_raise(tmp_path, vqgan):
  src = _folder(tmp_path / "src", 2)
  _pixels(40, 90, seed=7).save(src / "small.png")  # shorter side 40 >= default min_size 32
  (src / "small.txt").write_text("small")
  _pixels(20, 64, seed=8).save(src / "tiny.png")
  (src / "tiny.txt").write_text("tiny")
  (src / "broken.png").write_bytes(_png(_pixels(64, 64, 9))[:60])  # truncated
  (src / "broken.txt").write_text("broken")
  _pixels(64, 64, seed=10).save(src / "uncaptioned.png")
  (src / "empty.png").write_bytes(_png(_pixels(64, 64, 11)))
  (src / "empty.txt").write_text("  \n")  # an empty caption is a blank caption, kept
  summary = _run(src, tmp_path / "a", vqgan)
  assert summary.skipped == {"no caption": 1, "unreadable image": 1, "too small": 1}
  assert [r["caption"] for r in _rows(tmp_path / "a")] == ["caption 0", "caption 1", "", "small"]
  assert "no caption: 1, unreadable image: 1, too small: 1" in (tmp_path / "a" / "README.md").read_text()
  summary = _run(src, tmp_path / "b", vqgan, min_size=41)
  assert summary.skipped["too small"] == 2 and "small" not in [r["caption"] for r in _rows(tmp_path / "b")]
  assert _run(src, tmp_path / "c", vqgan, min_size=0).written == 5
  with pytest.raises(ValueError, match=r"input 'broken.png' is unusable \(unreadable image.*on_bad_image='skip'"):
    _run(src, tmp_path / "d", vqgan, on_bad_image="error")


def test_shard_size_and_names_and_determinism(tmp_path, vqgan):
  src = _folder(tmp_path / "src", 7, sizes=[(64, 64)] * 7)
  _run(src, tmp_path / "a", vqgan, shard_size=3)
  assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
      "00000.parquet", "00001.parquet", "00002.parquet", "README.md", INFO_NAME]
  assert [pq.read_metadata(p).num_rows for p in sorted((tmp_path / "a").glob("*.parquet"))] == [3, 3, 1]
  _run(src, tmp_path / "b", vqgan, shard_size=3)
  assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
  assert (tmp_path / "a" / INFO_NAME).read_bytes() == (tmp_path / "b" / INFO_NAME).read_bytes()


def test_batch_size_sets_the_vqgan_batch(tmp_path, vqgan, monkeypatch):
  shapes = []
  real = encode._encode_codes
  monkeypatch.setattr(encode, "_encode_codes", lambda m, p, x: shapes.append(x.shape) or real(m, p, x))
  _run(_folder(tmp_path / "src", 5), tmp_path / "out", vqgan, batch_size=2)
  assert shapes == [(2, 64, 64, 3)] * 3  # 2 + 2 + 1 padded to 2


def test_resume_after_a_simulated_interruption(tmp_path, vqgan, monkeypatch):
  src = _folder(tmp_path / "src", 5)
  _run(src, tmp_path / "ref", vqgan, shard_size=2)
  real, calls = encode._write_shard, []

  def interrupted(path, *args):
    calls.append(path.name)
    if len(calls) == 2:  # dies while writing the second shard, as a kill would
      (path.parent / f".{path.name}.x.tmp").write_bytes(b"partial")
      raise KeyboardInterrupt
    real(path, *args)

  monkeypatch.setattr(encode, "_write_shard", interrupted)
  with pytest.raises(KeyboardInterrupt):
    _run(src, tmp_path / "out", vqgan, shard_size=2)
  assert [p.name for p in (tmp_path / "out").glob("*.parquet")] == ["00000.parquet"]
  monkeypatch.setattr(encode, "_write_shard", real)
  summary = _run(src, tmp_path / "out", vqgan, shard_size=2)
  assert (summary.shards_encoded, summary.shards_done, summary.written) == (2, 3, 5)
  assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "ref")
  assert not list((tmp_path / "out").glob(".*"))
  with pytest.raises(ValueError, match=r"other settings \(sharding.num_shards: 3 -> 2; sharding.shard_size: 2 -> 3\)"):
    _run(src, tmp_path / "out", vqgan, shard_size=3)
  with pytest.raises(ValueError, match=r"preprocessing.min_size: 32 -> 8\).*original settings"):
    _run(src, tmp_path / "out", vqgan, shard_size=2, min_size=8)
  _pixels(64, 64, 99).save(src / "new.png")
  (src / "new.txt").write_text("new")
  with pytest.raises(ValueError, match="source.num_inputs: 5 -> 6"):
    _run(src, tmp_path / "out", vqgan, shard_size=2)


def test_each_process_encodes_its_own_shards(tmp_path, vqgan, monkeypatch):
  src = _folder(tmp_path / "src", 5)
  _run(src, tmp_path / "ref", vqgan, shard_size=2)
  monkeypatch.setattr(encode, "_process_slot", lambda: (1, 2))
  summary = _run(src, tmp_path / "out", vqgan, shard_size=2)
  assert [p.name for p in (tmp_path / "out").glob("*.parquet")] == ["00001.parquet"]
  assert not summary.complete and "**Incomplete:** 1 of 3" in (tmp_path / "out" / "README.md").read_text()
  monkeypatch.setattr(encode, "_process_slot", lambda: (0, 2))
  summary = _run(src, tmp_path / "out", vqgan, shard_size=2)
  assert summary.complete and summary.shards_encoded == 2
  assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "ref")


def _subprocess_env(jax_cache, **extra):
  return {**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "true", "HF_HUB_OFFLINE": "1",
          "JAX_COMPILATION_CACHE_DIR": str(jax_cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          **extra}


def test_batches_are_split_over_local_devices(tmp_path, vqgan, jax_cache):
  src = _folder(tmp_path / "src", 5)
  _run(src, tmp_path / "ref", vqgan, batch_size=3)
  script = ("import jax, sys; from dalle_flax.training import encode; real = encode._encode_codes\n"
            "def spy(module, params, pixels):\n"
            "  assert pixels.shape[0] == 4 and pixels.sharding.shard_shape(pixels.shape)[0] == 1, pixels.sharding\n"
            "  return real(module, params, pixels)\n"
            "encode._encode_codes = spy; assert jax.local_device_count() == 4\n"
            "encode.encode_dataset(sys.argv[1], vqgan=sys.argv[2], out=sys.argv[3], batch_size=3, progress=False)")
  env = _subprocess_env(jax_cache, XLA_FLAGS="--xla_force_host_platform_device_count=4")
  subprocess.run([sys.executable, "-c", script, src, TINY_VQGAN, tmp_path / "out"], env=env,
                 check=True, timeout=300)
  assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "ref")


@pytest.mark.slow
def test_two_jax_processes_write_the_one_process_shards(tmp_path, vqgan, jax_cache):
  """A real jax.distributed cluster of two processes on this machine, no coordination beyond it."""
  src = _folder(tmp_path / "src", 5)
  _run(src, tmp_path / "ref", vqgan, shard_size=2)
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = ("import jax, sys; jax.distributed.initialize(f'127.0.0.1:{sys.argv[4]}', 2, int(sys.argv[5]))\n"
            "from dalle_flax.training.encode import encode_dataset\n"
            "encode_dataset(sys.argv[1], vqgan=sys.argv[2], out=sys.argv[3], batch_size=4, shard_size=2, "
            "progress=False)")
  argv = [sys.executable, "-c", script, str(src), str(TINY_VQGAN), str(tmp_path / "out"), str(port)]
  processes = [subprocess.Popen([*argv, str(i)], env=_subprocess_env(jax_cache, JAX_PLATFORMS="cpu"))
               for i in range(2)]
  assert [p.wait(timeout=300) for p in processes] == [0, 0]
  assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "ref")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe (POSIX)")
def test_cli_killed_mid_run_resumes_to_identical_shards(tmp_path, jax_cache, capsys):
  """The third image is a named pipe, so the run blocks there after writing shard 0: SIGKILL it."""
  src, ref = _folder(tmp_path / "src", 6, sizes=[(64, 64)] * 6), tmp_path / "ref"
  args = ["--vqgan", str(TINY_VQGAN), "--shard-size", "2", "--batch-size", "2", "--no-progress"]
  assert cli.main(["encode", str(src), "--out", str(ref), *args]) == 0
  assert "img/s" not in capsys.readouterr().err  # --no-progress
  real = (src / "02.png").read_bytes()
  (src / "02.png").unlink()
  os.mkfifo(src / "02.png")
  out = tmp_path / "out"
  process = subprocess.Popen([sys.executable, "-m", "dalle_flax.cli", "encode", str(src), "--out", str(out), *args],
                             env=_subprocess_env(jax_cache), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
  try:
    deadline = time.monotonic() + 300
    while not (out / "00000.parquet").exists():
      assert process.poll() is None, process.stderr.read().decode()
      assert time.monotonic() < deadline, "the first shard never appeared"
      time.sleep(0.05)
    time.sleep(0.2)
    assert process.poll() is None  # still blocked on the pipe, shards 1 and 2 not written
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
  assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet"]
  (src / "02.png").unlink()
  (src / "02.png").write_bytes(real)
  capsys.readouterr()
  assert cli.main(["encode", str(src), "--out", str(out), *args]) == 0
  assert "(3 of 3 shards; 2 encoded now at" in capsys.readouterr().out
  assert _shard_bytes(out) == _shard_bytes(ref)


# --- Hub and CLI ---------------------------------------------------------------------------------
def test_push_uploads_the_finished_folder(tmp_path, vqgan, local_hub, monkeypatch):
  """LocalHubServer has model repos only, so the real upload goes to a model repo; a recording
  HfApi checks that encode_dataset itself asks for a dataset repo."""
  out = tmp_path / "out"
  _run(_folder(tmp_path / "src", 3), out, vqgan)
  (out / ".00009.parquet.x.tmp").write_bytes(b"leftover")
  push_encoded_dataset(out, "local-user/encoded", repo_type="model")
  assert sorted(local_hub.api.list_repo_files("local-user/encoded")) == [
      ".gitattributes", "00000.parquet", "README.md", INFO_NAME]
  calls = []

  class RecordingApi:
    def __init__(self, token=None):
      calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
      calls.append(("create", repo_id, kwargs))
      return type("Url", (), {"repo_id": repo_id})

    def upload_folder(self, **kwargs):
      calls.append(("upload", kwargs))
      return type("Info", (), {"commit_url": "https://hub/commit/1"})

  monkeypatch.setattr(encode.huggingface_hub, "HfApi", RecordingApi)
  summary = _run(tmp_path / "src", tmp_path / "out2", vqgan, push_to_hub="me/data", token="tok", private=True)
  assert summary.pushed == "https://hub/commit/1" and calls[0] == ("init", "tok")
  assert calls[1] == ("create", "me/data", {"repo_type": "dataset", "private": True, "exist_ok": True})
  assert calls[2][1]["repo_type"] == "dataset" and calls[2][1]["folder_path"] == tmp_path / "out2"
  assert 'load_dataset("me/data", split="train")' in (tmp_path / "out2" / "README.md").read_text()


def test_cli_passes_every_flag(tmp_path, monkeypatch, capsys):
  seen = {}

  def fake(source, **kwargs):
    seen.update(kwargs, source=source)
    return encode.EncodeSummary(Path("o"), 9, 2, 2, 1, 7, {"too small": 2}, 1.0, 9.0, "https://c")

  monkeypatch.setattr(encode, "encode_dataset", fake)
  assert cli.main(["encode", "SRC", "--vqgan", "V", "--out", "O", "--source-type", "imagefolder",
                   "--image-column", "im", "--caption-column", "cap", "--split", "test",
                   "--batch-size", "3", "--shard-size", "5", "--min-size", "7", "--on-bad-image",
                   "error", "--push-to-hub", "me/d", "--private", "--no-progress"]) == 0
  assert seen == {"source": "SRC", "vqgan": "V", "out": Path("O"), "source_type": "imagefolder",
                  "image_column": "im", "caption_column": "cap", "split": "test", "batch_size": 3,
                  "shard_size": 5, "min_size": 7, "on_bad_image": "error", "push_to_hub": "me/d",
                  "private": True, "progress": False}
  assert capsys.readouterr().out.splitlines() == [
      "wrote 7 rows of 9 inputs to o (2 of 2 shards; 1 encoded now at 9.0 images/s)",
      "skipped: too small 2", "https://c"]
  assert cli.main(["encode", "SRC", "--vqgan", "V", "--out", "O"]) == 0
  assert (seen["batch_size"], seen["shard_size"], seen["min_size"], seen["on_bad_image"],
          seen["progress"], seen["private"]) == (64, 2048, None, "skip", True, None)


def test_cli_encodes_with_a_progress_bar_and_reports_errors(tmp_path, capsys):
  src = _folder(tmp_path / "src", 3)
  assert cli.main(["encode", str(src), "--vqgan", str(TINY_VQGAN), "--out", str(tmp_path / "out")]) == 0
  captured = capsys.readouterr()
  assert "img/s" in captured.err and "wrote 3 rows of 3 inputs" in captured.out
  assert cli.main(["encode", str(src), "--vqgan", str(TINY_VQGAN), "--out",
                   str(tmp_path / "x"), "--source-type", "webdataset"]) == 1
  assert "dalle-flax: error: webdataset source" in capsys.readouterr().err
