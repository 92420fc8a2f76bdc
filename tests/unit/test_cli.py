"""The ``dalle-flax`` command line: generate, convert, and its error handling."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dalle_flax
from dalle_flax import cli
from dalle_flax.pipelines import image_seeds

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny-dalle-mini"
SHARED = REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="module", autouse=True)
def _share_compilations(jax_cache):
  """Every CLI run loads the model again: compile it once (the plugin's on-disk jax cache)."""
  yield jax_cache


def run(argv, capsys):
  code = cli.main([str(a) for a in argv])
  captured = capsys.readouterr()
  return code, captured.out.splitlines(), captured.err


def test_default_model_is_the_bundled_shapes_pipeline(capsys):
  bundled = Path(dalle_flax.__file__).resolve().parent / "bundled" / "shapes"
  assert cli.default_model() == str(bundled)
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["generate", "--help"])
  assert exit_info.value.code == 0
  help_text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
  assert "bundledshapesmodel" in help_text and "--modeldalle-mini/dalle-mini" in help_text


def test_generate_writes_one_png_per_image(tmp_path, capsys):
  code, paths, err = run(["generate", "a red apple", "--num-images", "2", "--seed", "5", "--out", tmp_path,
                          "--no-progress"], capsys)
  assert code == 0, err
  seeds = image_seeds(5, 2)
  assert paths == [str(tmp_path / f"a-red-apple_{s}.png") for s in seeds]
  written = np.stack([np.asarray(Image.open(p)) for p in paths])
  pipe = dalle_flax.pipeline("text-to-image", model=cli.default_model())  # no --model: the bundled one
  pipe.set_progress_bar_config(disable=True)
  expected = np.stack([np.asarray(im) for im in pipe("a red apple", num_images_per_prompt=2, seed=5)])
  np.testing.assert_array_equal(written, expected)
  # the seed in a file name regenerates that image alone
  code, (alone,), _ = run(["generate", "a red apple", "--seed", seeds[1], "--out", tmp_path / "again",
                           "--no-progress"], capsys)
  assert code == 0
  np.testing.assert_array_equal(np.asarray(Image.open(alone)), expected[1])


def test_generate_grid_and_progress_bar(tmp_path, capsys):
  code, paths, err = run(["generate", "a red apple", "a blue car", "--num-images", "2", "--grid",
                          "--seed", "1", "--batch-size", "2", "--out", tmp_path], capsys)
  assert code == 0, err
  assert [Path(p).name for p in paths] == ["a-red-apple_grid_1.png",
                                           f"a-blue-car_grid_{image_seeds(1, 4)[2]}.png"]
  assert all(Image.open(p).size == (128, 64) for p in paths)
  assert "Generating image tokens" in err  # progress bar on by default, on stderr


def test_convert_round_trip(tmp_path, capsys):
  if not (SHARED / "dallebart-mini-like").is_dir():
    pytest.skip("the shared golden fixtures are not available")
  ignore = shutil.ignore_patterns("expected", "README.txt")
  text = shutil.copytree(SHARED / "dallebart-mini-like", tmp_path / "text", ignore=ignore)
  vqgan = shutil.copytree(SHARED / "vqgan-f16-like", tmp_path / "vqgan", ignore=ignore)
  for path in (text, vqgan, *text.iterdir(), *vqgan.iterdir()):
    path.chmod(0o755 if path.is_dir() else 0o644)
  code, lines, err = run(["convert", text, "--vqgan", vqgan, "--out", tmp_path / "pipe"], capsys)
  assert code == 0, err
  assert lines == [str(tmp_path / "pipe")]
  folder = tmp_path / "pipe"
  names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
  assert {"config.json", "model.safetensors", "generation_config.json", "vqgan/config.json",
          "vqgan/model.safetensors", "tokenizer.json", "processor_config.json", "README.md"} <= names
  assert not any(name.endswith(".msgpack") for name in names)
  outputs = []
  for model in (tmp_path / "pipe", TINY):  # the bundled folder was made the same way
    code, (path,), err = run(["generate", "a red apple", "--seed", "3", "--model", model,
                              "--out", tmp_path / model.name, "--no-progress"], capsys)
    assert code == 0, err
    outputs.append(np.asarray(Image.open(path)))
  np.testing.assert_array_equal(*outputs)
  # a text model alone needs --vqgan
  code, lines, err = run(["generate", "a red apple", "--model", text, "--out", tmp_path], capsys)
  assert code == 1 and lines == []
  assert err.startswith("dalle-flax: error:") and "--vqgan" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, message", [
    (["--num-images", "0"], "--num-images: expected an integer >= 1"),
    (["--top-p", "1.5"], "--top-p: expected a number in (0, 1]"),
    (["--temperature", "-1"], "--temperature: expected a number > 0"),
    (["--seed", "x"], "--seed: expected an integer"),
    (["--dtype", "float64"], "--dtype: invalid choice"),
])
def test_bad_flag_values_exit_2(flags, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["generate", "a red apple", *flags])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


