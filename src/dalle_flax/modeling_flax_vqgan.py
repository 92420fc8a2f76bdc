"""VQGAN image tokenizer (taming-transformers f16 layout) in Flax linen, and ``FlaxVQGANModel``.

Example::

  images = FlaxVQGANModel.from_pretrained(repo_or_folder).decode_code(codes)  # (b, 256) -> (b, 256, 256, 3)

The parameter tree is the one of ``vqgan-jax`` checkpoints (``encoder/down_0/block_0/norm1/scale``,
``quantize/embedding/embedding``, ``decoder/up_4/upsample/conv/kernel`` ...), so the released
``flax_model.msgpack`` loads with no renaming. Inside a resolution level every ResnetBlock is
followed by *its own* attention block (``block_j`` then ``attn_j``), as in taming-transformers and
vqgan-jax after its 2022-07-09 fix. Tensors are NHWC; pixels are in [0, 1] (dalle-mini's
convention); decoded images are returned unclipped (see ``image_utils.to_uint8``).
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .configuration_vqgan import GROUP_NORM_GROUPS, VQGANConfig
from .modeling_flax_utils import FlaxPreTrainedModel, flatten_params, unflatten_params

logger = logging.getLogger(__name__)

__all__ = ["FlaxVQGANModel", "VQGAN"]

Dtype = Any
_EPSILON = 1e-6  # GroupNorm epsilon of taming-transformers / vqgan-jax


def _conv(features: int, kernel: int, name: str, dtype: Dtype, param_dtype: Dtype,
          strides: int = 1, padding: Any = "SAME") -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 dtype=dtype, param_dtype=param_dtype, name=name)


def _group_norm(name: str, dtype: Dtype, param_dtype: Dtype, groups: int = GROUP_NORM_GROUPS) -> nn.GroupNorm:
  # flax computes the statistics in float32 whatever ``dtype`` is.
  return nn.GroupNorm(num_groups=groups, epsilon=_EPSILON, dtype=dtype,
                      param_dtype=param_dtype, name=name)


class ResnetBlock(nn.Module):
  """norm1 -> swish -> conv1 -> norm2 -> swish -> dropout -> conv2, plus a (1x1) shortcut."""

  out_channels: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_groups: int = GROUP_NORM_GROUPS

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    """(b, h, w, c_in) -> (b, h, w, out_channels)."""
    h = nn.swish(_group_norm("norm1", self.dtype, self.param_dtype, self.norm_groups)(x))
    h = _conv(self.out_channels, 3, "conv1", self.dtype, self.param_dtype)(h)
    h = nn.swish(_group_norm("norm2", self.dtype, self.param_dtype, self.norm_groups)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = _conv(self.out_channels, 3, "conv2", self.dtype, self.param_dtype)(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "nin_shortcut", self.dtype, self.param_dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all h*w positions (1x1 convs q, k, v, proj_out) + residual."""

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_groups: int = GROUP_NORM_GROUPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """(b, h, w, c) -> (b, h, w, c)."""
    b, height, width, c = x.shape
    h = _group_norm("norm", self.dtype, self.param_dtype, self.norm_groups)(x)
    q, k, v = (_conv(c, 1, name, self.dtype, self.param_dtype)(h).reshape(b, height * width, c)
               for name in ("q", "k", "v"))
    scores = jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5)  # (b, hw, hw)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, height, width, c)
    return x + _conv(c, 1, "proj_out", self.dtype, self.param_dtype)(h)


class Downsample(nn.Module):
  """Halves h and w: zero-pad bottom/right by 1, 3x3 stride-2 VALID conv (or 2x2 average pool)."""

  with_conv: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.with_conv:
      return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, "conv", self.dtype, self.param_dtype, strides=2,
                 padding="VALID")(x)


class Upsample(nn.Module):
  """Doubles h and w: nearest-neighbour repeat (== jax.image.resize "nearest"), then a 3x3 conv."""

  with_conv: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    if self.with_conv:
      x = _conv(c, 3, "conv", self.dtype, self.param_dtype)(x)
    return x


