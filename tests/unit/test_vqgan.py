"""VQGAN: config, parameter tree, encode/decode, seamless grids, image helpers, save/load, Hub."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from flax.jax_utils import replicate
from huggingface_hub.errors import StrictDataclassError
from PIL import Image
from transformers import AutoConfig

from dalle_flax import FlaxVQGANModel, VQGANConfig, make_image_grid
from dalle_flax.configuration_vqgan import register
from dalle_flax.image_utils import from_pil, to_pil, to_uint8
from dalle_flax.modeling_flax_utils import flatten_params
from dalle_flax.modeling_flax_vqgan import Upsample, _decode_code_map

F16_16384 = dict(ch=128, out_ch=3, in_channels=3, num_res_blocks=2, resolution=256, z_channels=256,
                 ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,), n_embed=16384, embed_dim=256,
                 dropout=0.0, double_z=False, resamp_with_conv=True, give_pre_end=False)

# Two levels (downsampling factor 2) with attention at the lower one and a channel change, so
# nin_shortcut, attention, down- and upsampling all run: 8x8 images <-> 4x4 = 16 codes.
TINY = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=8, attn_resolutions=[4],
            z_channels=32, embed_dim=8, n_embed=16)


@pytest.fixture(scope="module")
def tiny():
  return FlaxVQGANModel(VQGANConfig(**TINY), seed=0)


def _pixels(batch=2, side=8, seed=0):
  return np.random.RandomState(seed).uniform(0, 1, (batch, side, side, 3)).astype(np.float32)


def _codes(batch=2, n=16, n_embed=16, seed=0):
  return np.random.RandomState(seed).randint(0, n_embed, (batch, n)).astype(np.int32)


# --- config -------------------------------------------------------------------------------
def test_config_defaults_are_the_released_f16_16384():
  config = VQGANConfig()
  assert {k: getattr(config, k) for k in F16_16384} == F16_16384
  assert config.model_type == "vqgan"
  assert (config.num_resolutions, config.downsample_factor, config.latent_resolution) == (5, 16, 16)


def test_legacy_config_without_model_type_loads(tmp_path):
  legacy = {"architectures": ["del"], "attn_resolutions": [4], "ch": 32, "ch_mult": [1, 1, 1, 1, 2],
            "double_z": False, "dropout": 0.0, "embed_dim": 16, "give_pre_end": False,
            "in_channels": 3, "n_embed": 64, "num_res_blocks": 1, "num_resolutions": 5, "out_ch": 3,
            "resamp_with_conv": True, "resolution": 64, "transformers_version": "4.25.1",
            "z_channels": 32}
  (tmp_path / "config.json").write_text(json.dumps(legacy))
  for config in (VQGANConfig.from_dict(dict(legacy)), VQGANConfig.from_pretrained(tmp_path)):
    assert isinstance(config, VQGANConfig)
    assert config.ch_mult == (1, 1, 1, 1, 2) and config.num_resolutions == 5
    assert config.attn_resolutions == (4,) and config.n_embed == 64
  # Saved back with a model_type, which AutoConfig then resolves to our class.
  config.save_pretrained(tmp_path / "ours")
  saved = json.loads((tmp_path / "ours" / "config.json").read_text())
  assert saved["model_type"] == "vqgan" and saved["ch_mult"] == [1, 1, 1, 1, 2]
  assert "num_resolutions" not in saved
  again = AutoConfig.from_pretrained(tmp_path / "ours")
  assert type(again) is VQGANConfig
  drop_path = lambda c: {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}
  assert drop_path(again) == drop_path(config)


def test_register_is_idempotent():
  register()
  register()
  assert type(AutoConfig.for_model("vqgan")) is VQGANConfig


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(ch=48), StrictDataclassError, "multiple of 32"),
    (dict(ch_mult=[]), StrictDataclassError, "at least one"),
    (dict(ch_mult=[1, 0]), StrictDataclassError, r"ch_mult\[1\] must be a positive integer"),
    (dict(attn_resolutions=[7]), StrictDataclassError, r"sides are \[256, 128, 64, 32, 16\]"),
    (dict(resolution=100), StrictDataclassError, "divisible by 2"),
    (dict(n_embed=0), StrictDataclassError, "n_embed must be a positive integer"),
    (dict(dropout=1.5), StrictDataclassError, r"dropout must lie in \[0, 1\)"),
    (dict(ch="128"), StrictDataclassError, "expected int, got str"),
    (dict(double_z=1), StrictDataclassError, "expected bool"),
    (dict(ch_mult=[1, "2"]), StrictDataclassError, "ch_mult"),
    (dict(num_resolutions=4), ValueError, "num_resolutions=4 but ch_mult"),
    (dict(ch=24, norm_num_groups=16), StrictDataclassError, "norm_num_groups=16 groups.*multiple of 16"),
    (dict(norm_num_groups=0), StrictDataclassError, "norm_num_groups must be a positive integer"),
])
def test_config_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    VQGANConfig(**kwargs)


def test_norm_num_groups_is_used_and_saved(tiny, tmp_path):
  """32 groups by default (the released models); another count keeps the parameters (GroupNorm's
  are per channel) but changes the outputs, and survives save/load."""
  assert VQGANConfig().norm_num_groups == 32 and tiny.config.norm_num_groups == 32
  grouped = FlaxVQGANModel(VQGANConfig(**dict(TINY, norm_num_groups=4)), params=tiny.params)
  codes = np.arange(16, dtype=np.int32).reshape(1, 16)
  decoded = np.asarray(grouped.decode_code(codes))
  assert not np.allclose(np.asarray(tiny.decode_code(codes)), decoded, atol=1e-3)
  grouped.save_pretrained(tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["norm_num_groups"] == 4
  np.testing.assert_array_equal(np.asarray(FlaxVQGANModel.from_pretrained(tmp_path).decode_code(codes)), decoded)


# --- parameter tree -----------------------------------------------------------------------
def _expected_f16_paths():
  """The released f16_16384 leaf paths, written from the reference layout (§4.1), not our code."""
  conv, norm = ("kernel", "bias"), ("scale", "bias")
  paths = []

  def add(prefix, names, leaves):
    paths.extend(f"{prefix}/{n}/{leaf}" for n in names for leaf in leaves)

  def block(prefix, shortcut):
    add(prefix, ["norm1", "norm2"], norm)
    add(prefix, ["conv1", "conv2"] + (["nin_shortcut"] if shortcut else []), conv)

  def attn(prefix):
    add(prefix, ["norm"], norm)
    add(prefix, ["q", "k", "v", "proj_out"], conv)

  for side in ("encoder", "decoder"):
    add(side, ["conv_in", "conv_out"], conv)
    add(side, ["norm_out"], norm)
    for mid in ("block_1", "block_2"):
      block(f"{side}/mid/{mid}", False)
    attn(f"{side}/mid/attn_1")
  # Encoder: 128->128, 128->128, 128->256 (shortcut), 256->256, 256->512 (shortcut, attention).
  for i, first_shortcut in enumerate([False, False, True, False, True]):
    for j in range(2):
      block(f"encoder/down_{i}/block_{j}", first_shortcut and j == 0)
      if i == 4:
        attn(f"encoder/down_{i}/attn_{j}")
    if i != 4:
      add(f"encoder/down_{i}/downsample", ["conv"], conv)
  # Decoder: up_4 512->512 (attention), up_3 512->256, up_2 256->256, up_1 256->128, up_0 128->128.
  for i, first_shortcut in enumerate([False, True, False, True, False]):
    for j in range(3):
      block(f"decoder/up_{i}/block_{j}", first_shortcut and j == 0)
      if i == 4:
        attn(f"decoder/up_{i}/attn_{j}")
    if i != 0:
      add(f"decoder/up_{i}/upsample", ["conv"], conv)
  add("", ["quant_conv", "post_quant_conv"], conv)
  paths.append("quantize/embedding/embedding")
  return sorted(p.lstrip("/") for p in paths)


def test_real_f16_16384_parameter_tree_under_eval_shape():
  model = FlaxVQGANModel(VQGANConfig(), _do_init=False)
  assert model.params is None
  flat = flatten_params(model.params_shape_tree)  # jax.eval_shape: nothing is allocated
  assert len(flat) == 343
  assert sorted(flat) == _expected_f16_paths()
  assert model.num_parameters() == 76_073_859
  count = lambda keys: sum(math.prod(flat[k].shape) for k in keys)
  assert count(k for k in flat if k.startswith(("encoder/", "quant_conv/"))) == 29_363_968
  assert count(k for k in flat if not k.startswith(("encoder/", "quant_conv/"))) == 46_709_891
  shapes = {
      "encoder/conv_in/kernel": (3, 3, 3, 128),
      "encoder/down_2/block_0/nin_shortcut/kernel": (1, 1, 128, 256),
      "encoder/down_4/attn_1/q/kernel": (1, 1, 512, 512),
      "encoder/conv_out/kernel": (3, 3, 512, 256),
      "quant_conv/kernel": (1, 1, 256, 256),
      "quantize/embedding/embedding": (16384, 256),
      "decoder/conv_in/kernel": (3, 3, 256, 512),
      "decoder/up_1/block_0/nin_shortcut/kernel": (1, 1, 256, 128),
      "decoder/up_4/upsample/conv/kernel": (3, 3, 512, 512),
      "decoder/norm_out/scale": (128,),
      "decoder/conv_out/kernel": (3, 3, 128, 3),
  }
  assert {k: tuple(flat[k].shape) for k in shapes} == shapes
  assert all(leaf.dtype == jnp.float32 for leaf in flat.values())


def test_no_params_error():
  model = FlaxVQGANModel(VQGANConfig(**TINY), _do_init=False)
  with pytest.raises(ValueError, match="has no parameters"):
    model.decode_code(_codes())


# --- encode / decode ----------------------------------------------------------------------
def test_encode_decode_shapes_and_quantisation(tiny):
  pixels = _pixels()
  latents, codes = tiny.encode(pixels)
  assert latents.shape == (2, 4, 4, 8) and latents.dtype == jnp.float32
  assert codes.shape == (2, 16) and codes.dtype == jnp.int32
  codebook = np.asarray(tiny.params["quantize"]["embedding"]["embedding"], np.float64)
  np.testing.assert_array_equal(np.asarray(latents).reshape(-1, 8), codebook[np.asarray(codes).ravel()])
  # codes are the nearest entries (brute force, float64), row-major over the 4x4 map
  encode_latents = jax.jit(lambda p, x: tiny.module.apply({"params": p}, x, method="encode_latents"))
  pre = np.asarray(encode_latents(tiny.params, pixels), np.float64)
  distances = ((pre.reshape(-1, 1, 8) - codebook[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(codes).ravel(), distances.argmin(1))
  images = tiny.decode_code(codes)
  assert images.shape == (2, 8, 8, 3) and images.dtype == jnp.float32
  reconstruction, call_codes = tiny(pixels)
  np.testing.assert_array_equal(np.asarray(call_codes), np.asarray(codes))
  np.testing.assert_allclose(np.asarray(reconstruction), np.asarray(images), atol=1e-6)


def test_decode_is_batched(tiny):
  codes = _codes(batch=3)
  images = np.asarray(tiny.decode_code(codes))
  assert images.shape == (3, 8, 8, 3)
  np.testing.assert_allclose(np.asarray(tiny.decode_code(codes[1:2]))[0], images[1], atol=1e-5)


def test_decode_unclipped_and_params_argument(tiny):
  codes = _codes()
  other = FlaxVQGANModel(tiny.config, seed=1).params
  a, b = np.asarray(tiny.decode_code(codes)), np.asarray(tiny.decode_code(codes, params=other))
  assert not np.allclose(a, b)
  assert a.min() < 0 or a.max() > 1  # random weights decode outside [0, 1]: nothing clips


@pytest.mark.parametrize("codes, error, match", [
    (np.full((1, 16), 16), ValueError,
     r"code 16 at index \(0, 0\) is outside the codebook \[0, 16\).*drop the start token"),
    (np.array([[0] * 15 + [-1]]), ValueError, r"code -1 at index \(0, 15\).*n_embed=16"),
    (np.zeros((1, 17), np.int32), ValueError, "not a square number.*drop the start token"),
    (np.zeros((1, 15), np.int32), ValueError, "not a square number"),
    (np.zeros((16,), np.int32), ValueError, r"add a batch axis with codes\[None\]"),
    (np.zeros((1, 16), np.float32), TypeError, "must be integer"),
])
def test_decode_code_rejects_bad_codes(tiny, codes, error, match):
  with pytest.raises(error, match=match):
    tiny.decode_code(codes)


@pytest.mark.parametrize("pixels, error, match", [
    (np.zeros((1, 8, 8, 3), np.uint8), TypeError, "must be floats in"),
    (np.full((1, 8, 8, 3), 200.0, np.float32), ValueError, "divide 0-255"),
    (np.zeros((8, 8, 3), np.float32), ValueError, r"pixels\[None\]"),
    (np.zeros((1, 3, 8, 8), np.float32), ValueError, "channels last"),
    (np.zeros((1, 9, 8, 3), np.float32), ValueError, "multiples of 2"),
    (np.full((1, 8, 8, 3), np.nan, np.float32), ValueError, "NaN"),
])
def test_encode_rejects_bad_pixels(tiny, pixels, error, match):
  with pytest.raises(error, match=match):
    tiny.encode(pixels)


def test_encode_accepts_jax_arrays(tiny):
  pixels = _pixels()
  np.testing.assert_array_equal(np.asarray(tiny.encode(jnp.asarray(pixels))[1]),
                                np.asarray(tiny.encode(pixels)[1]))


def test_jit_equals_no_jit(tiny):
  codes = _codes(batch=1)
  jitted = np.asarray(tiny.decode_code(codes))
  with jax.disable_jit():
    eager = np.asarray(tiny.decode_code(codes))
  np.testing.assert_allclose(eager, jitted, atol=1e-5, rtol=1e-5)


def test_decode_code_and_encode_under_user_jit_equal_eager(tiny):
  codes = _codes()
  eager = np.asarray(tiny.decode_code(codes))
  jitted = jax.jit(lambda c, p: tiny.decode_code(c, params=p))(jnp.asarray(codes), tiny.params)
  np.testing.assert_allclose(np.asarray(jitted), eager, atol=1e-5, rtol=1e-5)
  seamless = jax.jit(lambda c: tiny.decode_seamless(c, 1, 2))(jnp.asarray(codes))
  np.testing.assert_allclose(np.asarray(seamless), np.asarray(tiny.decode_seamless(codes, 1, 2)), atol=1e-5)
  pixels = _pixels()
  _, jit_codes = jax.jit(tiny.encode)(jnp.asarray(pixels))
  np.testing.assert_array_equal(np.asarray(jit_codes), np.asarray(tiny.encode(pixels)[1]))
  # traced inputs still get the shape and dtype checks
  with pytest.raises(ValueError, match=r"add a batch axis with codes\[None\]"):
    jax.jit(tiny.decode_code)(jnp.zeros((16,), jnp.int32))


def test_decode_code_under_pmap_like_the_original_notebook(tiny):
  # dalle-mini's inference notebook: p_decode = jax.pmap(lambda indices, params:
  # vqgan.decode_code(indices, params=params)), called with replicated params.
  devices = jax.local_device_count()
  codes = _codes(batch=2 * devices).reshape(devices, 2, 16)
  p_decode = jax.pmap(lambda indices, params: tiny.decode_code(indices, params=params))
  params = replicate(tiny.params)  # flax.jax_utils, as in the notebook
  images = np.asarray(p_decode(jnp.asarray(codes), params))
  assert images.shape == (devices, 2, 8, 8, 3)
  eager = np.asarray(tiny.decode_code(codes.reshape(-1, 16))).reshape(images.shape)
  np.testing.assert_allclose(images, eager, atol=1e-5, rtol=1e-5)


def test_eager_decode_code_still_rejects_out_of_range_jax_codes(tiny):
  with pytest.raises(ValueError, match=r"code 16 at index \(0, 3\) is outside the codebook"):
    tiny.decode_code(jnp.asarray([[0, 1, 2, 16] + [0] * 12], jnp.int32))


def test_compiled_once_per_shape_and_shared_by_equal_models(tiny):
  codes = _codes(batch=1)
  tiny.decode_code(codes)
  size = _decode_code_map._cache_size()
  tiny.decode_code((codes + 1) % 16)  # same shape: no new compilation
  twin = FlaxVQGANModel(tiny.config, jax.tree.map(lambda x: x * 1.5, tiny.params))
  twin.decode_code(codes)  # equal module, other params: params are arguments, not constants
  assert _decode_code_map._cache_size() == size
  tiny.decode_code(_codes(batch=2, n=4))  # a new shape compiles once more
  assert _decode_code_map._cache_size() == size + 1


def test_upsample_matches_jax_image_resize_nearest():
  x = jnp.asarray(np.random.RandomState(0).randn(2, 3, 5, 4), jnp.float32)
  ours = Upsample(with_conv=False).apply({}, x)
  np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.image.resize(x, (2, 6, 10, 4), "nearest")))


def test_dtype_and_param_dtype(tiny):
  bf16 = FlaxVQGANModel(tiny.config, tiny.params, dtype=jnp.bfloat16)
  codes = _codes()
  images = np.asarray(bf16.decode_code(codes))
  assert images.dtype == np.float32
  reference = np.asarray(tiny.decode_code(codes))
  assert np.abs(images - reference).max() < 0.1 * np.abs(reference).max()
  assert np.abs(images - reference).max() > 0  # the compute dtype was really bfloat16
  model = FlaxVQGANModel(tiny.config, param_dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree.leaves(model.params)} == {jnp.dtype(jnp.bfloat16)}


# --- seamless grids -----------------------------------------------------------------------
def test_seamless_grid_layout_and_shape(tiny):
  codes = _codes(batch=6)
  grid = np.asarray(tiny.decode_seamless(codes, rows=2, cols=3))
  assert grid.shape == (1, 16, 24, 3)
  tiles = codes.reshape(6, 4, 4)
  code_map = np.block([[tiles[0], tiles[1], tiles[2]], [tiles[3], tiles[4], tiles[5]]])[None]
  # the joined 8x12 map decoded directly (also shows non-square maps decode)
  expected = _decode_code_map(tiny.module, tiny.params, jnp.asarray(code_map, jnp.int32))
  np.testing.assert_array_equal(grid, np.asarray(expected))
  # tiles are decoded jointly: the top-left tile is not the image decoded on its own
  assert not np.allclose(grid[0, :8, :8], np.asarray(tiny.decode_code(codes[:1]))[0], atol=1e-4)


def test_seamless_one_by_one_equals_decode_code(tiny):
  codes = _codes(batch=1)
  np.testing.assert_array_equal(np.asarray(tiny.decode_seamless(codes, 1, 1)),
                                np.asarray(tiny.decode_code(codes)))


def test_seamless_errors(tiny):
  with pytest.raises(ValueError, match=r"rows\*cols = 4 code maps, got 3"):
    tiny.decode_seamless(_codes(batch=3), 2, 2)
  with pytest.raises(ValueError, match="rows must be a positive int"):
    tiny.decode_seamless(_codes(batch=1), 0, 1)
  with pytest.raises(ValueError, match="outside the codebook"):
    tiny.decode_seamless(np.full((1, 16), 99), 1, 1)


# --- image helpers ------------------------------------------------------------------------
def test_to_uint8_floors_like_the_original():
  values = np.array([-0.5, 0.0, 0.5, 0.999, 1.0, 1.7, 0.0039, 0.004], np.float32)
  np.testing.assert_array_equal(to_uint8(values), [0, 0, 127, 254, 255, 255, 0, 1])
  np.testing.assert_array_equal(to_uint8(jnp.asarray(values)), to_uint8(values))
  with pytest.raises(TypeError, match="float images"):
    to_uint8(np.zeros(3, np.uint8))
  with pytest.raises(ValueError, match="NaN"):
    to_uint8(np.array([np.nan], np.float32))


def test_to_pil():
  images = np.random.RandomState(0).uniform(-0.2, 1.2, (2, 5, 7, 3)).astype(np.float32)
  pils = to_pil(images)
  assert len(pils) == 2 and pils[0].size == (7, 5) and pils[0].mode == "RGB"
  np.testing.assert_array_equal(np.asarray(pils[1]), to_uint8(images[1]))
  assert len(to_pil(images[0])) == 1
  assert to_pil(np.zeros((1, 4, 4, 1), np.float32))[0].mode == "L"
  with pytest.raises(ValueError, match="channels must be last"):
    to_pil(np.zeros((1, 3, 4, 4), np.float32))


def test_from_pil_resizes_short_side_and_center_crops(tmp_path):
  rng = np.random.RandomState(0)
  wide = Image.fromarray(rng.randint(0, 256, (200, 300, 3), np.uint8))  # 300 wide, 200 high
  tall = Image.fromarray(rng.randint(0, 256, (90, 40, 3), np.uint8)).convert("RGBA")
  batch = from_pil([wide, tall], size=32)
  assert batch.shape == (2, 32, 32, 3) and batch.dtype == np.float32
  assert 0.0 <= batch.min() and batch.max() <= 1.0
  expected = wide.resize((48, 32), Image.Resampling.LANCZOS).crop((8, 0, 40, 32))
  np.testing.assert_allclose(batch[0], np.asarray(expected) / 255.0, atol=1e-7)
  # 40x90 -> 32x72 (int(32 * 90 / 40)); crop rows 20..52
  expected = tall.convert("RGB").resize((32, 72), Image.Resampling.LANCZOS).crop((0, 20, 32, 52))
  np.testing.assert_allclose(batch[1], np.asarray(expected) / 255.0, atol=1e-7)
  path = tmp_path / "red.png"
  Image.new("RGB", (64, 40), (255, 0, 0)).save(path)
  np.testing.assert_allclose(from_pil(path, size=16)[0], np.broadcast_to([1.0, 0.0, 0.0], (16, 16, 3)))
  with pytest.raises(TypeError, match="PIL image or a file path"):
    from_pil([np.zeros((4, 4, 3))])


def test_make_image_grid():
  colors = [(10 * k, 0, 255 - 10 * k) for k in range(6)]
  images = [Image.new("RGB", (4, 3), c) for c in colors]
  grid = make_image_grid(images, rows=2, cols=3)
  assert grid.size == (12, 6)
  for k, color in enumerate(colors):
    assert grid.getpixel(((k % 3) * 4 + 1, (k // 3) * 3 + 1)) == color
  assert make_image_grid(np.zeros((4, 3, 3, 3), np.float32), 2, 2).size == (6, 6)
  with pytest.raises(ValueError, match=r"rows\*cols = 4 images, got 6"):
    make_image_grid(images, 2, 2)
  with pytest.raises(ValueError, match="same size"):
    make_image_grid([Image.new("RGB", (4, 3)), Image.new("RGB", (3, 3))], 1, 2)


# --- save / load / Hub --------------------------------------------------------------------
def _assert_same_params(a, b):
  fa, fb = flatten_params(a), flatten_params(b)
  assert sorted(fa) == sorted(fb)
  for key in fa:
    assert fa[key].dtype == fb[key].dtype, key
    np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]), err_msg=key)


def test_save_load_bit_exact(tmp_path, tiny):
  tiny.save_pretrained(tmp_path)
  assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["FlaxVQGANModel"]
  loaded = FlaxVQGANModel.from_pretrained(tmp_path)
  drop = ("architectures", "_name_or_path")
  assert ({k: v for k, v in loaded.config.to_dict().items() if k not in drop}
          == {k: v for k, v in tiny.config.to_dict().items() if k not in drop})
  _assert_same_params(loaded.params, tiny.params)
  codes = _codes()
  np.testing.assert_array_equal(np.asarray(loaded.decode_code(codes)), np.asarray(tiny.decode_code(codes)))


def test_legacy_msgpack_checkpoint_loads_and_resaves(tmp_path, tiny):
  legacy = tmp_path / "legacy"  # what vqgan-jax's save_pretrained wrote: no model_type, msgpack
  legacy.mkdir()
  config = {k: v for k, v in tiny.config.to_dict().items() if k != "model_type"}
  config.update(architectures=["del"], num_resolutions=2, transformers_version="4.25.1")
  (legacy / "config.json").write_text(json.dumps(config))
  numpy_params = jax.tree.map(np.asarray, tiny.params)
  (legacy / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(numpy_params))
  loaded = FlaxVQGANModel.from_pretrained(legacy)
  _assert_same_params(loaded.params, tiny.params)
  loaded.save_pretrained(tmp_path / "ours")
  assert (tmp_path / "ours" / "model.safetensors").exists()
  _assert_same_params(FlaxVQGANModel.from_pretrained(tmp_path / "ours").params, tiny.params)


def test_push_to_hub_and_pull(local_hub, tiny):
  tiny.push_to_hub("tester/tiny-vqgan")
  files = set(local_hub.api.list_repo_files("tester/tiny-vqgan"))
  assert {"config.json", "model.safetensors", "README.md"} <= files
  pulled = FlaxVQGANModel.from_pretrained("tester/tiny-vqgan")
  assert type(pulled.config) is VQGANConfig and pulled.config.n_embed == 16
  _assert_same_params(pulled.params, tiny.params)
