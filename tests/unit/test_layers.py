"""Layer helpers checked against hand-computed values."""

import jax
import numpy as np
import pytest

from dalle_flax.layers_dalle_mini import ACTIVATIONS, smelu


@pytest.mark.parametrize("beta, x, expected", [
    # beta = 1: below -beta the original gives beta/4 (the paper's SmeLU gives 0 there)
    (1.0, -3.0, 0.25),
    (1.0, -1.0, 0.25),          # boundary -beta belongs to the constant branch
    (1.0, -0.75, 0.015625),     # (0.25)^2 / 4: right of -beta the value has dropped from beta/4
    (1.0, -0.5, 0.0625),        # (0.5)^2 / 4
    (1.0, 0.0, 0.25),           # (1)^2 / 4
    (1.0, 0.5, 0.5625),         # (1.5)^2 / 4
    (1.0, 1.0, 1.0),            # boundary beta: identity branch
    (1.0, 2.5, 2.5),
    # beta = 2
    (2.0, -5.0, 0.5),
    (2.0, -2.0, 0.5),
    (2.0, 1.0, 1.125),          # (3)^2 / 8
    (2.0, 2.0, 2.0),
    (2.0, 3.0, 3.0),
])
def test_smelu_matches_the_original_dalle_mini_function(beta, x, expected):
  out = smelu(np.float32(x), beta)
  np.testing.assert_allclose(float(out), expected, rtol=1e-6, atol=1e-12)


def test_smelu_is_the_registered_activation_and_keeps_shape_and_dtype():
  x = np.array([[-3.0, -1.0, 0.0], [0.5, 1.0, 2.5]], np.float32)
  out = np.asarray(ACTIVATIONS["smelu"](x))
  assert out.shape == x.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, [[0.25, 0.25, 0.25], [0.5625, 1.0, 2.5]], rtol=1e-6)


@pytest.mark.parametrize("x, slope", [(-3.0, 0.0), (-0.5, 0.25), (0.0, 0.5), (0.5, 0.75), (1.0, 1.0), (2.0, 1.0)])
def test_smelu_gradient_is_the_derivative_of_the_function(x, slope):
  # 0 below -beta, (x + beta) / (2 beta) in between, 1 from beta on (beta = 1)
  np.testing.assert_allclose(float(jax.grad(smelu)(np.float32(x))), slope, rtol=1e-6)