class _NoSleep:
  """``time`` for huggingface_hub's retry loop, without the waits (5 retries, 23 s of sleeps)."""

  def __getattr__(self, name):
    return getattr(time, name)

  @staticmethod
  def sleep(seconds):
    pass


def test_bad_model_and_unreachable_hub_exit_1(tmp_path, capsys, local_hub, monkeypatch):
  code, lines, err = run(["generate", "a red apple", "--model", tmp_path / "nope"], capsys)
  assert (code, lines) == (1, [])
  assert err.startswith("dalle-flax: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1
  code, _, err = run(["generate", "a red apple", "--model", "someone/missing-repo"], capsys)
  assert code == 1 and "someone/missing-repo" in err and "not found" in err
  local_hub.server.stop()
  from huggingface_hub.utils import _http

  monkeypatch.setattr(_http, "time", _NoSleep())
  code, _, err = run(["generate", "a red apple", "--model", "someone/any-repo"], capsys)
  assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
  assert "Could not download" in err


def test_console_entry_point_subprocess(tmp_path):
  """The real entry point: a bad path exits 1 with one line on stderr, no traceback."""
  result = subprocess.run([sys.executable, "-m", "dalle_flax.cli", "generate", "a red apple", "--model",
                           str(tmp_path / "nope")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith("dalle-flax:")]
  assert len(errors) == 1 and "nope" in errors[0] and "Traceback" not in result.stderr


def test_generate_takes_guidance_from_the_generation_config(tmp_path, capsys):
  folder = tmp_path / "guided"
  shutil.copytree(TINY, folder)
  config_path = folder / "generation_config.json"
  settings = {**json.loads(config_path.read_text()), "guidance_scale": 3.0}
  config_path.write_text(json.dumps(settings))
  code, (path,), err = run(["generate", "a red apple", "--model", folder, "--seed", "4", "--out", tmp_path / "out",
                            "--no-progress"], capsys)
  assert code == 0, err
  pipe = dalle_flax.pipeline("text-to-image", model=TINY)
  pipe.set_progress_bar_config(disable=True)
  written = np.asarray(Image.open(path))
  np.testing.assert_array_equal(written, np.asarray(pipe("a red apple", seed=4, guidance_scale=3.0)[0]))
  assert (written != np.asarray(pipe("a red apple", seed=4)[0])).any()  # unguided differs


def test_generate_needs_no_train_extra_and_train_commands_say_how_to_get_it(tmp_path):
  """Without grain/optax/orbax/pyarrow (a plain `pip install dalle-flax`) the parser builds, so
  `generate` works, and train / train-vqgan name the extra to install."""
  code = textwrap.dedent("""
      import importlib.abc, sys
      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] in ("grain", "optax", "orbax", "pyarrow"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
      sys.meta_path.insert(0, Block())
      from dalle_flax import cli
      cli.build_parser()
      sys.exit(cli.main(sys.argv[1:]))
  """)
  for argv in (["train-vqgan", "vqgan.json"], ["train", "--model", "m", "--train-data", "d", "--output-dir", "o"]):
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 1, done.stderr
    assert f"dalle-flax: error: {argv[0]} needs the [train] extra" in done.stderr, done.stderr
    assert "pip install 'dalle-flax[train]'" in done.stderr and "Traceback" not in done.stderr
