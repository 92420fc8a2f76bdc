"""VQGAN against outputs of the original vqgan-jax (fixture ``vqgan-f16-like``, CPU, float32).

The fixture is a tiny f16-layout VQModel saved by vqgan-jax itself (config.json without
model_type, flax_model.msgpack) with every formerly-constant leaf perturbed, so a swapped
scale/bias, a wrong block/attention order or a wrong upsampling shows up. Tolerances are the
fixture README's: integer codes exact, floats allclose(atol=1e-4, rtol=1e-4).
"""

from pathlib import Path

import jax
import numpy as np
import pytest

from dalle_flax import FlaxVQGANModel, VQGANConfig
from dalle_flax.modeling_flax_utils import flatten_params

pytestmark = pytest.mark.golden

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures"
FOLDER = FIXTURES / "vqgan-f16-like"
TOLERANCE = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def vqgan():
  if not (FOLDER / "flax_model.msgpack").is_file():
    pytest.skip(f"golden fixture folder {FOLDER} is absent (it lives in ../shared/fixtures)")
  return FlaxVQGANModel.from_pretrained(FOLDER)


@pytest.fixture(scope="module")
def expected(vqgan):
  return dict(np.load(FOLDER / "expected" / "vqgan_outputs.npz"))


def test_loads_legacy_folder_with_the_reference_tree(vqgan):
  assert type(vqgan.config) is VQGANConfig and vqgan.config.ch_mult == (1, 1, 1, 1, 2)
  reference = {}
  for line in (FOLDER / "expected" / "param_tree.txt").read_text().splitlines():
    path, shape, dtype = line.split("\t")
    reference[path] = (tuple(int(d) for d in shape.strip("(,)").split(",") if d.strip()), dtype)
  ours = {k: (tuple(v.shape), str(v.dtype)) for k, v in flatten_params(vqgan.params).items()}
  assert ours == reference
  assert vqgan.num_parameters() == 963_763


def test_decode_code(vqgan, expected):
  images = np.asarray(vqgan.decode_code(expected["codes"]))
  assert images.shape == (2, 64, 64, 3)
  np.testing.assert_allclose(images, expected["decode_code_images"], **TOLERANCE)
  np.testing.assert_allclose(images, expected["decode_code_images_jit"], **TOLERANCE)


def test_encode(vqgan, expected):
  # The fixture's inputs are in [-1, 1] (taming's range); the network does not care which.
  latents, codes = vqgan.encode(expected["encode_input_images"])
  np.testing.assert_array_equal(np.asarray(codes), expected["encode_indices"])
  np.testing.assert_allclose(np.asarray(latents), expected["encode_quant_states"], **TOLERANCE)
  encode_latents = jax.jit(lambda p, x: vqgan.module.apply({"params": p}, x, method="encode_latents"))
  pre_quant = encode_latents(vqgan.params, expected["encode_input_images"])
  np.testing.assert_allclose(np.asarray(pre_quant), expected["encode_pre_quant_latent"], **TOLERANCE)


def test_reconstruction(vqgan, expected):
  reconstruction, codes = vqgan(expected["encode_input_images"])
  np.testing.assert_array_equal(np.asarray(codes), expected["call_indices"])
  np.testing.assert_allclose(np.asarray(reconstruction), expected["call_reconstruction"], **TOLERANCE)
