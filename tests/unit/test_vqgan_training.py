"""VQGAN training: losses, straight-through gradients, dead-code restarts, resume, export, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw

pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")

from dalle_flax import FlaxVQGANModel  # noqa: E402
from dalle_flax.cli import main  # noqa: E402
from dalle_flax.configuration_vqgan import VQGANConfig  # noqa: E402
from dalle_flax.sharding import make_mesh  # noqa: E402
from dalle_flax.training import VQGANLossSettings, VQGANTrainingArguments, train_vqgan, vqgan_losses  # noqa: E402
from dalle_flax.training.optim import OptimizerSettings, build_optimizer  # noqa: E402
from dalle_flax.training.vqgan_step import (init_vqgan_state, make_vqgan_train_step,  # noqa: E402
                                            shard_images)
from dalle_flax.training.vqgan_trainer import image_batches, load_images  # noqa: E402

TINY = dict(resolution=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=32,
            n_embed=16, embed_dim=8)
COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255), (0, 0, 0)]


def _image(i: int) -> Image.Image:
  image = Image.new("RGB", (16, 16), COLOURS[i % len(COLOURS)])
  x = 2 + (i * 5) % 8
  ImageDraw.Draw(image).rectangle([x, 4, x + 6, 10], fill=COLOURS[(i + 2) % len(COLOURS)])
  return image


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
  root = tmp_path_factory.mktemp("images")
  for i in range(24):
    _image(i).save(root / f"{i:03d}.png")
  return root


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
  path = tmp_path_factory.mktemp("config") / "config.json"
  VQGANConfig(**TINY).to_json_file(str(path))
  return path


def _args(config_file: Path, data: Path, out: Path, **overrides) -> VQGANTrainingArguments:
  settings = dict(model=str(config_file), train_data=str(data), output_dir=str(out), train_batch_size=4,
                  max_steps=6, learning_rate=3e-3, logging_steps=1, save_steps=3, restart_steps=2)
  settings.update(overrides)
  return VQGANTrainingArguments(**settings)


def _losses(out: Path) -> list[tuple[int, float]]:
  lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in lines if "loss" in r]


def _tiny_model() -> FlaxVQGANModel:
  return FlaxVQGANModel(VQGANConfig(**TINY), seed=0)


def test_loss_terms_and_straight_through_gradients():
  model = _tiny_model()
  pixels = jnp.asarray(np.stack([np.asarray(_image(i)) for i in range(4)]) / 255.0, jnp.float32)
  settings = VQGANLossSettings()
  loss, aux = vqgan_losses(model.module, model.params, pixels, settings)
  expected = aux["reconstruction_loss"] + aux["codebook_loss"] + 0.25 * aux["commitment_loss"]
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # The codes are the exported quantizer's: encoding with the model gives the same ones.
  _, codes = model.encode(np.asarray(pixels))
  np.testing.assert_array_equal(aux["codes"], codes)
  # Reconstruction reaches the encoder (straight-through); the codebook term moves only the codebook.
  grads = jax.grad(lambda p: vqgan_losses(model.module, p, pixels, settings)[1]["reconstruction_loss"])(model.params)
  assert float(jnp.abs(grads["encoder"]["conv_in"]["kernel"]).sum()) > 0
  codebook_grads = jax.grad(lambda p: vqgan_losses(model.module, p, pixels, settings)[1]["codebook_loss"])(model.params)
  assert float(jnp.abs(codebook_grads["encoder"]["conv_in"]["kernel"]).sum()) == 0
  assert float(jnp.abs(codebook_grads["quantize"]["embedding"]["embedding"]).sum()) > 0


@pytest.mark.parametrize("knob", [{"commitment_weight": 1.0}, {"codebook_weight": 0.0}, {"reconstruction": "l2"}])
def test_loss_knobs_change_the_loss(knob):
  model = _tiny_model()
  pixels = jnp.asarray(np.stack([np.asarray(_image(i)) for i in range(4)]) / 255.0, jnp.float32)
  base, _ = vqgan_losses(model.module, model.params, pixels, VQGANLossSettings())
  changed, _ = vqgan_losses(model.module, model.params, pixels, VQGANLossSettings(**knob))
  assert abs(float(base) - float(changed)) > 1e-6


def test_dead_codes_restart_onto_batch_latents():
  model = _tiny_model()
  optimizer = build_optimizer(OptimizerSettings(learning_rate=0.0))  # only restarts change the codebook
  mesh = make_mesh(dp=1, mp=1)
  pixels = np.stack([np.asarray(_image(i)) for i in range(4)]).astype(np.float32) / 255.0
  latents = np.asarray(model.module.apply({"params": model.params}, pixels, method="encode_latents")).reshape(-1, 8)
  for restart_steps, expect_moved in ((1, True), (0, False)):
    state = init_vqgan_state(model, model.params, optimizer, mesh, seed=0)
    before = np.asarray(state.params["quantize"]["embedding"]["embedding"])
    step = make_vqgan_train_step(model, optimizer, mesh, VQGANLossSettings(restart_steps=restart_steps))
    state, metrics = step(state, shard_images(pixels, mesh))
    after = np.asarray(state.params["quantize"]["embedding"]["embedding"])
    if expect_moved:  # step 0: every code is dead, so each now sits on one of the batch's latents
      assert metrics["restarted"] == 16
      distances = np.abs(after[:, None, :] - latents[None]).max(-1).min(-1)
      assert distances.max() < 1e-5
    else:
      assert metrics["restarted"] == 0
      np.testing.assert_array_equal(after, before)


def test_train_reduces_loss_exports_and_card(config_file, image_folder, tmp_path):
  out = tmp_path / "run"
  result = train_vqgan(_args(config_file, image_folder, out, max_steps=40, save_steps=40, eval_data=str(image_folder),
                             eval_steps=40, num_samples=4))
  losses = [loss for _, loss in _losses(out)]
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])
  vqgan = FlaxVQGANModel.from_pretrained(out)
  assert vqgan.config.n_embed == 16
  pixels = load_images(str(image_folder), 16).astype(np.float32) / 255.0
  untrained, _ = FlaxVQGANModel(VQGANConfig(**TINY), seed=0)(pixels)
  reconstructed, _ = vqgan(pixels)
  mse = float(np.mean((np.asarray(reconstructed) - pixels) ** 2))
  assert mse < 0.5 * float(np.mean((np.asarray(untrained) - pixels) ** 2))
  # The eval metrics are those of the exported weights on the same images.
  assert result.eval is not None
  np.testing.assert_allclose(result.eval["eval_mse"], mse, rtol=1e-4)
  np.testing.assert_allclose(result.eval["eval_psnr"], -10 * np.log10(mse), rtol=1e-4)
  assert (out / "samples" / "step_0000040.png").is_file()
  with Image.open(out / "samples" / "step_0000040.png") as grid:
    assert grid.size == (4 * 16, 2 * 16)
  card = (out / "README.md").read_text()
  assert "## Training" in card and "40 x 4" in card


def test_resume_continues_exactly(config_file, image_folder, tmp_path):
  straight, split = tmp_path / "straight", tmp_path / "split"
  train_vqgan(_args(config_file, image_folder, straight))
  train_vqgan(_args(config_file, image_folder, split, max_steps=3))
  result = train_vqgan(_args(config_file, image_folder, split))
  assert result.resumed_from == 3
  assert _losses(split) == _losses(straight)
  a, b = (FlaxVQGANModel.from_pretrained(p).params for p in (straight, split))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_resume_refuses_other_settings(config_file, image_folder, tmp_path):
  out = tmp_path / "run"
  train_vqgan(_args(config_file, image_folder, out, max_steps=3))
  with pytest.raises(ValueError, match="train_batch_size"):
    train_vqgan(_args(config_file, image_folder, out, train_batch_size=8))


def test_fine_tune_starts_from_the_weights(image_folder, tmp_path):
  base = _tiny_model()
  base.save_pretrained(tmp_path / "base")
  out = tmp_path / "tuned"
  train_vqgan(VQGANTrainingArguments(model=str(tmp_path / "base"), train_data=str(image_folder), output_dir=str(out),
                                     train_batch_size=4, max_steps=1, learning_rate=0.0, restart_steps=0))
  tuned = FlaxVQGANModel.from_pretrained(out)
  jax.tree.map(np.testing.assert_array_equal, tuned.params, base.params)


def test_batches_are_seeded_and_split_over_processes(image_folder):
  images = load_images(str(image_folder), 16)
  assert images.shape == (24, 16, 16, 3) and images.dtype == np.uint8
  one = next(iter(image_batches(images, 8, seed=0)))
  again = next(iter(image_batches(images, 8, seed=0)))
  other = next(iter(image_batches(images, 8, seed=1)))
  np.testing.assert_array_equal(one, again)
  assert not np.array_equal(one, other)
  halves = [next(iter(image_batches(images, 4, seed=0, process_slice=(i, 2)))) for i in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), one)


@pytest.mark.parametrize("overrides, match", [
    (dict(train_batch_size=32), "fewer than one batch"),
    (dict(resolution=15), "multiple of the VQGAN's downsampling factor 2"),
    (dict(mesh="dp=1,mp=2"), "data-parallel only"),
    (dict(reconstruction="l3"), "reconstruction must be one of"),
    (dict(max_steps=0), "max_steps must be an int >= 1"),
])
def test_bad_settings_fail_clearly_before_training(config_file, image_folder, tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    train_vqgan(_args(config_file, image_folder, tmp_path / "run", **overrides))
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_train_vqgan(config_file, image_folder, tmp_path, capsys):
  out = tmp_path / "cli"
  settings = tmp_path / "settings.json"
  settings.write_text(json.dumps({"train_batch_size": 4, "max_steps": 2, "logging_steps": 1}))
  code = main(["train-vqgan", str(settings), "--model", str(config_file), "--train-data", str(image_folder),
               "--output-dir", str(out), "--max-steps", "3", "--commitment-weight", "0.5"])
  assert code == 0
  assert "trained 3 steps" in capsys.readouterr().out
  recorded = json.loads((out / "training_args.json").read_text())
  assert recorded["max_steps"] == 3 and recorded["commitment_weight"] == 0.5 and recorded["train_batch_size"] == 4
  assert FlaxVQGANModel.from_pretrained(out).config.resolution == 16


def test_quantize_from_step_decodes_unquantized_latents_first():
  model = _tiny_model()
  pixels = jnp.asarray(np.stack([np.asarray(_image(i)) for i in range(4)]) / 255.0, jnp.float32)
  settings = VQGANLossSettings()
  latents = model.module.apply({"params": model.params}, pixels, method="encode_latents")
  expected = model.module.apply({"params": model.params}, latents, method="decode")
  _, continuous = vqgan_losses(model.module, model.params, pixels, settings, quantized=False)
  _, quantized = vqgan_losses(model.module, model.params, pixels, settings, quantized=True)
  np.testing.assert_allclose(continuous["reconstruction_loss"], jnp.mean(jnp.abs(expected - pixels)), rtol=1e-5)
  assert abs(float(continuous["reconstruction_loss"]) - float(quantized["reconstruction_loss"])) > 1e-6
  # In training: steps before quantize_from_step decode continuously, then the codebook restarts from data.
  optimizer = build_optimizer(OptimizerSettings(learning_rate=0.0))
  mesh = make_mesh(dp=1, mp=1)
  state = init_vqgan_state(model, model.params, optimizer, mesh, seed=0)
  step = make_vqgan_train_step(model, optimizer, mesh, VQGANLossSettings(quantize_from_step=2, restart_steps=100))
  batch = shard_images(np.asarray(pixels), mesh)
  losses, restarted = [], []
  for _ in range(3):
    state, metrics = step(state, batch)
    losses.append(float(metrics["reconstruction_loss"]))
    restarted.append(int(metrics["restarted"]))
  np.testing.assert_allclose(losses[:2], float(continuous["reconstruction_loss"]), rtol=1e-5)
  assert restarted == [16, 0, 16]