class Level(nn.Module):
  """One resolution level: ``block_j`` (+ ``attn_j`` right after it), then an optional resampler.

  The encoder's levels are ``down_i`` (resampler ``downsample``), the decoder's ``up_i``
  (resampler ``upsample``).
  """

  out_channels: int
  num_blocks: int
  with_attention: bool
  resample: str | None  # "downsample", "upsample" or None
  resamp_with_conv: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_groups: int = GROUP_NORM_GROUPS

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    normed = dict(kwargs, norm_groups=self.norm_groups)
    for j in range(self.num_blocks):
      x = ResnetBlock(self.out_channels, self.dropout, name=f"block_{j}", **normed)(x, deterministic)
      if self.with_attention:
        x = AttnBlock(name=f"attn_{j}", **normed)(x)
    if self.resample == "downsample":
      x = Downsample(self.resamp_with_conv, name="downsample", **kwargs)(x)
    elif self.resample == "upsample":
      x = Upsample(self.resamp_with_conv, name="upsample", **kwargs)(x)
    return x


class MidBlock(nn.Module):
  """block_1 -> attn_1 -> block_2 at the lowest resolution."""

  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_groups: int = GROUP_NORM_GROUPS

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype, norm_groups=self.norm_groups)
    channels = x.shape[-1]
    x = ResnetBlock(channels, self.dropout, name="block_1", **kwargs)(x, deterministic)
    x = AttnBlock(name="attn_1", **kwargs)(x)
    return ResnetBlock(channels, self.dropout, name="block_2", **kwargs)(x, deterministic)


class Encoder(nn.Module):
  """conv_in -> down_0 .. down_{n-1} -> mid -> norm_out -> swish -> conv_out."""

  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attention_levels: tuple[bool, ...]
  out_channels: int
  resamp_with_conv: bool = True
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_groups: int = GROUP_NORM_GROUPS

  @nn.compact
  def __call__(self, pixels: jax.Array, deterministic: bool = True) -> jax.Array:
    """(b, H, W, in_channels) -> (b, H/f, W/f, out_channels) with f = 2**(levels - 1)."""
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    normed = dict(kwargs, norm_groups=self.norm_groups)
    last = len(self.ch_mult) - 1
    h = _conv(self.ch, 3, "conv_in", **kwargs)(pixels)
    for i, mult in enumerate(self.ch_mult):
      h = Level(self.ch * mult, self.num_res_blocks, self.attention_levels[i],
                "downsample" if i != last else None, self.resamp_with_conv, self.dropout,
                name=f"down_{i}", **normed)(h, deterministic)
    h = MidBlock(self.dropout, name="mid", **normed)(h, deterministic)
    h = nn.swish(_group_norm("norm_out", groups=self.norm_groups, **kwargs)(h))
    return _conv(self.out_channels, 3, "conv_out", **kwargs)(h)


class Decoder(nn.Module):
  """conv_in -> mid -> up_{n-1} .. up_0 (lowest resolution first) -> norm_out -> swish -> conv_out."""

  ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attention_levels: tuple[bool, ...]
  out_channels: int
  resamp_with_conv: bool = True
  give_pre_end: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_groups: int = GROUP_NORM_GROUPS

  @nn.compact
  def __call__(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
    """(b, h, w, z_channels) -> (b, h*f, w*f, out_channels) with f = 2**(levels - 1)."""
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    normed = dict(kwargs, norm_groups=self.norm_groups)
    h = _conv(self.ch * self.ch_mult[-1], 3, "conv_in", **kwargs)(z)
    h = MidBlock(self.dropout, name="mid", **normed)(h, deterministic)
    # Levels are named by resolution index like taming's (reversed) ``up`` list: up_{n-1} runs first.
    for i in reversed(range(len(self.ch_mult))):
      h = Level(self.ch * self.ch_mult[i], self.num_res_blocks + 1, self.attention_levels[i],
                "upsample" if i != 0 else None, self.resamp_with_conv, self.dropout,
                name=f"up_{i}", **normed)(h, deterministic)
    if self.give_pre_end:
      return h
    h = nn.swish(_group_norm("norm_out", groups=self.norm_groups, **kwargs)(h))
    return _conv(self.out_channels, 3, "conv_out", **kwargs)(h)


class VectorQuantizer(nn.Module):
  """Nearest-codebook-entry quantizer; the codebook is ``embedding/embedding`` (n_embed, embed_dim)."""

  n_embed: int
  embed_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self) -> None:
    self.embedding = nn.Embed(self.n_embed, self.embed_dim, dtype=self.dtype,
                              param_dtype=self.param_dtype)

  def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(b, h, w, embed_dim) -> (quantized (b, h, w, embed_dim), codes (b, h*w) int32, row-major)."""
    b = z.shape[0]
    flat = z.reshape(-1, self.embed_dim).astype(jnp.float32)  # (b*h*w, d)
    codebook = self.embedding.embedding.astype(jnp.float32)  # (n_embed, d)
    # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e, in float32 at full matmul precision: the nearest entry
    # must not flip on accelerators whose default f32 matmul rounds to bf16/tf32.
    distances = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(codebook ** 2, axis=1)
                 - 2 * jnp.dot(flat, codebook.T, precision=jax.lax.Precision.HIGHEST))
    codes = jnp.argmin(distances, axis=1).astype(jnp.int32)  # first index on ties
    return self.embedding(codes).reshape(z.shape), codes.reshape(b, -1)

  def lookup(self, code_map: jax.Array) -> jax.Array:
    """(b, h, w) int codes -> (b, h, w, embed_dim) codebook vectors."""
    return self.embedding(code_map)


class VQGAN(nn.Module):
  """The whole VQGAN: encoder, quant_conv, quantize, post_quant_conv, decoder.

  Built from plain, hashable values (see ``FlaxVQGANModel.build_module``) so a module can be a
  static argument of ``jax.jit``.
  """

  ch: int
  out_ch: int
  ch_mult: tuple[int, ...]
  num_res_blocks: int
  attention_levels: tuple[bool, ...]  # per level: does it have attention blocks
  z_channels: int
  encoder_channels: int  # 2 * z_channels when double_z
  n_embed: int
  embed_dim: int
  dropout: float
  resamp_with_conv: bool
  give_pre_end: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  norm_groups: int = GROUP_NORM_GROUPS

  def setup(self) -> None:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    shared = dict(ch=self.ch, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                  attention_levels=self.attention_levels, resamp_with_conv=self.resamp_with_conv,
                  dropout=self.dropout, norm_groups=self.norm_groups, **kwargs)
    self.encoder = Encoder(out_channels=self.encoder_channels, **shared)
    self.quant_conv = _conv(self.embed_dim, 1, "quant_conv", **kwargs)
    self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, **kwargs)
    self.post_quant_conv = _conv(self.z_channels, 1, "post_quant_conv", **kwargs)
    self.decoder = Decoder(out_channels=self.out_ch, give_pre_end=self.give_pre_end, **shared)

  def encode_latents(self, pixels: jax.Array, deterministic: bool = True) -> jax.Array:
    """(b, H, W, c) pixels -> (b, H/f, W/f, embed_dim) latents before quantisation."""
    return self.quant_conv(self.encoder(pixels, deterministic))

  def encode(self, pixels: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """(b, H, W, c) pixels -> (quantized latents (b, h, w, embed_dim), codes (b, h*w) int32)."""
    return self.quantize(self.encode_latents(pixels, deterministic))

  def decode(self, latents: jax.Array, deterministic: bool = True) -> jax.Array:
    """(b, h, w, embed_dim) quantized latents -> (b, h*f, w*f, out_ch) images."""
    return self.decoder(self.post_quant_conv(latents), deterministic)

  def decode_code_map(self, code_map: jax.Array) -> jax.Array:
    """(b, h, w) int codes -> (b, h*f, w*f, out_ch) images; h and w may differ."""
    return self.decode(self.quantize.lookup(code_map))

  def __call__(self, pixels: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """(b, H, W, c) pixels -> (reconstruction (b, H, W, out_ch), codes (b, h*w))."""
    latents, codes = self.encode(pixels, deterministic)
    return self.decode(latents, deterministic), codes


# Jitted entry points: params are arguments (never closed over); jax.jit caches one executable per
# (module, input shape), and modules compare by value, so equal models share compilations.
@functools.partial(jax.jit, static_argnames=("module",))
def _encode(module: VQGAN, params: Any, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
  latents, codes = module.apply({"params": params}, pixels, method="encode")
  return latents.astype(jnp.float32), codes


@functools.partial(jax.jit, static_argnames=("module",))
def _decode_code_map(module: VQGAN, params: Any, code_map: jax.Array) -> jax.Array:
  return module.apply({"params": params}, code_map, method="decode_code_map").astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("module",))
def _reconstruct(module: VQGAN, params: Any, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
  images, codes = module.apply({"params": params}, pixels)
  return images.astype(jnp.float32), codes


def _random_params(abstract: Any, key: jax.Array) -> dict[str, Any]:
  """Random parameters with flax's default distributions for the shapes of ``abstract``.

  Conv kernels are lecun-normal (truncated normal, variance 1/fan_in), biases zero, GroupNorm
  scales one, the codebook N(0, 1/embed_dim): what ``module.init`` gives. They are drawn from
  two random calls instead of flax's one-per-parameter key folding, which made the jitted init
  of even a tiny VQGAN take ~15 s to compile on CPU (and the eager one longer).
  """
  flat = flatten_params(abstract)
  kernels = sorted(k for k in flat if k.endswith("/kernel"))
  sizes = [math.prod(flat[k].shape) for k in kernels]
  key_kernels, key_codebook = jax.random.split(key)
  # 0.8796... is the std of a standard normal truncated to [-2, 2] (as in jax's variance_scaling).
  draws = jax.random.truncated_normal(key_kernels, -2.0, 2.0, (sum(sizes),), jnp.float32)
  draws = draws / 0.87962566103423978
  params: dict[str, Any] = {}
  for name, start, size in zip(kernels, np.cumsum([0] + sizes[:-1]), sizes):
    shape = flat[name].shape
    params[name] = draws[start:start + size].reshape(shape) * (1.0 / math.prod(shape[:-1])) ** 0.5
  for name, leaf in flat.items():
    leaf_name = name.rsplit("/", 1)[-1]
    if leaf_name == "embedding":
      params[name] = jax.random.normal(key_codebook, leaf.shape, jnp.float32) * leaf.shape[1] ** -0.5
    elif leaf_name in ("bias", "scale"):
      params[name] = (jnp.zeros if leaf_name == "bias" else jnp.ones)(leaf.shape, jnp.float32)
    else:
      assert leaf_name == "kernel", f"no initialiser for parameter {name}"
  return unflatten_params({name: value.astype(flat[name].dtype) for name, value in params.items()})


def _check_pixels(pixels: Any, config: VQGANConfig) -> jax.Array:
  """Validates an image batch and returns it as a float32 jax array.

  Shape and dtype are always checked; the value range only for concrete pixels (a tracer,
  under ``jax.jit`` or ``jax.pmap``, has no values to check).
  """
  if not hasattr(pixels, "dtype"):
    pixels = np.asarray(pixels)
  if pixels.ndim != 4:
    hint = "; add a batch axis with pixels[None]" if pixels.ndim == 3 else ""
    raise ValueError(
        f"pixels must have shape (batch, height, width, {config.in_channels}), got shape "
        f"{tuple(pixels.shape)}{hint}"
    )
  if pixels.shape[-1] != config.in_channels:
    raise ValueError(
        f"pixels must be NHWC with {config.in_channels} channels last, got shape "
        f"{tuple(pixels.shape)}; transpose NCHW input with pixels.transpose(0, 2, 3, 1)"
    )
  factor = config.downsample_factor
  if pixels.shape[1] % factor or pixels.shape[2] % factor:
    raise ValueError(
        f"height and width must be multiples of {factor} (the VQGAN downsampling factor), got "
        f"{pixels.shape[1]}x{pixels.shape[2]}; resize or crop, e.g. with image_utils.from_pil"
    )
  if not jnp.issubdtype(pixels.dtype, jnp.floating):
    raise TypeError(
        f"pixels must be floats in [0, 1], got dtype {pixels.dtype}; for uint8 images use "
        "image_utils.from_pil(...) or pixels.astype('float32') / 255"
    )
  if isinstance(pixels, jax.core.Tracer):  # inside jax.jit / pmap: values unknown, checked eagerly only
    return pixels.astype(jnp.float32)
  xp = jnp if isinstance(pixels, jax.Array) else np
  low, high = float(xp.min(pixels)), float(xp.max(pixels))
  if not (math.isfinite(low) and math.isfinite(high)):
    raise ValueError("pixels contain NaN or infinite values")
  # [0, 1] is dalle-mini's convention; [-1, 1] (taming's) is tolerated. Larger values are almost
  # always 0-255 intensities that were not rescaled.
  if high > 1.0 + 1e-3 or low < -1.0 - 1e-3:
    raise ValueError(
        f"pixels must lie in [0, 1] ([-1, 1] is tolerated), got values in [{low:.4g}, {high:.4g}]; "
        "divide 0-255 intensities by 255 (image_utils.from_pil does this)"
    )
  return jnp.asarray(pixels, jnp.float32)


def _check_codes(codes: Any, n_embed: int) -> np.ndarray | jax.Array:
  """Validates (batch, num_codes) image codes; returns them as int32 (numpy when concrete).

  Shape and dtype are always checked. The range is checked only for concrete codes: under
  ``jax.jit`` or ``jax.pmap`` the codes are tracers with no values on the host, so a traced
  code >= n_embed decodes to NaN pixels and a negative one wraps around (``jnp.take``).
  """
  if not hasattr(codes, "dtype"):
    codes = np.asarray(codes)
  if codes.ndim != 2:
    hint = "; add a batch axis with codes[None]" if codes.ndim == 1 else ""
    raise ValueError(f"codes must have shape (batch, num_codes), got shape {codes.shape}{hint}")
  if not np.issubdtype(codes.dtype, np.integer):  # bool is not an integer dtype here
    raise TypeError(
        f"codes must be integer VQGAN code indices, got dtype {codes.dtype}; cast with "
        "codes.astype('int32') if the values are whole numbers"
    )
  if isinstance(codes, jax.core.Tracer):
    return codes.astype(jnp.int32)
  codes = np.asarray(codes)
  bad = (codes < 0) | (codes >= n_embed)
  if bad.any():
    b, p = (int(i) for i in np.argwhere(bad)[0])
    value = int(codes[b, p])
    fix = ("drop the start token (sequences[:, 1:])" if value == n_embed and p == 0
           else f"codes must come from a model whose image vocabulary is this VQGAN's n_embed={n_embed}")
    raise ValueError(
        f"code {value} at index ({b}, {p}) is outside the codebook [0, {n_embed}) "
        f"({int(bad.sum())} codes out of range in all); {fix}"
    )
  return codes.astype(np.int32)


def _side(num_codes: int) -> int:
  """Side of the square code map holding ``num_codes`` codes, or a clear error."""
  side = math.isqrt(num_codes)
  if side * side != num_codes or num_codes == 0:
    hint = ""
    if num_codes > 1 and math.isqrt(num_codes - 1) ** 2 == num_codes - 1:
      hint = f"; it is one more than {num_codes - 1}: drop the start token (sequences[:, 1:])"
    raise ValueError(
        f"codes has {num_codes} codes per image, which is not a square number, so they cannot form "
        f"a square code map (256 = 16x16 for 256x256 images){hint}"
    )
  return side


class FlaxVQGANModel(FlaxPreTrainedModel):
  """VQGAN image tokenizer: ``encode`` images to codes, ``decode_code`` codes to images.

  Every method accepts ``params=`` to run with parameters other than ``self.params``. The
  computations are jitted once per input shape; ``dtype`` sets the compute dtype (the codebook
  distances and attention softmax stay in float32) and outputs are float32. The methods also
  run inside ``jax.jit`` / ``jax.pmap`` (e.g. ``jax.pmap(lambda c, p: vqgan.decode_code(c,
  params=p))`` with replicated params); the value checks (code range, pixel range) then only
  run on concrete inputs, so check traced inputs before tracing.

  Example::

    vqgan = FlaxVQGANModel.from_pretrained("dalle-mini/vqgan_imagenet_f16_16384")
    images = vqgan.decode_code(sequences[:, 1:])  # (b, 256, 256, 3), about [0, 1]
    pil_images = to_pil(images)
  """

  config_class = VQGANConfig
  model_card_template = "vqgan.md"
  main_input_name = "pixel_values"

  def build_module(self) -> VQGAN:
    config = self.config
    return VQGAN(
        ch=config.ch,
        out_ch=config.out_ch,
        ch_mult=tuple(config.ch_mult),
        num_res_blocks=config.num_res_blocks,
        attention_levels=tuple(config.resolution // 2**i in config.attn_resolutions
                               for i in range(config.num_resolutions)),
        z_channels=config.z_channels,
        encoder_channels=2 * config.z_channels if config.double_z else config.z_channels,
        n_embed=config.n_embed,
        embed_dim=config.embed_dim,
        dropout=float(config.dropout),
        resamp_with_conv=config.resamp_with_conv,
        give_pre_end=config.give_pre_end,
        norm_groups=config.norm_num_groups,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
    )

  def init_weights(self, key: jax.Array) -> dict[str, Any]:
    # Parameter shapes do not depend on the image size (attention placement comes from the
    # config), so trace on the smallest image: one latent position. Only the shapes are taken
    # from flax's init; see _random_params for why the values are drawn separately.
    side = self.config.downsample_factor
    pixels = jax.ShapeDtypeStruct((1, side, side, self.config.in_channels), jnp.float32)
    abstract = jax.eval_shape(
        lambda x: self.module.init({"params": jax.random.key(0)}, x)["params"], pixels)
    return _random_params(abstract, key)

  def encode(self, pixels: Any, params: Any = None) -> tuple[jax.Array, jax.Array]:
    """Encodes images to quantized latents and codes.

    Args:
      pixels: (b, H, W, in_channels) floats in [0, 1] (dalle-mini's convention); H and W
        multiples of ``config.downsample_factor`` (16).
      params: parameters to use instead of ``self.params``.

    Returns:
      latents: (b, H/16, W/16, embed_dim) float32 codebook vectors.
      codes: (b, H/16 * W/16) int32, row-major over the code map.
    """
    pixels = _check_pixels(pixels, self.config)
    return _encode(self.module, self._require_params(params), pixels)

  def decode_code(self, codes: Any, params: Any = None) -> jax.Array:
    """Decodes image codes to images.

    Args:
      codes: (b, n) integer codes in [0, n_embed), n a square (256 -> a 16x16 map, row-major).
        Generated sequences start with a start token: pass ``sequences[:, 1:]``.
      params: parameters to use instead of ``self.params``.

    Returns:
      (b, 16*sqrt(n), 16*sqrt(n), out_ch) float32 images, about [0, 1] and NOT clipped.
    """
    codes = _check_codes(codes, self.config.n_embed)
    side = _side(codes.shape[1])
    return _decode_code_map(self.module, self._require_params(params),
                            codes.reshape(codes.shape[0], side, side))

  def decode_seamless(self, codes: Any, rows: int, cols: int, params: Any = None) -> jax.Array:
    """Decodes a rows x cols grid of code maps as ONE joined map, so tile borders blend.

    This is min-dalle's seamless mode: the code maps are tiled in token space and decoded once,
    instead of decoding each image and pasting them together.

    Args:
      codes: (rows*cols, n) integer codes; image k sits at grid row k // cols, column k % cols.
      rows, cols: grid size.
      params: parameters to use instead of ``self.params``.

    Returns:
      (1, rows*16*sqrt(n), cols*16*sqrt(n), out_ch) float32 image, unclipped.
    """
    for name, value in (("rows", rows), ("cols", cols)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    codes = _check_codes(codes, self.config.n_embed)
    if codes.shape[0] != rows * cols:
      raise ValueError(
          f"a {rows}x{cols} grid needs rows*cols = {rows * cols} code maps, got {codes.shape[0]}"
      )
    side = _side(codes.shape[1])
    code_map = (codes.reshape(rows, cols, side, side).transpose(0, 2, 1, 3)
                .reshape(1, rows * side, cols * side))
    return _decode_code_map(self.module, self._require_params(params), code_map)

  def __call__(self, pixels: Any, params: Any = None) -> tuple[jax.Array, jax.Array]:
    """Encodes and decodes: (b, H, W, c) in [0, 1] -> (reconstruction (b, H, W, out_ch), codes)."""
    pixels = _check_pixels(pixels, self.config)
    return _reconstruct(self.module, self._require_params(params), pixels)
